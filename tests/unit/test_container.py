"""How a task ended: decide_termination over what the guest reported and who stopped the VM."""
import time

import pytest

from vmiso.container import decide_termination
from vmiso.state import Checkpoint


def checkpoint(kill_reason=None):
    return Checkpoint(container_id="c1", agent_id="a", domain="vmiso-c1", nonce="00" * 16, kill_reason=kill_reason)


@pytest.mark.parametrize("kill_reason, stop_detail, exit_code, expected", [
    (None, "shutdown", 0, ("FINISHED", "guest-exited", 0)),
    (None, "shutdown", 3, ("FAILED", "guest-exited", 3)),
    # A kill with a grace period sends SIGTERM: the task may exit with a status of its choosing,
    # and it was still killed.
    ("destroyed", "shutdown", 143, ("KILLED", "destroyed", 143)),
    ("destroyed", "shutdown", 0, ("KILLED", "destroyed", 0)),
    ("destroyed", "destroyed", None, ("KILLED", "destroyed", None)),
    ("timeout", "destroyed", None, ("FAILED", "timeout", None)),
    ("timeout", "shutdown", 143, ("FAILED", "timeout", 143)),  # SIGTERM at the deadline
    ("timeout", "shutdown", 0, ("FAILED", "timeout", 0)),  # its TERM handler exited 0
    (None, "shutdown", None, ("FAILED", "no-exit-status", None)),
    (None, "crashed", None, ("FAILED", "vm-crashed", None)),
    ("io-error", "destroyed", None, ("FAILED", "io-error", None)),  # paused by a disk error, stopped
])
def test_decide_termination(kill_reason, stop_detail, exit_code, expected):
    t = decide_termination(checkpoint(kill_reason), stop_detail, exit_code)
    assert (t.state, t.reason, t.exit_code) == expected and t.message


def test_a_vm_paused_by_a_disk_error_is_reported_and_stopped(tmp_path):
    """libvirt's "suspended/ioerror" event: the container is marked paused (status says
    PAUSED), and the Supervisor asks for it to be stopped with reason io-error (a VM paused on
    ENOSPC would otherwise wait forever)."""
    from vmiso.container import Container
    from vmiso.paths import Workdir
    from vmiso.supervisor import Supervisor
    from vmiso.testing.fakehost import FakeHost

    host = FakeHost()
    killed = []
    sup = Supervisor(host, Workdir(tmp_path), "vmiso", stop=lambda cid, reason: killed.append((cid, reason)))
    c = Container("c1", str(tmp_path), checkpoint())
    sup.watch_lifecycle(c)
    host.suspend(c.domain, "paused")
    assert c.paused == "paused" and killed == []  # paused by someone: only reported
    host.resume(c.domain)
    assert c.paused is None
    host.suspend(c.domain, "ioerror")
    for _ in range(100):
        if killed:
            break
        time.sleep(0.01)
    assert c.paused == "ioerror" and killed == [("c1", "io-error")]
