"""The base image store: bases added once, verified, hashed and kept read-only by content.

Layout under the work directory. QEMU's user reads bases directly, so the store's directories
are world-traversable and its files 0444 (the work directory itself admits only QEMU's group)::

  images/store/<sha256>/base.<qcow2|raw>   the base; never written after it was added
  images/store/<sha256>/meta.json          format, sizes, when and from where, a file stamp
  images/store/.add-*                      an add in progress (renamed into place when complete)
  images/store/.lock                       serialises changes: add's install, names, rm, gc
  images/names.json                        NAME -> sha256, replaced atomically

A base is verified (never probed) before it is copied, and its copy again, so what is stored is
exactly what was checked. Adding the same content twice stores it once. Before use its stamp
(size, mtime, inode) and mode are compared with those recorded at add time, and a base whose
stamp changed is hashed again. ``rm`` refuses and ``gc`` skips bases that live containers use.

A base boots one of three ways, recorded at add time (declared, never guessed from the content):
``disk`` (a bootable disk such as a cloud image: the firmware boots it), ``micro`` (an ext4
root honouring the micro guest's contract, booted with the micro kernel and initramfs; a micro
build's own root.qcow2 is ``micro`` by default) or ``oci`` (a container image's root file
system, made by image/oci/: its directory is named by the image's config digest rather than by
the base's sha256, which meta.json keeps as ``file_sha256``, and ``config.json`` beside the base
holds the image config, whose sha256 is the directory's name; ``passwd`` and ``group`` are the
image's /etc files, for resolving user names without opening the file system). Names are plain names or, for
container images, ``repo:tag`` references.
"""
import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .. import files
from ..errors import ImageError, InUse, InvalidSpec, NotFound, UnsafeImage
from ..paths import HostCache, Workdir
from . import garbage, inuse, lean, micro, qcow2
from .garbage import Collected
from .oci import cache as oci_cache
from .oci import reference

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")
SHA_RE = garbage.KEY_RE
MIN_PREFIX = 12  # hex digits of an id that name it (as long as they are unique)
PREFIX_RE = re.compile(rf"[0-9a-f]{{{MIN_PREFIX},64}}")
RESERVED = ("micro",)
BOOTS = ("disk", "micro", "oci")
META = "meta.json"
OCI_CONFIG = "config.json"
OCI_FILES = ("passwd", "group")  # the image's /etc/passwd and /etc/group, where it has them
CHUNK = 1 << 20
PROGRESS_EVERY = 64 << 20
_ZEROS = bytes(CHUNK)


@dataclass(frozen=True)
class StoredImage:
    """One base in the store, as its metadata and the names index describe it."""

    sha256: str
    format: str
    virtual_size: int
    file_size: int
    path: str
    names: tuple
    added_at: float
    source: str
    stamp: dict
    boot: str = "disk"
    file_sha256: Optional[str] = None  # the base's own sha256 where it differs from the id (oci)
    oci: Optional[dict] = None         # a container image's digests, platform and run config

    @property
    def config_path(self):
        """A container image's config (its raw JSON), beside the base."""
        return os.path.join(os.path.dirname(self.path), OCI_CONFIG) if self.boot == "oci" else None

    def to_dict(self):
        fields = ("sha256", "format", "virtual_size", "file_size", "path", "boot", "added_at", "source")
        extra = {"file_sha256": self.file_sha256, "oci": self.oci} if self.oci is not None else {}
        return {"names": list(self.names), **{f: getattr(self, f) for f in fields}, **extra}


@dataclass(frozen=True)
class Added:
    image: StoredImage
    created: bool            # False: the content was stored already
    previous: Optional[str]  # the sha256 the name pointed at before, if it moved


# -- names -------------------------------------------------------------------------------------

def _well_formed(name):
    return isinstance(name, str) and (
        (NAME_RE.fullmatch(name) is not None and ".." not in name) or reference.is_image_name(name))


def validate_name(name):
    """``name`` if it may name a stored base; InvalidSpec otherwise."""
    if not _well_formed(name):
        raise InvalidSpec("name", f"{name!r} is not a valid image name (1-64 of A-Z a-z 0-9 _ . + -, "
                                  "starting with a letter or digit, no '..'; or repo:tag)")
    if name in RESERVED or name.partition(":")[0] in RESERVED:
        raise InvalidSpec("name", f"{name!r} is reserved")
    if PREFIX_RE.fullmatch(name.lower()):
        # It would shadow (or be shadowed by) an image id or id prefix.
        raise InvalidSpec("name", f"{name!r} looks like an image id ({MIN_PREFIX} or more hex digits)")
    return name


def _root(workdir):
    """The work directory's path, from a Workdir or a path."""
    return Workdir.of(workdir).root


def _store(root):
    return Workdir(root).image_store


def _read_names(root):
    """The names index {name: sha256}; entries that are not well formed are ignored."""
    path = Workdir(root).image_names
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return {}
    except OSError as err:
        raise ImageError(path, f"cannot read the names index: {err.strerror}") from err
    with os.fdopen(fd, "rb") as f:
        try:
            names = json.loads(f.read()).get("names")
        except (ValueError, AttributeError) as err:
            raise ImageError(path, "the names index is damaged (not a JSON object)") from err
    if not isinstance(names, dict):
        raise ImageError(path, "the names index is damaged (no 'names' object)")
    return {n: s for n, s in names.items()
            if _well_formed(n) and isinstance(s, str) and SHA_RE.fullmatch(s)}


def _write_names(root, names):
    data = json.dumps({"version": 1, "names": dict(sorted(names.items()))}, indent=1) + "\n"
    files.write_atomic(Workdir(root).image_names, data.encode(), 0o644)


# -- the store directory -----------------------------------------------------------------------

def _ensure_store(root):
    """images/store, world-traversable (QEMU's user opens the bases in it)."""
    if not Workdir(root).images.is_dir():
        Workdir(root).ensure()  # a fresh host: make the work directory as launch would
    store = _store(root)
    with contextlib.suppress(FileExistsError):
        os.mkdir(store, 0o755)
    st = os.lstat(store)
    if not stat.S_ISDIR(st.st_mode):
        raise ImageError(store, "exists and is not a directory")
    if stat.S_IMODE(st.st_mode) != 0o755:
        os.chmod(store, 0o755)
    return store


# -- adding ------------------------------------------------------------------------------------

def _open_source(source):
    """A read fd of the regular file ``source``, never following a symlink."""
    try:
        fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as err:
        raise ImageError(source, f"cannot open: {err.strerror}") from err
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafeImage(source, "not a regular file")
    return fd


def _copy_hashed(src, dst, total, progress):
    """Copy fd ``src`` to fd ``dst`` (an all-zero chunk becomes a hole); its sha256 hex."""
    digest = hashlib.sha256()
    done, report = 0, PROGRESS_EVERY
    while True:
        chunk = os.read(src, CHUNK)
        if not chunk:
            break
        digest.update(chunk)
        if chunk == _ZEROS[:len(chunk)]:
            os.lseek(dst, len(chunk), os.SEEK_CUR)
        else:
            files.write_all(dst, chunk)
        done += len(chunk)
        if progress is not None and done >= report:
            progress(done, total)
            report += PROGRESS_EVERY
    os.ftruncate(dst, done)  # the file's end, when the last chunk was a hole
    return digest.hexdigest()


def _copy_in(source, dest, progress):
    """Copy ``source`` to the new file ``dest`` (0444, fsynced); return its sha256."""
    src = _open_source(source)
    try:
        total = os.fstat(src).st_size
        dst = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            sha = _copy_hashed(src, dst, total, progress)
            os.fsync(dst)  # ext4 may report a full disk only here (delayed allocation)
            os.fchmod(dst, 0o444)
        finally:
            os.close(dst)
    except OSError as err:
        raise ImageError(source, f"cannot copy into the store: {err.strerror}") from err
    finally:
        os.close(src)
    if progress is not None and total >= PROGRESS_EVERY:
        progress(total, total)
    return sha


def _stage(store, source, fmt, name, boot, progress):
    """A complete entry (base + metadata) in a new staging directory; (directory, sha256)."""
    staging = Path(tempfile.mkdtemp(prefix=".add-", dir=store))
    try:
        base = staging / f"base.{fmt}"
        sha = _copy_in(source, base, progress)
        try:
            # The copy is what was hashed: checking it too means a source swapped after the
            # first check cannot slip in.
            info = qcow2.verify_base(base, fmt)
        except UnsafeImage as err:
            raise UnsafeImage(source, f"changed while it was being added: {qcow2._message(err)}") from err
        meta = {
            "version": 1, "sha256": sha, "format": fmt, "virtual_size": info.virtual_size,
            "file_size": os.lstat(base).st_size, "added_at": time.time(), "added_as": name,
            "source": source, "stamp": files.stamp(os.lstat(base)), "boot": boot,
        }
        files.write_atomic(staging / META, (json.dumps(meta, indent=1) + "\n").encode(), 0o444)
        os.chmod(staging, 0o755)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging, sha


def _install(store, staging, sha):
    """Rename ``staging`` to store/<sha>; False when an intact copy is there already."""
    final = store / sha
    existing = _load(final, ()) if final.is_dir() else None
    if existing is not None and _unchanged(existing):
        return False
    if final.exists():
        files.remove_tree(final)  # damaged: replaced by the verified copy, same content
    os.rename(staging, final)
    files.fsync_dir(store)
    return True


def add(workdir, path, format="qcow2", name=None, boot=None, progress=None):
    """Verify, hash and store the base image at ``path``; optionally name it. Returns Added.

    ``boot`` is "disk" or "micro" (default: "micro" for a micro build's root, else "disk").
    ``progress(done_bytes, total_bytes)`` is called every 64 MiB of a large file.
    """
    if name is not None:
        validate_name(name)
    if boot not in (None, *BOOTS):
        raise InvalidSpec("boot", f"{boot!r} is not one of {BOOTS}")
    source = os.path.abspath(os.fspath(path))
    if not os.path.lexists(source):
        raise NotFound("image", source)
    qcow2.verify_base(source, format)  # refuse early, before copying gigabytes
    root = _root(workdir)
    store = _ensure_store(root)
    staging, sha = _stage(store, source, format, name, boot or _default_boot(root, source), progress)
    try:
        with files.locked(store):
            created = _install(store, staging, sha)
            if boot and not created:
                _set_boot(store / sha, boot)
            previous = _set_name(root, name, sha) if name else None
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already when it was installed
    return Added(lookup(root, sha), created, previous)


def staging(workdir):
    """A new staging directory in the store (``.add-*``: gc removes it if its maker died)."""
    return Path(tempfile.mkdtemp(prefix=".add-", dir=_ensure_store(_root(workdir))))


def add_oci(workdir, staged, image_id, config, source, oci, names=(), fmt="raw"):
    """Store a container image's root file system: ``staged`` (from ``staging()``) holds
    ``base.<fmt>``, or nothing when the store holds an intact entry of ``image_id`` already
    (then only the names change); ``config`` is the image config's raw bytes, whose sha256 is
    ``image_id``. Names (repo:tag) move to it. Returns Added. ``staged`` is gone afterwards."""
    for name in names:
        validate_name(name)
    root = _root(workdir)
    store = _store(root)
    try:
        if hashlib.sha256(config).hexdigest() != image_id:
            raise ImageError(staged, f"the config does not hash to the image id {image_id}")
        base = staged / f"base.{fmt}"
        if base.exists():
            _stage_oci(staged, base, fmt, image_id, config, source, oci, names)
        with files.locked(store):
            if base.exists():
                created = _install(store, staged, image_id)
            else:
                existing = _load(store / image_id, ())
                if existing is None or not _unchanged(existing):
                    raise ImageError(store / image_id, "was removed or changed during the import; import again")
                created = False
            previous = None
            for name in names:
                previous = _set_name(root, name, image_id) or previous
    finally:
        shutil.rmtree(staged, ignore_errors=True)  # gone already when it was installed
    return Added(lookup(root, image_id), created, previous)


def _stage_oci(staged, base, fmt, image_id, config, source, oci, names):
    info = qcow2.verify_base(base, fmt)
    files.write_atomic(staged / OCI_CONFIG, config, 0o444)
    os.chmod(base, 0o444)
    for name in OCI_FILES:
        if (staged / name).exists():
            os.chmod(staged / name, 0o444)
    meta = {
        "version": 1, "sha256": image_id, "file_sha256": _sha256_file(base), "format": fmt,
        "virtual_size": info.virtual_size, "file_size": os.lstat(base).st_size, "added_at": time.time(),
        "added_as": names[0] if names else None, "source": source, "stamp": files.stamp(os.lstat(base)),
        "boot": "oci", "oci": oci,
    }
    files.write_atomic(staged / META, (json.dumps(meta, indent=1) + "\n").encode(), 0o444)
    os.chmod(staged, 0o755)


def _default_boot(root, source):
    """"micro" when ``source`` is the root file system of a micro build (the same file)."""
    return "micro" if micro.is_root(root, source) else "disk"


def _set_boot(directory, boot):
    """Record a boot kind declared again for stored content (the latest declaration holds)."""
    meta = json.loads((directory / META).read_bytes())
    if meta.get("boot", "disk") != boot:
        meta["boot"] = boot
        files.write_atomic(directory / META, (json.dumps(meta, indent=1) + "\n").encode(), 0o444)


def _set_name(root, name, sha):
    """Point ``name`` at ``sha``; the sha it pointed at before, if another."""
    names = _read_names(root)
    previous = names.get(name)
    if previous != sha:
        names[name] = sha
        _write_names(root, names)
    return previous if previous not in (None, sha) else None


# -- looking up --------------------------------------------------------------------------------

def _load(directory, names):
    """The StoredImage in store directory ``directory``, or None if it is not a whole entry."""
    try:
        meta = json.loads((directory / META).read_bytes())
        fmt, sha, boot = meta["format"], meta["sha256"], meta.get("boot", "disk")
        if fmt not in qcow2.FORMATS or sha != directory.name or boot not in BOOTS:
            return None
        return StoredImage(
            sha256=sha, format=fmt, virtual_size=int(meta["virtual_size"]),
            file_size=int(meta["file_size"]), path=str(directory / f"base.{fmt}"),
            names=tuple(sorted(n for n, s in names.items() if s == sha)) if names else (),
            added_at=float(meta["added_at"]), source=str(meta["source"]), stamp=dict(meta["stamp"]),
            boot=boot, file_sha256=meta.get("file_sha256"), oci=meta.get("oci") if boot == "oci" else None,
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _entries(store):
    try:
        return sorted(e.name for e in os.scandir(store) if SHA_RE.fullmatch(e.name) and e.is_dir())
    except FileNotFoundError:
        return []


def _sha_of(root, ref, names):
    """The sha256 ``ref`` (a name, an id or an id prefix) stands for, or None."""
    if ref in names:
        return names[ref]
    if not isinstance(ref, str) or not PREFIX_RE.fullmatch(ref.lower()):
        return None
    matches = [sha for sha in _entries(_store(root)) if sha.startswith(ref.lower())]
    if len(matches) > 1:
        raise InvalidSpec("image", f"{ref!r} is ambiguous: it starts {len(matches)} stored image ids")
    return matches[0] if matches else None


def lookup(workdir, ref):
    """The StoredImage named (or with the id, or unique id prefix) ``ref``; None if none is."""
    root = _root(workdir)
    names = _read_names(root)
    sha = _sha_of(root, ref, names)
    if sha is None:
        return None
    image = _load(_store(root) / sha, names)
    if image is None and ref in names:
        raise NotFound("image", f"{ref} (its base {sha[:12]} is missing from the store)")
    return image


def list_images(workdir):
    """Every stored base, oldest first."""
    root = _root(workdir)
    names = _read_names(root)
    images = (_load(_store(root) / sha, names) for sha in _entries(_store(root)))
    return sorted((i for i in images if i is not None), key=lambda i: i.added_at)


def _unchanged(image):
    """Whether the base is still a 0444 regular file with the stamp recorded at add time."""
    try:
        st = os.lstat(image.path)
    except OSError:
        return False
    return (stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o444
            and files.stamp(st) == image.stamp)


def _sha256_file(path):
    digest = hashlib.sha256()
    with os.fdopen(_open_source(path), "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _recheck(root, image):
    """Hash a base whose stamp changed; raise UnsafeImage unless its content is the same."""
    try:
        before = os.lstat(image.path)
        sha = _sha256_file(image.path)
        after = os.lstat(image.path)
    except (OSError, ImageError) as err:
        raise UnsafeImage(image.path, f"stored base {image.sha256[:12]} is missing or unreadable") from err
    if (sha != (image.file_sha256 or image.sha256) or stat.S_IMODE(after.st_mode) != 0o444
            or files.stamp(before) != files.stamp(after)):
        raise UnsafeImage(image.path, f"stored base {image.sha256[:12]} was modified after it was added; "
                                      f"remove it ('vmiso image rm {image.sha256[:12]}') and add it again")
    # Same content (a touch, or a copy put back, changes the stamp): record the new stamp, so
    # the next launch is cheap again.
    store = _store(root)
    with files.locked(store):
        directory = store / image.sha256
        meta = json.loads((directory / META).read_bytes())
        meta["stamp"] = files.stamp(after)
        files.write_atomic(directory / META, (json.dumps(meta, indent=1) + "\n").encode(), 0o444)


def verified(workdir, ref):
    """(StoredImage, ImageInfo) for a stored base that is safe to boot, or None if ``ref`` names
    none. Cheap: a stamp comparison and a header check; a full hash only if the stamp changed."""
    root = _root(workdir)
    image = lookup(root, ref)
    if image is None:
        return None
    if not _unchanged(image):
        _recheck(root, image)
    return image, qcow2.verify_base(image.path, image.format)


# -- rm, gc ---------------------------------------------------------------------------------

def rm(workdir, ref):
    """Remove name ``ref``, or the image with id (prefix) ``ref`` and all its names.

    The base itself goes when no name is left on it; InUse if a live container uses it then.
    Returns (names removed, sha256, whether the base was removed)."""
    root = _root(workdir)
    store = _store(root)
    if not store.is_dir():
        raise NotFound("image", ref)
    with files.locked(store):
        names = _read_names(root)
        if ref in names and not (store / names[ref]).is_dir():
            del names[ref]  # a dangling name: nothing else to remove
            _write_names(root, names)
            return [ref], None, False
        image = lookup(root, ref)
        if image is None:
            raise NotFound("image", ref)
        if ref in names and len(image.names) > 1:
            del names[ref]
            _write_names(root, names)
            return [ref], image.sha256, False
        in_use = inuse.users_of(image.path, inuse.users(root))
        if in_use:
            raise InUse("image", ref, in_use)
        # Names first: a crash in between leaves an unnamed base, which gc collects.
        dropped = [n for n, sha in names.items() if sha == image.sha256]
        if dropped:
            _write_names(root, {n: s for n, s in names.items() if s != image.sha256})
        files.remove_tree(store / image.sha256)
        return dropped, image.sha256, True


def collectable(workdir, names, used):
    """What gc may remove of the store: names that point at nothing, unnamed bases that no live
    container uses (``used``: inuse.users()), what killed adds and removals left."""
    root = _root(workdir)
    store = _store(root)
    stored = set(_entries(store))
    index = str(Workdir(root).image_names)
    found = [Collected("name", n, index, 0) for n, sha in sorted(names.items()) if sha not in stored]
    found += [garbage.of_dir("store", store / image.sha256) for image in list_images(root)
              if not image.names and not inuse.users_of(image.path, used)]
    return found + garbage.partials(store)


def gc(workdir, dry_run=False, cache=None, on_wait=None):
    """Remove what each image component says is garbage: unnamed stored bases and old micro
    builds that no live container uses, lean kernels of the host ``cache`` (a HostCache or its
    path, default HostCache()) that no micro build of any work dir using it was made from, names
    that point at nothing, what killed adds left, and the layer cache's blobs that no container
    image left in the store came from. Returns what was (or would be) removed. ``on_wait()``: called
    before waiting for a pull or import that holds the layer cache."""
    root = _root(workdir)
    if not Workdir(root).images.is_dir():
        return []
    store = _ensure_store(root)
    with files.locked(store):
        names = _read_names(root)
        used = inuse.users(root)
        builds = micro.collectable(root, used)
        kept = micro.kept_kernels(root, {c.id for c in builds if c.kind == "micro"}, cache)
        found = collectable(root, names, used) + builds + lean.collectable(HostCache.of(cache).kernels, kept)
        if not dry_run:
            _collect(root, names, found)
    # After the store's lock is released: an import takes the layer cache's lock, then the
    # store's. What this gc removed is gone from the store, so its blobs go now too (a dry
    # run counts the images it would remove as gone).
    removed = {c.id for c in found if c.kind == "store"}
    found += oci_cache.collect(root, lambda: oci_cache.referenced(
        [image for image in list_images(root) if image.sha256 not in removed]), dry_run, on_wait)
    return found


def _collect(root, names, found):
    dangling = {c.id for c in found if c.kind == "name"}
    if dangling:
        _write_names(root, {n: s for n, s in names.items() if n not in dangling})
    for c in found:
        if c.kind in ("store", "micro", "kernel"):
            files.remove_tree(c.path)
        elif c.kind == "partial":
            shutil.rmtree(c.path, ignore_errors=True)
