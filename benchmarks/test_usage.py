"""usage_all's batch reader over 1, 10, 100 and 1000 generated VMs (cgroup v1+v2 hybrid and pure
v2): the Cython reader, its pure-Python twin and a psutil-based collector, same files, one run.
Live VMs (and libvirt's getAllDomainStats beside them): `vmiso bench usage --live K`.

Run with `pytest benchmarks/test_usage.py --benchmark-only`; compare the medians per group.
"""
import os
import shutil

import pytest

from vmiso import _fast
from vmiso.bench import usage as bench

SIZES = [1, 10, 100, 1000]


@pytest.fixture(scope="module", params=["hybrid", "v2"])
def trees(request):
    root = bench.scratch_dir()
    made = {n: (bench.make_tree(f"{root}/{n}", n, request.param), f"{root}/{n}/proc") for n in SIZES}
    yield made
    shutil.rmtree(root, ignore_errors=True)


def _reader(benchmark, module, trees, n):
    targets, proc = trees[n]
    reader = bench.batch_reader(module, targets, proc)
    try:
        benchmark.group = f"usage {n} VMs"
        benchmark.extra_info["vms"] = n
        benchmark.pedantic(reader.read, rounds=max(20, 2000 // n), warmup_rounds=2)
    finally:
        reader.close()


@pytest.mark.parametrize("n", SIZES)
def test_cython_reader(benchmark, trees, n):
    module = _fast.load("stats")
    if module is _fast.twin("stats"):
        pytest.skip("the Cython stats extension is not built or VMISO_NO_EXTENSIONS=1")
    _reader(benchmark, module, trees, n)


@pytest.mark.parametrize("n", SIZES)
def test_python_twin(benchmark, trees, n):
    _reader(benchmark, _fast.twin("stats"), trees, n)


@pytest.mark.parametrize("n", SIZES)
def test_psutil_collector(benchmark, trees, n):
    targets, proc = trees[n]
    poll = bench.psutil_collector(targets, proc)
    benchmark.group = f"usage {n} VMs"
    try:
        benchmark.pedantic(poll, rounds=max(5, 200 // n), warmup_rounds=1)
    finally:
        import psutil

        psutil.PROCFS_PATH = "/proc"


def test_scenario_reports_every_reader():
    result = bench.run_generated(10, rounds=5)
    assert result["python_us_per_vm"] > 0 and result["psutil_us_per_vm"] > 0
    assert result["python_refresh_us_per_vm"] > 0
    assert os.path.exists("/proc/self/stat")
