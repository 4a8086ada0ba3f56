"""Real micro VMs on a throwaway bridge: addressing, anti-spoofing, isolation, rate limits.

The bridge (``vmtb<hex>``) has no address on the host; the only other party is a veth whose far
end sits in a throwaway namespace with the subnet's .1 address. Nothing is routed anywhere: all
traffic stays between these VMs, this bridge and that namespace, and all of it is removed after.
"""
import os
import subprocess
import sys
import time

import pytest

from tests.net import nsutil
from vmiso import AlreadyExists, InvalidSpec, LaunchFailed, TaskSpec
from vmiso.net import api, features, filter, ipam, tap
from vmiso.spec import NetworkSpec, RateLimit

pytestmark = pytest.mark.system


def _launch(iso, cid, script, bridge, **net):
    return iso.launch(cid, TaskSpec.shell(script, network=NetworkSpec(bridge, **net)))


def _output_until(iso, cid, marker, timeout=60):
    """The task's stdout up to and including ``marker`` (or all of it when the task ends)."""
    out, deadline = b"", time.monotonic() + timeout
    for name, data in iso.output(cid):
        out += data if name == "stdout" else b""
        if marker.encode() in out or time.monotonic() > deadline:
            break
    return out.decode(errors="replace")


def _console(iso, cid):
    with open(iso.console_log(cid), errors="replace") as f:
        return f.read()[-2000:]


def _assert_nothing_left(iso, cid, tap):
    assert not os.path.exists(f"/sys/class/net/{tap}")
    assert tap not in filter.protected()
    assert ipam.Store(iso.workdir.root).lease(cid) is None


# Waits until the peer answers (the guest's NIC needs a moment after boot), at most ~20 s.
WAIT_FOR = 'i=0; until ping -c 1 -W 1 "$1" >/dev/null 2>&1; do i=$((i+1)); [ $i -lt 20 ] || break; done; '


def _diagnostics(bridge, ns):
    """What the host sees of the test LAN, for a failure message."""
    cmds = [["bridge", "link", "show"], ["nft", "list", "table", "bridge", "vmiso"],
            ["ip", "-n", ns, "neigh"], ["ip", "-br", "link", "show", "master", bridge]]
    return "\n".join(subprocess.run(c, capture_output=True, text=True).stdout for c in cmds)


def test_ping_by_assigned_address_and_spoofing_is_dropped(iso, cid, lan):
    """A reaches B and the peer by their addresses; its spoofed address and MAC reach nothing.
    If A reaches nothing at all, the failure carries the guests' consoles and the host's view."""
    bridge, prefix, ns = lan
    _ping_and_spoof(iso, cid, bridge, prefix, ns)


class _Unreachable(AssertionError):
    pass


def _ping_and_spoof(iso, cid, bridge, prefix, ns):
    b = _launch(iso, cid + "b", "sleep 120", bridge)
    assert b.ip.startswith(prefix) and int(b.mac[:2], 16) & 3 == 2  # locally administered unicast
    b_ip = b.ip.split("/")[0]
    script = (
        f"set -- {b_ip}; {WAIT_FOR}"
        f"ping -c 2 -W 2 {b_ip} >/dev/null && echo reach-b; "
        f"ping -c 1 -W 2 {prefix}1 >/dev/null && echo reach-peer || {{ ip addr show dev eth0; ip neigh; }}; "
        "me=$(ip addr show dev eth0 | sed -n 's/.*inet \\([0-9./]*\\).*/\\1/p'); "
        f"ip addr flush dev eth0; ip addr add {prefix}200/24 dev eth0; "
        f"ping -c 2 -W 2 {b_ip} >/dev/null && echo spoofed-ip-reached; "
        'ip addr flush dev eth0; ip addr add "$me" dev eth0; '
        "ip link set eth0 down; ip link set eth0 address 02:de:ad:be:ef:01; ip link set eth0 up; "
        f"ping -c 2 -W 2 {b_ip} >/dev/null && echo spoofed-mac-reached; "
        "echo spoof-done; sleep 60")
    a = _launch(iso, cid, script, bridge)
    assert a.ip != b.ip and a.mac != b.mac
    tap_a = iso.supervisor.get(cid).checkpoint.extra["tap"]
    tap_b = iso.supervisor.get(cid + "b").checkpoint.extra["tap"]
    try:
        out = _output_until(iso, cid, "spoof-done", timeout=80)
        if "reach-b" not in out and "reach-peer" not in out:
            raise _Unreachable("\n".join((out, _console(iso, cid), _console(iso, cid + "b"),
                                           _diagnostics(bridge, ns))))
        assert "reach-b" in out and "reach-peer" in out, (out, _console(iso, cid), _console(iso, cid + "b"))
        assert "spoofed-ip-reached" not in out and "spoofed-mac-reached" not in out, out
        assert "spoof-done" in out, out
        assert filter.drops(tap_a) > 0  # the spoofed frames died at A's port
        assert filter.drops(tap_b) == 0
        # The peer namespace reaches B by the address vmiso assigned.
        assert nsutil.run("busybox", "ping", "-c", "1", "-W", "3", b_ip, ns=ns, check=False).returncode == 0
    finally:
        iso.destroy(cid, grace=0)
        iso.destroy(cid + "b", grace=0)
    _assert_nothing_left(iso, cid, tap_a)
    _assert_nothing_left(iso, cid + "b", tap_b)


def test_isolated_ports_reach_the_bridge_side_but_not_each_other(iso, cid, lan):
    """Isolated guests reach the bridge's own address and a non-isolated port, never each other.
    The bridge address exists only on this throwaway bridge (no route, no uplink, removed after)."""
    bridge, prefix, _ = lan
    bridge_address = f"{prefix}254"
    subprocess.run(["ip", "addr", "add", f"{bridge_address}/24", "dev", bridge], check=True)
    b = _launch(iso, cid + "b", "sleep 120", bridge, isolated=True)
    b_ip = b.ip.split("/")[0]
    script = (f"set -- {prefix}1; {WAIT_FOR}"
              f"ping -c 1 -W 2 {prefix}1 >/dev/null && echo reach-peer; "
              f"ping -c 1 -W 2 {bridge_address} >/dev/null && echo reach-bridge; "
              f"ping -c 3 -W 2 {b_ip} >/dev/null && echo reach-guest-b; echo done")
    _launch(iso, cid, script, bridge, isolated=True)
    try:
        out = _output_until(iso, cid, "done", timeout=80)
        assert out.split() == ["reach-peer", "reach-bridge", "done"], out
    finally:
        iso.destroy(cid, grace=0)
        iso.destroy(cid + "b", grace=0)
        subprocess.run(["ip", "addr", "del", f"{bridge_address}/24", "dev", bridge], capture_output=True)


RECEIVER = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 5001)); s.listen(1); s.settimeout(90)
c, _ = s.accept(); c.settimeout(30)
want, got, first = int(sys.argv[1]), 0, None
while got < want:
    data = c.recv(65536)
    if not data:
        break
    if first is None:
        first, base = time.monotonic(), len(data)
    got += len(data)
print(got, got - base, time.monotonic() - first)
"""


def test_outbound_rate_limit_holds(iso, cid, lan):
    bridge, prefix, ns = lan
    total = 320 * 1024
    receiver = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", RECEIVER, str(total)],
                                stdout=subprocess.PIPE, text=True)
    try:
        script = (f"set -- {prefix}1; {WAIT_FOR}"
                  f"dd if=/dev/zero bs=1024 count={total // 1024} 2>/dev/null | nc {prefix}1 5001; echo sent")
        _launch(iso, cid, script, bridge, outbound=RateLimit(average=64, burst=16))
        got, after_first, seconds = receiver.communicate(timeout=120)[0].split()
    finally:
        receiver.kill()
        iso.destroy(cid, grace=0)
    assert int(got) == total
    rate_kib = int(after_first) / float(seconds) / 1024
    assert rate_kib < 64 * 1.25, f"{rate_kib:.1f} KiB/s through a 64 KB/s limit"


@pytest.mark.skipif(not features.vlan_filtering_available(),
                    reason=f"this kernel lacks {features.VLAN_FILTERING}")
def test_guests_in_different_vlans_cannot_reach_each_other(iso, cid, workdir):
    bridge = nsutil.unique("vmtb")
    api.create_bridge(workdir, bridge, vlan_filtering=True, subnet="10.251.7.0/24")
    try:
        b = _launch(iso, cid + "b", "sleep 120", bridge, vlan=20)
        script = f"sleep 3; ping -c 3 -W 2 {b.ip.split('/')[0]} >/dev/null && echo reach-b; echo done"
        _launch(iso, cid, script, bridge, vlan=10)
        out = _output_until(iso, cid, "done", timeout=80)
        assert "reach-b" not in out and "done" in out, out
    finally:
        iso.destroy(cid, grace=0)
        iso.destroy(cid + "b", grace=0)
        api.delete_bridge(workdir, bridge, force=True)


def test_identities_outside_the_plan_are_refused_before_anything_is_made(iso, cid, lan):
    """A bridge vmiso does not manage, an address outside the plan, a tenant choice the bridge's
    plan forbids: launch raises InvalidSpec before the container has a directory."""
    bridge, prefix, _ = lan
    foreign = nsutil.unique("vmtb")
    subprocess.run(["ip", "link", "add", foreign, "type", "bridge"], check=True)
    try:
        refused = [({"bridge": foreign}, InvalidSpec, f"vmiso net bridge create {foreign}"),
                   ({"bridge": bridge, "ip": "192.168.77.5/24"}, InvalidSpec, "outside"),
                   ({"bridge": bridge, "ip": prefix + "1/24"}, AlreadyExists, "bridge's own")]
        for net, error, words in refused:
            with pytest.raises(error, match=words):
                iso.launch(cid, TaskSpec.shell("true", network=NetworkSpec(**net)))
            assert not os.path.exists(iso.workdir.container_dir(cid))
        ipam.Store(iso.workdir.root).set_plan(bridge, tenant_ip=False)
        with pytest.raises(InvalidSpec, match="operator's policy"):
            _launch(iso, cid, "true", bridge, ip=prefix + "9/24")
        assert not os.path.exists(iso.workdir.container_dir(cid))
        assert ipam.Store(iso.workdir.root).lease(cid) is None
    finally:
        subprocess.run(["ip", "link", "del", foreign], capture_output=True)


@pytest.mark.parametrize("point", ["launch:seed", "launch:network", "launch:create"])
def test_failed_launch_leaves_no_network(iso, cid, lan, point, monkeypatch):
    bridge, _, _ = lan
    monkeypatch.setenv("VMISO_FAULT", point + ":raise")
    with pytest.raises(LaunchFailed):
        _launch(iso, cid, "true", bridge)
    names = {tap.candidate_name(cid, i) for i in range(4)}
    assert not names & set(os.listdir("/sys/class/net")) and not names & set(filter.protected())
    assert ipam.Store(iso.workdir.root).lease(cid) is None
    assert api.show_bridge(iso.workdir.root, bridge)["ports"][0]["name"].startswith("vmtv")  # the veth only
    assert len(api.show_bridge(iso.workdir.root, bridge)["ports"]) == 1
