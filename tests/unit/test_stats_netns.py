"""The guest's view of a tap's counters, checked on a real veth in a throwaway network namespace:
what the host end transmits the guest received, and back (both implementations)."""
import array
import os
import secrets
import subprocess
import sys
import time

import pytest

from vmiso import _fast

pytestmark = pytest.mark.netns

SYSFS = ("rx_bytes", "rx_packets", "rx_errors", "rx_dropped", "tx_bytes", "tx_packets", "tx_errors", "tx_dropped")


def sh(*argv):
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


@pytest.fixture
def veth():
    """(host namespace, host-end name, a process in that namespace): a veth pair whose other end
    is the "guest" in a second namespace, after the guest sent 50 KB of UDP to the host end."""
    host, guest = ("vmiso-st-" + secrets.token_hex(3) for _ in range(2))
    holder = None
    try:
        for ns in (host, guest):
            sh("ip", "netns", "add", ns)
            sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
               "net.ipv6.conf.default.disable_ipv6=1")
        sh("ip", "-n", host, "link", "add", "vtap0", "type", "veth", "peer", "name", "vguest0", "netns", guest)
        sh("ip", "-n", host, "addr", "add", "10.99.0.1/24", "dev", "vtap0")
        sh("ip", "-n", guest, "addr", "add", "10.99.0.2/24", "dev", "vguest0")
        sh("ip", "-n", host, "link", "set", "vtap0", "up")
        sh("ip", "-n", guest, "link", "set", "vguest0", "up")
        sh("ip", "netns", "exec", guest, sys.executable, "-c", SEND)
        holder = subprocess.Popen(["ip", "netns", "exec", host, "sleep", "60"])
        for _ in range(200):
            if os.readlink(f"/proc/{holder.pid}/ns/net") != os.readlink("/proc/self/ns/net"):
                break
            time.sleep(0.01)
        yield host, "vtap0", holder.pid
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
        for ns in (host, guest):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


SEND = """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(50):
    s.sendto(b"x" * 1000, ("10.99.0.1", 9))
"""


@pytest.mark.parametrize("name", ["cython", "python"])
def test_tap_counters_are_swapped_to_the_guests_view(veth, name):
    if name == "cython" and _fast.NO_EXTENSIONS:
        pytest.skip("VMISO_NO_EXTENSIONS=1")
    mod = _fast.twin("stats") if name == "python" else _fast.load("stats")
    ns, tap, pid = veth
    kernel = {k: int(sh("ip", "netns", "exec", ns, "cat", f"/sys/class/net/{tap}/statistics/{k}")) for k in SYSFS}
    vm = mod.VM("c1", [(f"/proc/{os.getpid()}/stat", mod.K_PROC_STAT, 0)], tap=tap)
    out = array.array("q", bytes(8 * mod.NFIELDS))
    fd = os.open(f"/proc/{pid}/net/dev", os.O_RDONLY)
    try:
        assert mod.read_batch([vm], out, fd) == []
    finally:
        os.close(fd)
        vm.close()
    assert kernel["rx_bytes"] > 50_000 > kernel["tx_bytes"]  # the guest sent, the host end received
    assert out[mod.F_NET_RX_BYTES] == kernel["tx_bytes"] and out[mod.F_NET_TX_BYTES] == kernel["rx_bytes"]
    assert out[mod.F_NET_RX_PACKETS] == kernel["tx_packets"] and out[mod.F_NET_TX_PACKETS] == kernel["rx_packets"]
    assert (out[mod.F_NET_RX_ERRORS], out[mod.F_NET_RX_DROPPED]) == (kernel["tx_errors"], kernel["tx_dropped"])
    assert (out[mod.F_NET_TX_ERRORS], out[mod.F_NET_TX_DROPPED]) == (kernel["rx_errors"], kernel["rx_dropped"])
