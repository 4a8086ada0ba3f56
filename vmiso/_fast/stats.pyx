# cython: language_level=3
"""Batch reader of every VM's counters (procfs, cgroup v1/v2, /proc/net/dev) in Cython (twin:
vmiso/_fast/stats_py.py; same names, results and errors; see there for the record layout and
for limits, the K_LIMIT files read at open and by refresh_limits() only).

Usage is polled for every VM every second or so: per VM this makes one pread per kept counter
file into a stack buffer and parses it in C, without building Python objects; Python objects are
made only for errors. The per-VM loop and the /proc/net/dev parse run without the GIL.

At a thousand VMs most of the time is the kernel's (one syscall per file); what is ours is kept
to one pass over each buffer: a key is matched by its first byte and length before any memcmp,
/proc/<pid>/stat is tokenised only up to the last field we need, and a tap's /proc/net/dev line
finds its VM through a C hash table instead of a bytes object and a dict lookup per line.
"""
import os

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.errno cimport EINTR, errno
from libc.stdint cimport int64_t, uint32_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memchr, memcmp
from posix.fcntl cimport O_CLOEXEC, O_RDONLY, open as c_open
from posix.stat cimport fstat, struct_stat
from posix.unistd cimport close, pread

from vmiso.errors import StatsError


cdef extern from "string.h" nogil:
    void *memrchr(const void *s, int c, size_t n)  # GNU (Python.h defines _GNU_SOURCE)

cdef extern from *:
    int ctz "__builtin_ctz" (unsigned int x) nogil
    void prefetch "__builtin_prefetch" (const void *p) nogil

# The slots, kinds and limits: one definition (layout.py), shared with the twin.
from vmiso._fast.layout import *

cdef enum:
    C_K_INT = 0
    C_K_CPU_KV = 1
    C_K_MEM_KV = 2
    C_K_PROC_STAT = 3
    C_K_CPU_MAX = 4
    C_K_FSTAT = 5
    C_K_LIMIT = 8
assert (C_K_INT, C_K_CPU_KV, C_K_MEM_KV, C_K_PROC_STAT, C_K_CPU_MAX, C_K_FSTAT, C_K_LIMIT) == \
    (K_INT, K_CPU_KV, K_MEM_KV, K_PROC_STAT, K_CPU_MAX, K_FSTAT, K_LIMIT)

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

assert (NFIELDS, MAX_FILES, BUF_SIZE) == (C_NFIELDS, C_MAX_FILES, C_BUF)  # C arrays are sized when compiled
cdef int64_t C_UNLIMITED = 0x7FFFFFFFFFFFFFFF


# --- key tables: (name, length, slot), built at import from layout.py -------------------------
cdef struct Key:
    const char *name
    int length
    int slot

cdef struct KeySet:
    Key keys[16]
    unsigned short first[256]  # bit k set: keys[k] starts with this byte
    int n

cdef KeySet CPU_SET, MEM_SET
cdef list _KEY_NAMES = []  # the bytes the tables point into, kept alive


cdef int key_set(KeySet *s, dict keys) except -1:
    cdef int k
    cdef bytes name
    assert len(keys) <= 16  # the bits of KeySet.first
    for k in range(256):
        s.first[k] = 0
    for k, (name, slot) in enumerate(keys.items()):
        _KEY_NAMES.append(name)
        s.keys[k].name = PyBytes_AS_STRING(name)
        s.keys[k].length = PyBytes_GET_SIZE(name)
        s.keys[k].slot = slot
        s.first[<unsigned char>s.keys[k].name[0]] |= 1 << k
    s.n = len(keys)
    return 0


key_set(&CPU_SET, CPU_KEYS)
key_set(&MEM_SET, MEM_KEYS)

# /proc/<pid>/stat field (after the command) -> slot; /proc/net/dev column -> slot (-1: unused).
cdef int PROC_STAT_SLOT[22]
cdef int NET_COLUMN[16]
cdef int SLOT_CFS_QUOTA = F_CFS_QUOTA_US
cdef int SLOT_CFS_PERIOD = F_CFS_PERIOD_US
PROC_STAT_SLOT[:] = [-1] * 22
NET_COLUMN[:] = [-1] * 16
for _field, _slot in PROC_STAT_FIELDS:
    PROC_STAT_SLOT[_field] = _slot
for _column, _slot in NET_COLUMNS:
    NET_COLUMN[_column] = _slot


# --- parsers (the twin's rules, byte for byte) ---------------------------------------------------
cdef inline bint is_space(char c) noexcept nogil:
    # bytes.strip()/split() whitespace: space, \t, \n, \v, \f, \r
    return c == 32 or (9 <= c <= 13)


cdef int parse_int(const char *p, Py_ssize_t n, int64_t *out) noexcept nogil:
    """The integer in p[0:n] (surrounding whitespace allowed; "max" is UNLIMITED): 0, or -1."""
    cdef Py_ssize_t i = 0, j = n, k
    cdef bint negative = False
    cdef unsigned long long value = 0, digit
    while i < j and is_space(p[i]):
        i += 1
    while j > i and is_space(p[j - 1]):
        j -= 1
    if j - i == 3 and p[i] == 109 and p[i + 1] == 97 and p[i + 2] == 120:  # "max"
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
        digit = <unsigned char>p[k] - 48  # a byte below '0' wraps to a large value
        if digit > 9:
            return -1
        # 18 digits cannot pass INT64_MAX; beyond, checked before the multiplication: 20 digits
        # can wrap an unsigned 64-bit value (2**64 became 0), and the twin refuses beyond int64.
        if j - i > 18 and value > (<unsigned long long>C_UNLIMITED - digit) // 10:
            return -1
        value = value * 10 + digit
    out[0] = -<int64_t>value if negative else <int64_t>value
    return 0


cdef inline Py_ssize_t skip_spaces(const char *buf, Py_ssize_t p, Py_ssize_t end) noexcept nogil:
    while p < end and is_space(buf[p]):
        p += 1
    return p


cdef inline Py_ssize_t token_int(const char *buf, Py_ssize_t p, Py_ssize_t end, int64_t *out, int *bad) noexcept nogil:
    """Parse the token (whitespace-delimited) at buf[p] as parse_int does; return where it ends.
    Plain digits, the usual case, are converted in the same pass that finds the token's end."""
    cdef Py_ssize_t start = p
    cdef unsigned long long value = 0, digit
    while p < end:
        digit = <unsigned char>buf[p] - 48
        if digit > 9:
            break
        value = value * 10 + digit
        p += 1
    if p > start and p - start <= 18 and (p == end or is_space(buf[p])):
        out[0] = <int64_t>value
        return p
    while p < end and not is_space(buf[p]):
        p += 1
    if parse_int(buf + start, p - start, out) < 0:
        bad[0] = 1
    return p


cdef int key_values(const char *buf, Py_ssize_t n, const KeySet *s, int64_t *rec) noexcept nogil:
    """"key value" lines (the twin's rule: a line's key is what precedes its first space). A
    key is tried only when the line starts with its first byte and has a space (or ends) right
    after it, so most lines cost one memchr for their end and a table lookup."""
    cdef Py_ssize_t start = 0, end, length
    cdef const char *hit
    cdef unsigned int candidates
    cdef int k, klen
    while start < n:
        hit = <const char *>memchr(buf + start, 10, n - start)
        end = hit - buf if hit != NULL else n
        length = end - start
        candidates = s.first[<unsigned char>buf[start]]
        while candidates:
            k = ctz(candidates)
            candidates &= candidates - 1
            klen = s.keys[k].length
            if klen > length or (klen < length and buf[start + klen] != 32) or \
                    memcmp(buf + start, s.keys[k].name, klen) != 0:
                continue
            # The key without a value ("anon" alone) is malformed, as in the twin.
            if parse_int(buf + start + klen + 1, length - klen - 1 if klen < length else 0,
                         &rec[s.keys[k].slot]) < 0:
                return E_MALFORMED
            break
        start = end + 1
    return OK


cdef int proc_stat(const char *buf, Py_ssize_t n, int64_t *rec) noexcept nogil:
    """Fields 11, 12, 17 and 21 after the last ')' (the command name may hold anything). As in
    the twin, fewer than 22 fields is malformed and nothing after field 21 matters, so the
    tokenising stops there (the line has 52)."""
    cdef const char *paren = <const char *>memrchr(buf, 41, n)  # ')'
    cdef Py_ssize_t i
    cdef int field = 0, bad = 0
    if paren == NULL:
        return E_MALFORMED
    i = paren - buf + 1
    while True:
        i = skip_spaces(buf, i, n)
        if i >= n:
            return E_MALFORMED
        if PROC_STAT_SLOT[field] < 0:
            while i < n and not is_space(buf[i]):
                i += 1
        else:
            i = token_int(buf, i, n, &rec[PROC_STAT_SLOT[field]], &bad)
            if bad:
                return E_MALFORMED
            if field == 21:
                return OK
        field += 1


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
    rec[SLOT_CFS_QUOTA] = -1 if quota == C_UNLIMITED else quota
    rec[SLOT_CFS_PERIOD] = period
    return OK


cdef inline int parse(int kind, const char *buf, Py_ssize_t n, int slot, int64_t *rec) noexcept nogil:
    if kind == C_K_INT:
        return OK if parse_int(buf, n, &rec[slot]) == 0 else E_MALFORMED
    if kind == C_K_CPU_KV:
        return key_values(buf, n, &CPU_SET, rec)
    if kind == C_K_MEM_KV:
        return key_values(buf, n, &MEM_SET, rec)
    if kind == C_K_PROC_STAT:
        return proc_stat(buf, n, rec)
    return cpu_max(buf, n, rec)


# --- one VM's files ---------------------------------------------------------------------------
cdef struct File:
    int fd
    int kind   # without K_LIMIT
    int slot
    int entry  # index in VM.paths, for errors


cdef struct Kept:
    int64_t value
    int slot


cdef struct VMData:
    # What every read_batch reads comes first, a file's fields side by side: a VM's five or so
    # counter files then fill two cache lines (its kept limits a third), where an array per
    # field took one line each (a thousand VMs' data do not stay in the cache between polls).
    int ncounters
    int nkept
    const char *tap             # the tap's name (NULL: none); VM.tap_name owns the bytes
    Py_ssize_t tap_len
    File counters[C_MAX_FILES]  # read by every read_batch
    Kept kept[C_NFIELDS]        # the limits' values from the last refresh_limits()
    int nlimits
    File limits[C_MAX_FILES]    # read at open and by refresh_limits()


cdef void close_files(File *files, int *n) noexcept nogil:
    cdef int i
    for i in range(n[0]):
        close(files[i].fd)
    n[0] = 0


cdef int read_files(const File *files, int n, int64_t *rec, int *failed_entry, int *failed_errno) noexcept nogil:
    cdef char buf[C_BUF]
    cdef Py_ssize_t got
    cdef int i, status
    cdef struct_stat st
    for i in range(n):
        failed_entry[0] = files[i].entry
        if files[i].kind == C_K_FSTAT:
            if fstat(files[i].fd, &st) < 0:
                failed_errno[0] = errno
                return E_SYS
            rec[files[i].slot] = <int64_t>st.st_blocks * 512
            continue
        got = pread(files[i].fd, buf, C_BUF, 0)
        if got < 0:
            failed_errno[0] = errno
            return E_SYS
        if got == 0:
            return E_EMPTY
        if got == C_BUF:
            return E_LARGE
        status = parse(files[i].kind, buf, got, files[i].slot, rec)
        if status != OK:
            return status
    return OK


cdef inline int read_vm(const VMData *d, int64_t *rec, int *failed_entry, int *failed_errno) noexcept nogil:
    cdef int k
    for k in range(d.nkept):
        rec[d.kept[k].slot] = d.kept[k].value
    return read_files(d.counters, d.ncounters, rec, failed_entry, failed_errno)


cdef inline void prefetch_vm(const VMData *d) noexcept nogil:
    """Ask for the next VM's lines while this one waits on the kernel."""
    if d != NULL:
        prefetch(d)
        prefetch((<const char *>d) + 64)
        prefetch(&d.kept[0])


cdef inline void fill_missing(int64_t *rec) noexcept nogil:
    cdef int k
    for k in range(C_NFIELDS):
        rec[k] = -1


cdef class VM:
    """The open files of one VM (see stats_py.VM)."""

    cdef VMData d
    cdef bint is_closed
    cdef readonly object key, tap, paths
    cdef bytes tap_name

    def __cinit__(self):
        self.d.ncounters = 0
        self.d.nlimits = 0
        self.d.nkept = 0
        self.d.tap = NULL
        self.is_closed = True

    def __init__(self, key, entries, tap=None):
        if not self.is_closed:  # initialised again: the files it holds are closed, not leaked
            self.close()
        entries = list(entries)
        if len(entries) > C_MAX_FILES:
            raise ValueError(f"at most {MAX_FILES} files per VM")
        self.key = key
        self.tap = tap
        self.tap_name = None if tap is None else tap.encode()  # as /proc/net/dev names it
        if self.tap_name is not None:
            self.d.tap = PyBytes_AS_STRING(self.tap_name)
            self.d.tap_len = PyBytes_GET_SIZE(self.tap_name)
        self.paths = tuple(str(path) for path, _, _ in entries)
        self.is_closed = False
        cdef int fd, err, index = 0
        cdef File *file
        for path, kind, slot in entries:
            if kind not in KINDS or not 0 <= slot < NFIELDS:
                self.close()
                raise ValueError(f"bad kind {kind} or slot {slot} for {path}")
            fd = c_open(os.fsencode(path), O_RDONLY | O_CLOEXEC)
            if fd < 0:
                err = errno
                self.close()
                raise StatsError.from_errno(str(path), err) from OSError(err, os.strerror(err))
            if kind & C_K_LIMIT:
                file = &self.d.limits[self.d.nlimits]
                self.d.nlimits += 1
            else:
                file = &self.d.counters[self.d.ncounters]
                self.d.ncounters += 1
            file.fd, file.kind, file.slot, file.entry = fd, kind & ~C_K_LIMIT, slot, index
            index += 1
        try:
            self.refresh_limits()
        except StatsError:
            self.close()
            raise

    @property
    def closed(self):
        return self.is_closed

    def refresh_limits(self):
        """Read the limit files again (see stats_py.VM.refresh_limits)."""
        cdef int64_t scratch[C_NFIELDS]
        cdef int status, index = 0, err = 0, k, kept = 0
        if self.is_closed:
            raise make_error(self, E_CLOSED, 0, 0)
        fill_missing(scratch)
        status = read_files(self.d.limits, self.d.nlimits, scratch, &index, &err)
        if status != OK:
            raise make_error(self, status, index, err)
        for k in range(C_NFIELDS):  # records start as -1: only what a limit file set is kept
            if scratch[k] != -1:
                self.d.kept[kept].slot = k
                self.d.kept[kept].value = scratch[k]
                kept += 1
        self.d.nkept = kept

    def close(self):
        close_files(self.d.counters, &self.d.ncounters)
        close_files(self.d.limits, &self.d.nlimits)
        self.is_closed = True

    def __dealloc__(self):
        close_files(self.d.counters, &self.d.ncounters)
        close_files(self.d.limits, &self.d.nlimits)


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


def read_batch(vms, out, int net_fd=-1):
    """Read every VM of ``vms`` into ``out``; return [(index, StatsError)] for those that failed."""
    cdef int64_t[::1] view = memoryview(out).cast("B").cast("q")
    cdef Py_ssize_t count = len(vms), i
    cdef VM vm
    cdef int64_t *rec
    cdef int64_t *base
    if view.shape[0] < count * C_NFIELDS:
        raise ValueError(f"out holds {view.shape[0]} values; {count * C_NFIELDS} needed")
    errors = []
    if count == 0:
        return errors
    base = &view[0]
    cdef const VMData **data = <const VMData **>PyMem_Malloc(count * sizeof(VMData *))
    cdef int *results = <int *>PyMem_Malloc(count * 3 * sizeof(int))
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
                if i + 1 < count:
                    prefetch_vm(data[i + 1])
                rec = base + i * C_NFIELDS
                fill_missing(rec)
                if data[i] == NULL:
                    results[3 * i] = E_CLOSED
                else:
                    results[3 * i] = read_vm(data[i], rec, &results[3 * i + 1], &results[3 * i + 2])
                if results[3 * i] != OK:
                    fill_missing(rec)
        for i in range(count):
            if results[3 * i] != OK:
                data[i] = NULL  # a failed VM gets no network counters either
                errors.append((i, make_error(vms[i], results[3 * i], results[3 * i + 1], results[3 * i + 2])))
        if net_fd >= 0:
            read_net(data, count, base, net_fd)
    finally:
        PyMem_Free(data)
        PyMem_Free(results)
    return errors


# --- /proc/net/dev -------------------------------------------------------------------------------
cdef struct Taps:
    const VMData **data
    int *slots  # open addressing, -1 = empty; else the index of the VM whose tap hashes here
    uint32_t mask


cdef inline uint32_t name_hash(const char *p, Py_ssize_t n) noexcept nogil:
    cdef uint32_t h = 2166136261u  # FNV-1a
    cdef Py_ssize_t k
    for k in range(n):
        h = (h ^ <unsigned char>p[k]) * 16777619u
    return h


cdef int *tap_slot(Taps *t, const char *name, Py_ssize_t n) noexcept nogil:
    """The table entry of tap ``name``: the VM's index, or -1 (a free entry) if none has it."""
    cdef uint32_t h = name_hash(name, n) & t.mask
    cdef const VMData *d
    while t.slots[h] >= 0:
        d = t.data[t.slots[h]]
        if d.tap_len == n and memcmp(d.tap, name, n) == 0:
            break
        h = (h + 1) & t.mask
    return &t.slots[h]


cdef int taps_build(Taps *t, const VMData **data, Py_ssize_t count) noexcept nogil:
    """The taps of the VMs read (data[i] != NULL): 1 if any, 0 if none, -1 without memory. A tap
    named twice belongs to the later VM, as the twin's dict has it."""
    cdef Py_ssize_t i, size = 8
    cdef bint any_tap = False
    while size < 2 * count:
        size *= 2
    t.data = data
    t.mask = <uint32_t>(size - 1)
    t.slots = <int *>malloc(size * sizeof(int))
    if t.slots == NULL:
        return -1
    for i in range(size):
        t.slots[i] = -1
    for i in range(count):
        if data[i] != NULL and data[i].tap != NULL:
            tap_slot(t, data[i].tap, data[i].tap_len)[0] = <int>i
            any_tap = True
    return 1 if any_tap else 0


cdef char *read_all(int fd, Py_ssize_t *size, int *failed_errno) noexcept nogil:
    """All of ``fd`` from offset 0 in C_NET_CHUNK preads (malloc'd; NULL: errno or no memory)."""
    cdef Py_ssize_t capacity = 2 * C_NET_CHUNK, got
    cdef char *buf = <char *>malloc(capacity)
    cdef char *bigger
    size[0] = 0
    failed_errno[0] = 0
    while buf != NULL:
        if capacity - size[0] < C_NET_CHUNK:
            capacity *= 2
            bigger = <char *>realloc(buf, capacity)
            if bigger == NULL:
                break
            buf = bigger
        got = pread(fd, buf + size[0], C_NET_CHUNK, size[0])
        if got < 0 and errno == EINTR:
            continue  # as os.pread does
        if got < 0:
            failed_errno[0] = errno
            break
        if got == 0:
            return buf
        size[0] += got
    free(buf)
    return NULL


cdef void net_line(const char *buf, Py_ssize_t start, Py_ssize_t end, Taps *t, int64_t *base) noexcept nogil:
    """One interface's line: "name: 16 columns". Any other shape leaves its counters unset."""
    cdef const char *hit = <const char *>memchr(buf + start, 58, end - start)  # ':'
    cdef Py_ssize_t name_start = start, name_end, p
    cdef int index, column = 0, bad = 0
    cdef int64_t values[16]
    if hit == NULL:
        return
    name_end = hit - buf
    while name_start < name_end and is_space(buf[name_start]):
        name_start += 1
    while name_end > name_start and is_space(buf[name_end - 1]):
        name_end -= 1
    index = tap_slot(t, buf + name_start, name_end - name_start)[0]
    if index < 0:
        return
    p = hit - buf + 1
    for column in range(16):
        p = skip_spaces(buf, p, end)
        if p >= end:
            return  # fewer than 16 columns
        if NET_COLUMN[column] < 0:
            while p < end and not is_space(buf[p]):
                p += 1
        else:
            p = token_int(buf, p, end, &values[column], &bad)
            if bad:
                return
    for column in range(16):
        if NET_COLUMN[column] >= 0:
            base[<Py_ssize_t>index * C_NFIELDS + NET_COLUMN[column]] = values[column]


cdef int read_net(const VMData **data, Py_ssize_t count, int64_t *base, int net_fd) except -1:
    """Fill the network slots of every VM read, from one read of /proc/net/dev (see the twin)."""
    cdef Taps t
    cdef char *buf = NULL
    cdef Py_ssize_t n = 0, start = 0, end
    cdef const char *hit
    cdef int found, err = 0, line = 0
    with nogil:
        found = taps_build(&t, data, count)
        if found > 0:
            buf = read_all(net_fd, &n, &err)
            if buf != NULL:
                while start < n:
                    hit = <const char *>memchr(buf + start, 10, n - start)
                    end = hit - buf if hit != NULL else n
                    line += 1
                    if line > 2:  # two header lines
                        net_line(buf, start, end, &t, base)
                    start = end + 1
                free(buf)
        free(t.slots)
    if found < 0 or (found > 0 and buf == NULL and err == 0):
        raise MemoryError()
    if found > 0 and buf == NULL:
        raise OSError(err, os.strerror(err))
    return 0
