"""The lean guest kernel: Linux built from Debian's own kernel source package (``linux-source``)
with ``make tinyconfig`` plus vmiso's fragment (image/guest/lean-kernel.config): the virtio
devices, ext4, iso9660 and the network built in, no modules, no initramfs needed, and nothing a
task VM never touches (input, VT, RTC, sound, USB, graphics).

Compiling takes minutes (about 6 on 2 cores) and happens once per host: the result is cached by
content in the host cache's ``kernel/`` (paths.HostCache, default /var/cache/vmiso/kernel, shared
by every work dir), key = sha256 over the source .deb, the fragment, vmiso's patches,
BUILDER_VERSION and the compiler's version::

  <key>/vmlinux            the kernel: an ELF with a PVH entry (a micro build boots a stripped copy)
  <key>/config             its complete .config
  <key>/manifest.json      key, release (the guest's uname -r), source, compiler
  .build-*                 a build in progress (source tree, objects; removed after)
  .build.lock              held by a compile, and while kernels move in (adopt)

A kernel's directory mtime is when a build last used it. gc (``collectable``) removes a kernel
that no micro build names, of this work dir or of any other work dir that built from the cache
(micro.kept_kernels), and that no build used within the last hour (one in progress may not have
written its manifest yet). Micro builds hold a copy of their kernel, so a kernel removed by
mistake costs a recompile, never a broken image.

The stock Debian cloud kernel stays available (``vmiso image build-micro --kernel stock``).
"""
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .. import files
from .._proc import run
from ..errors import CommandFailed, HostError, ImageError
from ..files import flocked
from . import debs, garbage, pvh

BUILDER_VERSION = "1"
SOURCE_METAPACKAGE = "linux-source"
FRAGMENT = "lean-kernel.config"
# vmiso's own changes to the source, applied in order (``patch -p1``); a patch that does not apply
# fails the build. no-initmem-poison: a faster boot under TCG (see the patch; docs/performance.md).
PATCHES = ("lean-kernel-no-initmem-poison.patch",)
COMPILE_TIMEOUT_S = 4 * 3600
HEARTBEAT_S = 30  # a progress line this often while the compiler runs


@dataclass(frozen=True)
class LeanKernel:
    key: str
    vmlinux: Path
    release: str


def _guest_file(name):
    return resources.files("vmiso.image").joinpath("guest", name).read_bytes()


def fragment():
    """The config fragment's bytes (part of the key)."""
    return _guest_file(FRAGMENT)


def wanted_options(text):
    """{option: value} the fragment sets, "n" for "is not set" lines, in file order."""
    wanted = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("CONFIG_") and "=" in line:
            name, _, value = line.partition("=")
            wanted[name] = value
        elif line.startswith("# CONFIG_") and line.endswith(" is not set"):
            wanted[line[2:-len(" is not set")]] = "n"
    return wanted


def missing_options(config_text, fragment_text):
    """The fragment's settings that the final .config does not have (Kconfig drops a setting whose
    dependencies are unmet without a word): "CONFIG_X=y (got n)" strings, empty when all hold."""
    have = wanted_options(config_text)
    return [f"{name}={value} (got {have.get(name, 'n')})"
            for name, value in wanted_options(fragment_text).items() if have.get(name, "n") != value]


def _compiler():
    try:
        return run(["gcc", "--version"], timeout=30).stdout.splitlines()[0]
    except (CommandFailed, IndexError) as err:
        raise HostError("gcc is needed to build the lean kernel (run 'make setup')") from err


def kernel_key(source_sha, fragment_bytes, compiler):
    digest = hashlib.sha256()
    patches = [_guest_file(name) for name in PATCHES]
    for part in (BUILDER_VERSION.encode(), source_sha.encode(), fragment_bytes, compiler.encode(), *patches):
        digest.update(len(part).to_bytes(8, "big") + part)  # length-prefixed: no two inputs alike
    return digest.hexdigest()


def _source_record(debs_cache):
    def lookup():
        meta = debs.apt_records([SOURCE_METAPACKAGE])[SOURCE_METAPACKAGE]
        real = debs.dependency(SOURCE_METAPACKAGE, meta, "linux-source-")
        return {"source": debs.apt_records([real])[real]}

    return debs.resolve(debs_cache, "lean-kernel", lookup)["source"]


def _load(directory):
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    vmlinux = directory / "vmlinux"
    return LeanKernel(manifest["key"], vmlinux, manifest["release"]) if vmlinux.is_file() else None


def _use(directory):
    """The kernel in ``directory`` (None if there is none), marked as used now (see collectable)."""
    found = _load(directory)
    if found is not None:
        with contextlib.suppress(OSError):
            os.utime(directory)
    return found


def build_lean_kernel(debs_cache, kernel_cache, progress=print):
    """The cached lean kernel for the current ``linux-source``, compiled first if needed."""
    kernel_cache = Path(kernel_cache)
    for directory in (Path(debs_cache), kernel_cache):
        directory.mkdir(parents=True, exist_ok=True)
    record = _source_record(debs_cache)
    # apt's SHA256 names the source without downloading (or hashing 140 MB) when it is built.
    source_sha = record.get("SHA256") or debs.fetch(record, debs_cache, progress)[1]
    key = kernel_key(source_sha, fragment(), _compiler())
    final = kernel_cache / key
    found = _use(final)
    if found is not None:
        return found
    with flocked(kernel_cache / ".build.lock"):  # one compile at a time; the loser finds the result
        found = _use(final)
        if found is not None:
            return found
        deb, fetched_sha = debs.fetch(record, debs_cache, progress)  # verified against apt's SHA256
        if fetched_sha != source_sha:
            raise ImageError(deb, f"sha256 {fetched_sha} is not the {source_sha} apt lists")
        _sweep(kernel_cache)
        staging = Path(tempfile.mkdtemp(prefix=".build-", dir=kernel_cache))
        try:
            out = _compile(deb, record, source_sha, key, staging, progress)
            os.rename(out, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    found = _load(final)
    if found is None:
        raise ImageError(final, "the new kernel build is incomplete")
    return found


def adopt(old_cache, kernel_cache):
    """Move the kernels of ``old_cache`` (a work dir's cache/kernel, from before the host cache)
    that ``kernel_cache`` lacks into it, and remove ``old_cache``. Nothing is compiled."""
    if not Path(old_cache).is_dir():
        return []
    with flocked(Path(kernel_cache) / ".build.lock"):
        return files.move_into(old_cache, kernel_cache, temp_prefix=".build-")


def collectable(kernel_cache, kept, min_age=garbage.STALE_SECONDS):
    """The kernels in ``kernel_cache`` whose key is not in ``kept`` (micro.kept_kernels: those
    micro builds name; None: keep every one) and that no build used for ``min_age`` seconds:
    Collected records."""
    if kept is None:
        return []
    try:
        kernels = garbage.keyed(kernel_cache)
    except OSError:
        return []
    return [garbage.of_dir("kernel", e.path) for e in kernels
            if e.name not in kept and time.time() - e.stat(follow_symlinks=False).st_mtime > min_age]


def _sweep(kernel_cache):
    """Builds a killed process left behind (the lock is free, so none of them is running)."""
    for entry in os.scandir(kernel_cache):
        if entry.name.startswith((".build-", ".rm-")) and entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)


def _compile(deb, record, source_sha, key, staging, progress):
    """Unpack, configure, compile; return the directory holding the finished files."""
    progress(f"kernel: unpacking {record['Package']} {record['Version']}")
    run(["dpkg-deb", "-x", deb, staging / "deb"], timeout=600)
    tarballs = sorted((staging / "deb" / "usr" / "src").glob("linux-source-*.tar.*"))
    if len(tarballs) != 1:
        raise ImageError(deb, f"expected one source tarball in /usr/src, found {len(tarballs)}")
    run(["tar", "-xf", tarballs[0], "-C", staging], timeout=1200)
    shutil.rmtree(staging / "deb")
    [source] = [p for p in staging.iterdir() if p.is_dir() and p.name.startswith("linux-source-")]
    for name in PATCHES:
        run(["patch", "-p1", "--forward", "--batch", "-d", source], input=_guest_file(name).decode(), timeout=60)
    objects = staging / "objects"
    make = ["make", "-s", "-C", source, f"O={objects}"]
    fragment_path = staging / FRAGMENT
    fragment_path.write_bytes(fragment())
    run([*make, "tinyconfig"], timeout=600)
    run([source / "scripts" / "kconfig" / "merge_config.sh", "-m", "-O", objects,
         objects / ".config", fragment_path], timeout=600)
    run([*make, "olddefconfig"], timeout=600)
    config = (objects / ".config").read_text()
    missing = missing_options(config, fragment().decode())
    if missing:
        raise ImageError(objects / ".config", "the kernel configuration dropped " + ", ".join(missing))
    jobs = os.cpu_count() or 1
    progress(f"kernel: compiling with {jobs} jobs (about 6 min on 2 cores; once, then cached)")
    _compile_with_heartbeat([*make, f"-j{jobs}", "vmlinux"], objects / "build.log", progress)
    vmlinux = objects / "vmlinux"
    if not pvh.has_pvh_entry(vmlinux.read_bytes()):
        raise ImageError(vmlinux, "the kernel has no PVH entry (CONFIG_PVH)")
    out = staging / "out"
    out.mkdir()
    shutil.copyfile(vmlinux, out / "vmlinux")
    (out / "config").write_text(config)
    manifest = {
        "key": key, "builder_version": BUILDER_VERSION,
        "release": run([*make, "kernelrelease"], timeout=120).stdout.strip(),
        "source": {"package": record["Package"], "version": record["Version"], "sha256": source_sha},
        "compiler": _compiler(),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    for path in out.iterdir():
        path.chmod(0o444)
    out.chmod(0o755)
    return out


def _compile_with_heartbeat(argv, log_path, progress):
    """Run the compiler (output to ``log_path``), saying every HEARTBEAT_S that it still runs."""
    started = time.monotonic()
    env = dict(os.environ, LC_ALL="C")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(a) for a in argv], stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            while True:
                try:
                    proc.wait(timeout=HEARTBEAT_S)
                    break
                except subprocess.TimeoutExpired:
                    elapsed = time.monotonic() - started
                    if elapsed > COMPILE_TIMEOUT_S:
                        raise CommandFailed(argv, None, f"timed out after {COMPILE_TIMEOUT_S} s") from None
                    progress(f"kernel: compiling, {int(elapsed) // 60}:{int(elapsed) % 60:02d} so far")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if proc.returncode != 0:
        tail = Path(log_path).read_bytes()[-4000:].decode(errors="replace")
        raise CommandFailed(argv, proc.returncode, tail)
