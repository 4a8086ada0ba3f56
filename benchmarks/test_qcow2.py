"""Overlay creation: the Cython writer, its pure-Python twin and the qemu-img process, one run.

Run with `pytest benchmarks/test_qcow2.py --benchmark-only`; compare the three medians.
"""
import os

import pytest

from vmiso import _fast
from vmiso.bench import qcow2 as bench


@pytest.fixture(scope="module")
def scratch():
    """(base, overlay path) on tmpfs when possible."""
    directory = bench.scratch_dir()
    yield bench.make_base(directory), os.path.join(directory, "overlay.qcow2")
    for name in os.listdir(directory):
        os.unlink(os.path.join(directory, name))
    os.rmdir(directory)


def _measure(benchmark, action, overlay, rounds):
    def remove_previous():  # outside the timed region
        if os.path.lexists(overlay):
            os.unlink(overlay)

    benchmark.pedantic(action, setup=remove_previous, rounds=rounds, warmup_rounds=3)
    remove_previous()


def test_overlay_cython(benchmark, scratch):
    fast = bench.compiled()
    if fast is None:
        pytest.skip("the Cython qcow2 extension is not built or VMISO_NO_EXTENSIONS=1")
    base, overlay = scratch
    _measure(benchmark, bench.writer(fast, base, overlay), overlay, rounds=500)


def test_overlay_python_twin(benchmark, scratch):
    base, overlay = scratch
    _measure(benchmark, bench.writer(_fast.twin("qcow2"), base, overlay), overlay, rounds=500)


def test_overlay_qemu_img_process(benchmark, scratch):
    base, overlay = scratch
    _measure(benchmark, bench.qemu_img(base, overlay), overlay, rounds=30)
