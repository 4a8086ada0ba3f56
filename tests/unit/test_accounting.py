"""Accounting without a VM: Mesos' field names, the memory-overhead formula, disk limit checks,
update() invalidating the Collector's kept limits."""
import dataclasses
import threading
from types import SimpleNamespace

import pytest

from vmiso.accounting import limits, live
from vmiso.accounting.live import Accounting, hard_limit, limits_record
from vmiso.errors import InvalidSpec, VmisoError
from vmiso.spec import Resources, ResourceStatistics

MESOS_FIELDS = [
    "timestamp", "processes", "threads", "cpus_user_time_secs", "cpus_system_time_secs", "cpus_limit",
    "cpus_nr_periods", "cpus_nr_throttled", "cpus_throttled_time_secs", "mem_total_bytes", "mem_rss_bytes",
    "mem_cache_bytes", "mem_anon_bytes", "mem_file_bytes", "mem_swap_bytes", "mem_limit_bytes",
    "disk_used_bytes", "disk_limit_bytes", "net_rx_packets", "net_rx_bytes", "net_rx_errors",
    "net_rx_dropped", "net_tx_packets", "net_tx_bytes", "net_tx_errors", "net_tx_dropped",
]


def test_resource_statistics_uses_mesos_names():
    assert [f.name for f in dataclasses.fields(ResourceStatistics)] == MESOS_FIELDS
    stats = ResourceStatistics(timestamp=1.5, threads=3, net_rx_bytes=0)
    assert stats.to_dict() == {"timestamp": 1.5, "threads": 3, "net_rx_bytes": 0}
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.threads = 4


def test_memory_limit_counts_qemu_overhead():
    mib = limits.MIB
    assert limits.hard_limit_bytes(256, 1, tcg=False) == (256 + 96 + 8 + 4) * mib
    assert limits.hard_limit_bytes(256, 1, tcg=True) == (256 + 96 + 8 + 4 + 128) * mib
    assert limits.hard_limit_bytes(4096, 4, tcg=False) == (4096 + 96 + 32 + 64) * mib
    # Measured here: a 256 MiB TCG guest with all its memory touched was charged 321 MiB.
    assert hard_limit(Resources(cpus=1, mem_mib=256), "tcg") > 321 * mib


def test_cpu_quota_and_shares():
    assert limits.cpu_quota_us(0.5) == 50_000 and limits.cpu_quota_us(1.25) == 125_000
    assert limits.cpu_shares(0.5) == 512 and limits.cpu_shares(0.001) == limits.MIN_SHARES
    assert limits_record(Resources(cpus=1.5, mem_mib=512)) == {"cpus": 1.5, "vcpus": 2, "mem_mib": 512,
                                                               "mem_max_mib": 512}


def test_disk_limits():
    assert limits.DiskLimits(read_bytes_sec=1 << 20, write_iops_sec=0).params() == {
        "read_bytes_sec": 1 << 20, "write_iops_sec": 0}
    with pytest.raises(InvalidSpec):
        limits.DiskLimits(total_bytes_sec=1, read_bytes_sec=2)
    with pytest.raises(InvalidSpec):
        limits.DiskLimits(total_iops_sec=-1)
    with pytest.raises(InvalidSpec):
        limits.DiskLimits(read_bytes_sec=1.5)


class FakeHost:
    def __init__(self, fail):
        self.fail, self.calls = fail, []

    def lookup(self, name):
        return name

    def set_cpu(self, dom, **params):
        self.calls.append(("cpu", params))

    def set_memory_hard_limit(self, dom, value):
        if self.fail:
            raise VmisoError("libvirt said no")
        self.calls.append(("memory", value))

    def set_balloon(self, dom, value):
        self.calls.append(("balloon", value))


class FakeCollector:
    def __init__(self):
        self.invalidated = []

    def invalidate(self, key):
        self.invalidated.append(key)


@pytest.mark.parametrize("fail", [False, True])
def test_update_makes_the_next_usage_reread_the_limits(monkeypatch, fail):
    """Even an update that fails halfway (the CPU quota set, the memory limit refused)."""
    c = SimpleNamespace(id="c1", domain="vmiso-c1", termination=None, dir="/nonexistent", cond=threading.Lock(),
                        checkpoint=SimpleNamespace(accel="kvm", extra={"limits": limits_record(Resources(cpus=2))}))
    host = FakeHost(fail)
    isolator = SimpleNamespace(host=host, supervisor=SimpleNamespace(get=lambda cid: c, own=lambda cid: c))
    accounting = Accounting(isolator, collector=FakeCollector())
    accounting._targets["c1"] = "the target with the old cpus"
    monkeypatch.setattr(live.state, "write", lambda directory, checkpoint: None)
    if fail:
        with pytest.raises(VmisoError, match="said no"):
            accounting.update("c1", Resources(cpus=1, mem_mib=256))
    else:
        accounting.update("c1", Resources(cpus=1, mem_mib=256))
    assert host.calls[0] == ("cpu", {"shares": 1024, "quota_us": 100_000, "period_us": 100_000})
    assert accounting.collector.invalidated == ["c1"] and "c1" not in accounting._targets
