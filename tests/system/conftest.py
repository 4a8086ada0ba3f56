"""System-test fixtures: the real libvirtd, the real micro guest, a work dir shared with `make demo`
(so micro is built once), and a check that nothing of ours is left behind after each test."""
import os
import secrets
import shutil
import subprocess
import sys

import pytest

WORKDIR = os.environ.get("VMISO_TEST_WORKDIR", "/var/lib/vmiso")
AGENT = "vmiso-systest"


@pytest.fixture(scope="session")
def workdir():
    from vmiso.image import micro

    micro.build_micro(WORKDIR, progress=lambda *a: None)
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
