"""Which base images live containers and warm VMs use, from what each container directory holds.

A container uses the base its checkpoint names unless it terminated (its overlay is deleted
then), and whatever base an overlay still in its directory has as backing file (so a container
whose checkpoint is unreadable still protects its base). A warm VM not claimed yet
(containers/.pool-<slot>, vmiso/pool.py) uses its overlay's base: it is named "warm VM <slot>".
Files are compared by identity
(device, inode), not by path, so a work directory spelled differently still matches.
"""
import contextlib
import os

from .. import state
from ..errors import ImageError
from ..paths import OVERLAY, SLOT_PREFIX, Workdir
from . import qcow2


def bases_of(directory):
    """Base paths the container in ``directory`` may still use."""
    bases = []
    with contextlib.suppress(state.CheckpointError, OSError):
        checkpoint = state.read(directory)
        if checkpoint.phase != state.TERMINATED and checkpoint.base:
            bases.append(checkpoint.base)
    with contextlib.suppress(ImageError):
        backing = qcow2.inspect(os.path.join(directory, OVERLAY)).backing_file
        if backing:
            bases.append(os.path.join(directory, backing))  # relative names are the overlay's
    return bases


def users(root):
    """{(st_dev, st_ino) of a base: {users}} for every base a live container or warm VM uses
    (a container by its id, a warm VM as "warm VM <slot>")."""
    containers = Workdir.of(root).containers
    try:
        names = [e.name for e in os.scandir(containers) if not e.name.startswith(".") or e.name.startswith(SLOT_PREFIX)]
    except FileNotFoundError:
        return {}
    used = {}
    for name in names:
        user = f"warm VM {name[len(SLOT_PREFIX):]}" if name.startswith(SLOT_PREFIX) else name
        for base in bases_of(containers / name):
            with contextlib.suppress(OSError):
                st = os.stat(base)
                used.setdefault((st.st_dev, st.st_ino), set()).add(user)
    return used


def users_of(path, used):
    """The container ids in ``used`` (from users()) that use the file at ``path``."""
    try:
        st = os.stat(path)
    except OSError:
        return set()
    return used.get((st.st_dev, st.st_ino), set())


def same_file(a, b):
    """Whether paths ``a`` and ``b`` are the same file (False if either is missing)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
