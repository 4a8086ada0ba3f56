"""System-test fixtures: the real libvirtd, the real micro guest, a work dir shared with `make demo`
(so micro is built once), and a check that nothing of ours is left behind after each test."""
import os
import random
import secrets
import shutil
import subprocess
import sys

import pytest

from tests.net import nsutil
from vmiso.net import api, ipam

WORKDIR = os.environ.get("VMISO_TEST_WORKDIR", "/var/lib/vmiso")
AGENT = "vmiso-systest"


@pytest.fixture(scope="session")
def workdir():
    from vmiso.image import micro

    micro.build_micro(WORKDIR, progress=lambda *a: None)  # lean: what "micro" boots
    micro.build_micro(WORKDIR, progress=lambda *a: None, kernel="stock", make_default=False)  # "micro:stock"
    return WORKDIR


@pytest.fixture
def cid():
    """A fresh container id; after the test, assert no domain and no directory of it remain."""
    container_id = "t-" + secrets.token_hex(4)
    yield container_id
    leftover = subprocess.run(["virsh", "-q", "list", "--all", "--name"], capture_output=True, text=True).stdout
    domain_left = f"vmiso-{container_id}" in leftover.split()
    # Clean up whatever the test left (so one failure does not cascade), then report it.
    for suffix in ("", "b"):
        subprocess.run(["virsh", "destroy", f"vmiso-{container_id}{suffix}"], capture_output=True)
        shutil.rmtree(os.path.join(WORKDIR, "containers", container_id + suffix), ignore_errors=True)
    assert not domain_left, "a domain was left behind"


@pytest.fixture
def iso(workdir):
    from vmiso import Isolator

    isolator = Isolator(workdir=workdir, agent_id=AGENT)
    yield isolator
    isolator.host.close()


def vmiso_cli(*args, workdir=WORKDIR, timeout=120, **kw):
    """Run the vmiso CLI as a user would (a separate process); returns CompletedProcess (bytes)."""
    return subprocess.run([sys.executable, "-m", "vmiso", "--workdir", workdir, *args],
                          capture_output=True, timeout=timeout, **kw)


@pytest.fixture
def lan(workdir):
    """(bridge, subnet prefix 'A.B.C.', peer namespace) with the peer at .1; all removed after."""
    bridge, veth, peer = nsutil.unique("vmtb"), nsutil.unique("vmtv"), nsutil.unique("vmtw")
    prefix = f"10.{random.randint(200, 250)}.{random.randint(0, 255)}."
    with nsutil.netns("vmtp") as ns:
        try:
            api.create_bridge(workdir, bridge)
            ipam.Store(workdir).set_plan(bridge, subnet=prefix + "0/24", gateway=prefix + "1")
            subprocess.run(["ip", "link", "add", veth, "type", "veth", "peer", "name", peer, "netns", ns], check=True)
            subprocess.run(["ip", "link", "set", veth, "master", bridge, "up"], check=True)
            subprocess.run(["ip", "-n", ns, "addr", "add", prefix + "1/24", "dev", peer], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", peer, "up"], check=True)
            yield bridge, prefix, ns
        finally:
            subprocess.run(["ip", "link", "del", veth], capture_output=True)
            api.delete_bridge(workdir, bridge, force=True)
            ipam.Store(workdir).drop_plan(bridge)


def wait_for_stdout(iso, cid, needle):
    """The task's stdout once ``needle`` appeared in it (chunks may split it); AssertionError
    with what came if the task ended first."""
    seen = b""
    for stream, data in iso.output(cid):
        seen += data if stream == "stdout" else b""
        if needle in seen:
            return seen
    raise AssertionError(f"{needle!r} never came; stdout: {seen!r}")
