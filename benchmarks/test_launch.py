"""Launch latency on the real libvirtd and the micro guest: a vmiso launch of `true`, start to
cleaned up, against the 2016 Mesos-prototype path (whole-disk copy of a 1 GiB image, genisoimage
seed, persistent define + start, end = completion line polled on the console), same task, one
pytest run. Both are timed whole, cleanup included (the prototype's destroy + undefine + delete
too, which `vmiso bench launch` does not count for it). Each round's phases land in extra_info;
`vmiso bench launch --baseline` alternates the two and breaks every phase down.

Run as root with libvirtd up: `pytest benchmarks/test_launch.py --benchmark-only -m system`.
"""
import os

import pytest

from vmiso.bench import baseline as prototype
from vmiso.bench import launch as bench

pytestmark = pytest.mark.system
WORKDIR = os.environ.get("VMISO_TEST_WORKDIR", "/var/lib/vmiso")
ROUNDS = 5


@pytest.fixture(scope="module")
def iso():
    if os.geteuid() != 0:
        pytest.skip("needs root (VMs through qemu:///system)")
    from vmiso import Isolator
    from vmiso.image import micro

    micro.build_micro(WORKDIR, progress=lambda *a: None)
    isolator = Isolator(workdir=WORKDIR, agent_id="vmiso-bench")
    isolator.host.conn()
    yield isolator
    isolator.host.close()


def _record(benchmark, launches, order):
    benchmark.group = "launch: true on micro, start to end"
    medians, _p90, _at = bench._stats(launches, order)
    benchmark.extra_info["phases_ms"] = medians
    benchmark.extra_info["failures"] = sum(not launch["ok"] for launch in launches)


def test_vmiso_launch_to_cleaned(benchmark, iso):
    launches = []
    benchmark.pedantic(lambda: launches.append(bench.vmiso_once(iso, [b"true"])), rounds=ROUNDS, iterations=1)
    _record(benchmark, launches, bench.VMISO_MARKS)
    assert all(launch["ok"] for launch in launches)


def test_prototype_path_to_completion(benchmark, iso):
    from vmiso.image import micro
    from vmiso.image.resolve import resolve

    base = prototype.base_image(iso.workdir.root, micro.find_micro(iso.workdir.root))
    boot = resolve(iso.workdir, "micro")
    conn = iso.host.conn()
    launches = []

    def once():
        launches.append(bench.baseline_once(conn, iso.workdir.root, base, boot, iso.accel, [b"true"]))

    benchmark.pedantic(once, rounds=ROUNDS, iterations=1)
    _record(benchmark, launches, bench.BASELINE_MARKS)
    assert all(launch["ok"] for launch in launches)
