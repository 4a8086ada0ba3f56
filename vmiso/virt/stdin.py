"""The task's stdin: the host end of the guest's ``vmiso.stdin`` virtio-serial port.

vmiso listens on ``containers/<id>/stdin.sock`` before the domain is created; QEMU connects to it
while it starts (libvirt ``<channel type='unix'><source mode='connect'>``), so the port is open
from the guest's first moment and the wrapper can give it to the task as its stdin. A thread then
copies the source (bytes, a file, a file object) into the socket in chunks: the socket's buffer
and the guest's virtqueue are the only buffers, so a task that reads slowly slows the copy
(back-pressure) and nothing is held whole in memory.

EOF: a serial port has none, but a virtio-serial port has a host side that can close. After the
last byte the thread shuts down its sending side only, QEMU reads what is left and the end, then
closes its connection, and the guest's port reports end of file once the task has read every
byte. Closing our side fully instead would make QEMU drop what it has not read yet (a hang-up),
so the thread keeps it open until QEMU is done. A task that exits without reading everything ends
its VM; QEMU's side goes away, the copy fails with EPIPE or ECONNRESET and stops: the task's exit
code is what it reported, nothing waits on the unread rest.
"""
import logging
import os
import socket
import threading
import time

from ..errors import InvalidSpec
from ..paths import qemu_uid

log = logging.getLogger(__name__)

CHUNK = 256 * 1024
ACCEPT_TIMEOUT_S = 60.0  # QEMU connects while it starts; a launch that returned has connected


def check_source(value):
    """InvalidSpec now, before a launch makes anything, if ``value`` is a path that cannot be
    read; the file itself is opened by the copying thread (a FIFO's open blocks)."""
    if isinstance(value, (str, os.PathLike)) and not os.access(value, os.R_OK):
        raise InvalidSpec("stdin", f"cannot read {os.fspath(value)}")


def listen(path, uid=None):
    """A listening unix socket at ``path`` that QEMU's user (``uid``: the local user a container's
    QEMU runs as instead), and nobody else, may connect to."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o600)
        uid = qemu_uid() if uid is None else uid
        if uid is not None and os.geteuid() == 0:
            os.chown(path, uid, -1)
        sock.listen(1)
    except BaseException:
        sock.close()
        raise
    return sock


def _chunks(value):
    """The source's bytes in chunks of at most CHUNK, read as they are sent."""
    if isinstance(value, bytes):
        for start in range(0, len(value), CHUNK):
            yield value[start:start + CHUNK]
        return
    if isinstance(value, (str, os.PathLike)):
        with open(value, "rb") as f:
            yield from iter(lambda: f.read(CHUNK), b"")
        return
    read = getattr(value, "read1", None) or value.read  # read1: what is there, without waiting for a full chunk
    while True:
        data = read(CHUNK)
        if not data:
            return
        yield data


def feed(listener, value, timeline=None):
    """Start the thread that copies ``value`` into the guest's stdin; returns the thread.
    ``timeline`` (a dict) gets "stdin:connected" and "stdin:done" (the guest has taken the end)."""
    thread = threading.Thread(target=_copy, args=(listener, value, timeline if timeline is not None else {}),
                              name="vmiso-stdin", daemon=True)
    thread.start()
    return thread


def _copy(listener, value, timeline):
    conn = None
    try:
        listener.settimeout(ACCEPT_TIMEOUT_S)
        conn, _ = listener.accept()
        listener.close()
        conn.settimeout(None)
        timeline["stdin:connected"] = time.monotonic()
        for data in _chunks(value):
            conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(4096):  # the guest never writes; this waits for QEMU to close
            pass
        timeline["stdin:done"] = time.monotonic()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the VM ended before its task read everything: the rest is dropped, as a pipe's
    except OSError as err:
        log.warning("stdin of the task: %s", err)
    finally:
        listener.close()
        if conn is not None:
            conn.close()
