"""Container images for tests and benchmarks, built offline from files on this machine.

- ``layer()``: a tar layer from ``Entry`` records (every OCI semantic and every hostile case
  the tests need: whiteouts, opaque directories, hard links, devices, xattrs, ``..`` names);
- ``write_layout()``: an OCI image layout of such layers (gzip, zstd or none), written by hand
  so tests can also make it wrong (a bad digest, another architecture);
- ``busybox_image()``: a small static image in several layers (busybox-static's binary);
- ``umoci_image()``: an image made with umoci itself, every OCI semantic in it;
- ``debian_python_image()``: a Debian root with python3, from Debian's packages unpacked with
  ``dpkg-deb -x`` (no maintainer scripts run; passwd and group from base-passwd), in two layers;
- ``Registry``: Debian's docker-registry on 127.0.0.1 in a temp dir, with its access log, and
  ``push()`` (skopeo) into it.

Images are content-addressed in a cache directory and built once: the same inputs give the
same bytes (fixed mtimes, sorted entries, gzip without timestamps), so the same image id.
"""
import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import socket
import stat
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .._proc import run

MTIME = 1_700_000_000
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_TYPES = {None: "application/vnd.oci.image.layer.v1.tar",
               "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
               "zstd": "application/vnd.oci.image.layer.v1.tar+zstd"}


@dataclass
class Entry:
    """One tar entry. ``kind``: file, dir, symlink, hardlink, char, block, fifo."""

    name: str
    kind: str = "file"
    data: bytes = b""
    mode: int = None
    uid: int = 0
    gid: int = 0
    target: str = ""      # symlink or hard link target
    dev: tuple = (0, 0)
    xattrs: dict = field(default_factory=dict)  # name -> bytes
    size: int = None      # a size to claim instead of len(data) (with data=b"": sparse zeros)


_TYPES = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
          "hardlink": tarfile.LNKTYPE, "char": tarfile.CHRTYPE, "block": tarfile.BLKTYPE,
          "fifo": tarfile.FIFOTYPE}


class _Zeros(io.RawIOBase):
    def __init__(self, size):
        self.left = size

    def readable(self):
        return True

    def readinto(self, buffer):
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def layer(entries):
    """The bytes of an uncompressed PAX tar holding ``entries`` in order."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            info = tarfile.TarInfo(e.name)
            info.type = _TYPES[e.kind]
            info.mode = e.mode if e.mode is not None else (0o755 if e.kind == "dir" else 0o644)
            info.uid, info.gid, info.mtime = e.uid, e.gid, MTIME
            info.linkname = e.target
            info.devmajor, info.devminor = e.dev
            info.pax_headers = {f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape")
                                for k, v in e.xattrs.items()}
            if e.kind == "file":
                info.size = len(e.data) if e.size is None else e.size
                source = io.BytesIO(e.data) if e.size is None else _Zeros(e.size)
                tar.addfile(info, source)
            else:
                tar.addfile(info)
    return out.getvalue()


def tree_layer(root):
    """The bytes of an uncompressed tar of directory ``root`` (numeric owners, hard links,
    symlinks, sorted, mtimes fixed)."""
    out = io.BytesIO()

    def fix(info):
        info.mtime = MTIME
        info.uname = info.gname = ""
        return info

    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(os.listdir(root)):
            tar.add(os.path.join(root, name), arcname=name, filter=fix)
    return out.getvalue()


def compress(data, compression):
    if compression is None:
        return data
    if compression == "gzip":
        return gzip.compress(data, mtime=0)
    import zstandard

    return zstandard.ZstdCompressor().compress(data)


def _blob(directory, data):
    digest = hashlib.sha256(data).hexdigest()
    path = Path(directory) / "blobs" / "sha256" / digest
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {"digest": "sha256:" + digest, "size": len(data)}


def write_layout(directory, layers, run_config=None, tag="latest", compression="gzip", architecture="amd64",
                 diff_ids=None, ref_name=None):
    """An OCI image layout at ``directory`` (created or added to) holding one image of
    ``layers`` (uncompressed tar bytes each). ``diff_ids`` overrides the config's (to make it
    wrong); ``ref_name`` the index annotation (default ``tag``). Returns the config digest."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    descriptors = []
    for data in layers:
        blob = compress(data, compression)
        descriptors.append({"mediaType": LAYER_TYPES[compression], **_blob(directory, blob)})
    config = {
        "created": "2023-11-14T22:13:20Z", "architecture": architecture, "os": "linux",
        "config": run_config or {},
        "rootfs": {"type": "layers",
                   "diff_ids": diff_ids or ["sha256:" + hashlib.sha256(d).hexdigest() for d in layers]},
        "history": [{"created_by": "vmiso.testing.oci"} for _ in layers],
    }
    config_blob = {"mediaType": OCI_CONFIG, **_blob(directory, json.dumps(config, sort_keys=True).encode())}
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config_blob, "layers": descriptors}
    manifest_blob = _blob(directory, json.dumps(manifest, sort_keys=True).encode())
    index_path = directory / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {"schemaVersion": 2, "manifests": []}
    name = ref_name or tag
    index["manifests"] = [m for m in index["manifests"]
                          if m.get("annotations", {}).get("org.opencontainers.image.ref.name") != name]
    index["manifests"].append({"mediaType": OCI_MANIFEST, **manifest_blob,
                               "annotations": {"org.opencontainers.image.ref.name": name}})
    index_path.write_text(json.dumps(index))
    return config_blob["digest"]


def _cached(cache, key, build):
    """``cache/key``, made by ``build(tmp)`` once (atomically: a rename into place)."""
    final = Path(cache) / key
    if final.is_dir():
        return final
    Path(cache).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cache))
    try:
        build(tmp)
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


BUSYBOX = "/bin/busybox"


def busybox_image(cache, stop_signal=None):
    """An OCI layout (tag ``1``) of busybox-static in three layers: the binary and its applet
    links; /etc; then a deletion and a change. Entrypoint none, Cmd ``sh``; ``stop_signal``: its
    config's StopSignal (none by default). Its path."""
    variant = "" if stop_signal is None else f":{stop_signal}"
    key = "busybox-" + hashlib.sha256(f"1:{_sha(BUSYBOX)}{variant}".encode()).hexdigest()[:16]

    def build(out):
        binary = Path(BUSYBOX).read_bytes()
        applets = ["sh", "ls", "cat", "echo", "id", "true", "false", "env", "pwd", "sleep"]
        first = [Entry("bin", "dir"), Entry("bin/busybox", data=binary, mode=0o755)]
        first += [Entry(f"bin/{a}", "symlink", target="busybox") for a in applets]
        second = [Entry("etc", "dir"), Entry("etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\n"
                                                                 b"app:x:1000:1000:app:/home/app:/bin/sh\n"),
                  Entry("etc/group", data=b"root:x:0:\napp:x:1000:\n"), Entry("etc/motd", data=b"old\n"),
                  Entry("home", "dir"), Entry("home/app", "dir", mode=0o750, uid=1000, gid=1000),
                  Entry("tmp", "dir", mode=0o1777)]
        third = [Entry("etc/.wh.motd", data=b""), Entry("etc/hostname", data=b"busybox\n")]
        run_config = {"Cmd": ["sh"], "Env": ["PATH=/bin", "IMAGE=busybox"], "WorkingDir": "/home/app"}
        if stop_signal is not None:
            run_config["StopSignal"] = stop_signal
        write_layout(out, [layer(first), layer(second), layer(third)], tag="1", run_config=run_config)

    return _cached(cache, key, build)


# -- a Debian root with python3 ------------------------------------------------------------------

DEBIAN_PACKAGES = ("python3", "dash", "coreutils", "base-passwd", "base-files")
DEPENDS_OPTIONS = ("--recurse", "--no-recommends", "--no-suggests", "--no-conflicts", "--no-breaks",
                   "--no-replaces", "--no-enhances")


def _closure(packages):
    text = run(["apt-cache", "depends", *DEPENDS_OPTIONS, *packages], timeout=120).stdout
    return sorted({line.strip() for line in text.splitlines() if line and not line.startswith((" ", "<"))})


def debian_python_image(cache, progress=print):
    """An OCI layout (tag ``12``) of a Debian 12 root with python3, dash and coreutils (one
    layer) and an application layer (/app/job.py, an ``app`` user, Env, WorkingDir /app), in
    ``cache``; its path. Packages come from the host cache (paths.HostCache)."""
    from ..image import debs
    from ..paths import HostCache

    packages = HostCache().ensure().debs
    names = _closure(DEBIAN_PACKAGES)
    records = debs.apt_records(names)
    key = "debian-python-" + hashlib.sha256(
        json.dumps(["1", sorted((n, r.get("SHA256")) for n, r in records.items())]).encode()).hexdigest()[:16]

    def build(out):
        root = out / "root"
        root.mkdir()
        for name in names:
            deb, _ = debs.fetch(records[name], packages, progress)
            run(["dpkg-deb", "-x", deb, root], timeout=300)
        app = out / "app"
        (app / "etc").mkdir(parents=True)
        master = root / "usr" / "share" / "base-passwd"
        (app / "etc" / "passwd").write_text((master / "passwd.master").read_text()
                                            + "app:x:1000:1000:app:/home/app:/bin/sh\n")
        (app / "etc" / "group").write_text((master / "group.master").read_text() + "app:x:1000:\n")
        (app / "home" / "app").mkdir(parents=True)
        os.chown(app / "home" / "app", 1000, 1000)
        (app / "app").mkdir()
        (app / "app" / "job.py").write_text("import os, sys\nprint(sys.version_info[:2], os.getcwd(), "
                                            "os.environ.get('APP_MODE'))\n")
        (app / "tmp").mkdir(mode=0o1777)
        os.chmod(app / "tmp", 0o1777)
        image = out / "image"
        write_layout(image, [tree_layer(root), tree_layer(app)], tag="12", run_config={
            "Cmd": ["python3", "/app/job.py"], "WorkingDir": "/app",
            "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "APP_MODE=test", "PYTHONDONTWRITEBYTECODE=1"]})
        shutil.rmtree(root)
        shutil.rmtree(app)

    return _cached(cache, key, build) / "image"


# -- a registry ----------------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Registry:
    """Debian's docker-registry (the CNCF distribution registry) serving ``127.0.0.1:PORT`` from
    a temp dir; ``log`` is its output, access log included. Use as a context manager."""

    def __init__(self, directory):
        self.directory = Path(directory)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log = self.directory / "registry.log"
        self.process = None

    def __enter__(self):
        config = self.directory / "config.yml"
        config.write_text(f"version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n"
                          f"storage:\n  filesystem:\n    rootdirectory: {self.directory / 'data'}\n"
                          f"http:\n  addr: {self.address}\n")
        log = open(self.log, "wb")
        # A daemon for the life of the fixture: _proc.run is for commands that end.
        self.process = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=log, stderr=log,
                                        stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"docker-registry exited {self.process.returncode}: {self.log.read_text()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return self
            time.sleep(0.05)
        self.__exit__()
        raise RuntimeError(f"docker-registry did not listen on {self.address} within 30 s")

    def __exit__(self, *exc):
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def push(self, layout, tag, name):
        """Copy the layout's image ``tag`` to ``name`` (repo:tag) in this registry."""
        run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:{tag}",
             f"docker://{self.address}/{name}"], timeout=600)
        return f"{self.address}/{name}"

    def blob_gets(self, repo=None):
        """The blob digests served so far (GET requests in the access log), in order."""
        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            if '"GET /v2/' in line and "/blobs/sha256:" in line and '" 200 ' in line:
                path = line.split('"GET ', 1)[1].split(" ", 1)[0]
                if repo is None or path.startswith(f"/v2/{repo}/blobs/"):
                    found.append(path.rsplit("/", 1)[1])
        return found


# -- comparing trees -----------------------------------------------------------------------------

def snapshot(root):
    """What a root tree holds, to compare trees made different ways: {path: (type, mode
    with setuid/setgid/sticky, uid, gid, detail, xattrs, hard-link group)}; detail is a file's
    sha256, a symlink's target or a device's (major, minor); the group is the first path (sorted)
    of the names sharing the inode, None for a single name."""
    root = os.fspath(root)
    found, inodes = {}, {}
    for top, dirs, names in os.walk(root):
        dirs.sort()
        for name in sorted(dirs + names) + ([""] if top == root else []):
            path = os.path.join(top, name) if name else top
            rel = "/" + os.path.relpath(path, root) if name else "/"
            rel = "/" if rel == "/." else rel
            st = os.lstat(path)
            kind = stat.S_IFMT(st.st_mode)
            if stat.S_ISREG(kind):
                detail = _sha(path)
            elif stat.S_ISLNK(kind):
                detail = os.readlink(path)
            elif stat.S_ISCHR(kind) or stat.S_ISBLK(kind):
                detail = (os.major(st.st_rdev), os.minor(st.st_rdev))
            else:
                detail = None
            xattrs = {k: os.getxattr(path, k, follow_symlinks=False)
                      for k in os.listxattr(path, follow_symlinks=False)}
            found[rel] = [kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, detail, xattrs]
            if not stat.S_ISDIR(kind):
                inodes.setdefault(st.st_ino, []).append(rel)
    for paths in inodes.values():
        group = min(paths) if len(paths) > 1 else None
        for p in paths:
            found[p].append(group)
    for p, value in found.items():
        if len(value) == 6:
            value.append(None)
        found[p] = tuple(value)
    return found


@contextlib.contextmanager
def mounted(image, scratch):
    """The ext4 file system in the raw image ``image``, loop-mounted read-only at
    ``scratch/mnt``."""
    mountpoint = Path(scratch) / "mnt"
    mountpoint.mkdir()
    run(["mount", "-o", "loop,ro", image, mountpoint], timeout=60)
    try:
        yield mountpoint
    finally:
        run(["umount", mountpoint], timeout=60)
        mountpoint.rmdir()


def umoci_image(image):
    """An OCI layout at ``image`` (tag ``t``) made with umoci: layers added verbatim with an opaque
    directory, hard links across layers, setuid and setgid files, a symlink chain, a device node
    and deletions, then one made by umoci's own repack (a deletion, a changed mode of a
    hard-linked file, a new hard-link pair). Its path."""
    image = Path(image)
    scratch = Path(tempfile.mkdtemp(prefix="umoci-", dir=image.parent))
    bundle = scratch / "bundle"
    try:
        run(["umoci", "init", "--layout", image])
        run(["umoci", "new", "--image", f"{image}:t"])
        with open(BUSYBOX, "rb") as f:
            busybox = f.read()
        crafted = [
            [Entry("bin", "dir"), Entry("bin/busybox", data=busybox, mode=0o755),
             Entry("bin/sh", "symlink", target="busybox"), Entry("usr/bin/passwd", data=b"pw", mode=0o4755),
             Entry("usr/bin/wall", data=b"w", mode=0o2755, gid=5), Entry("srv/data", "dir", uid=1000, gid=1000),
             Entry("srv/data/a", data=b"a"), Entry("srv/data/b", data=b"b"), Entry("tmp", "dir", mode=0o1777),
             Entry("dev/null", "char", dev=(1, 3), mode=0o666), Entry("etc", "dir"), Entry("etc/doomed", data=b"d"),
             Entry("etc/target", data=b"t" * 1000)],
            [Entry("srv/data/.wh..wh..opq"), Entry("srv/data/c", data=b"c", uid=1000),
             Entry("usr/lib/link-to-target", "hardlink", target="etc/target"),
             Entry("s1", "symlink", target="s2"), Entry("s2", "symlink", target="s3"),
             Entry("s3", "symlink", target="/usr/bin/passwd"), Entry("etc/.wh.doomed")],
        ]
        for number, entries in enumerate(crafted):
            tar = scratch / f"layer{number}.tar"
            tar.write_bytes(layer(entries))
            run(["umoci", "raw", "add-layer", "--image", f"{image}:t", tar])
        # a layer made by umoci itself: a deletion, a changed mode of a hard-linked file, a new hard link pair
        run(["umoci", "unpack", "--image", f"{image}:t", bundle])
        rootfs = bundle / "rootfs"
        os.unlink(rootfs / "srv" / "data" / "c")
        (rootfs / "srv" / "data" / "d").write_bytes(b"d")
        os.chmod(rootfs / "etc" / "target", 0o600)  # both names of the hard link change
        (rootfs / "opt").mkdir()
        (rootfs / "opt" / "x").write_bytes(b"x")
        os.link(rootfs / "opt" / "x", rootfs / "opt" / "y")
        run(["umoci", "repack", "--image", f"{image}:t", bundle])
        run(["umoci", "config", "--image", f"{image}:t", "--config.cmd", "/bin/sh"])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return image
