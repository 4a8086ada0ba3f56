"""A networked task claiming a warm VM (vmiso/warm.py), with the FakeHost playing libvirt and
micro's init, and the real tap, filters and address store in a throwaway namespace: the lease
made at claim, the tap wired before the NIC is plugged in, the NIC plugged with the lease's MAC
on the vmiso-made tap, the guest told the same MAC; a claim whose plug-in fails, and the task's
end, leave no tap, rule or lease. The guest side is tested with real VMs in
tests/system/test_warm.py."""
import io
import json
import shutil
import subprocess
import tarfile
import tempfile
import xml.etree.ElementTree as ET

import pytest

from vmiso import Isolator, LaunchFailed, PoolConfig, TaskSpec, supervisor
from vmiso.net import api, filter, ipam
from vmiso.spec import NetworkSpec
from vmiso.testing.fakehost import FakeHost

from . import nsutil

pytestmark = pytest.mark.netns


@pytest.fixture
def base(tmp_path):
    path = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M"], check=True)
    return str(path)


@pytest.fixture
def wd():
    """A short work dir: the claim socket's path must fit a unix socket address."""
    path = tempfile.mkdtemp(prefix="vw")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def warm(ns, wd, base, monkeypatch):
    monkeypatch.setattr(supervisor, "EXIT_LINE_GRACE", 0.05)
    monkeypatch.setattr(supervisor, "RELEASE_RECHECK", 0.05)
    api.create_bridge(wd, "br0", address="10.91.0.1/24")
    host = FakeHost()
    iso = Isolator(workdir=str(wd), accel="tcg", agent_id="agent-fake", host=host,
                   pool=PoolConfig(image=base, size=1, refill_delay_s=3600))
    assert iso.pool.wait_ready(1, timeout=10)
    yield iso, host, base
    iso.pool.close()


def links():
    return {link["ifname"] for link in nsutil.ip_json("link", "show")}


def test_the_nic_is_leased_wired_and_plugged_at_claim(warm):
    iso, host, base = warm
    seen_at_plug = []
    plug = host.attach_device

    def attach_device(dom, xml):  # what the port was like when the NIC went in
        dev = ET.fromstring(xml).find("target").get("dev")
        seen_at_plug.append((dev in links(), dev in filter.protected()))
        plug(dom, xml)

    host.attach_device = attach_device
    status = iso.launch("c1", TaskSpec(["true"], image=base, network=NetworkSpec("br0")))
    assert seen_at_plug == [(True, True)]  # tap and filters first
    assert status.domain.startswith("vmiso-pool-") and status.ip == "10.91.0.2/24"
    dom = host.domains[status.domain]
    (plugged,) = dom.attached
    nic = ET.fromstring(plugged)
    tap = iso.supervisor.get("c1").checkpoint.extra["tap"]
    assert nic.get("type") == "ethernet" and nic.find("mac").get("address") == status.mac
    assert nic.find("target").attrib == {"dev": tap, "managed": "no"}
    assert nic.find("address").get("bus") == "0x01" and nic.find("rom").get("enabled") == "no"
    assert dom.claim_done.wait(10)
    with tarfile.open(fileobj=io.BytesIO(dom.claimed)) as tar:
        config = json.loads(tar.extractfile("network-config").read())
    assert config["ethernets"]["eth0"]["match"]["macaddress"] == status.mac
    assert config["ethernets"]["eth0"]["addresses"] == [status.ip]
    host.guest_exits(status.domain, 0)
    assert iso.wait("c1", timeout=10).exit_code == 0
    iso.destroy("c1")
    assert tap not in links() and tap not in filter.protected()
    assert ipam.Store(iso.workdir.root).lease("c1") is None


def test_a_claim_whose_nic_cannot_be_plugged_leaves_nothing(warm):
    iso, host, base = warm
    (pooled,) = [n for n in host.domains if n.startswith("vmiso-pool-")]
    before = links()
    host.fail_next["attach_device"] = 1
    with pytest.raises(LaunchFailed, match="network"):
        iso.launch("c1", TaskSpec(["true"], image=base, network=NetworkSpec("br0")))
    assert pooled not in host.domains and iso.containers() == []  # the claimed VM is destroyed
    assert links() == before and filter.protected() == []
    assert ipam.Store(iso.workdir.root).lease("c1") is None
