"""Timestamps of what a guest prints, for the launch benchmark: one thread per launch follows the
launch's console and task channel with inotify (vmiso.virt.channel.Inotify, no polling) and notes
time.monotonic() at the first arrival of each marker.

The launch's directory does not exist before the launch makes it, so the watcher first watches
its parent for the directory's creation, then the directory itself for writes (a warm VM's logs:
the directory its checkpoint names, paths.log_dir).
"""
import os
import re
import select
import threading
import time

from .. import state
from ..errors import VmisoError
from ..paths import CONSOLE_LOG, STDOUT, log_dir
from ..virt import channel

IN_MODIFY, IN_CLOSE_WRITE, IN_MOVED_TO, IN_CREATE = 0x2, 0x8, 0x80, 0x100
USERSPACE = b"VMISO-USERSPACE"    # micro's init reached userspace (vmiso/image/guest/micro-init)
TASK_START = b"VMISO-TASK-START"  # the wrapper is about to run the command (guest/task.sh)
EXIT_LINE = re.compile(rb"VMISO-[0-9a-f]+ EXIT [0-9]{1,3}\n")
WAIT_LIMIT_S = 600.0
MAX_KEEP = 1 << 20                # the last bytes of a file kept for the marker search


class _Inotify(channel.Inotify):
    """channel.Inotify plus watches added later, with a mask of our choosing."""

    def __init__(self):
        super().__init__([])

    def add(self, path, mask):
        return channel._libc.inotify_add_watch(self.fd, os.fsencode(path), mask) >= 0


class _Follower:
    """The bytes of one file so far, read from a kept descriptor as it grows."""

    def __init__(self, path):
        self.path, self.fd, self.offset, self.data = path, None, 0, bytearray()

    def read(self):
        if self.fd is None:
            try:
                self.fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                return False
        grew = False
        while True:
            chunk = os.pread(self.fd, 65536, self.offset)
            if not chunk:
                return grew
            grew = True
            self.offset += len(chunk)
            self.data += chunk
            if len(self.data) > MAX_KEEP:
                del self.data[:-MAX_KEEP]

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class MarkWatcher(threading.Thread):
    """Watches ``parent``/``name`` (made later by the launch). ``marks`` gets, each once:
    console (first console byte), userspace, task_start, task_exit (exit line on the task channel).
    Start it, wait for ``ready``, then launch; ``stop()`` when the launch is over."""

    def __init__(self, parent, name, console=CONSOLE_LOG, stdout=STDOUT, pidfile=None):
        super().__init__(name=f"vmiso-bench-marks-{name}", daemon=True)
        self.pidfile = pidfile  # QEMU's: its CPU seconds at userspace go into ``cpu``
        self.parent = str(parent)
        self.directory = os.path.join(self.parent, name)
        self.names = (console, stdout)
        self.console = _Follower(os.path.join(self.directory, console))
        self.stdout = _Follower(os.path.join(self.directory, stdout))
        self.marks = {}
        self.cpu = {}
        self.ready = threading.Event()
        self._halt = threading.Event()

    def stop(self):
        self._halt.set()
        self.join(5)

    def run(self):
        watcher = _Inotify()
        try:
            watcher.add(self.parent, IN_CREATE | IN_MOVED_TO)  # moved: a warm VM's directory, claimed
            self.ready.set()
            watching = False
            while not self._halt.is_set():
                if not watching and os.path.isdir(self.directory):
                    watching = watcher.add(self.directory, IN_CREATE | IN_MODIFY | IN_CLOSE_WRITE)
                    logs = self._log_dir()
                    if logs != self.directory:
                        watching = watcher.add(logs, IN_CREATE | IN_MODIFY | IN_CLOSE_WRITE)
                        self.console.path, self.stdout.path = (os.path.join(logs, n) for n in self.names)
                if watching and self._scan():
                    return  # the exit line is the last marker
                watcher.wait(0.25)  # the timeout only re-checks stop()
        finally:
            self.ready.set()
            watcher.close()
            self.console.close()
            self.stdout.close()

    def _log_dir(self):
        """Where the launch's logs are: a claimed warm VM's directory arrives (renamed) with its
        checkpoint naming them; a cold launch's checkpoint may not be written yet (its logs are
        in its directory)."""
        try:
            return log_dir(self.directory, state.read(self.directory).extra.get("warm"))
        except VmisoError:  # CheckpointError, or a record naming no slot
            return self.directory

    def _mark(self, name):
        self.marks.setdefault(name, time.monotonic())

    def _cpu(self, name):
        """QEMU's CPU time so far (user + system, all threads): under TCG the guest's work, which
        other load on the machine does not inflate the way it inflates wall time."""
        try:
            with open(self.pidfile) as f:
                pid = int(f.read().strip())
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, ValueError, TypeError, IndexError):
            return
        self.cpu[name] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def _scan(self):
        if self.console.read():
            self._mark("console")
            data = self.console.data
            if "userspace" not in self.marks and USERSPACE in data:
                self._mark("userspace")
                self._cpu("userspace")
            if "task_start" not in self.marks and TASK_START in data:
                self._mark("task_start")
        if self.stdout.read() and EXIT_LINE.search(self.stdout.data[-256:]):
            self._mark("task_exit")
            return True
        return False


class ProcessExit(threading.Thread):
    """Notes when the process in ``pidfile`` (QEMU's) exits, from a pidfd (no polling): with a
    pid 1 that reaps orphans late, libvirt only reports the VM gone once it was reaped."""

    def __init__(self, pidfile):
        super().__init__(name="vmiso-bench-qemu-exit", daemon=True)
        self.when = None
        self.fd = None
        try:
            with open(pidfile) as f:
                self.fd = os.pidfd_open(int(f.read().strip()))
        except (OSError, ValueError):
            pass

    def run(self):
        if self.fd is None:
            return
        try:
            if select.select([self.fd], [], [], WAIT_LIMIT_S)[0]:
                self.when = time.monotonic()
        finally:
            os.close(self.fd)
