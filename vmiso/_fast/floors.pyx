# cython: language_level=3
"""Physical floors for the benchmarks: the system calls a hot path makes, and nothing else.

``vmiso bench qcow2`` and ``vmiso bench usage`` time these beside the real readers and writers
in the same run: what is left between a hot path and its floor is the work vmiso's own code does
(formatting, parsing, bookkeeping). The twin (floors_py.py) makes the same calls from Python.
"""
from libc.errno cimport errno
from libc.stdlib cimport free, malloc
from posix.fcntl cimport O_CLOEXEC, O_CREAT, O_EXCL, O_RDONLY, O_WRONLY, open
from posix.stat cimport fstat, struct_stat
from posix.types cimport off_t
from posix.unistd cimport close, ftruncate, pread, pwrite

cdef extern from "<fcntl.h>" nogil:
    int O_NOFOLLOW

cdef enum:
    MAX_WRITES = 8
    BUF = 16384


def qcow2_syscalls(bytes path, list writes, off_t end):
    """What write_overlay does to the file system for one overlay: open (exclusive create, no
    follow), one pwrite per ``(data, offset)`` of ``writes``, ftruncate to ``end``, close.
    OSError on failure (the file may then be left: the caller removes it between runs)."""
    cdef const char *cpath = path
    cdef const char *data[MAX_WRITES]
    cdef size_t lengths[MAX_WRITES]
    cdef off_t offsets[MAX_WRITES]
    cdef int count = len(writes), i, fd, err = 0
    cdef bytes item
    if count > MAX_WRITES:
        raise ValueError(f"at most {MAX_WRITES} writes")
    keep = []
    for i in range(count):
        item, offset = writes[i]
        keep.append(item)
        data[i], lengths[i], offsets[i] = item, len(item), offset
    with nogil:
        fd = open(cpath, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o600)
        if fd < 0:
            err = errno
        else:
            for i in range(count):
                if pwrite(fd, data[i], lengths[i], offsets[i]) != <Py_ssize_t>lengths[i]:
                    err = errno
                    break
            if not err and ftruncate(fd, end) != 0:
                err = errno
            if close(fd) != 0 and not err:
                err = errno
    if err:
        raise OSError(err, "qcow2 floor", path.decode("utf-8", "surrogateescape"))


cdef class UsageFiles:
    """The usage reader's kept files of many VMs: ``fds`` (counter files: one pread of up to
    16 KiB each), ``fstat_fds`` (overlays: one fstat each) and ``net_fd`` (/proc/net/dev, read
    to its end once per batch). ``read()`` makes exactly those calls; it returns the bytes read."""
    cdef int *fds
    cdef int nfds
    cdef int *stat_fds
    cdef int nstat
    cdef int net_fd

    def __cinit__(self, fds, fstat_fds, int net_fd=-1):
        self.nfds, self.nstat, self.net_fd = len(fds), len(fstat_fds), net_fd
        self.fds = <int *>malloc(sizeof(int) * (self.nfds + 1))
        self.stat_fds = <int *>malloc(sizeof(int) * (self.nstat + 1))
        if self.fds == NULL or self.stat_fds == NULL:
            raise MemoryError()
        for i, fd in enumerate(fds):
            self.fds[i] = fd
        for i, fd in enumerate(fstat_fds):
            self.stat_fds[i] = fd

    def __dealloc__(self):
        free(self.fds)
        free(self.stat_fds)

    def read(self):
        cdef char buf[BUF]
        cdef Py_ssize_t got, total = 0
        cdef off_t at
        cdef struct_stat st
        cdef int i, err = 0
        with nogil:
            for i in range(self.nfds):
                got = pread(self.fds[i], buf, BUF, 0)
                if got < 0:
                    err = errno
                    break
                total += got
            for i in range(self.nstat):
                if fstat(self.stat_fds[i], &st) != 0:
                    err = errno
                    break
            at = 0
            while not err and self.net_fd >= 0:
                got = pread(self.net_fd, buf, BUF, at)
                if got < 0:
                    err = errno
                elif got == 0:
                    break
                at += got
                total += got
        if err:
            raise OSError(err, "usage floor")
        return total
