"""The Isolator's usage(), usage_all() and update(): which VMs to read, and how limits change live.

The Isolator keeps one ``Accounting``; it remembers per container what the hot path needs (QEMU's
pid, the overlay's virtual size, the tap) so that a poll of a thousand VMs makes no libvirt call
and reads no pid file: a pid is looked up again only after its VM failed a read (a vanished
process gives ESRCH on the kept descriptor, never another process's numbers). update(), even one
that fails halfway, tells the Collector that the VM's limits changed, so the next usage() shows
them (the Collector keeps limits between reads, see usage.py).
"""
import threading
import time

from .. import state
from ..errors import InvalidSpec, NotFound, StatsError, VmisoError
from ..image import qcow2
from ..paths import OVERLAY
from ..spec import Resources
from ..virt.host import Host
from . import limits
from .usage import Collector, Target

SHRINK_WAIT = 5.0  # seconds a shrinking guest gets to give memory back before the limit drops


def limits_record(resources):
    """What launch records in ``checkpoint.extra["limits"]``: the allocation, and the maximum
    guest memory (the domain's <memory>: the balloon can go below it, never above)."""
    return {"cpus": resources.cpus, "vcpus": resources.vcpus, "mem_mib": resources.mem_mib,
            "mem_max_mib": resources.mem_mib}


class Accounting:
    def __init__(self, isolator, collector=None):
        self.iso = isolator
        self.collector = collector or Collector()
        self._lock = threading.Lock()
        self._targets = {}  # container id -> Target

    def target(self, c):
        """What the usage reader needs of container ``c`` (QEMU's pid, overlay, tap, limits);
        kept until its VM fails a read. StatsError if its VM is not running."""
        target = self._targets.get(c.id)
        if target is not None:
            return target
        pid = Host.pid(c.domain)
        if pid is None:
            raise StatsError(c.domain, "no QEMU process (the VM is not running)")
        overlay = c.path(OVERLAY)
        try:
            size = qcow2.inspect(overlay).virtual_size
        except VmisoError:
            size = None
        lim = c.checkpoint.extra.get("limits") or {}
        target = Target(key=c.id, pid=pid, overlay=overlay, tap=c.checkpoint.extra.get("tap"),
                        cpus=lim.get("cpus"), disk_limit=size)
        self._targets[c.id] = target
        return target

    def read(self, containers, prune):
        """({id: ResourceStatistics}, {id: StatsError}) for ``containers``."""
        with self._lock:
            targets, errors = [], {}
            for c in containers:
                try:
                    targets.append(self.target(c))
                except StatsError as err:
                    errors[c.id] = err
            if prune:
                for key in set(self._targets) - {t.key for t in targets} - set(errors):
                    del self._targets[key]
            stats, failed = self.collector.read(targets, prune=prune)
            for key in failed:
                self._targets.pop(key, None)  # look the pid up again next time
            errors.update(failed)
            return stats, errors

    def usage(self, container_id):
        c = self.iso.supervisor.get(container_id)
        if c.termination is not None:
            raise StatsError(c.domain, "the container has ended")
        stats, errors = self.read([c], prune=False)
        if container_id in errors:
            raise errors[container_id]
        return stats[container_id]

    def usage_all(self, errors=None):
        stats, failed = self.read(self.iso.supervisor.running(), prune=True)
        if errors is not None:
            errors.update(failed)
        return stats

    # --- update -------------------------------------------------------------------------------
    def update(self, container_id, resources, disk=None, inbound=None, outbound=None):
        if not isinstance(resources, Resources):
            raise InvalidSpec("resources", "must be a vmiso.Resources")
        c = self.iso.supervisor.own(container_id)
        host = self.iso.host
        dom = host.lookup(c.domain) if c.termination is None else None
        if dom is None:
            raise NotFound("running container", container_id)
        lim = c.checkpoint.extra.setdefault("limits", limits_record(resources))
        if resources.vcpus > lim["vcpus"]:
            raise InvalidSpec("cpus", f"at most {lim['vcpus']}: the VM has {lim['vcpus']} vCPUs")
        if resources.mem_mib > lim["mem_max_mib"]:
            raise InvalidSpec("mem_mib", f"at most {lim['mem_max_mib']} MiB, the maximum set at launch")
        tap = c.checkpoint.extra.get("tap")
        if (inbound or outbound) and not tap:
            raise InvalidSpec("network", "the task has no network to limit")
        try:
            self._apply(c, dom, lim, resources, disk, tap, inbound, outbound)
        finally:  # even after a partial update: whatever changed shows in the next usage()
            with self._lock:
                self._targets.pop(c.id, None)  # cpus_limit's fallback may have changed
                self.collector.invalidate(c.id)  # the cgroup's limits did: re-read them

    def _apply(self, c, dom, lim, resources, disk, tap, inbound, outbound):
        host = self.iso.host
        quota = limits.cpu_quota_us(resources.cpus) if resources.cpus < lim["vcpus"] else -1
        host.set_cpu(dom, shares=limits.cpu_shares(resources.cpus), quota_us=quota,
                     period_us=limits.CPU_PERIOD_US)
        self._update_memory(c, dom, lim, resources.mem_mib)
        if disk is not None:
            host.set_block_iotune(dom, "vda", disk.params())
        if inbound or outbound:
            from ..net import ratelimit  # netlink and tc stay in net/

            ratelimit.apply(tap, inbound=inbound, outbound=outbound)
        lim.update(cpus=resources.cpus, mem_mib=resources.mem_mib)
        with c.cond:
            state.write(c.dir, c.checkpoint)

    def _update_memory(self, c, dom, lim, mem_mib):
        host = self.iso.host
        tcg = c.checkpoint.accel == "tcg"
        new_limit = limits.hard_limit_bytes(mem_mib, lim["vcpus"], tcg)
        if mem_mib >= lim["mem_mib"]:  # grow: room first, then give it to the guest
            host.set_memory_hard_limit(dom, new_limit)
            host.set_balloon(dom, mem_mib * limits.MIB)
            return
        host.set_balloon(dom, mem_mib * limits.MIB)  # shrink: the guest gives back first
        deadline = time.monotonic() + SHRINK_WAIT
        while True:
            charged = self.usage(c.id).mem_total_bytes or 0
            if charged <= new_limit:
                host.set_memory_hard_limit(dom, new_limit)
                return
            if time.monotonic() > deadline:
                raise InvalidSpec("mem_mib", f"the VM still uses {charged >> 20} MiB, more than the "
                                             f"{new_limit >> 20} MiB limit {mem_mib} MiB needs; the balloon "
                                             "target is set, the limit is unchanged (no balloon driver?)")
            time.sleep(0.2)


def hard_limit(resources, accel):
    """The memory hard limit launch puts on a VM's cgroup (``accel``: "kvm" or "tcg")."""
    return limits.hard_limit_bytes(resources.mem_mib, resources.vcpus, accel == "tcg")
