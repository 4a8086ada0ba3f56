"""Disk admission: thin disks may promise more than is free, up to the operator's overcommit,
and the reserve always stays free; refusals carry the numbers."""
import os

import pytest

from vmiso import InvalidSpec, NoDiskSpace
from vmiso.admission import LAUNCH_BYTES, Policy, check, fits, growth_left

GIB = 1 << 30


@pytest.mark.parametrize("free, reserve, promised, new, overcommit, expected", [
    (10 * GIB, 1 * GIB, 0, 4 * GIB, 1, True),
    (10 * GIB, 1 * GIB, 6 * GIB, 4 * GIB, 1, False),    # 10 promised > 9 usable
    (10 * GIB, 1 * GIB, 6 * GIB, 4 * GIB, 2, True),     # thin disks: 10 <= 2 x 9
    (10 * GIB, 1 * GIB, 30 * GIB, 10 * GIB, 4, False),  # 40 > 36
    (GIB + LAUNCH_BYTES - 1, GIB, 0, 1, 100, False),    # the reserve stays: no room for the seed and logs
    (GIB + LAUNCH_BYTES, GIB, 0, 1, 100, True),
    (0, 0, 0, 1, 100, False),
])
def test_fits(free, reserve, promised, new, overcommit, expected):
    assert fits(free, reserve, promised, new, overcommit) is expected


def test_default_reserve_is_a_share_of_the_file_system_capped():
    assert Policy().reserve_on(10 * GIB) == int(10 * GIB * 0.05)
    assert Policy().reserve_on(1000 * GIB) == 2 * GIB
    assert Policy(reserve=123).reserve_on(1000 * GIB) == 123


@pytest.mark.parametrize("kwargs", [{"reserve": -1}, {"reserve": 1.5}, {"reserve": True}, {"overcommit": 0},
                                    {"overcommit": -2}, {"overcommit": float("inf")}, {"overcommit": "4"}])
def test_bad_policy_is_refused(kwargs):
    with pytest.raises(InvalidSpec):
        Policy(**kwargs)


def test_growth_left_counts_what_is_not_allocated_yet(tmp_path):
    overlay = tmp_path / "overlay.qcow2"
    with open(overlay, "wb") as f:
        f.write(b"x" * (1 << 20))
        os.fsync(f.fileno())
    allocated = os.stat(overlay).st_blocks * 512
    assert growth_left(str(overlay), 8 << 20) == (8 << 20) - allocated
    assert growth_left(str(overlay), 1) == 0
    assert growth_left(str(tmp_path / "gone"), 8 << 20) == 0  # its VM ended meanwhile


def test_check_refuses_with_the_numbers(tmp_path):
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    check(str(tmp_path), [], 1 << 20, Policy(reserve=0))  # fits: nothing raised
    with pytest.raises(NoDiskSpace) as info:
        check(str(tmp_path), [], 1 << 20, Policy(reserve=free + GIB))
    err = info.value
    assert err.reserve == free + GIB and err.new == 1 << 20 and str(tmp_path) in str(err)
    assert "GiB free" in str(err) and "reserved" in str(err)
    with pytest.raises(NoDiskSpace) as info:
        check(str(tmp_path), [(str(tmp_path / "gone"), 10 * GIB)], 2 * free, Policy(reserve=0, overcommit=1))
    assert "running disks may still grow by 0.00 GiB and this one by" in str(info.value)
