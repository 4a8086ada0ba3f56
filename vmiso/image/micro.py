"""The embedded default guest, *micro*: Debian's cloud kernel, a tiny initramfs and an ext4 root
of static busybox whose /sbin/init runs the task contract (DESIGN.md, "Guest contract").

Built from two Debian packages fetched with ``apt-get download`` (the kernel behind
``linux-image-cloud-amd64`` and ``busybox-static``) without mounting anything: the initramfs is a
newc cpio written here, the root is ``mke2fs -d`` of a directory converted to qcow2. The build is
content-addressed: key = sha256 over both .deb files, the guest scripts and the recipe, so it
reruns only when one of them changes. Layout under the work directory::

  cache/debs/*.deb                 downloaded packages (kept; verified against apt's SHA256)
  images/micro/<key>/              vmlinux, initrd.img, root.qcow2, manifest.json (all 0444)
  images/micro/.build-*            a build in progress (renamed into place when complete)

The kernel is the bzImage's payload unpacked (an ELF with a PVH entry, booted directly by QEMU);
where the payload's decompressor (``lz4`` for Debian 12) is missing it is the bzImage, vmlinuz.
  images/micro/current             the current key (text)

QEMU runs as another user (libvirt-qemu) and reads kernel, initrd and base directly, so
everything from ``images/`` down is world-readable/traversable; the work directory itself only
needs o+x.
"""
import hashlib
import json
import lzma
import os
import shutil
import stat
import tempfile
import time
import uuid
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .._proc import run
from ..errors import CommandFailed, HostError, ImageError

BUILDER_VERSION = "1"
KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
APT_LISTS = "/var/lib/apt/lists"
# Load order for busybox insmod (no modprobe, no modules.dep): each after its dependencies.
# ext4, jbd2, crc16, mbcache are built into Debian's cloud kernel, so they are not listed.
MODULES = (
    "virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci",
    "virtio_blk", "failover", "net_failover", "virtio_net", "virtio_console", "cdrom", "isofs",
    "virtio_balloon",  # lets Isolator.update() change guest memory live
)
ROOT_SIZE = 1 << 30  # virtual; the qcow2 holds only what is written
# With a journal: it boots no slower than without (measured, TCG) and keeps an overlay that is
# booted again after a killed VM consistent. Inode tables and journal are zeroed now, so the
# guest kernel starts no ext4lazyinit thread (time under TCG, and it would grow every overlay).
MKE2FS_OPTIONS = (
    "-t", "ext4", "-m", "0", "-L", "vmiso-micro",
    "-E", "lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0",
)
# quiet/loglevel: each console byte is a VM exit under TCG. cryptomgr.notests: the crypto
# self-tests cost ~0.24 s under TCG. tsc=reliable, no_timer_check: no clocksource watchdog, no
# timer IRQ check. i8042.*: no PS/2 probing. panic=-1: a panic reboots at once, which
# -no-reboot / on_reboot=destroy turn into the VM's end.
KERNEL_CMDLINE = (
    "console=ttyS0 quiet loglevel=3 panic=-1 rdinit=/init cryptomgr.notests "
    "tsc=reliable no_timer_check i8042.noaux i8042.nokbd i8042.nopnp"
)
GUEST_SCRIPTS = ("initramfs-init", "micro-init")
_RECIPE = repr((BUILDER_VERSION, MODULES, ROOT_SIZE, MKE2FS_OPTIONS))


@dataclass(frozen=True)
class MicroImage:
    key: str
    kernel: Path
    initrd: Path
    base: Path
    kernel_version: str
    virtual_size: int
    base_format: str = "qcow2"


# -- packages --------------------------------------------------------------------------------

def _apt_records(packages):
    """Fields of the candidate versions of ``packages`` from apt's lists (downloads nothing)."""
    argv = ["apt-cache", "show", "--no-all-versions", *packages]
    try:
        text = run(argv, timeout=60).stdout
    except CommandFailed:
        # Fresh machine without package lists: fetch them once, then ask again.
        run(["apt-get", "update", "-q"], timeout=600)
        text = run(argv, timeout=60).stdout
    records = {}
    for paragraph in text.split("\n\n"):
        fields = {}
        for line in paragraph.splitlines():
            name, sep, value = line.partition(": ")
            if sep and not line.startswith(" "):
                fields.setdefault(name, value.strip())
        if "Package" in fields and "Version" in fields:
            records[fields["Package"]] = fields
    missing = [p for p in packages if p not in records]
    if missing:
        raise HostError(f"apt knows no installable version of {', '.join(missing)}")
    return records


def _kernel_package(depends):
    """The real kernel package the metapackage depends on (linux-image-<abi>-cloud-amd64)."""
    for alternative in depends.replace("|", ",").split(","):
        name = alternative.split("(")[0].strip()
        if name.startswith("linux-image-") and name != KERNEL_METAPACKAGE:
            return name
    raise HostError(f"{KERNEL_METAPACKAGE} depends on no linux-image package: {depends!r}")


def _lists_stamp():
    """Changes whenever apt's package lists change (names, sizes, mtimes)."""
    entries = sorted(
        f"{e.name}:{e.stat().st_size}:{e.stat().st_mtime_ns}"
        for e in os.scandir(APT_LISTS) if e.is_file() and e.name != "lock"
    ) if os.path.isdir(APT_LISTS) else []
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()


def _resolve(cache):
    """apt's records for the kernel and busybox packages, {"kernel": ..., "busybox": ...}.

    apt-cache takes ~0.7 s a call where its binary cache is disabled (Debian's container
    images), so the answer is kept in ``cache/resolved.json`` until apt's lists change.
    """
    memo, stamp = cache / "resolved.json", _lists_stamp()
    try:
        saved = json.loads(memo.read_text())
        if saved["stamp"] == stamp:
            return saved["records"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    first = _apt_records([KERNEL_METAPACKAGE, BUSYBOX_PACKAGE])
    kernel = _kernel_package(first[KERNEL_METAPACKAGE].get("Depends", ""))
    keep = ("Package", "Version", "Architecture", "SHA256")
    records = {
        name: {k: record[k] for k in keep if k in record}
        for name, record in (("kernel", _apt_records([kernel])[kernel]),
                             ("busybox", first[BUSYBOX_PACKAGE]))
    }
    tmp = cache / f".resolved-{os.getpid()}"
    tmp.write_text(json.dumps({"stamp": stamp, "records": records}))
    os.replace(tmp, memo)
    return records


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fetch(record, cache, progress):
    """Path of the verified .deb for apt ``record`` in ``cache``, downloading it only when absent
    or corrupt. Returns (path, sha256)."""
    package = record["Package"]
    version = record["Version"].replace(":", "%3a")  # apt-get download's file naming
    path = cache / f"{package}_{version}_{record.get('Architecture', 'amd64')}.deb"
    want = record.get("SHA256")
    if path.exists():
        have = _sha256(path)
        if want in (None, have):
            return path, have
        path.unlink()
    progress(f"micro: downloading {package} {record['Version']}")
    with tempfile.TemporaryDirectory(prefix=".dl-", dir=cache) as tmp:
        run(["apt-get", "download", "-q", f"{package}={record['Version']}"], timeout=900, cwd=tmp)
        [got] = Path(tmp).glob("*.deb")
        have = _sha256(got)
        if want not in (None, have):
            raise ImageError(got, f"sha256 {have} does not match apt's {want}")
        os.replace(got, path)
    return path, have


def _guest_script(name):
    return resources.files("vmiso.image").joinpath("guest", name).read_bytes()


def _image_key(kernel_sha, busybox_sha):
    digest = hashlib.sha256()
    parts = [_RECIPE.encode(), repr(_pvh_tools()).encode(), kernel_sha.encode(), busybox_sha.encode()]
    parts += [_guest_script(name) for name in GUEST_SCRIPTS]
    for part in parts:  # length-prefixed, so no two different inputs hash alike
        digest.update(len(part).to_bytes(8, "big") + part)
    return digest.hexdigest()


# -- the kernel ------------------------------------------------------------------------------
# The bzImage's payload, unpacked, is an ELF vmlinux with a PVH entry note: QEMU starts it in
# 32-bit mode directly, skipping the real-mode setup and the in-guest decompression (-0.34 s a
# boot under TCG, measured). Without a tool for the payload's format, the bzImage is used as is.
_LZ4, _ZSTD, _GZIP, _XZ = b"\x02\x21\x4c\x18", b"\x28\xb5\x2f\xfd", b"\x1f\x8b", b"\xfd7zXZ\x00"
_PVH_NOTE = 18  # XEN_ELFNOTE_PHYS32_ENTRY


def _u(data, offset, size):
    return int.from_bytes(data[offset:offset + size], "little")


def _bzimage_payload(data):
    """The compressed vmlinux inside a bzImage (boot protocol >= 2.08), or b""."""
    if data[0x202:0x206] != b"HdrS" or _u(data, 0x206, 2) < 0x208:
        return b""
    start = ((data[0x1F1] or 4) + 1) * 512 + _u(data, 0x248, 4)
    return data[start:start + _u(data, 0x24C, 4)]


def _decompress(payload, scratch):
    """Unpacked ``payload``, or None when no decoder for its format is at hand."""
    if payload.startswith(_GZIP):
        return zlib.decompressobj(31).decompress(payload)
    # The other formats carry the unpacked size as a 4-byte trailer (the kernel's *_with_size).
    payload, size = payload[:-4], _u(payload, len(payload) - 4, 4)
    if payload.startswith(_XZ):
        elf = lzma.LZMADecompressor().decompress(payload)
    else:
        tool = {_LZ4: "lz4", _ZSTD: "zstd"}.get(payload[:4])
        if tool is None or shutil.which(tool) is None:
            return None
        packed, unpacked = scratch / "vmlinux.packed", scratch / "vmlinux.unpacked"
        packed.write_bytes(payload)
        run([tool, "-d", "-q", "-f", packed, unpacked], timeout=300)
        elf = unpacked.read_bytes()
    return elf if len(elf) == size else None


def _has_pvh_entry(elf):
    """Whether ``elf`` is an ELF64 with a PVH entry point note (so QEMU can boot it directly)."""
    if elf[:5] != b"\x7fELF\x02":
        return False
    phoff, phentsize, phnum = _u(elf, 0x20, 8), _u(elf, 0x36, 2), _u(elf, 0x38, 2)
    for ph in range(phoff, phoff + phentsize * phnum, phentsize):
        if _u(elf, ph, 4) != 4:  # PT_NOTE
            continue
        pos, end = _u(elf, ph + 8, 8), _u(elf, ph + 8, 8) + _u(elf, ph + 32, 8)
        while pos + 12 <= end:
            namesz, descsz, kind = _u(elf, pos, 4), _u(elf, pos + 4, 4), _u(elf, pos + 8, 4)
            if elf[pos + 12:pos + 12 + namesz] == b"Xen\0" and kind == _PVH_NOTE:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def _install_kernel(bzimage, out, scratch):
    """Write the kernel into ``out``: vmlinux (PVH ELF) if possible, else the bzImage vmlinuz."""
    data = Path(bzimage).read_bytes()
    payload = _bzimage_payload(data)
    elf = _decompress(payload, scratch) if len(payload) > 4 else None
    if elf and _has_pvh_entry(elf):
        (out / "vmlinux").write_bytes(elf)
        return "vmlinux"
    (out / "vmlinuz").write_bytes(data)
    return "vmlinuz"


def _pvh_tools():
    """Part of the recipe: which external decompressors this build can use."""
    return tuple(tool for tool in ("lz4", "zstd") if shutil.which(tool))


# -- the initramfs ---------------------------------------------------------------------------

def _cpio_entry(name, mode, data=b"", rdev=(0, 0), ino=0):
    """One newc cpio record: header, NUL-terminated name and data, each padded to 4 bytes."""
    name_bytes = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name_bytes), 0)
    head = b"070701" + b"".join(b"%08X" % value for value in fields) + name_bytes
    return head + b"\0" * (-len(head) % 4) + data + b"\0" * (-len(data) % 4)


def cpio_newc(entries):
    """An uncompressed newc archive of ``entries``: (name, mode, data, rdev) tuples, in order."""
    out = [_cpio_entry(name, mode, data, rdev, ino) for ino, (name, mode, data, rdev)
           in enumerate(entries, start=1)]
    out.append(_cpio_entry("TRAILER!!!", 0))
    return b"".join(out)


def _module_paths(kernel_root, kernel_version):
    moddir = kernel_root / "lib" / "modules" / kernel_version / "kernel"
    found = {p.name.split(".ko")[0]: p for p in moddir.rglob("*.ko*")}
    missing = [m for m in MODULES if m not in found]
    if missing:
        raise ImageError(moddir, f"kernel {kernel_version} lacks the modules {', '.join(missing)}")
    if any(found[m].suffix != ".ko" for m in MODULES):
        # Debian 12 ships them uncompressed; a compressed one would need unpacking here.
        raise ImageError(moddir, "compressed kernel modules are not supported")
    return [found[m] for m in MODULES]


def initramfs_entries(kernel_root, kernel_version, busybox):
    """The initramfs, in archive order: directories, a console node, busybox, /init, modules."""
    directory, regular = stat.S_IFDIR | 0o755, stat.S_IFREG
    entries = [(d, directory, b"", (0, 0)) for d in ("bin", "dev", "proc", "sys", "newroot", "lib",
                                                     "lib/modules")]
    # The kernel opens /dev/console for /init before anything mounts devtmpfs.
    entries.append(("dev/console", stat.S_IFCHR | 0o600, b"", (5, 1)))
    entries.append(("bin/busybox", regular | 0o755, Path(busybox).read_bytes(), (0, 0)))
    entries.append(("bin/sh", stat.S_IFLNK | 0o777, b"busybox", (0, 0)))
    entries.append(("init", regular | 0o755, _guest_script("initramfs-init"), (0, 0)))
    for name, path in zip(MODULES, _module_paths(kernel_root, kernel_version)):
        entries.append((f"lib/modules/{name}.ko", regular | 0o644, path.read_bytes(), (0, 0)))
    order = "".join(m + "\n" for m in MODULES).encode()
    entries.append(("lib/modules/order", regular | 0o644, order, (0, 0)))
    return entries


# -- the root file system --------------------------------------------------------------------

_ETC = {
    "passwd": "root:x:0:0:root:/root:/bin/sh\n",
    "group": "root:x:0:\n",
    "hostname": "micro\n",
    "hosts": "127.0.0.1 localhost\n::1 localhost\n",
}


def _populate_root(root, busybox):
    """The root tree: busybox with every applet linked, /etc basics, mount points, /sbin/init."""
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "dev", "proc", "sys", "run", "mnt"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "tmp").mkdir(mode=0o1777)
    (root / "tmp").chmod(0o1777)
    (root / "root").mkdir(mode=0o700)
    shutil.copyfile(busybox, root / "bin" / "busybox")
    (root / "bin" / "busybox").chmod(0o755)
    # What "busybox --install -s" does in the guest, done here: one symlink per applet.
    applets = run([busybox, "--list-full"], timeout=30).stdout.split()
    for applet in applets:
        link = root / applet
        if applet != "bin/busybox" and not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to("/bin/busybox")
    for name, text in _ETC.items():
        (root / "etc" / name).write_text(text)
    init = root / "sbin" / "init"
    init.unlink(missing_ok=True)  # busybox's own init applet: replaced by the contract script
    init.write_bytes(_guest_script("micro-init"))
    init.chmod(0o755)


def _make_root_qcow2(root, scratch, out, key):
    """ext4 of ``root`` as qcow2, byte-reproducible for one key: overlays name their base by path,
    so a forced rebuild must not change a single block under them."""
    for path in [root, *root.rglob("*")]:
        os.utime(path, (0, 0), follow_symlinks=False)
    raw = scratch / "root.ext4"
    ident = str(uuid.UUID(key[:32]))
    options = [*MKE2FS_OPTIONS[:-1], f"{MKE2FS_OPTIONS[-1]},hash_seed={ident}", "-U", ident]
    env = dict(os.environ, E2FSPROGS_FAKE_TIME="1", MKE2FS_DEVICE_SECTSIZE="512")
    run(["mke2fs", "-q", *options, "-d", root, "-F", raw, str(ROOT_SIZE // 1024) + "k"],
        timeout=300, env=env)
    # mke2fs -d copies each file's ctime, which nothing on the host can set: pin it afterwards.
    paths = ["/"] + sorted("/" + str(p.relative_to(root)) for p in root.rglob("*"))
    commands = "".join(f'sif "{p}" ctime 1\n' for p in paths)
    run(["debugfs", "-w", "-f", "-", raw], input=commands, timeout=300, env=env)
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, out], timeout=300)
    raw.unlink()


# -- build and lookup ------------------------------------------------------------------------

def _micro_dir(workdir):
    return Path(workdir) / "images" / "micro"


def _image_from(directory, manifest):
    return MicroImage(
        key=manifest["key"],
        kernel=directory / manifest["kernel_file"],
        initrd=directory / "initrd.img",
        base=directory / "root.qcow2",
        kernel_version=manifest["kernel_version"],
        virtual_size=manifest["virtual_size"],
    )


def _load(directory):
    """The MicroImage in ``directory``, or None if it is not a complete build."""
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    image = _image_from(directory, manifest)
    if not all(p.is_file() for p in (image.kernel, image.initrd, image.base)):
        return None
    return image


def find_micro(workdir):
    """The current micro image of ``workdir``, or None; builds and downloads nothing."""
    micro = _micro_dir(workdir)
    try:
        key = (micro / "current").read_text().strip()
    except OSError:
        return None
    if not key or "/" in key or key.startswith("."):
        return None
    return _load(micro / key)


def _ensure_dirs(workdir):
    """cache/debs and images/micro, the latter world-traversable for QEMU's user."""
    cache = Path(workdir) / "cache" / "debs"
    cache.mkdir(parents=True, exist_ok=True)
    micro = _micro_dir(workdir)
    micro.mkdir(parents=True, exist_ok=True)
    for d in (micro.parent, micro):
        d.chmod(0o755)
    return cache, micro


def _sweep(micro, max_age=3600):
    """Remove what a killed build left behind (an hour old: no build takes that long)."""
    for entry in os.scandir(micro):
        stale = time.time() - entry.stat(follow_symlinks=False).st_mtime > max_age
        if not (stale and entry.name.startswith((".build-", ".old-", ".current-"))):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            os.unlink(entry.path)


def _set_current(micro, key):
    tmp = micro / f".current-{os.getpid()}"
    tmp.write_text(key + "\n")
    tmp.chmod(0o444)
    os.replace(tmp, micro / "current")


def _build(out, scratch, debs, key, progress):
    """Everything of one image into ``out``; ``scratch`` takes the unpacked packages."""
    unpacked = {}
    for name, (deb, _) in debs.items():
        unpacked[name] = scratch / name
        run(["dpkg-deb", "-x", deb, unpacked[name]], timeout=300)
    kernel_root, busybox = unpacked["kernel"], unpacked["busybox"] / "bin" / "busybox"
    versions = [p.name for p in (kernel_root / "lib" / "modules").iterdir()]
    if len(versions) != 1:
        raise ImageError(debs["kernel"][0], f"expected one kernel version, found {versions}")
    kernel_version = versions[0]
    kernel_file = _install_kernel(kernel_root / "boot" / f"vmlinuz-{kernel_version}", out, scratch)
    progress("micro: writing the initramfs")
    cpio = cpio_newc(initramfs_entries(kernel_root, kernel_version, busybox))
    (out / "initrd.img").write_bytes(cpio)
    progress("micro: making the root file system")
    root = scratch / "root"
    _populate_root(root, busybox)
    _make_root_qcow2(root, scratch, out / "root.qcow2", key)
    manifest = {
        "key": key, "builder_version": BUILDER_VERSION, "kernel_version": kernel_version,
        "kernel_file": kernel_file,
        "virtual_size": ROOT_SIZE, "base_format": "qcow2", "modules": list(MODULES),
        "kernel_cmdline": KERNEL_CMDLINE,
        "packages": {name: {"file": deb.name, "sha256": sha} for name, (deb, sha) in debs.items()},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    for path in out.iterdir():
        path.chmod(0o444)
    out.chmod(0o755)


def _install(micro, staged, key, replace):
    """Rename ``staged`` to ``micro/key``. If that exists (a concurrent build won, or ``replace``)
    the existing one stays, unless ``replace``: then it is swapped out (same bytes, see
    _make_root_qcow2, so overlays over it stay valid)."""
    final = micro / key
    try:
        os.rename(staged, final)  # fails if final exists (a non-empty directory)
        return final
    except OSError:
        if not final.is_dir():
            raise
    if replace:
        old = Path(tempfile.mkdtemp(prefix=".old-", dir=micro))
        os.rename(final, old / key)
        os.rename(staged, final)
        shutil.rmtree(old, ignore_errors=True)
    return final


def build_micro(workdir, progress=print, force=False):
    """Build (or find) the micro image for the current Debian packages; return its MicroImage.

    Cheap when nothing changed: apt's lists say which package versions are current, the cached
    .deb files are hashed, and an existing image with that key is returned as it is.
    """
    cache, micro = _ensure_dirs(workdir)
    debs = {name: _fetch(record, cache, progress) for name, record in _resolve(cache).items()}
    key = _image_key(debs["kernel"][1], debs["busybox"][1])
    image = None if force else _load(micro / key)
    if image is None:
        progress(f"micro: building image {key[:12]} from {debs['kernel'][0].name}")
        _sweep(micro)
        staging = Path(tempfile.mkdtemp(prefix=".build-", dir=micro))
        try:
            out = staging / "out"
            out.mkdir()
            _build(out, staging, debs, key, progress)
            image = _load(_install(micro, out, key, replace=force))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if image is None:
            raise ImageError(micro / key, "the new build is incomplete")
    _set_current(micro, key)
    return image
