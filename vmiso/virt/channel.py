"""The host side of the guest protocol: the task channel's exit line and output streaming.

The guest wrapper writes the task's stdout to the second serial port and its stderr to the third
(files on the host, written by QEMU), then ``\\nVMISO-<nonce> EXIT <code>\\n`` as the very last
bytes of the stdout channel. Everything here treats those files as hostile input: the exit line
counts only when it carries this launch's nonce and ends the file, and reads are bounded.
"""
import ctypes
import ctypes.util
import os
import re
import select

MARKER_TAIL_BYTES = 256  # enough for "\nVMISO-<64 hex> EXIT <code>\n"


def marker_prefix(nonce):
    return b"\nVMISO-" + nonce.encode("ascii") + b" EXIT "


def _exit_re(nonce):
    return re.compile(re.escape(marker_prefix(nonce)) + rb"([0-9]{1,3})\n\Z")


def read_exit_code(path, nonce):
    """The exit code the guest reported at the end of ``path``, or None if it reported none."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - MARKER_TAIL_BYTES))
            tail = f.read()
    except OSError:
        return None
    match = _exit_re(nonce).search(tail)
    if match is None:
        return None
    code = int(match.group(1))
    return code if code <= 255 else None


class ExitLineFilter:
    """Strips the exit line from a stream of stdout chunks without ever delaying other bytes
    longer than needed: only a tail that could still become the exit line is held back."""

    def __init__(self, nonce):
        self.prefix = marker_prefix(nonce)
        self.regex = _exit_re(nonce)
        self.held = b""
        self.exit_code = None

    def feed(self, data):
        buf = self.held + data
        start = buf.find(self.prefix)
        if start >= 0:
            self.held = buf[start:]
            return buf[:start]
        keep = 0
        for n in range(min(len(self.prefix) - 1, len(buf)), 0, -1):
            if buf.endswith(self.prefix[:n]):
                keep = n
                break
        self.held = buf[len(buf) - keep:] if keep else b""
        return buf[: len(buf) - keep]

    def close(self):
        """The held bytes that were not the exit line (the exit code is in ``exit_code``)."""
        held, self.held = self.held, b""
        last = held.rfind(self.prefix)
        if last >= 0:
            match = self.regex.match(held, last)
            if match is not None:
                self.exit_code = int(match.group(1))
                return held[:last]
        return held


# --- inotify, so followers sleep until QEMU writes (no polling loop) --------------------------
_IN_MODIFY = 0x2
_IN_CLOSE_WRITE = 0x8
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class Inotify:
    """A minimal inotify watcher on directories: ``wait(timeout)`` returns True when a file in
    one of them was written."""

    def __init__(self, directories):
        self.fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        for path in directories:
            _libc.inotify_add_watch(self.fd, os.fsencode(path), _IN_MODIFY | _IN_CLOSE_WRITE)

    def wait(self, timeout):
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return False
        try:
            while os.read(self.fd, 4096):
                pass
        except BlockingIOError:
            pass
        return True

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def follow(paths, finished, chunk=65536, idle_check=0.5):
    """Yield (index, bytes) from the files in ``paths`` as they grow, until ``finished()`` is
    true and every file has been read to its end. Files that do not exist yet are waited for."""
    offsets = [0] * len(paths)
    watcher = Inotify(sorted({os.path.dirname(os.path.abspath(p)) for p in paths}))
    try:
        while True:
            done = finished()  # decide before reading, so nothing written before it is missed
            progressed = False
            for i, path in enumerate(paths):
                data = _read_from(path, offsets[i], chunk)
                if data:
                    offsets[i] += len(data)
                    progressed = True
                    yield i, data
            if done and not progressed:
                return
            if not progressed:
                watcher.wait(idle_check)  # the timeout only re-checks finished()
    finally:
        watcher.close()


def _read_from(path, offset, size):
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return b""
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def exit_line(nonce, code):
    """The bytes the guest wrapper writes last (for tests and the prototype baseline)."""
    return marker_prefix(nonce) + str(code).encode() + b"\n"

