"""The benchmarks' floors make exactly the system calls of the hot paths they stand beside: the
qcow2 floor leaves the very file the overlay writer leaves; the usage floor reads what the
batch reader reads. Cython and twin alike."""
import os

import pytest

from vmiso import _fast
from vmiso.bench import qcow2 as qcow2_bench
from vmiso.bench import usage as usage_bench

IMPLEMENTATIONS = [pytest.param(_fast.twin("floors"), id="python")]
if not _fast.NO_EXTENSIONS:
    IMPLEMENTATIONS.append(pytest.param(_fast.load("floors"), id="cython"))


def test_extension_is_loaded_unless_disabled():
    """Guard: the compiled floors (what the benches compare the Cython paths with) are in use."""
    assert _fast.implementation("floors") == ("python" if _fast.NO_EXTENSIONS else "cython")


@pytest.mark.parametrize("floors", IMPLEMENTATIONS)
def test_qcow2_floor_writes_the_writers_file(tmp_path, floors):
    base = str(tmp_path / "base.qcow2")
    writes, end = qcow2_bench.write_plan(base)
    floors.qcow2_syscalls(str(tmp_path / "floor").encode(), writes, end)
    _fast.load("qcow2").write_overlay(str(tmp_path / "writer"), qcow2_bench.SIZE, base.encode(), b"qcow2")
    assert (tmp_path / "floor").read_bytes() == (tmp_path / "writer").read_bytes()
    assert oct(os.stat(tmp_path / "floor").st_mode & 0o777) == "0o600"
    with pytest.raises(FileExistsError):  # exclusive create, as the writer's
        floors.qcow2_syscalls(str(tmp_path / "floor").encode(), writes, end)


@pytest.mark.parametrize("floors", IMPLEMENTATIONS)
def test_usage_floor_reads_every_counter_file_and_net_dev(tmp_path, floors):
    targets = usage_bench.make_tree(str(tmp_path), 3)
    reader = usage_bench.floor_reader(targets, f"{tmp_path}/proc")
    try:
        total = reader.read()
    finally:
        reader.close()
    from vmiso._fast import layout
    from vmiso.accounting import cgroups

    proc = f"{tmp_path}/proc"
    mounts = cgroups.mounts(f"{proc}/self/mountinfo")
    expected = sum(os.path.getsize(path) for t in targets
                   for path, kind, _ in cgroups.vm_files(t.pid, mounts, proc, t.overlay)
                   if not kind & layout.K_LIMIT and kind != layout.K_FSTAT)
    assert total == expected + os.path.getsize(f"{proc}/net/dev")
    assert type(floors.UsageFiles([], [], -1).read()) is int
