"""Anti-spoofing with real frames: a "guest" sends each frame class from a namespace of its own
through a filtered port of a bridge, and a sniffer on another port of that bridge says what
arrived. Every refused class must not arrive and must be counted by the rule the module
docstring of vmiso.net.filter names for it; every legitimate class must arrive.

Frames are written with AF_PACKET raw sockets (tests/net/frames.py builds them), so the kernel
sends exactly these bytes; the bridge, nftables and the filter are the real ones. All of it lives
in throwaway namespaces: the bridge's, the guest's and the other port's.
"""
import contextlib
import ipaddress
import select
import socket
import struct
import time

import pytest

from vmiso.net import addr, api, filter

from . import frames as f
from . import nsutil

pytestmark = pytest.mark.netns

GUEST_MAC, GUEST_IP = "02:00:00:00:00:0a", "10.95.0.10"
OTHER_MAC, OTHER_IP = "02:00:00:00:00:14", "10.95.0.20"
GUEST_LL, OTHER_LL = str(addr.link_local(GUEST_MAC)), str(addr.link_local(OTHER_MAC))
PORT = "vmigst0"  # the guest's bridge port: filtered as a tap of that name would be
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
DEADLINE = 5.0  # seconds to wait for a frame or a counter: a bound for a hung test, never a measurement


class Wire:
    """A guest's NIC (a raw socket in its namespace) and a sniffer on another port of the bridge."""

    def __init__(self, guest_ns, other_ns):
        with nsutil.inside(guest_ns):
            self.tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
            self.tx.bind(("eth0", 0))
        with nsutil.inside(other_ns):
            self.rx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            self.rx.bind(("eth0", ETH_P_ALL))
        # Room for a whole storm (the rate limit test): SO_RCVBUFFORCE, as root, passes rmem_max.
        self.rx.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), 8 << 20)
        self.received = set()
        self.sentinels = 0

    def close(self):
        self.tx.close()
        self.rx.close()

    def send(self, frame):
        self.tx.send(frame)

    def _drain(self, timeout):
        """Read what the sniffer has; wait up to ``timeout`` for the first frame."""
        ready, _, _ = select.select([self.rx], [], [], timeout)
        while ready:
            data, address = self.rx.recvfrom(65535)
            if address[2] != PACKET_OUTGOING:  # the other namespace's own frames are not arrivals
                self.received.add(data)
            ready, _, _ = select.select([self.rx], [], [], 0)

    def wait_for(self, predicate):
        deadline = time.monotonic() + DEADLINE
        while not predicate():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._drain(min(left, 0.05))
        return True

    def arrives(self, frame):
        """Send ``frame``; True once it arrived at the other port (False after DEADLINE)."""
        self.send(frame)
        return self.wait_for(lambda: frame in self.received)

    def sentinel(self):
        """A new plain IPv4 datagram from the guest to the other port: what must always pass."""
        self.sentinels += 1
        return f.udp4(GUEST_MAC, OTHER_MAC, GUEST_IP, OTHER_IP, 40000, 40001, b"sentinel %d" % self.sentinels)

    def dropped_by(self, frame, rule):
        """Send ``frame``; True once ``rule``'s counter took it, False if the frame arrived at the
        other port instead or nothing happened within DEADLINE."""
        before = filter.drop_counts(PORT).get(rule, 0)
        self.send(frame)
        counted = self.wait_for(lambda: frame in self.received
                                or filter.drop_counts(PORT).get(rule, 0) > before)
        return counted and frame not in self.received


@contextlib.contextmanager
def _port_namespace(bridge, port, mac, ipv6):
    """A namespace whose eth0 (``mac``) is the far end of veth ``port`` on ``bridge``."""
    with nsutil.netns("vmtf") as name:
        nsutil.run("ip", "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", name)
        if not ipv6:  # raw frames only: the namespace's own IPv6 chatter (DAD, MLD, RS) stays out
            nsutil.run("sysctl", "-qw", "net.ipv6.conf.eth0.disable_ipv6=1", ns=name)
        nsutil.run("ip", "link", "set", "eth0", "address", mac, "up", ns=name)
        nsutil.run("ip", "link", "set", port, "master", bridge, "up")
        yield name


@contextlib.contextmanager
def _lan(wd, ipv6):
    api.create_bridge(wd, "br0", subnet="10.95.0.0/24")
    with _port_namespace("br0", PORT, GUEST_MAC, ipv6) as guest, \
            _port_namespace("br0", "vmtoth0", OTHER_MAC, ipv6) as other:
        filter.protect(PORT, GUEST_MAC, GUEST_IP + "/24")
        try:
            yield guest, other
        finally:
            filter.unprotect(PORT)


@pytest.fixture
def wire(ns, wd):
    with _lan(wd, ipv6=False) as (guest, other):
        w = Wire(guest, other)
        try:
            assert w.arrives(w.sentinel()), "the guest's port forwards nothing at all"
            yield w
        finally:
            w.close()


def _lying_length(frame):
    """``frame`` (IPv4 or IPv6) with its IP length field claiming more than the frame holds: a
    DHCP offer that a lax receiver (a DHCP client's raw socket) might still parse."""
    version = frame[14] >> 4
    at = 14 + (2 if version == 4 else 4)
    frame = frame[:at] + b"\xff\xf0" + frame[at + 2:]
    if version == 4:  # the header checksum matches the lie: only the length gives it away
        header = frame[14:24] + b"\0\0" + frame[26:34]
        frame = frame[:24] + struct.pack("!H", f.checksum(header)) + frame[26:]
    return frame


# --- what a guest must not send -----------------------------------------------------------------
G, OM = GUEST_MAC, OTHER_MAC  # short, for the tables below
REFUSED = {
    # identity
    "ether source": (f.udp4("02:00:00:00:00:99", OM, GUEST_IP, OTHER_IP, 1, 2, b"x"), "ether-source"),
    "VLAN tag": (f.ether(OM, G, f.ETH_IP, b"\0" * 46, vlan=5), "ethertype"),
    "STP BPDU (802.3/LLC)": (f.stp_bpdu(G), "ethertype"),  # forwarded by a bridge with STP off
    "LLDP to a group address": (f.ether("01:00:5e:00:00:0e", G, f.ETH_LLDP, f.lldp(G)), "ethertype"),
    "ARP for another IP": (f.arp(G, 2, G, "10.95.0.1", OM, OTHER_IP, dst=OM), "arp-source"),
    "ARP for another MAC": (f.arp(G, 2, "02:00:00:00:00:99", GUEST_IP, OM, OTHER_IP, dst=OM), "arp-source"),
    "ARP with other lengths": (f.arp(G, 2, G, GUEST_IP, OM, OTHER_IP, dst=OM, hlen=8), "arp-format"),
    "ARP, not request/reply": (f.arp(G, 3, G, GUEST_IP, OM, OTHER_IP, dst=OM), "arp-format"),
    "IPv4 source": (f.udp4(G, OM, "10.95.0.1", OTHER_IP, 1, 2, b"x"), "ipv4-source"),
    "IPv6 source": (f.udp6(G, OM, "fe80::1", OTHER_LL, 1, 2, b"x"), "ipv6-source"),
    "UDP from ::": (f.udp6(G, OM, "::", OTHER_LL, 1, 2, b"x"), "ipv6-unspecified"),
    "IPv4 whose length lies": (_lying_length(f.udp4(G, f.BROADCAST, GUEST_IP, "255.255.255.255", 67, 68,
                                                    f.bootp(2, OM, 2, yiaddr="10.95.0.99"))), "ip-malformed"),
    "IPv6 whose length lies": (_lying_length(f.udp6(G, OM, GUEST_LL, OTHER_LL, 547, 546, f.dhcp6(2))),
                               "ip-malformed"),
    "echo from ::": (f.icmp6(G, OM, "::", OTHER_LL, 128, 0, b"\0\1\0\1"), "ipv6-unspecified"),
    # NDP poisoning
    "NA for another address": (f.neighbor_advert(G, GUEST_LL, OTHER_LL, f.lladdr_option(2, G)), "ndp-target"),
    "NA for a global address": (f.neighbor_advert(G, GUEST_LL, "2001:db8::1", f.lladdr_option(2, G)),
                                "ndp-target"),
    "DAD probe for another address": (f.neighbor_solicit(G, "::", OTHER_LL, f.nonce_option()), "ndp-target"),
    "NA with another lladdr": (f.neighbor_advert(G, GUEST_LL, GUEST_LL, f.lladdr_option(2, OM)), "ndp-lladdr"),
    "NS with another lladdr": (f.neighbor_solicit(G, GUEST_LL, OTHER_LL, f.lladdr_option(1, OM)), "ndp-lladdr"),
    "NS with two options": (f.neighbor_solicit(G, GUEST_LL, OTHER_LL, f.lladdr_option(1, G) * 2), "ndp-format"),
    "NS with an odd option": (f.neighbor_solicit(G, GUEST_LL, OTHER_LL, b"\x05\x01" + bytes(6)), "ndp-format"),
    # DHCP
    "DHCP discover, random chaddr": (f.udp4(G, f.BROADCAST, GUEST_IP, "255.255.255.255", 68, 67,
                                            f.bootp(1, "02:12:34:56:78:9a", 1)), "dhcp"),
    "DHCP discover from 0.0.0.0": (f.udp4(G, f.BROADCAST, "0.0.0.0", "255.255.255.255", 68, 67,
                                          f.bootp(1, G, 1)), "ipv4-source"),
    "DHCP offer from port 67": (f.udp4(G, f.BROADCAST, GUEST_IP, "255.255.255.255", 67, 68,
                                       f.bootp(2, OM, 2, yiaddr="10.95.0.99")), "dhcp"),
    "DHCP offer from port 1234": (f.udp4(G, f.BROADCAST, GUEST_IP, "255.255.255.255", 1234, 68,
                                         f.bootp(2, OM, 2, yiaddr="10.95.0.99")), "dhcp"),
    "DHCPv6 solicit": (f.udp6(G, f.multicast_mac("ff02::1:2"), GUEST_LL, "ff02::1:2", 546, 547, f.dhcp6(1)),
                       "dhcp"),
    "DHCPv6 advertise from port 1234": (f.udp6(G, OM, GUEST_LL, OTHER_LL, 1234, 546, f.dhcp6(2)), "dhcp"),
    "DHCPv6 advertise from port 547": (f.udp6(G, OM, GUEST_LL, OTHER_LL, 547, 546, f.dhcp6(2)), "dhcp"),
    # redirects and router advertisements
    "ICMPv4 redirect": (f.icmp4(G, OM, GUEST_IP, OTHER_IP, 5, 1, f.ip4("10.95.0.10")
                                + bytes(28)), "icmp-type"),
    "ICMPv4 router advertisement": (f.icmp4(G, f.BROADCAST, GUEST_IP, "255.255.255.255", 9, 0,
                                            struct.pack("!BBH4sI", 1, 2, 1800, f.ip4(GUEST_IP), 0)), "icmp-type"),
    "ICMPv6 redirect": (f.redirect6(G, OM, GUEST_LL, OTHER_LL, GUEST_LL, "2001:db8::1"), "icmpv6-type"),
    "router advertisement": (f.router_advert(G, GUEST_LL), "icmpv6-type"),
    "MLD query": (f.mld_query(G, GUEST_LL), "icmpv6-type"),
    "IGMP query": (f.igmp(G, GUEST_IP, "0.0.0.0", 0x11, dst="224.0.0.1"), "igmp-type"),
    # routing and first-hop redundancy protocols
    "VRRP": (f.ipv4(G, f.multicast_mac("224.0.0.18"), GUEST_IP, "224.0.0.18", 112, f.vrrp2(), ttl=255),
             "router-protocol"),
    "VRRPv3 over IPv6": (f.ipv6(G, f.multicast_mac("ff02::12"), GUEST_LL, "ff02::12", 112, f.vrrp2(), 255),
                         "router-protocol"),
    "OSPF hello": (f.ipv4(G, f.multicast_mac("224.0.0.5"), GUEST_IP, "224.0.0.5", 89, f.ospf_hello(), ttl=1),
                   "router-protocol"),
    "PIM hello": (f.ipv4(G, f.multicast_mac("224.0.0.13"), GUEST_IP, "224.0.0.13", 103, f.pim_hello(), ttl=1),
                  "router-protocol"),
    "RIP response": (f.udp4(G, f.multicast_mac("224.0.0.9"), GUEST_IP, "224.0.0.9", 520, 520,
                            f.rip2_response()), "router-port"),
    "RIPng response": (f.udp6(G, f.multicast_mac("ff02::9"), GUEST_LL, "ff02::9", 521, 521, b"\2\1\0\0"),
                       "router-port"),
    "HSRP hello": (f.udp4(G, f.multicast_mac("224.0.0.2"), GUEST_IP, "224.0.0.2", 1985, 1985,
                          f.hsrp_hello(), ttl=1), "router-port"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_frame_does_not_reach_another_port(wire, name):
    frame, rule = REFUSED[name]
    assert wire.dropped_by(frame, rule), (f"{name}: arrived={frame in wire.received}, "
                                          f"counters={filter.drop_counts(PORT)}")
    assert wire.arrives(wire.sentinel())  # the port still forwards what it should


def test_every_rule_has_a_refused_frame():
    rules = {statement.rsplit('comment "', 1)[1].rstrip('"')
             for chain in filter.port_rules(PORT, GUEST_MAC, GUEST_IP + "/24").values()
             for statement in chain if "comment" in statement}
    assert rules - {rule for _, rule in REFUSED.values()} == {"multicast-rate"}  # tested on its own below


# --- what a guest must still be able to send ----------------------------------------------------
ALLOWED = {
    "ARP request": f.arp(G, 1, G, GUEST_IP, "00:00:00:00:00:00", OTHER_IP),
    "ARP reply": f.arp(G, 2, G, GUEST_IP, OM, OTHER_IP, dst=OM),
    "gratuitous ARP": f.arp(G, 1, G, GUEST_IP, "00:00:00:00:00:00", GUEST_IP),
    "ARP probe": f.arp(G, 1, G, "0.0.0.0", "00:00:00:00:00:00", GUEST_IP),
    "IPv4 unicast": f.udp4(G, OM, GUEST_IP, OTHER_IP, 40000, 53, b"query"),
    "IPv4 broadcast": f.udp4(G, f.BROADCAST, GUEST_IP, "10.95.0.255", 40000, 9999, b"hello"),
    "IPv4 echo": f.icmp4(G, OM, GUEST_IP, OTHER_IP, 8, 0, b"\0\1\0\1ping"),
    "IPv4 unreachable": f.icmp4(G, OM, GUEST_IP, OTHER_IP, 3, 3, bytes(4) + bytes(28)),
    "IGMPv3 report": f.igmp3_report(G, GUEST_IP, "239.1.2.3"),
    "IGMPv2 leave": f.igmp(G, GUEST_IP, "239.1.2.3", 0x17, dst="224.0.0.2"),
    "mDNS": f.udp4(G, f.multicast_mac("224.0.0.251"), GUEST_IP, "224.0.0.251", 5353, 5353, bytes(12)),
    "IPv6 unicast": f.udp6(G, OM, GUEST_LL, OTHER_LL, 40000, 53, b"query"),
    "IPv6 echo": f.icmp6(G, OM, GUEST_LL, OTHER_LL, 128, 0, b"\0\1\0\1ping", hop_limit=64),
    "NS for another address": f.neighbor_solicit(G, GUEST_LL, OTHER_LL, f.lladdr_option(1, G)),
    "NS unicast, no option": f.neighbor_solicit(G, GUEST_LL, OTHER_LL, dst=OTHER_LL),
    "DAD probe for its own address": f.neighbor_solicit(G, "::", GUEST_LL, f.nonce_option()),
    "NA for its own address": f.neighbor_advert(G, GUEST_LL, GUEST_LL, f.lladdr_option(2, G)),
    "solicited NA, no option": f.neighbor_advert(G, GUEST_LL, GUEST_LL, dst=OTHER_LL, dst_mac=OM,
                                                 flags=0x60000000),
    "router solicitation": f.router_solicit(G, GUEST_LL),
    "MLDv2 report": f.mld2_report(G, GUEST_LL, "ff02::1:ff00:a"),
    "MLDv2 report from ::": f.mld2_report(G, "::", "ff02::1:ff00:a"),
}


def test_link_local_control_frames_never_reach_another_port(wire):
    """LLDP and PAUSE to their reserved 01:80:c2:00:00:0x addresses: the bridge hands them to the
    port's own interface (or drops them) before its prerouting hook, so no rule sees them; what
    matters is that they do not arrive, checked once a later frame has."""
    control = [f.ether("01:80:c2:00:00:0e", G, f.ETH_LLDP, f.lldp(G)),
               f.ether("01:80:c2:00:00:01", G, 0x8808, bytes.fromhex("0001ffff") + bytes(42))]
    for frame in control:
        wire.send(frame)
    assert wire.arrives(wire.sentinel())
    assert not wire.received.intersection(control)


@pytest.mark.parametrize("name", sorted(ALLOWED))
def test_legitimate_frame_arrives(wire, name):
    assert wire.arrives(ALLOWED[name]), f"{name} did not arrive; counters={filter.drop_counts(PORT)}"
    assert filter.drops(PORT) == 0


# --- broadcast and multicast storms -------------------------------------------------------------
def test_broadcast_and_multicast_are_rate_limited_per_port(wire):
    count = 3 * filter.MULTICAST_BURST
    storm = [f.udp4(G, f.BROADCAST, GUEST_IP, "10.95.0.255", 40000, 9999, b"storm %d" % i) for i in range(count)]
    started = time.monotonic()
    for frame in storm:
        wire.send(frame)
    elapsed = time.monotonic() - started

    def limited():
        return filter.drop_counts(PORT).get("multicast-rate", 0)

    def arrived():
        return len(wire.received.intersection(storm))

    # Every frame is either delivered or counted by the limit: wait until all are accounted for.
    assert wire.wait_for(lambda: arrived() + limited() == count), (arrived(), limited())
    # At least the burst; at most the burst plus what the rate refills while sending (and one
    # second's slack: the bucket's granularity). The send loop's own duration sets the bound.
    assert filter.MULTICAST_BURST <= arrived() <= filter.MULTICAST_BURST + filter.MULTICAST_RATE * (elapsed + 1)
    assert filter.drops(PORT) == limited()  # nothing else was dropped
    # Unicast is not limited: the same number of frames all arrive.
    unicast = [f.udp4(G, OM, GUEST_IP, OTHER_IP, 40000, 9999, b"unicast %d" % i) for i in range(count)]
    for frame in unicast:
        wire.send(frame)
    assert wire.wait_for(lambda: wire.received.issuperset(unicast))
    assert filter.drops(PORT) == limited()


# --- the guest's own kernel, not hand-made frames -----------------------------------------------
def _wait_for_link_local(ns):
    """Until the namespace's eth0 has finished duplicate address detection (bounded)."""
    deadline = time.monotonic() + 3 * DEADLINE
    while time.monotonic() < deadline:
        addrs = nsutil.ip_json("-6", "addr", "show", "dev", "eth0", ns=ns)[0]["addr_info"]
        if any(a["local"].startswith("fe80") and not a.get("tentative") for a in addrs):
            return
        time.sleep(0.1)
    raise AssertionError(f"no usable link-local address in {ns}: {addrs}")


def _ping(ns, *argv):
    return nsutil.run("busybox", "ping", "-c", "1", "-W", "2", *argv, ns=ns, check=False).returncode == 0


def test_a_real_guest_stack_talks_ipv4_and_ipv6(ns, wd):
    """ARP, NDP (its DAD, NS and NA from its own kernel), IPv4 and IPv6 both ways; nothing dropped."""
    with _lan(wd, ipv6=True) as (guest, other):
        nsutil.run("ip", "addr", "add", GUEST_IP + "/24", "dev", "eth0", ns=guest)
        nsutil.run("ip", "addr", "add", OTHER_IP + "/24", "dev", "eth0", ns=other)
        _wait_for_link_local(guest)
        _wait_for_link_local(other)
        assert _ping(guest, OTHER_IP) and _ping(other, GUEST_IP)
        assert _ping(guest, "-I", "eth0", OTHER_LL) and _ping(other, "-I", "eth0", GUEST_LL)
        neighbours = nsutil.ip_json("-6", "neigh", "show", "dev", "eth0", ns=other)
        assert {n["dst"]: n["lladdr"] for n in neighbours}.get(GUEST_LL) == GUEST_MAC
        drops = filter.drop_counts(PORT)
        assert sum(drops.values()) == 0, drops


def test_link_local_helper_matches_the_kernel(ns, wd):
    """The filter's idea of the guest's link-local address is the one its kernel makes."""
    with _lan(wd, ipv6=True) as (guest, _):
        _wait_for_link_local(guest)
        addrs = nsutil.ip_json("-6", "addr", "show", "dev", "eth0", ns=guest)[0]["addr_info"]
        assert [a["local"] for a in addrs if a["local"].startswith("fe80")] == [GUEST_LL]
        assert ipaddress.IPv6Address(GUEST_LL) == addr.link_local(GUEST_MAC)
