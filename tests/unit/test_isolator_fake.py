"""The Isolator's own logic on a FakeHost (vmiso.testing.fakehost): launch and its rollback, every
way a task ends (decide_termination's branches through the real conclusion path), kill,
ownership, and recovery after a restart. No libvirtd, no VM; the real-VM tests in
tests/system prove the same against libvirt."""
import os
import socket
import threading

import libvirt
import pytest

from vmiso import Isolator, LaunchFailed, NotOwned, TaskSpec, Timeout, VirtError, state
from vmiso.testing.fakehost import FakeHost

AGENT = "agent-fake"
pytestmark = pytest.mark.usefixtures("fast_conclusion")


@pytest.fixture
def iso(tmp_path, host):
    return Isolator(workdir=str(tmp_path / "w"), accel="tcg", agent_id=AGENT, host=host)


def spec(base, **kw):
    return TaskSpec(["true"], image=base, **kw)


def files(iso, cid):
    return sorted(os.listdir(iso.workdir.container_dir(cid)))


def checkpoint(iso, cid):
    return state.read(str(iso.workdir.container_dir(cid)))


def test_launch_runs_and_a_guest_exit_is_concluded(iso, host, base):
    status = iso.launch("c1", spec(base))
    assert (status.state, status.domain, status.owner) == ("RUNNING", "vmiso-c1", AGENT)
    dom = host.domains["vmiso-c1"]
    assert f"<ns0:agent>{AGENT}</ns0:agent>" in dom.metadata or AGENT in dom.metadata
    assert host.hard_limits["vmiso-c1"] > 0
    assert checkpoint(iso, "c1").phase == state.RUNNING
    host.guest_exits("vmiso-c1", 3)
    t = iso.wait("c1", timeout=10)
    assert (t.state, t.reason, t.exit_code) == ("FAILED", "guest-exited", 3)
    # wait() returns once QEMU's exit told the status; the release follows libvirt's stop event,
    # on a thread of its own: without a destroy, the files go when it is done.
    iso.supervisor.await_release(iso.supervisor.get("c1"))
    assert "overlay.qcow2" not in files(iso, "c1") and "seed.iso" not in files(iso, "c1")
    assert checkpoint(iso, "c1").termination["exit_code"] == 3
    assert iso.destroy("c1") == t and not os.path.exists(iso.workdir.container_dir("c1"))


@pytest.mark.parametrize("detail, expected", [
    ("shutdown", ("FAILED", "no-exit-status")),          # powered off without reporting
    ("crashed", ("FAILED", "vm-crashed")),
    ("failed", ("FAILED", "vm-crashed")),                # QEMU died
    ("destroyed", ("FAILED", "vm-crashed")),             # destroyed outside vmiso
])
def test_each_way_a_vm_can_stop_without_an_exit_code(iso, host, base, detail, expected):
    iso.launch("c1", spec(base))
    host.stop("vmiso-c1", detail)
    t = iso.wait("c1", timeout=10)
    assert (t.state, t.reason, t.exit_code) == (*expected, None) and t.message


def test_a_stop_nobody_heard_is_found_by_wait_and_told_by_libvirts_log(iso, host, base):
    iso.launch("c1", spec(base))
    host.stop_reasons["vmiso-c1"] = "crashed"
    host.stop("vmiso-c1", "crashed", notify=False)
    # Events are hints: wait() asks libvirt again whenever it wakes without one.
    t = iso.wait("c1", timeout=0.05)
    assert (t.state, t.reason) == ("FAILED", "vm-crashed")


def test_wait_times_out_while_the_vm_runs(iso, base):
    iso.launch("c1", spec(base))
    with pytest.raises(Timeout):
        iso.wait("c1", timeout=0.05)


def test_lost_when_nothing_tells_how_it_ended(tmp_path, host, base):
    """The VM vanished while no agent ran, and libvirt's log says nothing either: LOST."""
    first = Isolator(workdir=str(tmp_path / "w"), accel="tcg", agent_id=AGENT, host=host)
    first.launch("c1", spec(base))
    host.close()  # the agent went away
    host.stop("vmiso-c1", None, notify=False)
    again = Isolator(workdir=str(tmp_path / "w"), accel="tcg", agent_id=AGENT, host=host)
    report = again.recover()
    t = report.terminated["c1"]
    assert (t.state, t.reason, t.exit_code) == ("LOST", "vm-crashed", None)


def test_kill_without_a_task_channel_presses_the_power_button(iso, host, base):
    iso.launch("c1", spec(base))
    t = iso.kill("c1", grace=2)
    assert (t.state, t.reason) == ("KILLED", "destroyed")
    assert ("shutdown", "vmiso-c1") in host.calls and ("destroy", "vmiso-c1") not in host.calls


def test_kill_with_no_grace_destroys(iso, host, base):
    iso.launch("c1", spec(base))
    assert iso.kill("c1", grace=0).state == "KILLED"
    assert ("destroy", "vmiso-c1") in host.calls and ("shutdown", "vmiso-c1") not in host.calls
    assert files(iso, "c1") == ["checkpoint.json"]  # the record stays for wait/status


def play_stop_listener(iso, host, cid, code, domain=None):
    """The guest's end of the task channel's input (control.sock): read the stop request to its
    end, as QEMU does, then report ``code`` and power off (``domain``: a warm VM's name).
    Returns the bytes it got."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(os.path.join(iso.workdir.container_dir(cid), "control.sock"))
    server.listen(1)
    got = bytearray()

    def run():
        conn, _ = server.accept()
        with conn, server:
            while data := conn.recv(64):
                got.extend(data)
        host.guest_exits(domain or f"vmiso-{cid}", code)

    threading.Thread(target=run, daemon=True).start()
    return got


@pytest.mark.parametrize("given, line", [(None, "TERM"), ("SIGQUIT", "SIG 3"), (9, "SIG 9"), ("TERM", "TERM")])
def test_kill_sends_the_stop_signal_the_launch_recorded(iso, host, base, given, line):
    iso.launch("c1", spec(base, stop_signal=given))
    cp = checkpoint(iso, "c1")
    assert cp.extra["stop_signal"] == (15 if given is None else TaskSpec(["x"], stop_signal=given).stop_signal)
    got = play_stop_listener(iso, host, "c1", 7)
    t = iso.kill("c1", grace=5)
    assert (t.state, t.reason, t.exit_code) == ("KILLED", "destroyed", 7)
    assert bytes(got) == f"VMISO-{cp.nonce} {line}\n".encode()
    assert ("destroy", "vmiso-c1") not in host.calls and ("shutdown", "vmiso-c1") not in host.calls


def test_a_kill_from_another_process_reads_the_stop_signal_from_the_checkpoint(tmp_path, host, base):
    """The signal is the checkpoint's, so an agent after a restart (or another process) sends it;
    a checkpoint of an older vmiso has none, or a malformed one: SIGTERM, the line it always got."""
    first = Isolator(workdir=str(tmp_path / "w"), accel="tcg", agent_id=AGENT, host=host)
    for cid in ("quit", "old", "odd"):
        first.launch(cid, spec(base, stop_signal="SIGQUIT"))
    host.close()  # the agent dies; its VMs live on
    for cid, value in (("old", None), ("odd", "9; reboot")):
        cp = checkpoint(first, cid)
        cp.extra.pop("stop_signal")
        if value is not None:
            cp.extra["stop_signal"] = value
        state.write(str(first.workdir.container_dir(cid)), cp)
    again = Isolator(workdir=str(tmp_path / "w"), accel="tcg", agent_id=AGENT, host=host)
    assert sorted(again.recover().running) == ["odd", "old", "quit"]
    for cid, line in (("quit", "SIG 3"), ("old", "TERM"), ("odd", "TERM")):
        got = play_stop_listener(again, host, cid, 0)
        assert again.kill(cid, grace=5).exit_code == 0
        assert bytes(got) == f"VMISO-{checkpoint(again, cid).nonce} {line}\n".encode(), cid


def test_timeout_stops_the_task(iso, host, base):
    iso.launch("c1", spec(base, timeout=0.05))
    t = iso.wait("c1", timeout=10)  # TIMEOUT_GRACE is not waited: the fake powers off at once
    assert (t.state, t.reason) == ("FAILED", "timeout")


@pytest.mark.parametrize("point", ["launch:dir", "launch:checkpoint", "launch:overlay", "launch:seed",
                                   "launch:create", "launch:running"])
def test_a_failed_launch_leaves_nothing(iso, host, base, point, monkeypatch):
    monkeypatch.setenv("VMISO_FAULT", point + ":raise")
    with pytest.raises(LaunchFailed):
        iso.launch("c1", spec(base))
    assert iso.workdir.container_ids() == [] and host.domains == {}
    created = ("create", "vmiso-c1") in host.calls
    assert (("destroy", "vmiso-c1") in host.calls) == created  # the domain it made, and only then
    monkeypatch.delenv("VMISO_FAULT")
    assert iso.launch("c1", spec(base)).state == "RUNNING"  # the id is free again


def test_libvirt_errors_roll_back(iso, host, base):
    host.fail_next["create"] = libvirt.VIR_ERR_INTERNAL_ERROR
    with pytest.raises(LaunchFailed) as info:
        iso.launch("c1", spec(base))
    assert isinstance(info.value.__cause__, VirtError) and info.value.__cause__.code == libvirt.VIR_ERR_INTERNAL_ERROR
    host.fail_next["set_memory_hard_limit"] = libvirt.VIR_ERR_OPERATION_INVALID
    with pytest.raises(LaunchFailed):
        iso.launch("c1", spec(base))
    assert host.domains == {} and iso.workdir.container_ids() == []


def test_a_foreign_domain_under_our_name_is_never_touched(iso, host, base):
    foreign = host.add_foreign("vmiso-c1")
    with pytest.raises(LaunchFailed, match="already exists"):
        iso.launch("c1", spec(base))
    assert host.domains["vmiso-c1"] is foreign and ("destroy", "vmiso-c1") not in host.calls


def test_recover_adopts_concludes_and_cleans(tmp_path, host, base):
    first = Isolator(workdir=str(tmp_path / "w"), accel="tcg", agent_id=AGENT, host=host)
    for cid in ("run", "ended", "destroying"):
        first.launch(cid, spec(base))
    host.close()  # the agent dies; its VMs live on
    host.guest_exits("vmiso-ended", 0)
    cp = checkpoint(first, "destroying")
    cp.phase, cp.kill_reason, cp.remove_requested = state.DESTROYING, "destroyed", True
    state.write(str(first.workdir.container_dir("destroying")), cp)  # destroy() was interrupted
    orphan_meta = host.domains["vmiso-run"].metadata.replace(">run<", ">orphan<")
    host.add_foreign("vmiso-orphan", orphan_meta)        # ours by metadata, no record
    host.add_foreign("vmiso-stranger", None)             # nobody's: never touched
    os.makedirs(first.workdir.container_dir("corrupt"))
    with open(os.path.join(first.workdir.container_dir("corrupt"), "checkpoint.json"), "w") as f:
        f.write("{not json")

    again = Isolator(workdir=str(tmp_path / "w"), accel="tcg", agent_id=AGENT, host=host)
    report = again.recover()
    assert report.running == ["run"]
    assert report.terminated["ended"].exit_code == 0
    assert report.destroyed == ["destroying"] and not os.path.exists(again.workdir.container_dir("destroying"))
    assert report.orphans == ["orphan"] and "vmiso-orphan" not in host.domains
    assert report.corrupt == ["corrupt"] and "vmiso-stranger" in host.domains
    host.guest_exits("vmiso-run", 5)  # supervised again: its end is heard
    assert again.wait("run", timeout=10).exit_code == 5
    assert again.recover().running == []  # a second recover changes nothing more


def test_an_interrupted_launch_is_failed_and_cleaned(tmp_path, host, base):
    first = Isolator(workdir=str(tmp_path / "w"), accel="tcg", agent_id=AGENT, host=host)
    first.launch("c1", spec(base))
    cp = checkpoint(first, "c1")
    cp.phase = state.LAUNCHING
    state.write(str(first.workdir.container_dir("c1")), cp)  # as if the process died mid-launch
    host.close()
    again = Isolator(workdir=str(tmp_path / "w"), accel="tcg", agent_id=AGENT, host=host)
    t = again.recover().terminated["c1"]
    assert (t.state, t.reason) == ("FAILED", "launch-failed") and "vmiso-c1" not in host.domains


def test_another_agents_container_is_read_only(tmp_path, host, base):
    owner = Isolator(workdir=str(tmp_path / "w"), accel="tcg", agent_id="owner", host=host)
    other = Isolator(workdir=str(tmp_path / "w"), accel="tcg", agent_id="other", host=FakeHost())
    owner.launch("c1", spec(base))
    before = {n: os.stat(os.path.join(owner.workdir.container_dir("c1"), n)).st_mtime_ns for n in files(owner, "c1")}
    report = other.recover()
    assert report.foreign == {"c1": "owner"} and report.ids == []
    for call in (other.kill, other.destroy):
        with pytest.raises(NotOwned):
            call("c1")
    assert other.status("c1").state == "RUNNING" and other.status("c1").owner == "owner"
    after = {n: os.stat(os.path.join(owner.workdir.container_dir("c1"), n)).st_mtime_ns for n in files(owner, "c1")}
    assert after == before and "vmiso-c1" in host.domains
    host.guest_exits("vmiso-c1", 4)
    assert owner.wait("c1", timeout=10).exit_code == 4
    assert other.wait("c1", timeout=10).exit_code == 4  # read from the owner's record
    assert checkpoint(owner, "c1").agent_id == "owner"


# --- a local user's container (launch(uid=), the agent's callers) ---------------------------------
def test_a_users_container_runs_qemu_as_that_user_and_its_directory_admits_only_them(iso, host, base):
    import xml.etree.ElementTree as ET

    from vmiso.image import store
    from vmiso.paths import _acl_users, qemu_gid, qemu_uid

    if os.geteuid() != 0 or qemu_gid() is None:
        pytest.skip("needs root and QEMU's user (libvirt-qemu) to chown and set ACLs")
    store.add(iso.workdir.ensure().root, base, name="plain:1")
    status = iso.launch("u1", TaskSpec(["true"], image="plain:1"), uid=4242)
    assert status.uid == 4242 and status.cpus == 1.0 and status.mem_mib == 256
    label = ET.fromstring(host.domains["vmiso-u1"].xml).find("seclabel")
    assert label.attrib == {"type": "static", "model": "dac", "relabel": "yes"}
    assert label.find("label").text == f"+4242:+{qemu_gid()}"
    directory = iso.workdir.container_dir("u1")
    assert _acl_users(directory) == {4242}                    # not libvirt-qemu: its VMs are everyone's
    assert {4242, qemu_uid()} <= _acl_users(iso.workdir.containers)
    assert checkpoint(iso, "u1").extra["uid"] == 4242
    # The operator's containers stay as they were: QEMU's own user, no seclabel, no uid.
    root = iso.launch("r1", spec(base), uid=0)
    assert root.uid is None and ET.fromstring(host.domains["vmiso-r1"].xml).find("seclabel") is None
    assert _acl_users(iso.workdir.container_dir("r1")) == {qemu_uid()}
    # ... and another launch's set-up of the work dir keeps the user's QEMU let into containers/.
    assert {4242, qemu_uid()} <= _acl_users(iso.workdir.containers)


def test_a_users_container_never_boots_a_host_path(iso, base):
    from vmiso import InvalidSpec

    with pytest.raises(InvalidSpec, match="image paths are not allowed"):
        iso.launch("u2", spec(base), uid=4242)
    assert not os.path.exists(iso.workdir.container_dir("u2"))
    with pytest.raises(InvalidSpec, match="uid"):
        iso.launch("u3", spec(base), uid=-1)


def test_same_agent_id_in_another_work_dir_is_not_an_orphan(tmp_path, host, base):
    """libvirt's domains are host-wide, work dirs are not: a recover() in work dir B never takes
    work dir A's running domain for an orphan of its own, even under the same agent id."""
    a = Isolator(workdir=str(tmp_path / "a"), accel="tcg", agent_id=AGENT, host=host)
    b = Isolator(workdir=str(tmp_path / "b"), accel="tcg", agent_id=AGENT, host=host)
    a.launch("c1", spec(base))
    legacy_meta = host.domains["vmiso-c1"].metadata.replace(str(a.workdir.root), "").replace(
        "<vmiso:workdir></vmiso:workdir>", "")
    host.add_foreign("vmiso-legacy", legacy_meta.replace(">c1<", ">legacy<"))  # launched before the work dir was kept
    report = b.recover()
    assert report.orphans == ["legacy"]  # no work dir recorded: as before, this agent's orphan
    assert "vmiso-c1" in host.domains and a.recover().running == ["c1"]


def test_a_launch_refused_for_disk_space_or_a_taken_id_leaves_the_id_free(iso, host, base):
    """Admission runs in the Supervisor's table lock (two launches cannot both take the last
    free space); a refusal, or a directory another process made for the id, leaves nothing
    supervised: the id launches later, and kill/destroy of it are not blocked."""
    from vmiso import AlreadyExists, NoDiskSpace
    from vmiso.admission import Policy

    policy = iso.disk_policy
    iso.disk_policy = Policy(reserve=2**62)
    with pytest.raises(NoDiskSpace):
        iso.launch("c1", spec(base))
    assert not iso.supervisor.supervises("c1") and host.domains == {}
    iso.disk_policy = policy
    os.makedirs(iso.workdir.container_dir("c2"))  # another process's container of that id
    with pytest.raises(AlreadyExists):
        iso.launch("c2", spec(base))
    assert not iso.supervisor.supervises("c2") and host.domains == {}
    assert iso.launch("c1", spec(base)).state == "RUNNING"
    with pytest.raises(AlreadyExists):
        iso.launch("c1", spec(base))  # supervised here already
    assert iso.destroy("c1", grace=0).reason == "destroyed"


def test_the_supervisor_answers_for_a_destroyed_container(iso, host, base):
    """After destroy() the record is gone, yet wait(), timeline() and a second destroy() answer
    from what the Supervisor kept; a new launch of the id is a new container."""
    iso.launch("c1", spec(base))
    host.guest_exits("vmiso-c1", 0)
    t = iso.destroy("c1")
    assert (t.state, t.exit_code) == ("FINISHED", 0)
    assert iso.supervisor.ended("c1") == t and iso.wait("c1") == t and iso.destroy("c1") == t
    assert "launch:running" in iso.timeline("c1") and "vm:concluded" in iso.timeline("c1")
    iso.launch("c1", spec(base))
    assert iso.supervisor.ended("c1") is None and iso.status("c1").state == "RUNNING"


def test_a_work_dir_too_deep_for_a_socket_is_refused_before_anything_is_made(tmp_path, host, base):
    """A container's control.sock (and a warm VM's claim.sock) must fit a unix socket's 107-byte
    path: a deep work dir or a long id gets InvalidSpec naming both, not a failure inside libvirt."""
    from vmiso import InvalidSpec, PoolConfig

    deep = tmp_path / ("d" * 60)
    iso = Isolator(workdir=str(deep), accel="tcg", agent_id=AGENT, host=host)
    with pytest.raises(InvalidSpec, match="107"):
        iso.launch("c" * 40, spec(base))
    with pytest.raises(InvalidSpec, match="pool.*shorter work dir"):
        iso.pool.configure(PoolConfig(image=base, size=1))
    assert host.domains == {} and not os.path.exists(deep / "containers" / ("c" * 40))
