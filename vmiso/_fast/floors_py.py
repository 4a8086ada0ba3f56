"""Pure-Python twin of floors.pyx: the same system calls, made from Python (see floors.pyx)."""
import os

BUF = 16384


def qcow2_syscalls(path, writes, end):
    """open (exclusive create, no follow), one pwrite per ``(data, offset)``, ftruncate, close."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        for data, offset in writes:
            if os.pwrite(fd, data, offset) != len(data):
                raise OSError("short write")
        os.ftruncate(fd, end)
    finally:
        os.close(fd)


class UsageFiles:
    """One pread per counter file, one fstat per overlay, /proc/net/dev read to its end."""

    def __init__(self, fds, fstat_fds, net_fd=-1):
        self.fds, self.stat_fds, self.net_fd = list(fds), list(fstat_fds), net_fd

    def read(self):
        total = 0
        for fd in self.fds:
            total += len(os.pread(fd, BUF, 0))
        for fd in self.stat_fds:
            os.fstat(fd)
        at = 0
        while self.net_fd >= 0:
            data = os.pread(self.net_fd, BUF, at)
            if not data:
                break
            at += len(data)
            total += len(data)
        return total
