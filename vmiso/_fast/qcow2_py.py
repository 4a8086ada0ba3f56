"""qcow2 overlay writer and header parser, pure Python (twin of vmiso/_fast/qcow2.pyx).

Both modules have the same names, results and errors; tests compare them on the same inputs.
Layout and limits follow QEMU (its docs/interop/qcow2.txt): the overlay is what
``qemu-img create -f qcow2 -b BASE -F FMT`` writes, byte for byte, whenever one refcount block
covers the metadata (always at cluster_bits >= 14).
"""
import os
import struct

from vmiso.errors import ImageError

MAGIC = b"QFI\xfb"
_EXT_END = 0
_EXT_BACKING_FORMAT = 0xE2792ACA
_EXT_FEATURE_TABLE = 0x6803F857
_EXT_DATA_FILE = 0x44415441
_EXT_ENCRYPTION = 0x0537BE77

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MAX_BACKING_NAME = 1023  # QEMU's limit
MAX_FORMAT_NAME = 15  # QEMU keeps the backing format in a char[16]
_MAX_L1_ENTRIES = 0x2000000 // 8  # QCOW_MAX_L1_SIZE: 32 MiB of L1 table
_MAX_REFTABLE_BYTES = 0x800000  # QCOW_MAX_REFTABLE_SIZE
_MAX_SNAPSHOTS = 65536
_SNAPSHOT_HEADER_SIZE = 40  # the fixed part of one snapshot table entry
_INT64_MAX = (1 << 63) - 1
_SECTOR = 512
_HEADER_LENGTH = 112
_DATA_PATH = "<data>"

# The feature name table qemu-img writes (8 entries of 48 bytes: type, bit, name).
FEATURE_TABLE = b"".join(
    struct.pack(">BB46s", kind, bit, name)
    for kind, bit, name in (
        (0, 0, b"dirty bit"), (0, 1, b"corrupt bit"), (0, 2, b"external data file"),
        (0, 3, b"compression type"), (0, 4, b"extended L2 entries"), (1, 0, b"lazy refcounts"),
        (2, 0, b"bitmaps"), (2, 1, b"raw external data"),
    )
)
# QEMU leaves the feature table out when clusters are this small (the header must fit).
_FEATURE_TABLE_MIN_CLUSTER = 8192

_HEADER_V2 = struct.Struct(">4sIQIIQIIQQIIQ")
_HEADER_V3 = struct.Struct(">QQQII")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


def _pad8(n):
    return (n + 7) & ~7


# ---------------------------------------------------------------- writer


def _check_name(path, what, name, limit):
    if not isinstance(name, bytes):
        raise ImageError(path, f"{what} must be bytes")
    if not 1 <= len(name) <= limit:
        raise ImageError(path, f"{what} must be 1 to {limit} bytes, not {len(name)}")
    if b"\0" in name:
        raise ImageError(path, f"{what} contains a NUL byte")


def _layout(size, cluster_bits):
    """(virtual size, l1_size, rt_clusters, rb_clusters, used clusters) for an empty overlay."""
    if not isinstance(cluster_bits, int) or not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        return None, f"cluster_bits must be {MIN_CLUSTER_BITS} to {MAX_CLUSTER_BITS}"
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        return None, "virtual size must be a positive integer"
    l1_coverage = 1 << (2 * cluster_bits - 3)
    if size > _MAX_L1_ENTRIES * l1_coverage:
        return None, f"virtual size too large for {1 << cluster_bits}-byte clusters " \
                     f"(at most {_MAX_L1_ENTRIES * l1_coverage} bytes)"
    vsize = (size + _SECTOR - 1) // _SECTOR * _SECTOR  # QEMU rounds up to whole sectors
    cluster = 1 << cluster_bits
    l1_size = (vsize + l1_coverage - 1) // l1_coverage
    l1_clusters = (l1_size * 8 + cluster - 1) // cluster
    per_block = cluster // 2  # 16-bit refcounts
    rt, rb = 1, 1
    while True:  # grows monotonically to the fixed point: header, table, blocks, L1
        used = 1 + rt + rb + l1_clusters
        need_rb = (used + per_block - 1) // per_block
        need_rt = (need_rb * 8 + cluster - 1) // cluster
        if (need_rb, need_rt) == (rb, rt):
            return (vsize, l1_size, rt, rb, used), None
        rb, rt = max(rb, need_rb), max(rt, need_rt)


def _header(vsize, cluster_bits, l1_size, rt, rb, backing, backing_format):
    """Cluster 0 up to the end of the backing file name, or None if it does not fit."""
    cluster = 1 << cluster_bits
    exts = struct.pack(">II", _EXT_BACKING_FORMAT, len(backing_format)) + backing_format
    exts += b"\0" * (_pad8(len(exts)) - len(exts))
    if cluster >= _FEATURE_TABLE_MIN_CLUSTER:
        exts += struct.pack(">II", _EXT_FEATURE_TABLE, len(FEATURE_TABLE)) + FEATURE_TABLE
    exts += b"\0" * 8
    name_offset = _HEADER_LENGTH + len(exts)
    if name_offset + len(backing) > cluster:
        return None
    head = _HEADER_V2.pack(
        MAGIC, 3, name_offset, len(backing), cluster_bits, vsize, 0, l1_size,
        (1 + rt + rb) << cluster_bits, 1 << cluster_bits, rt, 0, 0,
    ) + _HEADER_V3.pack(0, 0, 0, 4, _HEADER_LENGTH) + b"\0" * 8
    return head + exts + backing


def write_overlay(path, size, backing, backing_format, cluster_bits=16):
    """Create ``path`` as an empty qcow2 v3 overlay of ``size`` bytes over ``backing``.

    ``backing`` is the backing file name as stored (bytes, 1-1023, no NUL) and ``backing_format``
    its format (bytes). Exclusive create, mode 0600, never follows a symlink; a partial file is
    removed on error. Raises ImageError (with the OSError as __cause__ for system errors).
    """
    path = os.fsdecode(path)
    _check_name(path, "backing file name", backing, MAX_BACKING_NAME)
    _check_name(path, "backing format", backing_format, MAX_FORMAT_NAME)
    layout, problem = _layout(size, cluster_bits)
    if problem:
        raise ImageError(path, problem)
    vsize, l1_size, rt, rb, used = layout
    head = _header(vsize, cluster_bits, l1_size, rt, rb, backing, backing_format)
    if head is None:
        raise ImageError(path, "header and backing file name do not fit in the first cluster")
    rb_offset = (1 + rt) << cluster_bits
    table = b"".join(_U64.pack(rb_offset + (i << cluster_bits)) for i in range(rb))
    refcounts = b"\0\1" * used  # the blocks are contiguous: one flat array of 16-bit counts
    end = ((1 + rt + rb) << cluster_bits) + 8 * l1_size
    _write(path, head, table, refcounts, 1 << cluster_bits, rb_offset, end)


def _write(path, head, table, refcounts, rt_offset, rb_offset, end):
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as err:
        raise ImageError(path, f"cannot create overlay: {err.strerror}") from err
    try:
        try:
            # Everything not written here is zero: the L1 table and the rest of each cluster.
            _pwrite_all(fd, head, 0)
            _pwrite_all(fd, table, rt_offset)
            _pwrite_all(fd, refcounts, rb_offset)
            os.ftruncate(fd, end)
        finally:
            os.close(fd)
    except OSError as err:
        try:
            os.unlink(path)
        except OSError:
            pass
        raise ImageError(path, f"cannot write overlay: {err.strerror}") from err


def _pwrite_all(fd, data, offset):
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        if done <= 0:
            raise OSError(28, os.strerror(28))  # ENOSPC: a zero-byte write made no progress
        view = view[done:]
        offset += done


# ---------------------------------------------------------------- parser


def _fail(path, message):
    raise ImageError(path, message)


def _check_table(path, what, offset, entries, entry_len, max_bytes, cluster_bits, file_size):
    """QEMU's table validation, plus: the table lies inside the file and not in cluster 0."""
    if entries > max_bytes // entry_len:
        _fail(path, f"{what} too large ({entries} entries)")
    length = entries * entry_len
    if offset > _INT64_MAX - length:
        _fail(path, f"{what} offset out of range")
    if offset & ((1 << cluster_bits) - 1):
        _fail(path, f"{what} offset {offset:#x} is not cluster aligned")
    if length:
        if offset == 0:
            _fail(path, f"{what} overlaps the header")
        if offset + length > file_size:
            _fail(path, f"{what} lies beyond the end of the file")


def _name(path, what, data, start, length):
    raw = data[start:start + length]
    if b"\0" in raw:
        _fail(path, f"{what} contains a NUL byte")
    return raw.decode("utf-8", "surrogateescape")


def _extensions(path, data, start, end, out):
    """Walk the header extensions in data[start:end]; fill ``out``."""
    offset = start
    seen = out["extensions"]
    while offset < end:
        if end - offset < 8:
            _fail(path, "truncated header extension")
        if offset + 8 > len(data):
            _fail(path, "header extensions run past the data read")
        kind, length = struct.unpack_from(">II", data, offset)
        offset += 8
        if kind == _EXT_END:
            return
        if length > end - offset:
            _fail(path, f"header extension {kind:#x} too large")
        if offset + length > len(data):
            _fail(path, "header extensions run past the data read")
        if kind in seen:
            _fail(path, f"duplicate header extension {kind:#x}")
        seen.append(kind)
        if kind == _EXT_BACKING_FORMAT:
            if length > MAX_FORMAT_NAME:
                _fail(path, "backing format name too long")
            out["backing_format"] = _name(path, "backing format", data, offset, length)
        elif kind == _EXT_DATA_FILE:
            out["data_file"] = _name(path, "data file name", data, offset, length)
        elif kind == _EXT_ENCRYPTION:
            if length != 16:
                _fail(path, "bad encryption header extension length")
            out["has_encryption_header"] = True
        offset += _pad8(length)


def parse_header(data, file_size, path=_DATA_PATH):
    """Parse a qcow2 header, its extensions and backing file name from the start of a file.

    ``data`` is the first bytes of the file (at least all of cluster 0 or the whole file),
    ``file_size`` its full size. Returns a dict; raises only ImageError.
    """
    if not isinstance(data, (bytes, bytearray)):
        _fail(path, "header data must be bytes")
    if not isinstance(file_size, int) or isinstance(file_size, bool) or file_size < len(data):
        _fail(path, "file size must be an integer no smaller than the data")
    if file_size > _INT64_MAX:
        _fail(path, "file size out of range")
    if len(data) < 4 or data[:4] != MAGIC:
        _fail(path, "not a qcow2 image (bad magic)")
    if len(data) < _HEADER_V2.size:
        _fail(path, "truncated qcow2 header")
    (_, version, bf_offset, bf_size, cluster_bits, size, crypt, l1_size, l1_offset,
     rt_offset, rt_clusters, nb_snapshots, sn_offset) = _HEADER_V2.unpack_from(data, 0)
    if version not in (2, 3):
        _fail(path, f"unsupported qcow2 version {version}")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        _fail(path, f"cluster_bits {cluster_bits} out of range {MIN_CLUSTER_BITS}-{MAX_CLUSTER_BITS}")
    cluster = 1 << cluster_bits
    out = {
        "version": version, "virtual_size": size, "cluster_bits": cluster_bits,
        "cluster_size": cluster, "backing_file": None, "backing_format": None,
        "incompatible_features": 0, "compatible_features": 0, "autoclear_features": 0,
        "crypt_method": crypt, "l1_size": l1_size, "l1_table_offset": l1_offset,
        "refcount_table_offset": rt_offset, "refcount_table_clusters": rt_clusters,
        "nb_snapshots": nb_snapshots, "snapshots_offset": sn_offset, "refcount_order": 4,
        "header_length": _HEADER_V2.size, "data_file": None, "has_encryption_header": False,
        "extensions": [],
    }
    if version == 3:
        _header_v3(path, data, cluster, out)
    _check_fields(path, out, file_size)
    ext_end = bf_offset if bf_offset else cluster
    _extensions(path, data, out["header_length"], min(ext_end, cluster), out)
    if bf_offset and bf_size:
        if bf_offset > cluster or bf_size > min(MAX_BACKING_NAME, cluster - bf_offset):
            _fail(path, "backing file name out of bounds")
        if bf_offset + bf_size > len(data):
            _fail(path, "backing file name runs past the data read")
        out["backing_file"] = _name(path, "backing file name", data, bf_offset, bf_size)
    return out


def _header_v3(path, data, cluster, out):
    if len(data) < 104:
        _fail(path, "truncated qcow2 v3 header")
    incompatible, compatible, autoclear, order, length = _HEADER_V3.unpack_from(data, 72)
    if length < 104 or length % 8:
        _fail(path, f"bad header_length {length}")
    if length > cluster:
        _fail(path, "header_length exceeds the cluster size")
    if length > len(data):
        _fail(path, "truncated qcow2 header")
    if order > 6:
        _fail(path, f"refcount_order {order} out of range")
    out.update(incompatible_features=incompatible, compatible_features=compatible,
               autoclear_features=autoclear, refcount_order=order, header_length=length)


def _check_fields(path, out, file_size):
    bits = out["cluster_bits"]
    size = out["virtual_size"]
    if size > _INT64_MAX:
        _fail(path, "virtual size out of range")
    l1_coverage_bits = 2 * bits - 3
    needed = (size >> l1_coverage_bits) + (1 if size & ((1 << l1_coverage_bits) - 1) else 0)
    if out["l1_size"] < needed:
        _fail(path, "L1 table too small for the virtual size")
    if out["refcount_table_clusters"] == 0:
        _fail(path, "no refcount table")
    if out["nb_snapshots"] > _MAX_SNAPSHOTS:
        _fail(path, "too many snapshots")
    _check_table(path, "L1 table", out["l1_table_offset"], out["l1_size"], 8,
                 _MAX_L1_ENTRIES * 8, bits, file_size)
    _check_table(path, "refcount table", out["refcount_table_offset"],
                 out["refcount_table_clusters"], 1 << bits, _MAX_REFTABLE_BYTES, bits, file_size)
    _check_table(path, "snapshot table", out["snapshots_offset"], out["nb_snapshots"],
                 _SNAPSHOT_HEADER_SIZE, _MAX_SNAPSHOTS * _SNAPSHOT_HEADER_SIZE, bits, file_size)
