"""The Isolator API in-process, on the real libvirtd and micro guest."""
import os

import pytest

from vmiso import AlreadyExists, LaunchFailed, NotFound, Resources, TaskSpec, Timeout

pytestmark = pytest.mark.system


def test_launch_wait_destroy(iso, cid):
    status = iso.launch(cid, TaskSpec.shell("echo hi; echo oops >&2; exit 5"))
    assert status.state == "RUNNING" and status.domain == f"vmiso-{cid}" and status.accel in ("kvm", "tcg")
    assert cid in iso.containers()
    chunks = {"stdout": b"", "stderr": b""}
    for name, data in iso.output(cid):
        chunks[name] += data
    assert chunks == {"stdout": b"hi\n", "stderr": b"oops\n"}
    termination = iso.wait(cid, timeout=60)
    assert (termination.state, termination.reason, termination.exit_code) == ("FAILED", "guest-exited", 5)
    assert iso.status(cid).state == "FAILED"
    # The VM's disk is freed as soon as it ends; the record stays until destroy.
    directory = os.path.join(iso.workdir.containers, cid)
    assert sorted(os.listdir(directory)) == ["checkpoint.json", "console.log", "stderr", "stdout"]
    assert iso.destroy(cid) == termination
    assert not os.path.exists(directory)
    assert iso.destroy(cid) == termination  # idempotent
    assert iso.wait(cid) == termination    # wait after destroy still answers
    assert cid not in iso.containers()


def test_zero_exit_is_finished(iso, cid):
    iso.launch(cid, TaskSpec(["true"], resources=Resources(cpus=0.5, mem_mib=128)))
    assert iso.wait(cid, timeout=60).state == "FINISHED"
    iso.destroy(cid)


def test_duplicate_id_and_unknown_id(iso, cid):
    iso.launch(cid, TaskSpec(["sleep", "600"]))
    try:
        with pytest.raises(AlreadyExists):
            iso.launch(cid, TaskSpec(["true"]))
        with pytest.raises(Timeout):
            iso.wait(cid, timeout=0.2)
    finally:
        assert iso.destroy(cid, grace=0).state == "KILLED"
    with pytest.raises(NotFound):
        iso.status("never-launched")


@pytest.mark.parametrize("point", ["launch:checkpoint", "launch:overlay", "launch:seed", "launch:create",
                                   "launch:running"])
def test_failed_launch_leaves_nothing(iso, cid, point, monkeypatch):
    monkeypatch.setenv("VMISO_FAULT", point + ":raise")
    with pytest.raises(LaunchFailed) as info:
        iso.launch(cid, TaskSpec(["true"]))
    assert "fault injected" in str(info.value)
    assert not os.path.exists(os.path.join(iso.workdir.containers, cid))
    assert iso.host.lookup(f"vmiso-{cid}") is None
    monkeypatch.delenv("VMISO_FAULT")
    iso.launch(cid, TaskSpec(["true"]))  # the id is free again
    assert iso.wait(cid, timeout=60).exit_code == 0
    iso.destroy(cid)
