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


class ImageError(VmisoError):
    """A disk image cannot be read or written as asked."""

    def __init__(self, path, message):
        self.path = str(path)
        super().__init__(f"{path}: {message}")


class UnsafeImage(ImageError):
    """A base image is refused: it could make QEMU open something it should not."""


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


class LaunchFailed(VmisoError):
    """A launch did not complete; everything it had made was removed again."""

    def __init__(self, container_id, step, cause):
        self.container_id = container_id
        self.step = step
        self.cause = cause
        super().__init__(f"launch of {container_id} failed at step {step}: {cause}")


class Timeout(VmisoError, TimeoutError):
    """A wait ran out of time."""
