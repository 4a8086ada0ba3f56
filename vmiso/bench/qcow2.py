"""Overlay creation benchmark: the Cython writer, its pure-Python twin and `qemu-img create`,
beside the floor: the same system calls with nothing computed (_fast/floors.pyx).

All write the same overlay over the same base in one run, on tmpfs when there is one (so the
numbers measure the writers, not the disk). Medians in microseconds; ``floor_ratio`` is the
Cython writer's time over the floor's.
"""
import os
import shutil
import statistics
import tempfile
import time

from vmiso import _fast
from vmiso._proc import run as run_command

SIZE = 10 << 30  # a typical cloud image's virtual size
CLUSTER_BITS = 16
QEMU_IMG_ITERATIONS = 30


def scratch_dir():
    """A fresh directory on tmpfs (/dev/shm) if writable, else in the system temp dir."""
    parent = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    return tempfile.mkdtemp(prefix="vmiso-bench-qcow2-", dir=parent)


def make_base(directory):
    """A qcow2 base of SIZE bytes, made by qemu-img (its path)."""
    base = os.path.join(directory, "base.qcow2")
    run_command(["qemu-img", "create", "-q", "-f", "qcow2", base, str(SIZE)])
    return base


def compiled():
    """The compiled qcow2 module, or None when it is not built or disabled."""
    module = _fast.load("qcow2")
    return None if module is _fast.twin("qcow2") else module


def writer(module, base, overlay):
    """A no-argument callable that writes ``overlay`` over ``base`` with ``module``."""
    name = base.encode()
    return lambda: module.write_overlay(overlay, SIZE, name, b"qcow2")


def qemu_img(base, overlay):
    """A no-argument callable that runs the whole qemu-img process."""
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", overlay]
    return lambda: run_command(argv)


def write_plan(base):
    """(writes, end) of the overlay the writers make over ``base``: each ``(bytes, offset)``
    they pwrite, and the size they ftruncate to (computed with the twin's own layout code)."""
    twin = _fast.twin("qcow2")
    (size, l1_size, rt, rb, used), problem = twin._layout(SIZE, CLUSTER_BITS)
    assert problem is None, problem
    head = twin._header(size, CLUSTER_BITS, l1_size, rt, rb, base.encode(), b"qcow2")
    rb_offset = (1 + rt) << CLUSTER_BITS
    table = b"".join((rb_offset + (i << CLUSTER_BITS)).to_bytes(8, "big") for i in range(rb))
    writes = [(head, 0), (table, 1 << CLUSTER_BITS), (b"\0\1" * used, rb_offset)]
    return writes, ((1 + rt + rb) << CLUSTER_BITS) + 8 * l1_size


def floor(module, base, overlay):
    """A no-argument callable making only the writers' system calls, from ``module`` (floors)."""
    writes, end = write_plan(base)
    path = overlay.encode()
    return lambda: module.qcow2_syscalls(path, writes, end)


def median_us(action, overlay, iterations):
    """Median wall time of ``action`` in µs; the previous overlay is removed outside the timing."""
    samples = []
    for _ in range(iterations):
        if os.path.lexists(overlay):
            os.unlink(overlay)
        start = time.perf_counter_ns()
        action()
        samples.append(time.perf_counter_ns() - start)
    os.unlink(overlay)
    return statistics.median(samples) / 1000


def run(iterations=200):
    """Measure the three writers in one run; return their medians and the speedups."""
    directory = scratch_dir()
    try:
        base = make_base(directory)
        overlay = os.path.join(directory, "overlay.qcow2")
        fast = compiled()
        floors = _fast.load("floors")
        floor_us = median_us(floor(floors, base, overlay), overlay, iterations)
        cython_us = median_us(writer(fast, base, overlay), overlay, iterations) if fast else None
        python_us = median_us(writer(_fast.twin("qcow2"), base, overlay), overlay, iterations)
        qemu_us = median_us(qemu_img(base, overlay), overlay, min(iterations, QEMU_IMG_ITERATIONS))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    best = cython_us if cython_us is not None else python_us
    return {
        "cython_us": cython_us,
        "python_us": python_us,
        "qemu_img_us": qemu_us,
        "speedup_vs_qemu_img": qemu_us / best,
        "speedup_vs_python": python_us / cython_us if cython_us else None,
        "floor_us": floor_us,
        "floor_ratio": best / floor_us,
        "floor_implementation": _fast.implementation("floors"),
        "iterations": iterations,
        "implementation": _fast.implementation("qcow2"),
    }


if __name__ == "__main__":
    for key, value in run().items():
        print(f"{key:20} {value:.2f}" if isinstance(value, float) else f"{key:20} {value}")
