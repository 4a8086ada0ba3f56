"""The one exception tree of vmiso. Attributes first; stdlib bases where they fit.

libvirt errors are translated in vmiso.virt only, netlink errors in vmiso.net only,
always with ``raise ... from err``.
"""


class VmisoError(Exception):
    """Base of every error vmiso raises on purpose."""


class InvalidSpec(VmisoError, ValueError):
    """A task spec, container id or other input is malformed. ``field`` names the culprit."""

    def __init__(self, field, message):
        self.field = field
        super().__init__(f"{field}: {message}")


class NotFound(VmisoError, LookupError):
    """No such container (or image)."""

    def __init__(self, what, name):
        self.what = what
        self.name = name
        super().__init__(f"no such {what}: {name}")


class AlreadyExists(VmisoError):
    """A container with this id exists already."""

    def __init__(self, what, name):
        self.what = what
        self.name = name
        super().__init__(f"{what} already exists: {name}")


class NotOwned(VmisoError, PermissionError):
    """The container belongs to another agent: this one may read it, never change it."""

    def __init__(self, container_id, owner, agent_id):
        self.container_id = container_id
        self.owner = owner
        self.agent_id = agent_id
        super().__init__(f"container {container_id} belongs to agent {owner!r}, not {agent_id!r}: "
                         "it is read-only here")


class Forbidden(VmisoError, PermissionError):
    """The agent's policy refuses the caller this request (who may run VMs, their limits, the
    images, bridges and volumes they may use: vmiso/agent/policy.py). One line saying why."""


class NoDiskSpace(VmisoError, OSError):
    """A launch was refused: the work dir's file system cannot hold it (vmiso/admission.py).
    The attributes are the numbers, in bytes."""

    LAUNCH_BYTES = 8 << 20  # what a launch writes at once: seed ISO, logs, qcow2 headers

    def __init__(self, path, free, reserve, promised, new, overcommit):
        self.path, self.free, self.reserve = str(path), free, reserve
        self.promised, self.new, self.overcommit = promised, new, overcommit
        usable = free - reserve
        if usable < self.LAUNCH_BYTES:
            why = f"{_gib(free)} free, {_gib(reserve)} of it reserved"
        else:
            why = (f"{_gib(usable)} usable ({_gib(free)} free - {_gib(reserve)} reserved), but running disks may "
                   f"still grow by {_gib(promised)} and this one by {_gib(new)}: more than {overcommit:g} x usable")
        super().__init__(f"not enough disk space in {path}: {why} (see disk_reserve and disk_overcommit)")


def _gib(n):
    return f"{n / (1 << 30):.2f} GiB"


class ImageError(VmisoError):
    """A disk image cannot be read or written as asked."""

    def __init__(self, path, message):
        self.path = str(path)
        super().__init__(f"{path}: {message}")


class UnsafeImage(ImageError):
    """A base image is refused: it could make QEMU open something it should not."""


class InUse(VmisoError):
    """Something cannot be removed: live containers (ids in ``users``) still use it."""

    def __init__(self, what, name, users):
        self.what = what
        self.name = name
        self.users = sorted(users)
        super().__init__(f"{what} {name} is in use by {', '.join(self.users)}")


class HostError(VmisoError):
    """The host lacks something vmiso needs (a package, a daemon, a device)."""


class CommandFailed(HostError):
    """An external command failed. Carries argv, exit code and stderr."""

    def __init__(self, argv, returncode, stderr):
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        tail = (stderr or "").strip().splitlines()[-1:] or ["(no stderr)"]
        super().__init__(f"{argv[0]} exited {returncode}: {tail[0]}")


class VirtError(VmisoError):
    """libvirt refused or failed an operation. ``code`` is libvirt's error code, if any."""

    def __init__(self, message, code=None):
        self.code = code
        super().__init__(message)


class NetworkError(VmisoError):
    """A host network operation (netlink, nftables, tc) failed. ``errno`` is the kernel's, if any."""

    def __init__(self, message, errno=None):
        self.errno = errno
        super().__init__(message)


class KernelFeatureMissing(NetworkError, HostError):
    """The running kernel lacks a feature the request needs. ``feature`` names it."""

    def __init__(self, feature, message):
        self.feature = feature
        super().__init__(f"{message}: this kernel lacks {feature}")


class StatsError(VmisoError):
    """One VM's counters could not be read: its process or cgroup vanished, a file is malformed,
    or the reader was closed. ``path`` is the file, ``errno`` the system error (None if none)."""

    GONE = (2, 3, 19)  # ENOENT, ESRCH, ENODEV: what reading a vanished process or cgroup gives

    def __init__(self, path, message, errno=None):
        self.path = str(path)
        self.errno = errno
        super().__init__(f"{path}: {message}")

    @classmethod
    def from_errno(cls, path, errno):
        import os

        gone = " (the VM is gone)" if errno in cls.GONE else ""
        return cls(path, f"{os.strerror(errno)}{gone}", errno)


class LaunchFailed(VmisoError):
    """A launch did not complete; everything it had made was removed again."""

    def __init__(self, container_id, step, cause):
        self.container_id = container_id
        self.step = step
        self.cause = cause
        super().__init__(f"launch of {container_id} failed at step {step}: {cause}")


class Timeout(VmisoError, TimeoutError):
    """A wait ran out of time."""
