# cython: language_level=3
"""Batch reader of every VM's counters (procfs, cgroup v1/v2, /proc/net/dev) in Cython (twin:
vmiso/_fast/stats_py.py; same names, results and errors; see there for the record layout).

Usage is polled for every VM every second or so: per VM this makes one pread per kept file
descriptor into a stack buffer and parses it in C, without building Python objects; Python
objects are made only for errors. The per-VM loop runs without the GIL.
"""
import os

from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.errno cimport errno
from libc.stdint cimport int64_t
from libc.string cimport memchr, memcmp
from posix.fcntl cimport O_CLOEXEC, O_RDONLY, open as c_open
from posix.stat cimport fstat, struct_stat
from posix.unistd cimport close, pread

from vmiso.errors import StatsError

# The same slots, kinds and limits as stats_py.py (the differential tests hold them equal).
(F_UTIME_TICKS, F_STIME_TICKS, F_THREADS, F_RSS_PAGES,
 F_CPU_USAGE_US, F_CPU_USER_US, F_CPU_SYSTEM_US, F_ACCT_USER_TICKS, F_ACCT_SYSTEM_TICKS,
 F_NR_PERIODS, F_NR_THROTTLED, F_THROTTLED_US, F_THROTTLED_NS, F_CFS_QUOTA_US, F_CFS_PERIOD_US,
 F_MEM_CURRENT, F_MEM_LIMIT, F_MEM_SWAP_CURRENT,
 F_MEM_RSS, F_MEM_CACHE, F_MEM_SWAP, F_MEM_ACTIVE_ANON, F_MEM_INACTIVE_ANON,
 F_MEM_ACTIVE_FILE, F_MEM_INACTIVE_FILE, F_MEM_ANON, F_MEM_FILE,
 F_NET_RX_PACKETS, F_NET_RX_BYTES, F_NET_RX_ERRORS, F_NET_RX_DROPPED,
 F_NET_TX_PACKETS, F_NET_TX_BYTES, F_NET_TX_ERRORS, F_NET_TX_DROPPED,
 F_DISK_USED, NFIELDS) = range(37)
cdef enum:
    C_K_INT = 0
    C_K_CPU_KV = 1
    C_K_MEM_KV = 2
    C_K_PROC_STAT = 3
    C_K_CPU_MAX = 4
    C_K_FSTAT = 5
    C_K_ONCE = 6
K_INT, K_CPU_KV, K_MEM_KV, K_PROC_STAT, K_CPU_MAX, K_FSTAT, K_ONCE = range(7)
UNLIMITED = (1 << 63) - 1
MAX_FILES = 16
BUF_SIZE = 16384

cdef enum:
    C_NFIELDS = 36
    C_MAX_FILES = 16
    C_BUF = 16384
    C_NET_CHUNK = 65536

cdef enum:
    OK = 0
    E_SYS = 1        # errno set
    E_EMPTY = 2
    E_LARGE = 3
    E_MALFORMED = 4
    E_CLOSED = 5

assert NFIELDS == C_NFIELDS and F_DISK_USED == 35  # the C tables below use these numbers
cdef int64_t C_UNLIMITED = 0x7FFFFFFFFFFFFFFF

# Key tables: (name, length, slot); slots as in stats_py.CPU_KEYS / MEM_KEYS.
cdef struct Key:
    const char *name
    int length
    int slot

cdef Key CPU_KEYS[9]
CPU_KEYS[:] = [Key(b"usage_usec", 10, 4), Key(b"user_usec", 9, 5), Key(b"system_usec", 11, 6),
               Key(b"nr_periods", 10, 9), Key(b"nr_throttled", 12, 10),
               Key(b"throttled_usec", 14, 11), Key(b"throttled_time", 14, 12),
               Key(b"user", 4, 7), Key(b"system", 6, 8)]
cdef Key MEM_KEYS[10]
MEM_KEYS[:] = [Key(b"total_rss", 9, 18), Key(b"total_cache", 11, 19), Key(b"total_swap", 10, 20),
               Key(b"total_active_anon", 17, 21), Key(b"total_inactive_anon", 19, 22),
               Key(b"total_active_file", 17, 23), Key(b"total_inactive_file", 19, 24),
               Key(b"hierarchical_memory_limit", 25, 16), Key(b"anon", 4, 25), Key(b"file", 4, 26)]
# /proc/net/dev column -> slot (the tap's receive is the guest's transmit, and back).
cdef int NET_COLUMN[16]
NET_COLUMN[:] = [32, 31, 33, 34, -1, -1, -1, -1, 28, 27, 29, 30, -1, -1, -1, -1]


cdef inline bint is_space(char c) noexcept nogil:
    # bytes.strip()/split() whitespace: space, \t, \n, \v, \f, \r
    return c == 32 or (9 <= c <= 13)


cdef int parse_int(const char *p, Py_ssize_t n, int64_t *out) noexcept nogil:
    """The integer in p[0:n] (surrounding whitespace allowed; "max" is UNLIMITED): 0, or -1."""
    cdef Py_ssize_t i = 0, j = n, k
    cdef bint negative = False
    cdef unsigned long long value = 0
    while i < j and is_space(p[i]):
        i += 1
    while j > i and is_space(p[j - 1]):
        j -= 1
    if j - i == 3 and memcmp(p + i, b"max", 3) == 0:
        out[0] = C_UNLIMITED
        return 0
    if j == i or j - i > 20:
        return -1
    if p[i] == 45:  # '-'
        negative = True
        i += 1
        if i == j:
            return -1
    for k in range(i, j):
        if p[k] < 48 or p[k] > 57:
            return -1
        # Checked before the multiplication: 20 digits can wrap an unsigned 64-bit value (2**64
        # became 0 and passed), and the twin refuses anything beyond int64 as malformed.
        if value > (<unsigned long long>C_UNLIMITED - <unsigned long long>(p[k] - 48)) // 10:
            return -1
        value = value * 10 + <unsigned long long>(p[k] - 48)
    out[0] = -<int64_t>value if negative else <int64_t>value
    return 0


cdef int key_values(const char *buf, Py_ssize_t n, const Key *keys, int nkeys, int64_t *rec) noexcept nogil:
    cdef Py_ssize_t start = 0, end, sp
    cdef const char *hit
    cdef int k
    while start < n:
        hit = <const char *>memchr(buf + start, 10, n - start)
        end = hit - buf if hit != NULL else n
        if end > start:
            hit = <const char *>memchr(buf + start, 32, end - start)
            sp = hit - buf if hit != NULL else end
            for k in range(nkeys):
                if keys[k].length == sp - start and memcmp(buf + start, keys[k].name, sp - start) == 0:
                    if parse_int(buf + sp + 1, end - sp - 1 if sp < end else 0, &rec[keys[k].slot]) < 0:
                        return E_MALFORMED
                    break
        start = end + 1
    return OK


cdef int proc_stat(const char *buf, Py_ssize_t n, int64_t *rec) noexcept nogil:
    cdef Py_ssize_t i = n - 1, start
    cdef int field = 0
    cdef int64_t value
    while i >= 0 and buf[i] != 41:  # ')'
        i -= 1
    if i < 0:
        return E_MALFORMED
    i += 1
    while i < n:
        while i < n and is_space(buf[i]):
            i += 1
        if i >= n:
            break
        start = i
        while i < n and not is_space(buf[i]):
            i += 1
        if field == 11 or field == 12 or field == 17 or field == 21:
            if parse_int(buf + start, i - start, &value) < 0:
                return E_MALFORMED
            if field == 11:
                rec[0] = value
            elif field == 12:
                rec[1] = value
            elif field == 17:
                rec[2] = value
            else:
                rec[3] = value
        field += 1
    return OK if field >= 22 else E_MALFORMED


cdef int cpu_max(const char *buf, Py_ssize_t n, int64_t *rec) noexcept nogil:
    cdef Py_ssize_t i = 0
    cdef Py_ssize_t starts[2]
    cdef Py_ssize_t ends[2]
    cdef int parts = 0
    cdef int64_t quota, period
    while i < n:
        while i < n and is_space(buf[i]):
            i += 1
        if i >= n:
            break
        if parts == 2:
            return E_MALFORMED
        starts[parts] = i
        while i < n and not is_space(buf[i]):
            i += 1
        ends[parts] = i
        parts += 1
    if parts != 2 or parse_int(buf + starts[0], ends[0] - starts[0], &quota) < 0 \
            or parse_int(buf + starts[1], ends[1] - starts[1], &period) < 0:
        return E_MALFORMED
    rec[13] = -1 if quota == C_UNLIMITED else quota
    rec[14] = period
    return OK


cdef struct VMData:
    int n
    int fds[C_MAX_FILES]
    int kinds[C_MAX_FILES]
    int slots[C_MAX_FILES]
    int64_t once[C_MAX_FILES]  # K_ONCE values, read at open


cdef class VM:
    """The open files of one VM (see stats_py.VM)."""

    cdef VMData d
    cdef bint is_closed
    cdef readonly object key, tap, paths

    def __cinit__(self):
        self.d.n = 0
        self.is_closed = True

    def __init__(self, key, entries, tap=None):
        entries = list(entries)
        if len(entries) > C_MAX_FILES:
            raise ValueError(f"at most {MAX_FILES} files per VM")
        self.key = key
        self.tap = tap
        self.paths = tuple(str(path) for path, _, _ in entries)
        self.is_closed = False
        cdef bytes encoded
        cdef int fd, status, err = 0
        for path, kind, slot in entries:
            if kind not in (K_INT, K_CPU_KV, K_MEM_KV, K_PROC_STAT, K_CPU_MAX, K_FSTAT, K_ONCE) or \
                    not 0 <= slot < NFIELDS:
                self.close()
                raise ValueError(f"bad kind {kind} or slot {slot} for {path}")
            encoded = os.fsencode(path)
            fd = c_open(encoded, O_RDONLY | O_CLOEXEC)
            if fd < 0:
                err = errno
                self.close()
                raise StatsError.from_errno(str(path), err) from OSError(err, os.strerror(err))
            self.d.fds[self.d.n] = fd
            self.d.kinds[self.d.n] = kind
            self.d.slots[self.d.n] = slot
            self.d.n += 1
            if kind == K_ONCE:
                status = self.read_one(self.d.n - 1, &self.d.once[self.d.n - 1], &err)
                if status != OK:
                    error = make_error(self, status, self.d.n - 1, err)
                    self.close()
                    raise error

    @property
    def closed(self):
        return self.is_closed

    def close(self):
        cdef int i
        for i in range(self.d.n):
            close(self.d.fds[i])
        self.d.n = 0
        self.is_closed = True

    def __dealloc__(self):
        cdef int i
        for i in range(self.d.n):
            close(self.d.fds[i])

    cdef int read_one(self, int i, int64_t *value, int *failed_errno) noexcept nogil:
        cdef char buf[C_BUF]
        cdef Py_ssize_t got = pread(self.d.fds[i], buf, C_BUF, 0)
        if got < 0:
            failed_errno[0] = errno
            return E_SYS
        if got == 0:
            return E_EMPTY
        if got == C_BUF:
            return E_LARGE
        return OK if parse_int(buf, got, value) == 0 else E_MALFORMED

cdef int read_vm(VMData *d, int64_t *rec, int *failed_file, int *failed_errno) noexcept nogil:
    cdef char buf[C_BUF]
    cdef Py_ssize_t got
    cdef int i, status
    cdef struct_stat st
    for i in range(d.n):
        failed_file[0] = i
        if d.kinds[i] == C_K_ONCE:
            rec[d.slots[i]] = d.once[i]
            continue
        if d.kinds[i] == C_K_FSTAT:
            if fstat(d.fds[i], &st) < 0:
                failed_errno[0] = errno
                return E_SYS
            rec[d.slots[i]] = <int64_t>st.st_blocks * 512
            continue
        got = pread(d.fds[i], buf, C_BUF, 0)
        if got < 0:
            failed_errno[0] = errno
            return E_SYS
        if got == 0:
            return E_EMPTY
        if got == C_BUF:
            return E_LARGE
        if d.kinds[i] == C_K_INT:
            status = OK if parse_int(buf, got, &rec[d.slots[i]]) == 0 else E_MALFORMED
        elif d.kinds[i] == C_K_CPU_KV:
            status = key_values(buf, got, CPU_KEYS, 9, rec)
        elif d.kinds[i] == C_K_MEM_KV:
            status = key_values(buf, got, MEM_KEYS, 10, rec)
        elif d.kinds[i] == C_K_PROC_STAT:
            status = proc_stat(buf, got, rec)
        else:
            status = cpu_max(buf, got, rec)
        if status != OK:
            return status
    return OK


cdef object make_error(VM vm, int status, int index, int err):
    if status == E_CLOSED:
        return StatsError(vm.paths[0] if vm.paths else "<vm>", "reader closed")
    path = vm.paths[index]
    if status == E_SYS:
        return StatsError.from_errno(path, err)
    if status == E_EMPTY:
        return StatsError(path, "empty read (the VM is gone)")
    if status == E_LARGE:
        return StatsError(path, "larger than expected")
    return StatsError(path, "malformed contents")


cdef inline void fill_missing(int64_t *rec) noexcept nogil:
    cdef int k
    for k in range(C_NFIELDS):
        rec[k] = -1


def read_batch(vms, out, int net_fd=-1):
    """Read every VM of ``vms`` into ``out``; return [(index, StatsError)] for those that failed."""
    cdef int64_t[::1] view = memoryview(out).cast("B").cast("q")
    cdef Py_ssize_t count = len(vms), i
    cdef int status, index = 0, err = 0
    cdef VM vm
    cdef int64_t *rec
    if view.shape[0] < count * C_NFIELDS:
        raise ValueError(f"out holds {view.shape[0]} values; {count * C_NFIELDS} needed")
    errors = []
    failed = set()
    cdef VMData **data = <VMData **>PyMem_Malloc(max(count, 1) * sizeof(VMData *))
    cdef int *results = <int *>PyMem_Malloc(max(count, 1) * 3 * sizeof(int))
    if data == NULL or results == NULL:
        PyMem_Free(data)
        PyMem_Free(results)
        raise MemoryError()
    try:
        for i in range(count):
            vm = <VM?>vms[i]  # the list keeps every VM alive while the GIL is released
            data[i] = NULL if vm.is_closed else &vm.d
        with nogil:  # one release for the whole batch
            for i in range(count):
                rec = &view[i * C_NFIELDS]
                fill_missing(rec)
                if data[i] == NULL:
                    results[3 * i] = E_CLOSED
                else:
                    results[3 * i] = read_vm(data[i], rec, &results[3 * i + 1], &results[3 * i + 2])
                if results[3 * i] != OK:
                    fill_missing(rec)
        for i in range(count):
            if results[3 * i] != OK:
                errors.append((i, make_error(vms[i], results[3 * i], results[3 * i + 1], results[3 * i + 2])))
                failed.add(i)
    finally:
        PyMem_Free(data)
        PyMem_Free(results)
    if net_fd >= 0:
        _net(vms, view, net_fd, failed)
    return errors


cdef bytes read_all(int fd):
    chunks = []
    cdef Py_ssize_t offset = 0
    while True:
        chunk = os.pread(fd, C_NET_CHUNK, offset)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        offset += len(chunk)


cdef void _net(vms, int64_t[::1] view, int net_fd, failed) except *:
    cdef dict taps = {}
    cdef Py_ssize_t i, start, end, colon, name_start, name_end, n, p, cstart
    cdef int column
    cdef int64_t values[16]
    cdef const char *buf
    cdef bint ok
    cdef int line
    for i in range(len(vms)):
        vm = vms[i]
        if vm.tap is not None and i not in failed:
            taps[vm.tap.encode()] = i
    if not taps:
        return
    data = read_all(net_fd)
    buf = data
    n = len(data)
    start = 0
    line = 0
    while start < n:
        end = start
        while end < n and buf[end] != 10:
            end += 1
        line += 1
        if line > 2:
            colon = start
            while colon < end and buf[colon] != 58:  # ':'
                colon += 1
            if colon < end:
                name_start, name_end = start, colon
                while name_start < name_end and is_space(buf[name_start]):
                    name_start += 1
                while name_end > name_start and is_space(buf[name_end - 1]):
                    name_end -= 1
                index = taps.get(buf[name_start:name_end])
                if index is not None:
                    column = 0
                    ok = True
                    p = colon + 1
                    while p < end:
                        while p < end and is_space(buf[p]):
                            p += 1
                        if p >= end:
                            break
                        cstart = p
                        while p < end and not is_space(buf[p]):
                            p += 1
                        if column < 16 and NET_COLUMN[column] >= 0:
                            if parse_int(buf + cstart, p - cstart, &values[column]) < 0:
                                ok = False
                        column += 1
                    if ok and column >= 16:
                        for column in range(16):
                            if NET_COLUMN[column] >= 0:
                                view[<Py_ssize_t>index * C_NFIELDS + NET_COLUMN[column]] = values[column]
        start = end + 1
