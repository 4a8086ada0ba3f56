# cython: language_level=3
"""qcow2 overlay writer and header parser in Cython (twin: vmiso/_fast/qcow2_py.py).

The launch path creates one overlay per task, so the writer builds the header in a C buffer and
makes the few system calls (open, three pwrite, ftruncate, close) without the GIL. Both modules
have the same names, results and errors; tests compare them on the same inputs.
"""
import os

from libc.errno cimport EINTR, ENOSPC, errno
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset
from posix.fcntl cimport O_CLOEXEC, O_CREAT, O_EXCL, O_WRONLY, open
from posix.types cimport off_t
from posix.unistd cimport close, ftruncate, pwrite, unlink

from vmiso.errors import ImageError


cdef extern from "<fcntl.h>" nogil:
    enum: O_NOFOLLOW

cdef extern from "<string.h>" nogil:
    char *strerror(int errnum)

cdef extern from "Python.h":
    bytes PyUnicode_EncodeFSDefault(object unicode)  # what os.fsencode does for a str


MAGIC = b"QFI\xfb"
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MAX_BACKING_NAME = 1023  # QEMU's limit
MAX_FORMAT_NAME = 15  # QEMU keeps the backing format in a char[16]
_INT64_MAX = (1 << 63) - 1
_DATA_PATH = "<data>"

# The same limits as C values, usable without the GIL (see qcow2_py.py for their sources).
cdef enum:
    HEADER_BUF = 2048  # 112 + 24 + 392 + 8 + 1023 fits
    SMALL_TABLES = 512  # refcount table + block bytes that fit on the stack
    C_HEADER_LENGTH = 112
    C_SECTOR = 512
    C_FEATURE_TABLE_MIN_CLUSTER = 8192
    C_MAX_FORMAT_NAME = 15
    C_MAX_BACKING_NAME = 1023
cdef uint64_t C_INT64_MAX = 0x7FFFFFFFFFFFFFFF
cdef uint64_t C_MAX_L1_ENTRIES = 0x2000000 // 8
cdef uint64_t C_MAX_REFTABLE_BYTES = 0x800000
cdef uint64_t C_MAX_SNAPSHOTS = 65536
cdef uint64_t C_SNAPSHOT_HEADER_SIZE = 40
cdef uint32_t C_EXT_END = 0
cdef uint32_t C_EXT_BACKING_FORMAT = 0xE2792ACA
cdef uint32_t C_EXT_FEATURE_TABLE = 0x6803F857
cdef uint32_t C_EXT_DATA_FILE = 0x44415441
cdef uint32_t C_EXT_ENCRYPTION = 0x0537BE77

# The feature name table qemu-img writes (8 entries of 48 bytes: type, bit, name).
cdef bytes _features():
    cdef bytes out = b""
    for kind, bit, name in (
        (0, 0, b"dirty bit"), (0, 1, b"corrupt bit"), (0, 2, b"external data file"),
        (0, 3, b"compression type"), (0, 4, b"extended L2 entries"), (1, 0, b"lazy refcounts"),
        (2, 0, b"bitmaps"), (2, 1, b"raw external data"),
    ):
        out += bytes((kind, bit)) + name + b"\0" * (46 - len(name))
    return out


FEATURE_TABLE = _features()
cdef bytes _FEATURE_TABLE = FEATURE_TABLE


# ---------------------------------------------------------------- big-endian helpers

cdef inline void put32(uint8_t *p, uint32_t v) noexcept nogil:
    p[0] = v >> 24
    p[1] = v >> 16
    p[2] = v >> 8
    p[3] = v


cdef inline void put64(uint8_t *p, uint64_t v) noexcept nogil:
    put32(p, <uint32_t>(v >> 32))
    put32(p + 4, <uint32_t>v)


cdef inline uint32_t get32(const uint8_t *p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline uint64_t get64(const uint8_t *p) noexcept nogil:
    return (<uint64_t>get32(p) << 32) | get32(p + 4)


cdef inline uint64_t pad8(uint64_t n) noexcept nogil:
    return (n + 7) & ~(<uint64_t>7)


# ---------------------------------------------------------------- writer

cdef bytes _check_name(str path, str what, object name, Py_ssize_t limit):
    """``name`` as exact bytes, if it is a valid name."""
    if not isinstance(name, bytes):
        raise ImageError(path, f"{what} must be bytes")
    cdef bytes b = name if type(name) is bytes else bytes(name)
    cdef Py_ssize_t n = len(b)
    if not 1 <= n <= limit:
        raise ImageError(path, f"{what} must be 1 to {limit} bytes, not {n}")
    if b"\0" in b:
        raise ImageError(path, f"{what} contains a NUL byte")
    return b


cdef struct Layout:
    uint64_t vsize
    uint64_t l1_size
    uint64_t rt
    uint64_t rb
    uint64_t used


cdef object _layout(object size, object cluster_bits, Layout *out):
    """Fill ``out``; return None, or the problem as a message (same as the twin)."""
    if not isinstance(cluster_bits, int) or not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        return f"cluster_bits must be {MIN_CLUSTER_BITS} to {MAX_CLUSTER_BITS}"
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        return "virtual size must be a positive integer"
    cdef int bits = cluster_bits
    cdef uint64_t coverage = (<uint64_t>1) << (2 * bits - 3)
    if size > C_MAX_L1_ENTRIES * coverage:  # at most 2**61: no overflow
        return (f"virtual size too large for {1 << bits}-byte clusters "
                f"(at most {C_MAX_L1_ENTRIES * coverage} bytes)")
    cdef uint64_t csize = size
    cdef uint64_t cluster = (<uint64_t>1) << bits
    cdef uint64_t per_block = cluster // 2
    cdef uint64_t l1_clusters, need_rb, need_rt
    out.vsize = (csize + C_SECTOR - 1) // C_SECTOR * C_SECTOR
    out.l1_size = (out.vsize + coverage - 1) // coverage
    l1_clusters = (out.l1_size * 8 + cluster - 1) // cluster
    out.rt = 1
    out.rb = 1
    while True:  # grows monotonically to the fixed point: header, table, blocks, L1
        out.used = 1 + out.rt + out.rb + l1_clusters
        need_rb = (out.used + per_block - 1) // per_block
        need_rt = (need_rb * 8 + cluster - 1) // cluster
        if need_rb == out.rb and need_rt == out.rt:
            return None
        out.rb = max(out.rb, need_rb)
        out.rt = max(out.rt, need_rt)


cdef Py_ssize_t _header(uint8_t *buf, const Layout *lay, int bits, const char *backing,
                        Py_ssize_t backing_len, const char *fmt, Py_ssize_t fmt_len,
                        const char *features, Py_ssize_t features_len) noexcept nogil:
    """Write cluster 0 up to the end of the backing name into buf; its length, or -1."""
    cdef uint64_t cluster = (<uint64_t>1) << bits
    cdef Py_ssize_t pos = C_HEADER_LENGTH
    cdef Py_ssize_t name_offset = pos + 8 + pad8(fmt_len) + 8
    if cluster >= C_FEATURE_TABLE_MIN_CLUSTER:
        name_offset += 8 + features_len
    if <uint64_t>(name_offset + backing_len) > cluster:
        return -1
    memset(buf, 0, name_offset)
    memcpy(buf, b"QFI\xfb", 4)
    put32(buf + 4, 3)
    put64(buf + 8, name_offset)
    put32(buf + 16, <uint32_t>backing_len)
    put32(buf + 20, bits)
    put64(buf + 24, lay.vsize)
    put32(buf + 36, <uint32_t>lay.l1_size)
    put64(buf + 40, (1 + lay.rt + lay.rb) << bits)
    put64(buf + 48, cluster)
    put32(buf + 56, <uint32_t>lay.rt)
    put32(buf + 96, 4)
    put32(buf + 100, C_HEADER_LENGTH)
    put32(buf + pos, C_EXT_BACKING_FORMAT)
    put32(buf + pos + 4, <uint32_t>fmt_len)
    memcpy(buf + pos + 8, fmt, fmt_len)
    pos += 8 + pad8(fmt_len)
    if cluster >= C_FEATURE_TABLE_MIN_CLUSTER:
        put32(buf + pos, C_EXT_FEATURE_TABLE)
        put32(buf + pos + 4, <uint32_t>features_len)
        memcpy(buf + pos + 8, features, features_len)
        pos += 8 + features_len
    memcpy(buf + name_offset, backing, backing_len)  # the end marker is the zeroed 8 bytes before
    return name_offset + backing_len


cdef int _pwrite_all(int fd, const uint8_t *p, size_t n, off_t offset) noexcept nogil:
    """0, or an errno."""
    cdef ssize_t done
    while n:
        done = pwrite(fd, p, n, offset)
        if done < 0:
            if errno == EINTR:
                continue
            return errno
        if done == 0:
            return ENOSPC  # a zero-byte write made no progress
        p += done
        n -= done
        offset += done
    return 0


cdef int _write_file(int fd, const uint8_t *head, size_t head_len, const uint8_t *table,
                     size_t table_len, off_t rt_offset, const uint8_t *refcounts,
                     size_t rc_len, off_t rb_offset, off_t end) noexcept nogil:
    """Everything not written here is zero: the L1 table and the rest of each cluster."""
    cdef int err = _pwrite_all(fd, head, head_len, 0)
    if not err:
        err = _pwrite_all(fd, table, table_len, rt_offset)
    if not err:
        err = _pwrite_all(fd, refcounts, rc_len, rb_offset)
    if not err and ftruncate(fd, end) != 0:
        err = errno
    return err


def _os_error(int err, str path):
    return OSError(err, strerror(err).decode("utf-8", "replace"), path)


def write_overlay(path, size, backing, backing_format, cluster_bits=16):
    """Create ``path`` as an empty qcow2 v3 overlay of ``size`` bytes over ``backing``.

    ``backing`` is the backing file name as stored (bytes, 1-1023, no NUL) and ``backing_format``
    its format (bytes). Exclusive create, mode 0600, never follows a symlink; a partial file is
    removed on error. Raises ImageError (with the OSError as __cause__ for system errors).
    """
    # A str path (the usual case) needs no os.fsdecode call; the encoding below is os.fsencode's.
    cdef str spath = path if type(path) is str else os.fsdecode(path)
    cdef bytes bname = _check_name(spath, "backing file name", backing, MAX_BACKING_NAME)
    cdef bytes bfmt = _check_name(spath, "backing format", backing_format, MAX_FORMAT_NAME)
    cdef Layout lay
    memset(&lay, 0, sizeof(lay))
    problem = _layout(size, cluster_bits, &lay)
    if problem is not None:
        raise ImageError(spath, problem)
    cdef int bits = cluster_bits
    cdef uint8_t head[HEADER_BUF]
    cdef Py_ssize_t head_len = _header(head, &lay, bits, bname, len(bname), bfmt, len(bfmt),
                                       _FEATURE_TABLE, len(_FEATURE_TABLE))
    if head_len < 0:
        raise ImageError(spath, "header and backing file name do not fit in the first cluster")
    cdef bytes encoded = PyUnicode_EncodeFSDefault(spath)
    if b"\0" in encoded:  # open() would stop at the NUL and create another file
        raise ValueError("embedded null byte")  # what os.open raises in the twin
    cdef const char *cpath = encoded
    cdef size_t table_len = lay.rb * 8
    cdef size_t rc_len = lay.used * 2
    cdef uint8_t small[SMALL_TABLES]
    cdef uint8_t *tables = small
    if table_len + rc_len > SMALL_TABLES:
        tables = <uint8_t *>malloc(table_len + rc_len)
        if tables == NULL:
            raise MemoryError()
    cdef off_t rb_offset = (1 + lay.rt) << bits
    cdef off_t end = ((1 + lay.rt + lay.rb) << bits) + 8 * lay.l1_size
    cdef uint64_t i
    cdef int fd, err = 0, created = 0
    with nogil:
        for i in range(lay.rb):
            put64(tables + 8 * i, rb_offset + (i << bits))
        for i in range(lay.used):  # the blocks are contiguous: one flat array of 16-bit counts
            tables[table_len + 2 * i] = 0
            tables[table_len + 2 * i + 1] = 1
        fd = open(cpath, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o600)
        if fd < 0:
            err = errno
        else:
            created = 1
            err = _write_file(fd, head, head_len, tables, table_len, (<off_t>1) << bits,
                              tables + table_len, rc_len, rb_offset, end)
            if close(fd) != 0 and not err:
                err = errno
            if err:
                unlink(cpath)
    if tables != small:
        free(tables)
    if err:
        cause = _os_error(err, spath)
        verb = "write" if created else "create"
        raise ImageError(spath, f"cannot {verb} overlay: {cause.strerror}") from cause


# ---------------------------------------------------------------- parser

cdef class _Reader:
    """The data being parsed, with its path for errors."""
    cdef bytes data
    cdef const uint8_t *p
    cdef uint64_t n
    cdef str path

    cdef fail(self, str message):
        raise ImageError(self.path, message)

    cdef str name(self, str what, uint64_t start, uint64_t length):
        cdef bytes raw = self.data[start:start + length]
        if b"\0" in raw:
            self.fail(f"{what} contains a NUL byte")
        return raw.decode("utf-8", "surrogateescape")


cdef _check_table(_Reader r, str what, uint64_t offset, uint64_t entries, uint64_t entry_len,
                  uint64_t max_bytes, int bits, uint64_t file_size):
    """QEMU's table validation, plus: the table lies inside the file and not in cluster 0."""
    if entries > max_bytes // entry_len:
        r.fail(f"{what} too large ({entries} entries)")
    cdef uint64_t length = entries * entry_len
    if offset > C_INT64_MAX - length:
        r.fail(f"{what} offset out of range")
    if offset & (((<uint64_t>1) << bits) - 1):
        r.fail(f"{what} offset {offset:#x} is not cluster aligned")
    if length:
        if offset == 0:
            r.fail(f"{what} overlaps the header")
        if offset + length > file_size:
            r.fail(f"{what} lies beyond the end of the file")


cdef _extensions(_Reader r, uint64_t start, uint64_t end, dict out):
    """Walk the header extensions in data[start:end]; fill ``out``."""
    cdef uint64_t offset = start
    cdef uint32_t kind, length
    cdef list seen = out["extensions"]
    while offset < end:
        if end - offset < 8:
            r.fail("truncated header extension")
        if offset + 8 > r.n:
            r.fail("header extensions run past the data read")
        kind = get32(r.p + offset)
        length = get32(r.p + offset + 4)
        offset += 8
        if kind == C_EXT_END:
            return
        if length > end - offset:
            r.fail(f"header extension {kind:#x} too large")
        if offset + length > r.n:
            r.fail("header extensions run past the data read")
        if kind in seen:
            r.fail(f"duplicate header extension {kind:#x}")
        seen.append(kind)
        if kind == C_EXT_BACKING_FORMAT:
            if length > C_MAX_FORMAT_NAME:
                r.fail("backing format name too long")
            out["backing_format"] = r.name("backing format", offset, length)
        elif kind == C_EXT_DATA_FILE:
            out["data_file"] = r.name("data file name", offset, length)
        elif kind == C_EXT_ENCRYPTION:
            if length != 16:
                r.fail("bad encryption header extension length")
            out["has_encryption_header"] = True
        offset += pad8(length)


def parse_header(data, file_size, path=_DATA_PATH):
    """Parse a qcow2 header, its extensions and backing file name from the start of a file.

    ``data`` is the first bytes of the file (at least all of cluster 0 or the whole file),
    ``file_size`` its full size. Returns a dict; raises only ImageError.
    """
    cdef _Reader r = _Reader.__new__(_Reader)
    r.path = path
    if not isinstance(data, (bytes, bytearray)):
        r.fail("header data must be bytes")
    if not isinstance(file_size, int) or isinstance(file_size, bool) or file_size < len(data):
        r.fail("file size must be an integer no smaller than the data")
    if file_size > _INT64_MAX:
        r.fail("file size out of range")
    r.data = bytes(data)
    r.p = r.data
    r.n = len(r.data)
    cdef uint64_t fsize = file_size
    if r.n < 4 or r.data[:4] != MAGIC:
        r.fail("not a qcow2 image (bad magic)")
    if r.n < 72:
        r.fail("truncated qcow2 header")
    cdef const uint8_t *p = r.p
    cdef uint32_t version = get32(p + 4)
    cdef uint64_t bf_offset = get64(p + 8)
    cdef uint32_t bf_size = get32(p + 16)
    cdef uint32_t bits = get32(p + 20)
    if version != 2 and version != 3:
        r.fail(f"unsupported qcow2 version {version}")
    if not MIN_CLUSTER_BITS <= bits <= MAX_CLUSTER_BITS:
        r.fail(f"cluster_bits {bits} out of range {MIN_CLUSTER_BITS}-{MAX_CLUSTER_BITS}")
    cdef uint64_t cluster = (<uint64_t>1) << bits
    cdef dict out = {
        "version": version, "virtual_size": get64(p + 24), "cluster_bits": bits,
        "cluster_size": cluster, "backing_file": None, "backing_format": None,
        "incompatible_features": 0, "compatible_features": 0, "autoclear_features": 0,
        "crypt_method": get32(p + 32), "l1_size": get32(p + 36), "l1_table_offset": get64(p + 40),
        "refcount_table_offset": get64(p + 48), "refcount_table_clusters": get32(p + 56),
        "nb_snapshots": get32(p + 60), "snapshots_offset": get64(p + 64), "refcount_order": 4,
        "header_length": 72, "data_file": None, "has_encryption_header": False,
        "extensions": [],
    }
    if version == 3:
        _header_v3(r, cluster, out)
    _check_fields(r, p, bits, fsize)
    cdef uint64_t ext_end = bf_offset if bf_offset else cluster
    _extensions(r, out["header_length"], min(ext_end, cluster), out)
    if bf_offset and bf_size:
        if bf_offset > cluster or bf_size > min(<uint64_t>C_MAX_BACKING_NAME, cluster - bf_offset):
            r.fail("backing file name out of bounds")
        if bf_offset + bf_size > r.n:
            r.fail("backing file name runs past the data read")
        out["backing_file"] = r.name("backing file name", bf_offset, bf_size)
    return out


cdef _header_v3(_Reader r, uint64_t cluster, dict out):
    if r.n < 104:
        r.fail("truncated qcow2 v3 header")
    cdef const uint8_t *p = r.p
    cdef uint32_t order = get32(p + 96)
    cdef uint32_t length = get32(p + 100)
    if length < 104 or length % 8:
        r.fail(f"bad header_length {length}")
    if length > cluster:
        r.fail("header_length exceeds the cluster size")
    if length > r.n:
        r.fail("truncated qcow2 header")
    if order > 6:
        r.fail(f"refcount_order {order} out of range")
    out["incompatible_features"] = get64(p + 72)
    out["compatible_features"] = get64(p + 80)
    out["autoclear_features"] = get64(p + 88)
    out["refcount_order"] = order
    out["header_length"] = length


cdef _check_fields(_Reader r, const uint8_t *p, int bits, uint64_t file_size):
    cdef uint64_t size = get64(p + 24)
    if size > C_INT64_MAX:
        r.fail("virtual size out of range")
    cdef int coverage_bits = 2 * bits - 3
    cdef uint64_t needed = (size >> coverage_bits) + (
        1 if size & (((<uint64_t>1) << coverage_bits) - 1) else 0)
    cdef uint64_t l1_size = get32(p + 36)
    cdef uint64_t rt_clusters = get32(p + 56)
    cdef uint64_t nb_snapshots = get32(p + 60)
    if l1_size < needed:
        r.fail("L1 table too small for the virtual size")
    if rt_clusters == 0:
        r.fail("no refcount table")
    if nb_snapshots > C_MAX_SNAPSHOTS:
        r.fail("too many snapshots")
    _check_table(r, "L1 table", get64(p + 40), l1_size, 8, C_MAX_L1_ENTRIES * 8, bits, file_size)
    _check_table(r, "refcount table", get64(p + 48), rt_clusters, (<uint64_t>1) << bits,
                 C_MAX_REFTABLE_BYTES, bits, file_size)
    _check_table(r, "snapshot table", get64(p + 64), nb_snapshots, C_SNAPSHOT_HEADER_SIZE,
                 C_MAX_SNAPSHOTS * C_SNAPSHOT_HEADER_SIZE, bits, file_size)
