"""Disk admission: a launch is refused, with the numbers, when the work dir's file system cannot
hold what it promises.

Overlays are thin: a task's disk takes host space only as its guest writes, so refusing by
virtual size alone would turn away most launches a host can run. The rule instead:

  usable    = free space (what an unprivileged writer may use) - reserve
  promised  = what the running VMs' overlays may still grow (virtual size - allocated, each)
              + the new VM's virtual size
  admitted  when usable >= LAUNCH_BYTES (seed, logs, headers: written at once)
             and promised <= overcommit x usable

``reserve`` keeps the host's own writers alive (default: 5 % of the file system, at most
2 GiB); ``overcommit`` is how far the operator bets on thin disks (default 4). A guest that
writes past what is there gets I/O errors, never a paused VM (virt/domain.py: error_policy).
The running VMs counted are this Isolator's: other agents sharing the file system should keep
their own reserve.
"""
import os
from dataclasses import dataclass
from typing import Optional

from .errors import InvalidSpec, NoDiskSpace

LAUNCH_BYTES = NoDiskSpace.LAUNCH_BYTES  # seed ISO, logs, qcow2 headers: written at launch
DEFAULT_RESERVE_FRACTION = 0.05
DEFAULT_RESERVE_MAX = 2 << 30
DEFAULT_OVERCOMMIT = 4.0


@dataclass(frozen=True)
class Policy:
    """``reserve``: bytes that stay free (None: DEFAULT_RESERVE_FRACTION of the file system, at
    most DEFAULT_RESERVE_MAX); ``overcommit``: how many times the usable space the promised
    growth may be."""

    reserve: Optional[int] = None
    overcommit: float = DEFAULT_OVERCOMMIT

    def __post_init__(self):
        if self.reserve is not None and (isinstance(self.reserve, bool) or not isinstance(self.reserve, int)
                                         or self.reserve < 0):
            raise InvalidSpec("disk_reserve", f"must be a number of bytes >= 0, not {self.reserve!r}")
        if isinstance(self.overcommit, bool) or not isinstance(self.overcommit, (int, float)) \
                or not 0 < self.overcommit < float("inf"):
            raise InvalidSpec("disk_overcommit", f"must be a number > 0, not {self.overcommit!r}")

    def reserve_on(self, total):
        """The reserve on a file system of ``total`` bytes."""
        if self.reserve is not None:
            return self.reserve
        return min(DEFAULT_RESERVE_MAX, int(total * DEFAULT_RESERVE_FRACTION))


def fits(free, reserve, promised, new, overcommit):
    """The admission rule (module docstring). Pure."""
    usable = free - reserve
    return usable >= LAUNCH_BYTES and promised + new <= overcommit * usable


def growth_left(overlay, virtual_size):
    """How much ``overlay`` may still grow: its virtual size less what it has allocated."""
    try:
        allocated = os.stat(overlay).st_blocks * 512
    except OSError:
        return 0  # gone: its VM ended meanwhile
    return max(0, virtual_size - allocated)


def check(path, running, new, policy):
    """Raise NoDiskSpace unless a VM with a ``new``-byte disk fits on ``path``'s file system,
    beside ``running`` ((overlay path, virtual size) of each running VM)."""
    st = os.statvfs(path)
    free, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
    reserve = policy.reserve_on(total)
    promised = sum(growth_left(overlay, size) for overlay, size in running)
    if not fits(free, reserve, promised, new, policy.overcommit):
        raise NoDiskSpace(path, free, reserve, promised, new, policy.overcommit)
