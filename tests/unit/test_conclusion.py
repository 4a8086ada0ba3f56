"""The conclusion in two halves, on the FakeHost: the termination is recorded (and wait() and
output() followers answer) as soon as QEMU has exited with the exit line written, while libvirt's
teardown still runs; the VM's files, network and watches are released only at libvirt's stopped
event. destroy() right after wait() waits for that release; a process that dies between the
halves leaves work recover() completes."""
import os
import threading

import pytest

from vmiso import Isolator, TaskSpec, Timeout, state

AGENT = "agent-fake"
pytestmark = pytest.mark.usefixtures("fast_conclusion")


def make(tmp_path, host):
    return Isolator(workdir=str(tmp_path / "w"), accel="tcg", agent_id=AGENT, host=host)


def files(iso, cid):
    return sorted(os.listdir(iso.workdir.container_dir(cid)))


def test_the_status_is_known_when_qemu_exits_and_the_cleanup_follows_libvirt(tmp_path, host, base):
    iso = make(tmp_path, host)
    iso.launch("c1", TaskSpec(["true"], image=base))
    host.guest_exits("vmiso-c1", 7, teardown=False)  # QEMU gone; libvirt still tearing down
    t = iso.wait("c1", timeout=10)
    assert (t.state, t.reason, t.exit_code) == ("FAILED", "guest-exited", 7)
    cp = state.read(str(iso.workdir.container_dir("c1")))
    assert cp.termination["exit_code"] == 7 and cp.cleanup_pending
    assert "overlay.qcow2" in files(iso, "c1")  # libvirt may still use them: not yet
    assert list(iso.output("c1")) == []  # a follower ends at once (the exit line is no output)
    host.stop("vmiso-c1", "shutdown")
    assert iso.wait("c1") == t
    iso.supervisor.await_release(iso.supervisor.get("c1"))
    assert "overlay.qcow2" not in files(iso, "c1") and "seed.iso" not in files(iso, "c1")
    assert not state.read(str(iso.workdir.container_dir("c1"))).cleanup_pending


def test_destroy_right_after_wait_waits_for_libvirts_teardown(tmp_path, host, base):
    iso = make(tmp_path, host)
    iso.launch("c1", TaskSpec(["true"], image=base))
    host.guest_exits("vmiso-c1", 0, teardown=False)
    t = iso.wait("c1", timeout=10)
    done = []
    destroyer = threading.Thread(target=lambda: done.append(iso.destroy("c1")))
    destroyer.start()
    destroyer.join(0.3)
    assert destroyer.is_alive() and os.path.isdir(iso.workdir.container_dir("c1"))  # not during teardown
    host.stop("vmiso-c1", "shutdown")
    destroyer.join(10)
    assert done == [t] and not os.path.exists(iso.workdir.container_dir("c1"))
    assert ("destroy", "vmiso-c1") not in host.calls  # it ended by itself: nothing to destroy


def test_destroy_after_wait_finds_a_teardown_whose_event_was_lost(tmp_path, host, base):
    iso = make(tmp_path, host)
    iso.launch("c1", TaskSpec(["true"], image=base))
    host.guest_exits("vmiso-c1", 0, teardown=False)
    iso.wait("c1", timeout=10)
    host.stop("vmiso-c1", "shutdown", notify=False)  # libvirt finished; nobody heard
    assert iso.destroy("c1").exit_code == 0 and not os.path.exists(iso.workdir.container_dir("c1"))


def test_a_vm_that_exits_without_an_exit_line_is_left_to_libvirts_event(tmp_path, host, base):
    iso = make(tmp_path, host)
    iso.launch("c1", TaskSpec(["true"], image=base))
    host.qemu_exits("vmiso-c1")  # no exit line: a crash or a kill, libvirt's detail decides
    with pytest.raises(Timeout):
        iso.wait("c1", timeout=0.3)
    host.stop("vmiso-c1", "crashed")
    t = iso.wait("c1", timeout=10)
    assert (t.state, t.reason) == ("FAILED", "vm-crashed")


@pytest.mark.parametrize("gone_before_recover", [True, False])
def test_a_crash_between_the_halves_leaves_work_recover_completes(tmp_path, host, base, monkeypatch,
                                                                 gone_before_recover):
    """The fault point after the termination is recorded stops the conclusion there (as a crash
    of the process would); a new Isolator's recover() reports the termination and releases the
    VM's files once libvirt is done with the domain."""
    first = make(tmp_path, host)
    first.launch("c1", TaskSpec(["true"], image=base))
    monkeypatch.setenv("VMISO_FAULT", "conclude:recorded:raise")
    faulted = threading.Event()
    monkeypatch.setattr(threading, "excepthook", lambda args: faulted.set())
    host.guest_exits("vmiso-c1", 3, teardown=False)
    assert first.wait("c1", timeout=10).exit_code == 3
    assert faulted.wait(10)
    host.close()  # the process is gone: its watches with it
    monkeypatch.delenv("VMISO_FAULT")
    cp = state.read(str(first.workdir.container_dir("c1")))
    assert cp.cleanup_pending and "overlay.qcow2" in files(first, "c1")
    if gone_before_recover:
        host.stop("vmiso-c1", "shutdown")
    again = make(tmp_path, host)
    report = again.recover()
    assert report.terminated["c1"].exit_code == 3
    if not gone_before_recover:
        assert "overlay.qcow2" in files(again, "c1")  # libvirt still has the domain
        host.stop("vmiso-c1", "shutdown")
    again.supervisor.await_release(again.supervisor.get("c1"))
    assert "overlay.qcow2" not in files(again, "c1")
    assert not state.read(str(again.workdir.container_dir("c1"))).cleanup_pending
    assert again.destroy("c1").exit_code == 3 and not os.path.exists(again.workdir.container_dir("c1"))
