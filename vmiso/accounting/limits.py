"""Live limits: the memory hard limit with QEMU's own overhead, and the plan of an update().

The memory cgroup of a VM holds QEMU, not only the guest's RAM: QEMU's heap, device emulation,
thread stacks per vCPU, the guest's page tables and dirty bitmaps, and under TCG the cache of
translated code. A hard limit of just the guest's RAM gets QEMU OOM-killed. The limit is

    hard_limit = guest + 96 MiB + 8 MiB x vCPUs + guest / 64   (+ 128 MiB under TCG)

The formula leaves room above what a guest with all its memory touched was measured to be
charged (docs/performance.md, "QEMU's memory overhead"). QEMU's shared libraries are charged to
whichever cgroup first read them, usually not the VM's; the base term leaves room for when they
are.

It is applied through libvirt (``<memtune><hard_limit>`` at launch, ``setMemoryParameters`` on
update), not by writing the cgroup: libvirt owns the VM's cgroups, re-applies its own values
when it reconnects to a domain, shows them in ``virsh memtune`` and knows the layout on v1, v2
and systemd hosts alike.
"""
from dataclasses import dataclass
from typing import Optional

from ..errors import InvalidSpec

MIB = 1 << 20
BASE_OVERHEAD = 96 * MIB
PER_VCPU_OVERHEAD = 8 * MIB
TCG_OVERHEAD = 128 * MIB
PAGE_TABLE_SHARE = 64          # 1/64 of guest RAM: page tables, dirty bitmaps
CPU_PERIOD_US = 100_000
SHARES_PER_CPU = 1024          # cpu.shares per CPU, as Mesos and Docker give them
MIN_SHARES = 2


def hard_limit_bytes(mem_mib, vcpus, tcg):
    """The memory cgroup's hard limit for a guest of ``mem_mib`` MiB (see the module's docstring)."""
    guest = int(mem_mib) * MIB
    return guest + BASE_OVERHEAD + PER_VCPU_OVERHEAD * int(vcpus) + guest // PAGE_TABLE_SHARE + \
        (TCG_OVERHEAD if tcg else 0)


def cpu_quota_us(cpus):
    """The whole-VM CFS quota per CPU_PERIOD_US for ``cpus`` CPUs."""
    return int(round(cpus * CPU_PERIOD_US))


def cpu_shares(cpus):
    return max(MIN_SHARES, int(round(cpus * SHARES_PER_CPU)))


_IOTUNE_FIELDS = ("total_bytes_sec", "read_bytes_sec", "write_bytes_sec",
                  "total_iops_sec", "read_iops_sec", "write_iops_sec")


@dataclass(frozen=True)
class DiskLimits:
    """QEMU's I/O throttling of the task's disk, libvirt's ``<iotune>`` names; 0 removes one.
    ``total_*`` and ``read_*``/``write_*`` of one unit exclude each other."""

    total_bytes_sec: Optional[int] = None
    read_bytes_sec: Optional[int] = None
    write_bytes_sec: Optional[int] = None
    total_iops_sec: Optional[int] = None
    read_iops_sec: Optional[int] = None
    write_iops_sec: Optional[int] = None

    def __post_init__(self):
        for name in _IOTUNE_FIELDS:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not 0 <= value < 1 << 53):
                raise InvalidSpec(name, f"{value!r} is not a whole number of 0 or more")
        for unit in ("bytes_sec", "iops_sec"):
            if getattr(self, f"total_{unit}") and (getattr(self, f"read_{unit}") or getattr(self, f"write_{unit}")):
                raise InvalidSpec(f"total_{unit}", f"excludes read_{unit} and write_{unit}")

    def params(self):
        """The libvirt setBlockIoTune parameters this sets (unset fields are left as they are)."""
        return {name: getattr(self, name) for name in _IOTUNE_FIELDS if getattr(self, name) is not None}
