"""Assemble ResourceStatistics for many VMs with one batch read (the hot path of usage_all).

A ``Collector`` keeps each VM's files open between calls and re-opens them when the VM's QEMU
process changes (a new pid: the VM was restarted or the id reused). What the numbers mean:

- cpu times: the VM's cgroup (cgroup2 ``cpu.stat`` in microseconds, else v1 ``cpuacct.stat``,
  else QEMU's /proc/<pid>/stat, in clock ticks); throttling from the cgroup with the CFS quota.
- ``cpus_limit``: the CFS quota / period of the VM's cgroup when one is set, else the CPUs the
  task was given (its vCPUs cannot use more).
- memory is the host's view, QEMU's overhead included: ``mem_total_bytes`` is what the VM's
  memory cgroup is charged (v1: total_rss + total_cache; v2: memory.current),
  ``mem_limit_bytes`` the hard limit of that cgroup (guest memory + overhead, see limits.py),
  ``mem_rss_bytes`` QEMU's resident set (what ps, psutil and libvirt's ``rss`` show).
- ``disk_used_bytes``: bytes allocated to the overlay; ``disk_limit_bytes``: its virtual size.
- network: the tap's counters as the guest sees them (tap TX = guest RX).

Limits are not counters, so they are not read on every call: the CFS quota and period (v1
``cpu.cfs_quota_us``/``cpu.cfs_period_us``, v2 ``cpu.max``) and v2 ``memory.max`` are read when a
VM's files are opened and kept (the K_LIMIT files of _fast/stats_py.py). ``invalidate(key)``
marks one VM's kept limits stale, so the next read re-reads them first: vmiso's own update()
calls it, and what update() changed shows in the very next usage(). A change made behind vmiso's
back (``virsh schedinfo``/``virsh memtune`` by hand) shows within LIMITS_TTL seconds, after which
every VM's limits are re-read. Each VM's first re-read comes at a point of that window set by its
key, so VMs opened together (1000 at an agent's restart) spread their re-reads over the window
instead of all re-reading in one poll every LIMITS_TTL seconds. (v1's memory limit,
``hierarchical_memory_limit``, comes with the counters of memory.stat and is always current.)
"""
import array
import logging
import os
import resource
import time
import zlib
from dataclasses import dataclass
from typing import Optional

from .. import _fast
from ..errors import StatsError
from ..spec import ResourceStatistics
from . import cgroups

log = logging.getLogger(__name__)

_BIG = 1 << 62  # v1 says "unlimited" with a page-rounded INT64_MAX; v2 with "max"
_FILES_PER_VM = 8
LIMITS_TTL = 5.0  # seconds kept limits are trusted (see the module's docstring)


@dataclass(frozen=True)
class Target:
    """One VM to read: ``key`` (the container id), QEMU's ``pid``, its overlay, tap and the CPUs
    it was given (the cpus_limit when no quota is set)."""

    key: str
    pid: int
    overlay: Optional[str] = None
    tap: Optional[str] = None
    cpus: Optional[float] = None
    disk_limit: Optional[int] = None


class _Open:
    """A VM whose files are open: for which pid and Target, and when its limits were read."""

    __slots__ = ("pid", "vm", "target", "limits_at")

    def __init__(self, pid, vm, target, limits_at):
        self.pid, self.vm, self.target, self.limits_at = pid, vm, target, limits_at


class Collector:
    """Batch usage reader. Not thread-safe: callers serialise (the Isolator holds a lock).
    ``clock``: monotonic seconds (for LIMITS_TTL)."""

    def __init__(self, proc="/proc", mountinfo=None, net_dev=None, impl=None, clock=time.monotonic):
        self.proc = proc
        self.mountinfo = mountinfo or f"{proc}/self/mountinfo"
        self.net_dev = net_dev or f"{proc}/net/dev"
        self.impl = impl or _fast.load("stats")
        self.clock = clock
        self._mounts = None
        self._open = {}  # key -> _Open
        self._net_fd = -1
        self._out = array.array("q")
        self._clk_tck = os.sysconf("SC_CLK_TCK")
        self._page = os.sysconf("SC_PAGE_SIZE")

    def close(self):
        for held in self._open.values():
            held.vm.close()
        self._open.clear()
        if self._net_fd >= 0:
            os.close(self._net_fd)
            self._net_fd = -1

    def invalidate(self, key):
        """The limits of VM ``key`` changed (or may have): re-read them at its next read."""
        held = self._open.get(key)
        if held is not None:
            held.limits_at = None

    def read(self, targets, prune=True):
        """({key: ResourceStatistics}, {key: StatsError}) for ``targets``; with ``prune``, the
        files of VMs no longer among them are closed."""
        targets = list(targets)
        errors = {}
        vms, kept = [], []
        if prune:
            wanted = {t.key for t in targets}
            for key in [k for k in self._open if k not in wanted]:
                self._open.pop(key).vm.close()
        now = self.clock()
        for target in targets:
            try:
                vms.append(self._vm(target, now))
                kept.append(target)
            except StatsError as err:
                errors[target.key] = err
        need = len(vms) * self.impl.NFIELDS
        if len(self._out) < need:
            self._out = array.array("q", bytes(8 * need))
        failed = self.impl.read_batch(vms, self._out, self._net())
        for index, err in failed:
            errors[kept[index].key] = err
            self._open.pop(kept[index].key).vm.close()  # re-derived next time: it may be back
        stamp = time.time()
        bad = {index for index, _ in failed}
        stats = {t.key: self.assemble(self._out, i * self.impl.NFIELDS, t, stamp)
                 for i, t in enumerate(kept) if i not in bad}
        return stats, errors

    def _vm(self, target, now):
        held = self._open.get(target.key)
        if held is not None and held.pid == target.pid and held.target == target:
            if held.limits_at is None or now - held.limits_at >= LIMITS_TTL:
                self._refresh_limits(held, now)
            return held.vm
        if held is not None:
            held.vm.close()
            del self._open[target.key]
        if self._mounts is None:
            self._mounts = cgroups.mounts(self.mountinfo)
        files = cgroups.vm_files(target.pid, self._mounts, self.proc, target.overlay)
        ensure_fd_room(len(self._open) * _FILES_PER_VM + len(files))
        vm = self.impl.VM(target.key, files, tap=target.tap)  # reads the limits
        # Read just now; dated back by the key's phase, so its first re-read comes sooner.
        self._open[target.key] = _Open(target.pid, vm, target, now - _phase(target.key))
        return vm

    def _refresh_limits(self, held, now):
        """Re-read one VM's limits; a VM that fails is closed and re-derived next time, as after
        a failed read."""
        try:
            held.vm.refresh_limits()
        except StatsError:
            del self._open[held.target.key]
            held.vm.close()
            raise
        held.limits_at = now

    def _net(self):
        if self._net_fd < 0:
            try:
                self._net_fd = os.open(self.net_dev, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as err:
                log.warning("no network counters: %s", err)
        return self._net_fd

    def assemble(self, out, base, target, now):
        """The ResourceStatistics of the record at ``out[base:]`` (see the module's docstring)."""
        s = self.impl
        r = out[base:base + s.NFIELDS]

        def v(slot):
            return r[slot] if r[slot] >= 0 else None

        if r[s.F_CPU_USER_US] >= 0:
            user, system = r[s.F_CPU_USER_US] / 1e6, r[s.F_CPU_SYSTEM_US] / 1e6
        elif r[s.F_ACCT_USER_TICKS] >= 0:
            user, system = r[s.F_ACCT_USER_TICKS] / self._clk_tck, r[s.F_ACCT_SYSTEM_TICKS] / self._clk_tck
        else:
            user, system = r[s.F_UTIME_TICKS] / self._clk_tck, r[s.F_STIME_TICKS] / self._clk_tck
        quota, period = r[s.F_CFS_QUOTA_US], r[s.F_CFS_PERIOD_US]
        cpus_limit = quota / period if quota > 0 and period > 0 else target.cpus
        if r[s.F_THROTTLED_NS] >= 0:
            throttled = r[s.F_THROTTLED_NS] / 1e9
        elif r[s.F_THROTTLED_US] >= 0:
            throttled = r[s.F_THROTTLED_US] / 1e6
        else:
            throttled = None
        if r[s.F_MEM_RSS] >= 0:  # cgroup v1
            cache = r[s.F_MEM_CACHE]
            total = r[s.F_MEM_RSS] + cache
            anon = _sum(r[s.F_MEM_ACTIVE_ANON], r[s.F_MEM_INACTIVE_ANON])
            file = _sum(r[s.F_MEM_ACTIVE_FILE], r[s.F_MEM_INACTIVE_FILE])
            swap, limit = v(s.F_MEM_SWAP), r[s.F_MEM_LIMIT]
        else:
            total, anon, file = v(s.F_MEM_CURRENT), v(s.F_MEM_ANON), v(s.F_MEM_FILE)
            cache, swap, limit = file, v(s.F_MEM_SWAP_CURRENT), r[s.F_MEM_LIMIT]
        return ResourceStatistics(
            timestamp=now, processes=1, threads=v(s.F_THREADS),
            cpus_user_time_secs=user, cpus_system_time_secs=system, cpus_limit=cpus_limit,
            cpus_nr_periods=v(s.F_NR_PERIODS), cpus_nr_throttled=v(s.F_NR_THROTTLED),
            cpus_throttled_time_secs=throttled,
            mem_total_bytes=total, mem_rss_bytes=r[s.F_RSS_PAGES] * self._page if r[s.F_RSS_PAGES] >= 0 else None,
            mem_cache_bytes=cache, mem_anon_bytes=anon, mem_file_bytes=file, mem_swap_bytes=swap,
            mem_limit_bytes=limit if 0 <= limit < _BIG else None,
            disk_used_bytes=v(s.F_DISK_USED), disk_limit_bytes=target.disk_limit,
            net_rx_packets=v(s.F_NET_RX_PACKETS), net_rx_bytes=v(s.F_NET_RX_BYTES),
            net_rx_errors=v(s.F_NET_RX_ERRORS), net_rx_dropped=v(s.F_NET_RX_DROPPED),
            net_tx_packets=v(s.F_NET_TX_PACKETS), net_tx_bytes=v(s.F_NET_TX_BYTES),
            net_tx_errors=v(s.F_NET_TX_ERRORS), net_tx_dropped=v(s.F_NET_TX_DROPPED),
        )


def _phase(key):
    """Where in [0, LIMITS_TTL) VM ``key`` re-reads its limits: spread, and stable per key."""
    return zlib.crc32(key.encode("utf-8", "surrogateescape")) / 2**32 * LIMITS_TTL


def _sum(a, b):
    return a + b if a >= 0 and b >= 0 else None


def ensure_fd_room(needed):
    """Kept descriptors: ~8 per VM, so 1000 VMs need more than the usual 1024. Raise the soft
    limit towards the hard one when we get close."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if needed + 256 > soft and soft != resource.RLIM_INFINITY:
        want = needed * 2 + 1024
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        if new > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
