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
    NetworkError,
    NoDiskSpace,
    NotFound,
    NotOwned,
    StatsError,
    Timeout,
    UnsafeImage,
    VirtError,
    VmisoError,
)
from .spec import (
    ContainerStatus,
    NetworkSpec,
    RateLimit,
    Resources,
    ResourceStatistics,
    TaskSpec,
    Termination,
    Volume,
)

__version__ = "0.1.0"

__all__ = [
    "AlreadyExists", "CommandFailed", "ContainerStatus", "HostError", "ImageError", "InvalidSpec",
    "Isolator", "LaunchFailed", "NetworkError", "NetworkSpec", "NoDiskSpace", "NotFound", "NotOwned",
    "PoolConfig", "RateLimit", "RecoveryReport", "ResourceStatistics", "Resources", "StatsError", "TaskSpec",
    "Termination",
    "Timeout", "UnsafeImage", "VirtError", "VmisoError", "Volume",
]

# Loaded when first used: the Isolator brings libvirt in, and recovery the Isolator's modules.
_LAZY = {"Isolator": ("isolator", "Isolator"), "RecoveryReport": ("recovery", "RecoveryReport"),
         "PoolConfig": ("pool", "PoolConfig")}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attribute = _LAZY[name]
        return getattr(importlib.import_module(f".{module}", __name__), attribute)
    raise AttributeError(f"module 'vmiso' has no attribute {name!r}")
