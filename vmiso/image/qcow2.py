"""qcow2 overlays and base-image inspection: create a task's overlay, read and vet a base's header.

Nothing here runs qemu-img: headers are read with O_NOFOLLOW and parsed by vmiso._fast's qcow2
module (Cython, or its pure-Python twin). ``verify_base`` is the safety gate for base images;
``create_overlay`` is on the launch path and writes the overlay natively in microseconds.
"""
import errno
import os
import stat
from dataclasses import dataclass
from typing import Optional

from vmiso import _fast
from vmiso.errors import ImageError, UnsafeImage

FORMATS = ("qcow2", "raw")
FIRST_READ = 4096  # holds the header, extensions and backing name of any sane image
MAX_VIRTUAL_SIZE = 1 << 51  # 2 PiB: the most qemu-img allows at 64 KiB clusters
KNOWN_INCOMPATIBLE = 0x1F  # dirty, corrupt, external data file, compression type, extended L2
DIRTY, CORRUPT, EXTERNAL_DATA = 1, 2, 4
QCOW2_MAGIC = b"QFI\xfb"


@dataclass(frozen=True)
class ImageInfo:
    """What a disk image's header says (for raw: format "raw" and the file size)."""

    path: str
    format: str
    version: Optional[int]
    virtual_size: int
    cluster_size: Optional[int]
    backing_file: Optional[str]
    backing_format: Optional[str]
    data_file: Optional[str]
    encrypted: bool
    incompatible_features: int
    compatible_features: int
    dirty: bool
    corrupt: bool


def _message(err):
    """An ImageError's message without its path prefix."""
    text = str(err)
    prefix = f"{err.path}: "
    return text[len(prefix):] if text.startswith(prefix) else text


def _open_regular(path):
    """(fd, size) of a regular file, never following a symlink (the caller closes fd)."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK  # NONBLOCK: a FIFO won't hang
    try:
        fd = os.open(path, flags)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise UnsafeImage(path, "is a symbolic link (refused)") from err
        raise ImageError(path, f"cannot open: {err.strerror}") from err
    try:
        st = os.fstat(fd)
    except OSError as err:
        os.close(fd)
        raise ImageError(path, f"cannot stat: {err.strerror}") from err
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise UnsafeImage(path, "not a regular file")
    return fd, st.st_size


def _read_header(path):
    """(file size, parsed header or None for raw). Reads the first 4 KiB, and all of cluster 0
    only when the header does not parse from those."""
    fd, file_size = _open_regular(path)
    parse = _fast.load("qcow2").parse_header
    try:
        head = _pread(fd, min(FIRST_READ, file_size), 0)
        if head[:4] != QCOW2_MAGIC:
            return file_size, None
        try:
            return file_size, parse(head, file_size, path)
        except ImageError:
            bits = int.from_bytes(head[20:24], "big") if len(head) >= 24 else 21
            whole = min(1 << min(max(bits, 9), 21), file_size)
            if len(head) >= whole:
                raise
            return file_size, parse(head + _pread(fd, whole - len(head), len(head)), file_size, path)
    except OSError as err:
        raise ImageError(path, f"cannot read: {err.strerror}") from err
    finally:
        os.close(fd)


def _pread(fd, size, offset):
    chunks = []
    while size > 0:
        chunk = os.pread(fd, size, offset)
        if not chunk:
            break  # the file shrank: the parser reports what is missing
        chunks.append(chunk)
        size -= len(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def inspect(path):
    """ImageInfo of ``path`` from its header; a file without the qcow2 magic is raw."""
    path = os.fspath(path)
    file_size, h = _read_header(path)
    if h is None:
        return ImageInfo(path, "raw", None, file_size, None, None, None, None, False, 0, 0,
                         False, False)
    incompatible = h["incompatible_features"]
    return ImageInfo(
        path=path, format="qcow2", version=h["version"], virtual_size=h["virtual_size"],
        cluster_size=h["cluster_size"], backing_file=h["backing_file"],
        backing_format=h["backing_format"], data_file=h["data_file"],
        encrypted=bool(h["crypt_method"]) or h["has_encryption_header"],
        incompatible_features=incompatible, compatible_features=h["compatible_features"],
        dirty=bool(incompatible & DIRTY), corrupt=bool(incompatible & CORRUPT),
    )


def verify_base(path, declared_format):
    """ImageInfo of a base image that is safe to put under overlays; UnsafeImage otherwise."""
    path = os.fspath(path)
    if declared_format not in FORMATS:
        raise UnsafeImage(path, f"declared format {declared_format!r} is not one of {FORMATS}")
    try:
        info = inspect(path)
    except UnsafeImage:
        raise
    except ImageError as err:
        raise UnsafeImage(path, f"unreadable or damaged image: {_message(err)}") from err
    if info.format != declared_format:
        raise UnsafeImage(path, f"declared {declared_format} but the file is {info.format}")
    if not 0 < info.virtual_size <= MAX_VIRTUAL_SIZE:
        raise UnsafeImage(path, f"virtual size {info.virtual_size} is out of bounds")
    problem = next(_qcow2_problems(info), None)
    if problem:
        raise UnsafeImage(path, problem)
    return info


def _qcow2_problems(info):
    """Why a qcow2 base is unsafe, most serious first (nothing for raw)."""
    if info.format != "qcow2":
        return
    features = info.incompatible_features
    if info.backing_file is not None:
        yield f"has a backing file ({info.backing_file!r})"
    if info.data_file is not None or features & EXTERNAL_DATA:
        yield "uses an external data file"
    if info.encrypted:
        yield "is encrypted"
    if features & ~KNOWN_INCOMPATIBLE:
        yield f"has unknown incompatible features {features & ~KNOWN_INCOMPATIBLE:#x}"
    if info.dirty:
        yield "is dirty (not cleanly closed; needs qemu-img check -r)"
    if info.corrupt:
        yield "is marked corrupt"


def create_overlay(path, backing, backing_format="qcow2", size=None, cluster_bits=16):
    """Create ``path``: an empty qcow2 overlay over ``backing``, stored by name as given.

    A relative backing name is resolved against the overlay's directory (as QEMU does). ``size``
    defaults to the base's virtual size (a raw base's file size) and may not be smaller.
    """
    path = os.fspath(path)
    if backing_format not in FORMATS:
        raise ImageError(path, f"backing format {backing_format!r} is not one of {FORMATS}")
    name = os.fsencode(os.fspath(backing))
    resolved = os.path.join(os.path.dirname(path), os.fsdecode(name))
    base = inspect(resolved)
    if base.format != backing_format:
        raise ImageError(path, f"backing file {resolved} is {base.format}, not {backing_format}")
    if size is None:
        size = base.virtual_size
    elif not isinstance(size, int) or isinstance(size, bool):
        raise ImageError(path, f"size must be an integer, not {size!r}")
    elif size < base.virtual_size:
        raise ImageError(path, f"size {size} is smaller than the base's {base.virtual_size} bytes")
    _fast.load("qcow2").write_overlay(path, size, name, backing_format.encode(), cluster_bits)


def create_overlay_on_verified(path, backing, backing_format, size, cluster_bits=16):
    """The launch path's writer: ``backing`` was verified (``verify_base``, at resolve time) and
    ``size`` compared with its virtual size already, so its header is not read a second time."""
    _fast.load("qcow2").write_overlay(os.fspath(path), size, os.fsencode(os.fspath(backing)),
                                      backing_format.encode(), cluster_bits)
