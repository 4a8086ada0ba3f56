"""vmiso: run a cluster agent's tasks inside QEMU/KVM virtual machines.

Public API (Mesos containerizer shape)::

    from vmiso import Isolator, TaskSpec, Resources
    iso = Isolator()                       # work dir /var/lib/vmiso, qemu:///system
    iso.launch("task-1", TaskSpec(["sh", "-c", "echo hi; exit 3"], resources=Resources(cpus=1, mem_mib=256)))
    term = iso.wait("task-1")              # Termination(state="FAILED", reason="guest-exited", exit_code=3)
    iso.destroy("task-1")

Importing vmiso imports neither libvirt nor pyroute2; the Isolator loads them when first used.
"""
from .errors import (
    AlreadyExists,
    CommandFailed,
    HostError,
    ImageError,
    InvalidSpec,
    LaunchFailed,
    NoDiskSpace,
    NotFound,
    NotOwned,
    Timeout,
    UnsafeImage,
    VirtError,
    VmisoError,
)
from .spec import ContainerStatus, Resources, TaskSpec, Termination, Volume

__version__ = "0.1.0"

__all__ = [
    "AlreadyExists", "CommandFailed", "ContainerStatus", "HostError", "ImageError", "InvalidSpec",
    "Isolator", "LaunchFailed", "NoDiskSpace", "NotFound", "NotOwned", "Resources", "TaskSpec", "Termination",
    "Timeout", "UnsafeImage", "VirtError", "VmisoError", "Volume",
]


def __getattr__(name):
    if name == "Isolator":
        from .isolator import Isolator

        return Isolator
    raise AttributeError(f"module 'vmiso' has no attribute {name!r}")
