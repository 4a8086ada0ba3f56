"""The embedded default guest, *micro*: a small kernel booted directly and an ext4 root of static
busybox whose /sbin/init runs the task contract (docs/guest-contract.md).

Two kernels, one root (``build_micro(kernel=...)``, ``vmiso image build-micro --kernel``):

- lean (the default): compiled once from Debian's ``linux-source`` with vmiso's config (lean.py):
  virtio, ext4 and iso9660 built in, so the kernel mounts /dev/vda itself; no initramfs.
- stock: Debian's cloud kernel (``linux-image-cloud-amd64``) and a tiny initramfs that loads its
  virtio modules and mounts the root. Nothing is compiled.

Built from Debian packages fetched with ``apt-get download`` without mounting anything: the
initramfs is a newc cpio written here, the root is ``mke2fs -d`` of a directory converted to
qcow2. The build is content-addressed: key = sha256 over the kernel (its .deb, or the lean
kernel's key), busybox's .deb, the guest scripts and the recipe, so it reruns only when one of
them changes. What does not depend on the work directory is in the host cache (paths.HostCache,
default /var/cache/vmiso), shared by every work dir of the host::

  <cache>/debs/*.deb               downloaded packages (kept; verified against apt's SHA256)
  <cache>/kernel/<key>/            lean kernels (lean.py)
  <cache>/workdirs/<id>            the work dirs that built micro from this cache (see kept_kernels)

and the builds under the work directory::

  images/micro/<key>/              vmlinux, initrd.img (stock), root.qcow2, manifest.json (0444)
  images/micro/.build-*            a build in progress (renamed into place when complete)
  images/micro/current             the key the image name "micro" boots (text)
  images/micro/current-<kernel>    the newest key of each kernel ("micro:lean", "micro:stock")

The stock kernel is the bzImage's payload unpacked (pvh.py), or the bzImage where the payload's
decompressor is missing. QEMU runs as another user (libvirt-qemu) and reads kernel, initrd and
base directly, so everything from ``images/`` down is world-readable/traversable; the work
directory itself only needs o+x. The image's kernel is a copy (the lean one stripped, see
_kernel_files): QEMU never reads the host cache.

A work dir made before the host cache kept ``cache/debs`` and ``cache/kernel`` itself: its next
build moves what they hold into the host cache (nothing is downloaded or compiled again).

gc (store.gc) asks ``collectable`` for the builds it may remove (no current one, no live
container's) and ``kept_kernels`` for the lean kernels the remaining builds were made from, of
this work dir and of every other one that built from the host cache; lean.collectable keeps
those.
"""
import hashlib
import json
import os
import shutil
import stat
import tempfile
import time
import uuid
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Optional

from .. import files
from .._proc import run
from ..errors import ImageError, InvalidSpec
from ..paths import HostCache, Workdir
from . import debs, execbin, garbage, inuse, lean, pvh

BUILDER_VERSION = "3"
KERNELS = ("lean", "stock")  # what build_micro(kernel=...) takes; see the module's docstring
DEFAULT_KERNEL = "lean"
KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
# Load order for busybox insmod (no modprobe, no modules.dep): each after its dependencies.
# ext4, jbd2, crc16, mbcache are built into Debian's cloud kernel, so they are not listed.
MODULES = (
    "virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci",
    "virtio_blk", "failover", "net_failover", "virtio_net", "virtio_console", "cdrom", "isofs",
    "virtio_balloon",  # lets Isolator.update() change guest memory live
)
ROOT_SIZE = 1 << 30  # virtual; the qcow2 holds only what is written
# With a journal: it boots no slower than without (docs/performance.md) and keeps an overlay that is
# booted again after a killed VM consistent. Inode tables and journal are zeroed now, so the
# guest kernel starts no ext4lazyinit thread (time under TCG, and it would grow every overlay).
MKE2FS_OPTIONS = (
    "-t", "ext4", "-m", "0", "-L", "vmiso-micro",
    "-E", "lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0",
)
# quiet/loglevel: each console byte is a VM exit under TCG. cryptomgr.notests: the crypto
# self-tests are slow under TCG. tsc=reliable, no_timer_check: no clocksource watchdog, no
# timer IRQ check. panic=-1: a panic reboots at once, which -no-reboot / on_reboot=destroy turn
# into the VM's end.
_COMMON_CMDLINE = "console=ttyS0 quiet loglevel=3 panic=-1 cryptomgr.notests tsc=reliable no_timer_check"
# stock: the initramfs loads the virtio modules and mounts the root; i8042.*: no PS/2 probing.
STOCK_CMDLINE = _COMMON_CMDLINE + " rdinit=/init i8042.noaux i8042.nokbd i8042.nopnp"
# lean: virtio and ext4 are built in, so the kernel mounts the root itself. noapictimer: the
# local APIC timer's calibration and emulation are slow under TCG; the PIT drives the tick
# instead and the other vCPUs get it by broadcast (time still runs right with 2 vCPUs). Revisit
# on KVM hosts, where the APIC timer is cheap. noreplace-smp: a 1-vCPU guest otherwise rewrites
# every LOCK prefix of its kernel to run uniprocessor, a store into kernel text at each site,
# which TCG makes slow (the prefixes cost a 1-vCPU guest next to nothing). What each of these
# bought: docs/performance.md, "What each change bought".
LEAN_CMDLINE = _COMMON_CMDLINE + " root=/dev/vda rootfstype=ext4 rw noapictimer noreplace-smp"
GUEST_SCRIPTS = ("initramfs-init", "micro-init")
_RECIPE = repr((BUILDER_VERSION, MODULES, ROOT_SIZE, MKE2FS_OPTIONS, STOCK_CMDLINE, LEAN_CMDLINE))


@dataclass(frozen=True)
class MicroImage:
    key: str
    kernel: Path
    initrd: Optional[Path]  # None: the kernel mounts the root itself (lean)
    base: Path
    kernel_version: str
    virtual_size: int
    base_format: str = "qcow2"
    cmdline: str = STOCK_CMDLINE
    kernel_flavour: str = "stock"


def _guest_script(name):
    return resources.files("vmiso.image").joinpath("guest", name).read_bytes()


def _image_key(kernel_flavour, kernel_id, busybox_sha):
    """``kernel_id``: the stock kernel .deb's sha256, or the lean kernel's key."""
    digest = hashlib.sha256()
    parts = [_RECIPE.encode(), repr(pvh.tools()).encode(), kernel_flavour.encode(), kernel_id.encode(),
             busybox_sha.encode()]
    parts += [_guest_script(name) for name in GUEST_SCRIPTS]
    parts += [execbin.source(), execbin.identity().encode()]
    for part in parts:  # length-prefixed, so no two different inputs hash alike
        digest.update(len(part).to_bytes(8, "big") + part)
    return digest.hexdigest()


def _resolve(cache, kernel_flavour):
    """apt's records of the packages a ``kernel_flavour`` image is made of: {"busybox": ...}, and
    for stock {"kernel": ...} too (the real package behind the cloud kernel's metapackage)."""
    def lookup():
        if kernel_flavour != "stock":
            return {"busybox": debs.apt_records([BUSYBOX_PACKAGE])[BUSYBOX_PACKAGE]}
        first = debs.apt_records([KERNEL_METAPACKAGE, BUSYBOX_PACKAGE])
        kernel = debs.dependency(KERNEL_METAPACKAGE, first[KERNEL_METAPACKAGE], "linux-image-")
        return {"kernel": debs.apt_records([kernel])[kernel], "busybox": first[BUSYBOX_PACKAGE]}

    return debs.resolve(cache, f"micro-{kernel_flavour}", lookup)


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


def _populate_root(root, busybox, scratch):
    """The root tree: busybox with every applet linked, /etc basics, mount points, /sbin/init,
    and vmiso-exec (execbin.py), which starts a container image's task."""
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
    helper = root / execbin.GUEST_PATH
    helper.parent.mkdir(parents=True, exist_ok=True)
    execbin.build(helper, scratch)


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
    return Workdir.of(workdir).micro_images


def _image_from(directory, manifest):
    initrd = manifest.get("initrd_file", "initrd.img")
    return MicroImage(
        key=manifest["key"],
        kernel=directory / manifest["kernel_file"],
        initrd=directory / initrd if initrd else None,
        base=directory / "root.qcow2",
        kernel_version=manifest["kernel_version"],
        virtual_size=manifest["virtual_size"],
        cmdline=manifest.get("kernel_cmdline", STOCK_CMDLINE),
        kernel_flavour=manifest.get("kernel_flavour", "stock"),
    )


def _load(directory):
    """The MicroImage in ``directory``, or None if it is not a complete build."""
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    image = _image_from(directory, manifest)
    if not all(p.is_file() for p in (image.kernel, image.initrd or image.kernel, image.base)):
        return None
    return image


def _pointer(kernel_flavour):
    """The file naming the current key: "current" (what "micro" boots) or "current-<flavour>"."""
    if kernel_flavour is None:
        return "current"
    check_kernel(kernel_flavour)
    return f"current-{kernel_flavour}"


def check_kernel(kernel_flavour):
    if kernel_flavour not in KERNELS:
        raise InvalidSpec("kernel", f"{kernel_flavour!r} is not one of {', '.join(KERNELS)}")
    return kernel_flavour


def find_micro(workdir, kernel_flavour=None):
    """The current micro image of ``workdir`` (of that kernel flavour if given), or None; builds
    and downloads nothing."""
    micro = _micro_dir(workdir)
    try:
        key = (micro / _pointer(kernel_flavour)).read_text().strip()
    except OSError:
        return None
    if not key or "/" in key or key.startswith("."):
        return None
    return _load(micro / key)


def is_root(workdir, path):
    """Whether ``path`` is the root file system of one of ``workdir``'s micro builds."""
    return any(inuse.same_file(path, r) for r in _micro_dir(workdir).glob("*/root.qcow2"))


def _ensure_dirs(workdir):
    """images/micro, world-traversable for QEMU's user."""
    micro = _micro_dir(workdir)
    micro.mkdir(parents=True, exist_ok=True)
    for d in (micro.parent, micro):
        d.chmod(0o755)
    return micro


def _ensure_cache(workdir, cache):
    """The host cache, set up, with ``workdir`` registered and what the work dir kept in its
    own cache before (cache/debs, cache/kernel) moved into it."""
    cache = HostCache.of(cache).ensure()
    cache.register(workdir)
    old = Workdir.of(workdir)
    files.move_into(old.old_debs_cache, cache.debs)
    lean.adopt(old.old_kernel_cache, cache.kernels)
    return cache


def _sweep(micro, max_age=garbage.STALE_SECONDS):
    """Remove what a killed build left behind (an hour old: no build takes that long)."""
    for entry in os.scandir(micro):
        stale = time.time() - entry.stat(follow_symlinks=False).st_mtime > max_age
        if not (stale and entry.name.startswith((".build-", ".old-", ".current"))):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            os.unlink(entry.path)


def _set_pointer(micro, name, key):
    tmp = micro / f".{name}-{os.getpid()}"
    tmp.write_text(key + "\n")
    tmp.chmod(0o444)
    os.replace(tmp, micro / name)


def _kernel_files(kernel, out, scratch, debs_found):
    """Put the kernel into ``out``; return (kernel_file, kernel_version, the unpacked stock kernel
    package or None for a lean kernel)."""
    if kernel is not None:
        # Without its symbol table: QEMU reads and sorts the symbols of every -kernel it loads,
        # at every start (docs/performance.md). The cache keeps the full vmlinux.
        run(["strip", "--strip-all", "-o", out / "vmlinux", kernel.vmlinux], timeout=120)
        return "vmlinux", kernel.release, None
    kernel_root = scratch / "kernel"
    run(["dpkg-deb", "-x", debs_found["kernel"][0], kernel_root], timeout=300)
    versions = [p.name for p in (kernel_root / "lib" / "modules").iterdir()]
    if len(versions) != 1:
        raise ImageError(debs_found["kernel"][0], f"expected one kernel version, found {versions}")
    version = versions[0]
    kernel_file = pvh.install_kernel(kernel_root / "boot" / f"vmlinuz-{version}", out, scratch)
    return kernel_file, version, kernel_root


def _build(out, scratch, debs_found, kernel, key, progress):
    """Everything of one image into ``out``; ``scratch`` takes the unpacked packages.
    ``kernel``: a LeanKernel, or None for the stock kernel of ``debs_found["kernel"]``."""
    run(["dpkg-deb", "-x", debs_found["busybox"][0], scratch / "busybox"], timeout=300)
    busybox = scratch / "busybox" / "bin" / "busybox"
    kernel_file, kernel_version, kernel_root = _kernel_files(kernel, out, scratch, debs_found)
    stock = kernel is None
    if stock:
        progress("micro: writing the initramfs")
        cpio = cpio_newc(initramfs_entries(kernel_root, kernel_version, busybox))
        (out / "initrd.img").write_bytes(cpio)
    progress("micro: making the root file system")
    root = scratch / "root"
    _populate_root(root, busybox, scratch)
    _make_root_qcow2(root, scratch, out / "root.qcow2", key)
    manifest = {
        "key": key, "builder_version": BUILDER_VERSION, "kernel_version": kernel_version,
        "kernel_flavour": "stock" if stock else "lean", "kernel_file": kernel_file,
        "initrd_file": "initrd.img" if stock else None,
        "virtual_size": ROOT_SIZE, "base_format": "qcow2",
        "modules": list(MODULES) if stock else [],
        "kernel_cmdline": STOCK_CMDLINE if stock else LEAN_CMDLINE,
        "packages": {name: {"file": deb.name, "sha256": sha} for name, (deb, sha) in debs_found.items()},
    }
    if not stock:
        manifest["lean_kernel"] = kernel.key
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


def build_micro(workdir, progress=print, force=False, kernel=DEFAULT_KERNEL, make_default=True, cache=None):
    """Build (or find) the micro image for the current Debian packages; return its MicroImage.

    ``kernel``: "lean" (compiled from linux-source once, see lean.py) or "stock" (Debian's cloud
    kernel and an initramfs). The image becomes the current one of its flavour and, with
    ``make_default``, what the image name "micro" boots. ``cache``: the host cache (a HostCache
    or its path) that keeps lean kernels and Debian packages; default HostCache().

    Cheap when nothing changed: apt's lists say which package versions are current, the cached
    .deb files are hashed, and an existing image with that key is returned as it is.
    """
    check_kernel(kernel)
    host = _ensure_cache(workdir, cache)
    micro = _ensure_dirs(workdir)
    debs_found = {name: debs.fetch(record, host.debs, progress)
                  for name, record in _resolve(host.debs, kernel).items()}
    built_kernel = None
    if kernel == "lean":
        built_kernel = lean.build_lean_kernel(host.debs, host.kernels, progress)
        kernel_id = built_kernel.key
    else:
        kernel_id = debs_found["kernel"][1]
    key = _image_key(kernel, kernel_id, debs_found["busybox"][1])
    image = None if force else _load(micro / key)
    if image is None:
        progress(f"micro: building image {key[:12]} ({kernel} kernel)")
        _sweep(micro)
        staging = Path(tempfile.mkdtemp(prefix=".build-", dir=micro))
        try:
            out = staging / "out"
            out.mkdir()
            _build(out, staging, debs_found, built_kernel, key, progress)
            image = _load(_install(micro, out, key, replace=force))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if image is None:
            raise ImageError(micro / key, "the new build is incomplete")
    _set_pointer(micro, _pointer(kernel), key)
    if make_default:
        _set_pointer(micro, "current", key)
    return image


# -- gc --------------------------------------------------------------------------------------

def _used(directory, used):
    try:
        return any(inuse.users_of(p, used) for p in directory.iterdir())
    except OSError:
        return True  # unreadable: keep it


def collectable(workdir, used):
    """What gc may remove of ``workdir``'s micro builds: the builds that are no current one
    ("current", "current-<kernel>") and that no live container uses (``used``: inuse.users()),
    and what killed removals left. Collected records; no build while none is current."""
    micro = _micro_dir(workdir)
    try:
        current = {(micro / e.name).read_text().strip() for e in os.scandir(micro)
                   if e.name == "current" or e.name.startswith("current-")}
        keys = [e.name for e in garbage.keyed(micro)] if current else []
    except OSError:
        current, keys = set(), []
    old = [key for key in keys if key not in current and not _used(micro / key, used)]
    return [garbage.of_dir("micro", micro / key) for key in old] + garbage.partials(micro)


def kept_kernels(workdir, dropping=(), cache=None):
    """The keys of the lean kernels that micro builds were made from: ``workdir``'s builds but
    those in ``dropping`` (keys gc removes now), and every build of the other work dirs that
    built from the host ``cache`` (HostCache.users()). None when a build cannot be read: then
    every kernel stays."""
    this = Workdir.of(workdir)
    others = [w for w in HostCache.of(cache).users() if w.root != this.root]
    kept = set()
    for micro, skip in [(this.micro_images, set(dropping))] + [(w.micro_images, set()) for w in others]:
        try:
            keys = [e.name for e in garbage.keyed(micro) if e.name not in skip]
        except FileNotFoundError:
            continue  # no builds there
        except OSError:
            return None
        for key in keys:
            try:
                manifest = json.loads((micro / key / "manifest.json").read_text())
            except (OSError, ValueError):
                return None  # a build we cannot read: keep every kernel
            if manifest.get("lean_kernel"):
                kept.add(manifest["lean_kernel"])
    return kept
