"""recover() after the agent dies: the crash-point matrix, and the world changing while the
agent is down. Every crash is a real SIGKILL of a separate agent process at a named fault point."""
import os
import signal
import subprocess
import sys
import time
import uuid
import xml.etree.ElementTree as ET

import pytest

from vmiso import Isolator, TaskSpec
from vmiso.faults import DESTROY_POINTS, LAUNCH_POINTS
from vmiso.state import CheckpointError

pytestmark = pytest.mark.system

AGENT = "vmiso-recovery-test"


def agent_process(workdir, cid, cmd, env_fault=None, destroy_fault=None, network=None):
    env = dict(os.environ)
    env.pop("VMISO_FAULT", None)
    if env_fault:
        env["VMISO_FAULT"] = env_fault
    argv = [sys.executable, "-m", "vmiso.testing.agent", "--workdir", workdir, "--agent", AGENT, "--id", cid]
    if destroy_fault:
        argv += ["--destroy-fault", destroy_fault]
    if network:
        argv += ["--network", network]
    return subprocess.run(argv + ["--", *cmd], capture_output=True, text=True, timeout=120, env=env)


def domains():
    out = subprocess.run(["virsh", "-q", "list", "--all", "--name"], capture_output=True, text=True).stdout
    return set(out.split())


def leftovers(workdir, cid):
    """Everything of container ``cid`` that still exists anywhere."""
    found = []
    if f"vmiso-{cid}" in domains():
        found.append("domain")
    if os.path.lexists(os.path.join(workdir, "containers", cid)):
        found.append("directory")
    return found


@pytest.fixture
def fresh(workdir):
    """A fresh isolator for this agent on the shared work dir: what a restarted agent makes."""
    made = []

    def make():
        iso = Isolator(workdir=workdir, agent_id=AGENT)
        made.append(iso)
        return iso

    yield make
    for iso in made:
        iso.host.close()


def assert_recovered_once(report, cid):
    places = [cid in report.running, cid in report.terminated, cid in report.destroyed, cid in report.corrupt]
    assert sum(places) <= 1, report
    return places


@pytest.mark.parametrize("point", [p for p in LAUNCH_POINTS if p != "launch:network"] + list(DESTROY_POINTS))
def test_crash_point_matrix(workdir, cid, fresh, point):
    if point.startswith("launch:"):
        proc = agent_process(workdir, cid, ["sleep", "600"], env_fault=point)
    else:
        proc = agent_process(workdir, cid, ["sleep", "600"], destroy_fault=point)
    assert proc.returncode == -signal.SIGKILL, proc.stderr

    iso = fresh()
    report = iso.recover()
    running, terminated, destroyed, corrupt = assert_recovered_once(report, cid)
    if point == "launch:running":
        assert running  # the launch had finished: the VM is adopted
    elif point in ("launch:dir",):
        assert corrupt or not leftovers(workdir, cid)  # no checkpoint yet: cleaned
    elif point.startswith("launch:"):
        assert terminated and report.terminated[cid].reason == "launch-failed"
    else:
        assert destroyed  # an interrupted destroy is finished
    assert not report.orphans

    second = fresh().recover()  # a second recover changes nothing
    assert (second.running, second.terminated.keys(), second.destroyed, second.orphans, second.corrupt) == \
        (report.running, report.terminated.keys(), [], [], [])

    if running or terminated:
        iso.destroy(cid, grace=0)
    assert leftovers(workdir, cid) == []
    iso.launch(cid, TaskSpec(["true"]))  # a new launch on the same id works
    assert iso.wait(cid, timeout=60).exit_code == 0
    iso.destroy(cid)


def wait_gone(cid, timeout=60):
    deadline = time.time() + timeout
    while f"vmiso-{cid}" in domains():
        assert time.time() < deadline, "domain did not stop"
        time.sleep(0.2)


def test_vm_exits_while_agent_is_down(workdir, cid, fresh):
    assert agent_process(workdir, cid, ["sh", "-c", "exit 3"]).returncode == 0
    wait_gone(cid)
    report = fresh().recover()
    termination = report.terminated[cid]
    assert (termination.state, termination.reason, termination.exit_code) == ("FAILED", "guest-exited", 3)
    fresh().destroy(cid)


def test_qemu_killed_while_agent_is_down(workdir, cid, fresh):
    assert agent_process(workdir, cid, ["sleep", "600"]).returncode == 0
    with open(f"/run/libvirt/qemu/vmiso-{cid}.pid") as f:
        os.kill(int(f.read()), signal.SIGKILL)
    wait_gone(cid)
    termination = fresh().recover().terminated[cid]
    assert (termination.state, termination.reason, termination.exit_code) == ("FAILED", "vm-crashed", None)
    fresh().destroy(cid)


def test_virsh_destroy_while_agent_is_down(workdir, cid, fresh):
    assert agent_process(workdir, cid, ["sleep", "600"]).returncode == 0
    subprocess.run(["virsh", "destroy", f"vmiso-{cid}"], check=True, capture_output=True)
    termination = fresh().recover().terminated[cid]
    assert (termination.state, termination.reason) == ("FAILED", "vm-crashed")
    assert "outside vmiso" in termination.message
    fresh().destroy(cid)


@pytest.mark.parametrize("content", [b"", b'{"version": 1, "contai'])
def test_truncated_checkpoint(workdir, cid, fresh, content):
    assert agent_process(workdir, cid, ["sleep", "600"]).returncode == 0
    with open(os.path.join(workdir, "containers", cid, "checkpoint.json"), "wb") as f:
        f.write(content)
    with pytest.raises(CheckpointError):
        fresh().recover(strict=True)
    assert f"vmiso-{cid}" in domains()  # strict recovery changes nothing
    report = fresh().recover()
    assert cid in report.corrupt
    assert leftovers(workdir, cid) == []  # the domain was provably ours: destroyed, files removed


def test_foreign_domains_are_never_touched(workdir, cid, fresh, tmp_path):
    """A domain named vmiso-* without our metadata, and one with another agent's, both survive."""
    from vmiso.virt.domain import QBOOT_ROM, DomainConfig

    names = [f"vmiso-{cid}", f"vmiso-{cid}-other"]
    for name, metadata in zip(names, (None, {"agent": "someone-else", "container": cid})):
        config = DomainConfig(name=name, uuid=str(uuid.uuid4()), domain_type="qemu", vcpus=1, memory_mib=32,
                              disks=(), serial_logs=(), metadata=metadata or {}, firmware_rom=QBOOT_ROM)
        root = config.to_element()
        if metadata is None:
            root.remove(root.find("metadata"))  # no ownership record at all
        xml = tmp_path / f"{name}.xml"
        xml.write_text(ET.tostring(root, encoding="unicode"))
        subprocess.run(["virsh", "create", str(xml)], check=True, capture_output=True)
    try:
        report = fresh().recover()
        assert not report.orphans
        assert set(names) <= domains()
    finally:
        for name in names:
            subprocess.run(["virsh", "destroy", name], capture_output=True)


@pytest.mark.parametrize("point", ["launch:checkpoint", "launch:seed", "launch:network", "launch:create",
                                   "launch:running", "destroy:kill", "destroy:cleanup"])
def test_crash_point_matrix_with_network(workdir, cid, fresh, lan, point):
    """The same crashes with a tap, filter chain and lease in play: none of them leaks."""
    from vmiso.net import filter, ipam

    bridge = lan[0]
    kind = {"env_fault": point} if point.startswith("launch:") else {"destroy_fault": point}
    proc = agent_process(workdir, cid, ["sleep", "600"], network=bridge, **kind)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    iso = fresh()
    report = iso.recover()
    assert_recovered_once(report, cid)
    if cid in report.running or cid in report.terminated:
        iso.destroy(cid, grace=0)
    assert leftovers(workdir, cid) == []
    assert ipam.Store(workdir).lease(cid) is None
    assert not [t for t in filter.protected() if os.path.exists(f"/sys/class/net/{t}")
                and t not in _taps_of_running(iso)]
    assert not any(name.startswith("vmi") for name in os.listdir("/sys/class/net")
                   if name not in _taps_of_running(iso))


def _taps_of_running(iso):
    """Taps that belong to containers still running in this work dir (other tests' are not ours)."""
    taps = set()
    for container_id in iso.workdir.container_ids():
        try:
            taps.add(iso.supervisor.get(container_id).checkpoint.extra.get("tap"))
        except Exception:
            continue
    return taps
