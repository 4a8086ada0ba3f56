"""Warm VMs with the real libvirtd, QEMU and micro's init (vmiso/pool.py, docs/guest-contract.md
"Warm VMs"): two consecutive tasks in warm VMs of one pool see different host names, boot ids
(each pool VM booted on its own) and random bytes, the host's clock, and nothing the other wrote;
a pool whose owner dies leaves no VM after recover(); a crashed pool VM is replaced; a warm
task's output survives virtlogd's roll-overs."""
import os
import secrets
import signal

import pytest

from vmiso import Isolator, PoolConfig, TaskSpec

pytestmark = pytest.mark.system

AGENT = "vmiso-test-warm"
PROBE = ("hostname; cat /proc/sys/kernel/random/boot_id; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; "
         "echo; date +%s; cat /marker 2>/dev/null || echo none; echo mine >/marker; sync")


def run_warm(iso, cid):
    status = iso.launch(cid, TaskSpec.shell(PROBE))
    assert status.domain.startswith("vmiso-pool-")  # a warm VM, not a cold boot
    out = b"".join(data for name, data in iso.output(cid) if name == "stdout").decode().split("\n")
    termination = iso.wait(cid, timeout=60)
    iso.destroy(cid)
    assert termination.exit_code == 0, out
    return out


def test_two_warm_tasks_share_nothing(workdir):
    import time

    iso = Isolator(workdir=workdir, agent_id=AGENT, pool=PoolConfig(size=2, refill_delay_s=0))
    ids = ["w-" + secrets.token_hex(3) for _ in range(2)]
    try:
        assert iso.pool.wait_ready(2, timeout=120)
        first, second = (run_warm(iso, cid) for cid in ids)
    finally:
        iso.pool.close()
        iso.host.close()
    assert first[0] == ids[0] and second[0] == ids[1]              # the hostname arrives at claim
    assert first[1] != second[1] and len(first[1]) == 36          # boot_id: every pool VM booted on its own
    assert first[2] != second[2] and len(first[2]) == 32          # random bytes
    assert abs(int(first[3]) - time.time()) < 60                  # the clock set from the host's
    assert first[4] == "none" and second[4] == "none"             # the first task's file is not the second's


def test_a_dead_owners_pool_leaves_no_vm_and_a_crashed_one_is_replaced(workdir):
    import subprocess

    owner = Isolator(workdir=workdir, agent_id=AGENT, pool=PoolConfig(size=1, refill_delay_s=0))
    try:
        assert owner.pool.wait_ready(1, timeout=120)
        (slot,) = owner.pool.status()["slots"]
        with open(f"/run/libvirt/qemu/{slot['domain']}.pid") as f:
            pid = int(f.read())
        os.kill(pid, signal.SIGKILL)  # QEMU dies: the pool replaces the VM
        with owner.pool.cond:
            assert owner.pool.cond.wait_for(lambda: slot["id"] not in owner.pool.slots, timeout=60)
        assert owner.pool.wait_ready(1, timeout=120)
        (replacement,) = owner.pool.status()["slots"]
        assert replacement["domain"] != slot["domain"] and owner.pool.stats["replaced"] == 1
        with owner.pool.cond:  # the owner "dies": it stops refilling and forgets its VMs
            owner.pool.closed = True
            owner.pool.slots.clear()
            owner.pool.cond.notify_all()
    finally:
        owner.host.close()
    again = Isolator(workdir=workdir, agent_id=AGENT)
    try:
        assert again.recover().pool == [replacement["domain"]]
    finally:
        again.host.close()
    names = subprocess.run(["virsh", "-q", "list", "--name"], capture_output=True, text=True).stdout.split()
    assert not [n for n in names if n in (slot["domain"], replacement["domain"])]
    assert not [n for n in os.listdir(os.path.join(workdir, "containers")) if n.startswith(".pool-")
                and n.endswith(replacement["id"])]


FLOOD_LINES = 750_000  # `seq 1 N`: about 5 MiB of known bytes, past virtlogd's 2 MiB roll-over twice


def test_a_warm_tasks_output_survives_virtlogds_roll_over(workdir):
    """virtlogd opened the pool VM's logs before its task was known and rolls them over by path:
    every byte of a 5 MiB output reaches output(), in order, nothing of the VM is left under the
    pool directory's old name, and nothing at all once the container is destroyed."""
    expected = b"".join(b"%d\n" % i for i in range(1, FLOOD_LINES + 1))
    # No replacement boots during the test: it would only take CPU from the flood.
    iso = Isolator(workdir=workdir, agent_id=AGENT, pool=PoolConfig(size=1, refill_delay_s=3600))
    cid = "w-" + secrets.token_hex(3)
    containers = os.path.join(workdir, "containers")
    try:
        assert iso.pool.wait_ready(1, timeout=120)
        (slot,) = iso.pool.status()["slots"]
        status = iso.launch(cid, TaskSpec.shell(f"seq 1 {FLOOD_LINES}; exit 3"))
        assert status.domain == slot["domain"]
        out = b"".join(data for name, data in iso.output(cid) if name == "stdout")
        assert iso.wait(cid, timeout=300).exit_code == 3
        assert len(out) == len(expected) and out == expected

        def of_this_vm():  # (other tests may share the work dir: only this VM's names count)
            return {n for n in os.listdir(containers) if n == cid or slot["id"] in n}

        logs = os.path.dirname(iso.console_log(cid))
        assert of_this_vm() == {cid, os.path.basename(logs)}  # the pool directory's name is gone
        assert [n for n in os.listdir(logs) if n.startswith("stdout.")]  # it did roll over
        iso.destroy(cid)
        assert of_this_vm() == set()
    finally:
        iso.destroy(cid, grace=0)
        iso.pool.close()
        iso.host.close()
