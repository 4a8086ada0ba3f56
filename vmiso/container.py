"""One container as a process supervises it: its in-memory state, its launch lock, and the rule
that turns how its VM stopped into a Termination (pure, so it is the same in every process)."""
import fcntl
import os
import threading

from .paths import LOGS, log_dir
from .spec import (
    FAILED,
    FINISHED,
    KILLED,
    LOST,
    MAX_SIGNAL,
    R_DESTROYED,
    R_GUEST_EXITED,
    R_IO_ERROR,
    R_LAUNCH_FAILED,
    R_NO_EXIT_STATUS,
    R_TIMEOUT,
    R_VM_CRASHED,
    SIGTERM,
    Termination,
)

LAUNCH_LOCK = "launch.lock"  # held (flock) by the launching process; free once it finished or died


class Container:
    """In-memory state of one container this process supervises."""

    def __init__(self, container_id, directory, checkpoint):
        self.id = container_id
        self.dir = directory
        self.checkpoint = checkpoint
        self.cond = threading.Condition()
        self.stop_detail = None       # how libvirt says the domain stopped ("shutdown", "failed", ...)
        self.termination = None
        self.timer = None
        self.op = threading.Lock()   # serialises launch, kill and destroy of this container
        self.timeline = {}           # step name -> time.monotonic() when it completed (this process)
        self.removed = False         # set once destroy() (or a failed launch) removed it
        self.foreign = False         # another agent's: read here, never concluded, killed or removed
        self.paused = None           # why libvirt paused the VM ("ioerror", "paused"), while it is
        self.wakeups = set()         # channel.Wakeup of each output() following it: set when it ends
        # Its VM is gone for libvirt too and its files, network and watches are released (the
        # termination may be known before: as soon as QEMU exits). destroy() waits for it.
        self.released = False

    @property
    def owner(self):
        """The agent id that launched the container (from its checkpoint)."""
        return self.checkpoint.agent_id

    @property
    def domain(self):
        return self.checkpoint.domain

    def path(self, name):
        if name in LOGS:  # a warm VM's logs keep the directory they were opened in (paths.log_dir)
            return os.path.join(log_dir(self.dir, self.warm_slot), name)
        return os.path.join(self.dir, name)

    @property
    def stop_signal(self):
        """The signal a graceful stop sends the task, as its launch recorded it; SIGTERM for a
        checkpoint without one (an older vmiso's) or with anything but a signal number."""
        value = self.checkpoint.extra.get("stop_signal")
        if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_SIGNAL:
            return value
        return SIGTERM

    @property
    def warm_slot(self):
        """The pool slot this container's VM was booted as (vmiso/pool.py), or None (cold)."""
        return self.checkpoint.extra.get("warm")


def hold_launch_lock(directory):
    fd = os.open(os.path.join(directory, LAUNCH_LOCK), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def launch_in_progress(directory):
    """True while a live process holds the container's launch lock."""
    try:
        fd = os.open(os.path.join(directory, LAUNCH_LOCK), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def guest_hostname(container_id):
    """A DNS-label hostname for the guest (ids may hold '.' and '_', labels may not)."""
    label = "".join(ch if ch.isalnum() or ch == "-" else "-" for ch in container_id)[:63].strip("-")
    return label or "vmiso"


def decide_termination(checkpoint, stop_detail, exit_code):
    """How a task ended, from what the guest reported, who stopped it and libvirt's detail."""
    kill_reason = checkpoint.kill_reason
    # A kill with a grace period, and the timeout, ask the task to stop (its stop signal): it was killed,
    # or timed out, whatever status it chose to exit with.
    if kill_reason == R_DESTROYED and exit_code is not None:
        return Termination(KILLED, R_DESTROYED, exit_code, f"the task was killed (it exited with status {exit_code})")
    if kill_reason == R_TIMEOUT and exit_code is not None:
        return Termination(FAILED, R_TIMEOUT, exit_code,
                           f"the task ran past its timeout and was stopped (it exited with status {exit_code})")
    if exit_code is not None:
        return Termination(FINISHED if exit_code == 0 else FAILED, R_GUEST_EXITED, exit_code,
                           f"the task exited with status {exit_code}")
    if kill_reason == R_TIMEOUT:
        return Termination(FAILED, R_TIMEOUT, None, "the task ran past its timeout and was killed")
    if kill_reason == R_DESTROYED:
        return Termination(KILLED, R_DESTROYED, None, "the task was killed")
    if kill_reason == R_IO_ERROR:
        return Termination(FAILED, R_IO_ERROR, None, "the VM was paused by a disk I/O error (is the host's file "
                                                     "system full?) and was stopped")
    if kill_reason == R_LAUNCH_FAILED:
        return Termination(FAILED, R_LAUNCH_FAILED, None, "the launch was interrupted")
    if stop_detail == "shutdown":
        return Termination(FAILED, R_NO_EXIT_STATUS, None, "the guest powered off without reporting an exit status")
    if stop_detail in ("crashed", "failed"):
        return Termination(FAILED, R_VM_CRASHED, None, "the VM crashed (QEMU ended unexpectedly)")
    if stop_detail == "destroyed":
        return Termination(FAILED, R_VM_CRASHED, None, "the VM was destroyed outside vmiso")
    return Termination(LOST, R_VM_CRASHED, None, "the VM ended while nobody watched, without an exit status")


def new_uuid():
    """A random (version 4) UUID as text. Not the uuid module: it imports platform, a few ms of
    every vmiso command's start."""
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40
    raw[8] = raw[8] & 0x3F | 0x80
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
