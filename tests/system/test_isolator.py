"""The Isolator API in-process, on the real libvirtd and micro guest."""
import os
import subprocess

import pytest

from vmiso import AlreadyExists, LaunchFailed, NotFound, Resources, TaskSpec, Timeout

from .conftest import wait_for_stdout

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
    # The status is known when QEMU exits; the VM's disk is freed once libvirt has torn the VM
    # down, without a destroy; the record stays until destroy.
    iso.supervisor.await_release(iso.supervisor.get(cid))
    directory = os.path.join(iso.workdir.containers, cid)
    assert sorted(os.listdir(directory)) == ["checkpoint.json", "console.log", "stderr", "stdout"]
    assert iso.destroy(cid) == termination
    assert not os.path.exists(directory)
    assert iso.destroy(cid) == termination  # idempotent
    assert iso.wait(cid) == termination    # wait after destroy still answers
    assert cid not in iso.containers()


def test_zero_exit_is_finished_and_a_fraction_of_a_cpu_is_a_quota(iso, cid):
    iso.launch(cid, TaskSpec(["sh", "-c", "sleep 8; exit 0"], resources=Resources(cpus=0.5, mem_mib=128)))
    sched = subprocess.run(["virsh", "schedinfo", f"vmiso-{cid}"], capture_output=True, text=True, check=True)
    fields = dict(line.replace(" ", "").split(":", 1) for line in sched.stdout.splitlines() if ":" in line)
    assert int(fields["global_quota"]) * 2 == int(fields["global_period"])  # the VM's cgroup, live
    assert iso.usage(cid).cpus_limit == 0.5
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


def test_quick_cpu_probe_changes_nothing_the_guest_sees(workdir, cid):
    """virt/cpuprobe.py: libvirt keeps the capability removal in the live XML, and a guest started
    with the quick probe sees the same CPU flags as one started with libvirt's full probe."""
    import xml.etree.ElementTree as ET

    from vmiso import Isolator
    from vmiso.virt import cpuprobe, domain

    from .conftest import AGENT

    seen = {}
    for wanted, name in (("quick", cid), ("full", cid + "b")):  # the cid fixture checks both
        iso = Isolator(workdir=workdir, agent_id=AGENT, cpu_probe=wanted)
        try:
            assert iso.cpu_probe().quick == (wanted == "quick")  # libvirt 9 + QEMU 7.2 here
            iso.launch(name, TaskSpec.shell("grep -m1 '^flags' /proc/cpuinfo; sleep 120"))
            live = ET.fromstring(iso.host.lookup(f"vmiso-{name}").XMLDesc())
            ns = domain.QEMU_NS
            dels = [el.get("capability") for el in live.findall(f"{{{ns}}}capabilities/{{{ns}}}del")]
            assert dels == ([cpuprobe.CAPABILITY] if wanted == "quick" else [])
            seen[wanted] = wait_for_stdout(iso, name, b"\n")
            iso.destroy(name, grace=0)
        finally:
            iso.host.close()
    assert seen["quick"].startswith(b"flags") and len(seen["quick"].split()) > 10
    assert seen["quick"] == seen["full"]


def test_kill_asks_the_task_to_stop_with_sigterm_first(iso, cid):
    """kill(grace) writes a stop request into the task channel; the wrapper sends SIGTERM to the
    task, which ends on its own terms: killed, with the status it chose and its last words."""
    iso.launch(cid, TaskSpec.shell('trap "echo got-term; exit 7" TERM; echo ready; while :; do sleep 1; done'))
    wait_for_stdout(iso, cid, b"ready\n")
    termination = iso.kill(cid, grace=60)
    assert (termination.state, termination.reason, termination.exit_code) == ("KILLED", "destroyed", 7)
    with open(os.path.join(iso.workdir.containers, cid, "stdout"), "rb") as f:
        assert b"ready\ngot-term\n" in f.read()
    iso.destroy(cid)


def test_kill_sends_the_tasks_own_stop_signal(iso, cid):
    """With a stop signal (docker's --stop-signal) the request names it, the wrapper sends it, and
    the task ends on its own terms as with SIGTERM. Short sleeps: busybox's sh runs a trap only
    once its foreground child has ended."""
    script = ('trap "echo got-quit; exit 7" QUIT; trap "echo got-term; exit 8" TERM; echo ready; '
              'while :; do sleep 0.1; done')
    iso.launch(cid, TaskSpec.shell(script, stop_signal="SIGQUIT"))
    wait_for_stdout(iso, cid, b"ready\n")
    termination = iso.kill(cid, grace=10)
    assert (termination.state, termination.reason, termination.exit_code) == ("KILLED", "destroyed", 7)
    with open(os.path.join(iso.workdir.containers, cid, "stdout"), "rb") as f:
        out = f.read()
    assert b"ready\ngot-quit\n" in out and b"got-term" not in out
    iso.destroy(cid)
    # Without one, the same task gets SIGTERM, as it always did.
    iso.launch(cid, TaskSpec.shell(script))
    wait_for_stdout(iso, cid, b"ready\n")
    assert iso.kill(cid, grace=10).exit_code == 8
    iso.destroy(cid)


def test_kill_of_a_task_that_ignores_sigterm_stops_the_vm_after_the_grace(iso, cid):
    iso.launch(cid, TaskSpec.shell('trap "" TERM; echo ready; while :; do sleep 1; done'))
    wait_for_stdout(iso, cid, b"ready\n")
    termination = iso.kill(cid, grace=2)
    assert (termination.state, termination.reason, termination.exit_code) == ("KILLED", "destroyed", None)
    iso.destroy(cid)
