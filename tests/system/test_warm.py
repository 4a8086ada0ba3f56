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


def test_a_warm_task_with_a_network_reaches_its_peer_by_its_lease_and_cannot_spoof(workdir, lan):
    """A task with a network claims a warm VM: the address and MAC leased at claim, the tap wired
    with its filters, the NIC hot-plugged. The peer namespace and the task reach each other by
    that address; a spoofed source address or MAC reaches nothing and is dropped at its port;
    nothing of the network is left after destroy."""
    from tests.net import nsutil
    from vmiso.net import filter, ipam
    from vmiso.spec import NetworkSpec

    bridge, prefix, ns = lan
    peer = prefix + "1"
    script = (f'i=0; until ping -c 1 -W 1 {peer} >/dev/null 2>&1; do i=$((i+1)); [ $i -lt 20 ] || break; done; '
              f"ping -c 2 -W 2 {peer} >/dev/null && echo reach-peer; "
              "me=$(ip addr show dev eth0 | sed -n 's/.*inet \\([0-9./]*\\).*/\\1/p'); echo addr=$me; "
              "mac=$(cat /sys/class/net/eth0/address); "
              f"ip addr flush dev eth0; ip addr add {prefix}200/24 dev eth0; "
              f"ping -c 2 -W 2 {peer} >/dev/null && echo spoofed-ip-reached; "
              'ip addr flush dev eth0; ip addr add "$me" dev eth0; '
              "ip link set eth0 down; ip link set eth0 address 02:de:ad:be:ef:01; ip link set eth0 up; "
              f"ping -c 2 -W 2 {peer} >/dev/null && echo spoofed-mac-reached; "
              'ip link set eth0 down; ip link set eth0 address "$mac"; ip link set eth0 up; '
              "echo spoof-done; sleep 60")
    iso = Isolator(workdir=workdir, agent_id=AGENT, pool=PoolConfig(size=1, refill_delay_s=3600))
    cid = "w-" + secrets.token_hex(3)
    try:
        assert iso.pool.wait_ready(1, timeout=120)
        status = iso.launch(cid, TaskSpec.shell(script, network=NetworkSpec(bridge)))
        assert status.domain.startswith("vmiso-pool-")  # warm, not a cold boot
        assert status.ip.startswith(prefix) and int(status.mac[:2], 16) & 3 == 2
        tap = iso.supervisor.get(cid).checkpoint.extra["tap"]
        out = b""
        for name, data in iso.output(cid):
            out += data if name == "stdout" else b""
            if b"spoof-done" in out:
                break
        text = out.decode(errors="replace")
        with open(iso.console_log(cid), errors="replace") as f:
            console = f.read()[-2000:]
        assert "reach-peer" in text and f"addr={status.ip}" in text, (text, console)
        assert "spoofed-ip-reached" not in text and "spoofed-mac-reached" not in text, text
        assert filter.drops(tap) > 0  # the spoofed frames died at the task's port
        # The peer reaches the task by the address vmiso leased.
        assert nsutil.run("busybox", "ping", "-c", "1", "-W", "3", status.ip.split("/")[0], ns=ns,
                          check=False).returncode == 0
        iso.destroy(cid, grace=0)
        assert not os.path.exists(f"/sys/class/net/{tap}") and tap not in filter.protected()
        assert ipam.Store(iso.workdir.root).lease(cid) is None
    finally:
        iso.destroy(cid, grace=0)
        iso.pool.close()
        iso.host.close()
