"""The host side of the guest protocol: the task channel's exit line, output streaming, and the
stop request written into it.

The guest wrapper writes the task's stdout to the second serial port and its stderr to the third
(files on the host, written by QEMU), then ``VMISO-<nonce> EXIT <code>\\n`` as the very last
bytes of the stdout channel. The other way, ``VMISO-<nonce> TERM\\n`` on that port's input
makes the wrapper send SIGTERM to the task, ``VMISO-<nonce> SIG <number>\\n`` another signal (the
task's stop signal). Everything here treats those files as hostile input:
the exit line counts only when it carries this launch's nonce and ends the file, and reads are
bounded.
"""
import ctypes
import os
import re
import select
import socket
import threading
import time

from ..spec import MAX_SIGNAL, SIGTERM

MARKER_TAIL_BYTES = 256  # enough for "VMISO-<64 hex> EXIT <code>\n"


def marker_prefix(nonce):
    # No leading newline: the nonce alone makes the marker unambiguous, so output bytes are
    # never held back just because they end a line (a streamed "hello\n" shows at once).
    return b"VMISO-" + nonce.encode("ascii") + b" EXIT "


def stop_request(nonce, signal=SIGTERM):
    """The line that makes the guest wrapper send ``signal`` (a number) to the task
    (image/guest/task.sh): ``TERM`` for SIGTERM, the one line a wrapper of an older vmiso
    understands, so a task without a stop signal of its own gets exactly what it always got;
    ``SIG <number>`` for any other signal."""
    if isinstance(signal, bool) or not isinstance(signal, int) or not 1 <= signal <= MAX_SIGNAL:
        raise ValueError(f"{signal!r} is not a signal number (1..{MAX_SIGNAL})")
    what = b"TERM" if signal == SIGTERM else b"SIG %d" % signal
    return b"VMISO-" + nonce.encode("ascii") + b" " + what + b"\n"


def request_stop(socket_path, nonce, timeout=1.0, signal=SIGTERM):
    """Write the stop request for ``signal`` into the task channel through its unix socket
    (libvirt listens there for QEMU). True once QEMU has taken every byte; False when the VM has
    no such socket (launched by an older vmiso), or nothing takes the request within ``timeout``
    seconds.

    QEMU passes input on only as fast as the guest's UART accepts it, and drops what it has not
    read yet when the peer hangs up. So: send, shut down our sending side, and wait for QEMU to
    read the end of it and close; the guest output that reaches this connection meanwhile is
    dropped (it is in the task log anyway)."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as conn:
        try:
            conn.settimeout(timeout)
            conn.connect(str(socket_path))
            conn.sendall(stop_request(nonce, signal))
            conn.shutdown(socket.SHUT_WR)
            while True:
                conn.settimeout(max(0.001, deadline - time.monotonic()))
                if not conn.recv(65536):
                    return True
        except OSError:  # no socket, refused, or the timeout
            return False


def _exit_re(nonce):
    return re.compile(re.escape(marker_prefix(nonce)) + rb"([0-9]{1,3})\n\Z")


def _tail(path, size):
    """The last ``size`` bytes of file ``path`` (b"" if it cannot be read)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - size))
            return f.read()
    except OSError:
        return b""


def read_exit_code(path, nonce):
    """The exit code the guest reported at the end of ``path``, or None if it reported none."""
    match = _exit_re(nonce).search(_tail_of_stream(str(path)))
    if match is None:
        return None
    code = int(match.group(1))
    return code if code <= 255 else None


def wait_for_exit_code(path, nonce, timeout):
    """read_exit_code, but give virtlogd up to ``timeout`` seconds to write the last bytes: it
    copies QEMU's output asynchronously, and may be a moment behind libvirt's stop event."""
    code = read_exit_code(path, nonce)
    if code is not None or timeout <= 0:
        return code
    watcher = Inotify([os.path.dirname(os.path.abspath(path))])
    try:
        deadline = time.monotonic() + timeout
        while code is None and (left := deadline - time.monotonic()) > 0:
            watcher.wait(left)
            code = read_exit_code(path, nonce)
    finally:
        watcher.close()
    return code


def _tail_of_stream(path):
    """The stream's last bytes; virtlogd may have just rolled ``path`` over to ``path.0``."""
    current = _tail(path, MARKER_TAIL_BYTES)
    if len(current) >= MARKER_TAIL_BYTES:
        return current
    return _tail(path + ".0", MARKER_TAIL_BYTES - len(current)) + current


class ExitLineFilter:
    """Strips the exit line from a stream of stdout chunks. The guest is hostile: it knows the
    nonce, so it can print the marker's prefix anywhere. Only a tail that could still become
    the exit line (the prefix, up to three digits and a newline, at the very end of what was
    read) is held back: at most MAX_HELD bytes, whatever the guest writes after a forged
    prefix streams as it arrives."""

    def __init__(self, nonce):
        self.prefix = marker_prefix(nonce)
        self.regex = _exit_re(nonce)
        self.max_held = len(self.prefix) + len(b"255\n")
        self.held = b""
        self.exit_code = None

    def _could_end_with_marker(self, tail):
        """True if ``tail`` is the start of an exit line, or a whole one."""
        if len(tail) <= len(self.prefix):
            return self.prefix.startswith(tail)
        if not tail.startswith(self.prefix):
            return False
        rest = tail[len(self.prefix):]
        if rest.endswith(b"\n"):
            return 1 <= len(rest) - 1 <= 3 and rest[:-1].isdigit()
        return len(rest) <= 3 and (not rest or rest.isdigit())

    def feed(self, data):
        buf = self.held + data
        first = max(0, len(buf) - self.max_held)
        start = buf.find(self.prefix[:1], first)
        while start >= 0 and not self._could_end_with_marker(buf[start:]):
            start = buf.find(self.prefix[:1], start + 1)
        if start < 0:
            self.held = b""
            return buf
        self.held = buf[start:]
        return buf[:start]

    def close(self):
        """The held bytes that were not the exit line (the exit code is in ``exit_code``)."""
        held, self.held = self.held, b""
        match = self.regex.fullmatch(held)
        if match is not None:
            self.exit_code = int(match.group(1))
            return b""
        return held


# --- inotify, so followers sleep until QEMU writes (no polling loop) --------------------------
_IN_MODIFY = 0x2
_IN_CLOSE_WRITE = 0x8
_IN_MOVED_TO = 0x80  # a file renamed into place (an atomically written checkpoint)
# The process's own symbols (libc's among them): ctypes.util.find_library would run
# `ldconfig -p` in a subprocess at import, on every vmiso command's start.
_libc = ctypes.CDLL(None, use_errno=True)


class Inotify:
    """A minimal inotify watcher on directories: ``wait(timeout)`` returns True when a file in
    one of them was written."""

    def __init__(self, directories):
        self.fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        for path in directories:
            _libc.inotify_add_watch(self.fd, os.fsencode(path), _IN_MODIFY | _IN_CLOSE_WRITE | _IN_MOVED_TO)

    def wait(self, timeout, also=None):
        """True once a file was written (or ``also``, a Wakeup, was set), False after ``timeout``."""
        fds = [self.fd] if also is None else [self.fd, also.fileno()]
        ready, _, _ = select.select(fds, [], [], timeout)
        if self.fd not in ready:
            return bool(ready)
        try:
            while os.read(self.fd, 4096):
                pass
        except BlockingIOError:
            pass
        return True

    def close(self):
        """Close the descriptor in the background: the kernel waits for an RCU grace period
        before an inotify descriptor's close returns (milliseconds, longer on a loaded host),
        and a follower closes it on the path to `vmiso run`'s exit."""
        if self.fd >= 0:
            threading.Thread(target=os.close, args=(self.fd,), name="vmiso-inotify-close", daemon=True).start()
            self.fd = -1


class Wakeup:
    """A flag a follower's wait can select on: once set() it stays readable for good (level
    triggered, so every waiter sees it; set() from any thread, any number of times)."""

    def __init__(self):
        self._read, self._write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def fileno(self):
        return self._read

    def set(self):
        try:
            os.write(self._write, b"x")
        except (BlockingIOError, OSError):
            pass  # set already (the pipe holds a byte), or closed

    def close(self):
        for fd in (self._read, self._write):
            os.close(fd)


class _Reader:
    """Reads one stream from a kept file descriptor, across virtlogd's roll-overs: a renamed
    file is read to its end through the old descriptor, then the new file from its start."""

    def __init__(self, path):
        self.path = path
        self.fd = None
        self.offset = 0

    def read(self, size):
        if self.fd is None:
            self._open()
            if self.fd is None:
                return b""
        data = os.pread(self.fd, size, self.offset)
        if data:
            self.offset += len(data)
            return data
        if self._rolled_over():
            self.close()
            return self.read(size)
        return b""

    def _open(self):
        try:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            self.offset = 0
        except OSError:
            self.fd = None

    def _rolled_over(self):
        try:
            return os.stat(self.path, follow_symlinks=False).st_ino != os.fstat(self.fd).st_ino
        except FileNotFoundError:
            return False

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def follow(paths, finished, chunk=65536, idle_check=0.5, wakeup=None):
    """Yield (index, bytes) from the files in ``paths`` as they grow, until ``finished()`` is
    true and every file has been read to its end. Files that do not exist yet are waited for;
    roll-overs are followed (bytes of a roll-over that happened twice between reads are lost:
    the bound on host-side logs). ``wakeup`` (a Wakeup) set means: ask ``finished()`` now, rather
    than at the next write or ``idle_check`` seconds later."""
    readers = [_Reader(p) for p in paths]
    watcher = Inotify(sorted({os.path.dirname(os.path.abspath(p)) for p in paths}))
    try:
        while True:
            done = finished()  # decide before reading, so nothing written before it is missed
            progressed = False
            for i, reader in enumerate(readers):
                data = reader.read(chunk)
                if data:
                    progressed = True
                    yield i, data
            if done and not progressed:
                return
            if not progressed:
                watcher.wait(idle_check, wakeup)  # the timeout only re-checks finished()
    finally:
        watcher.close()
        for reader in readers:
            reader.close()


def exit_line(nonce, code):
    """The bytes the guest wrapper writes last (for tests and the prototype baseline)."""
    return marker_prefix(nonce) + str(code).encode() + b"\n"

