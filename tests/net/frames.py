"""Ethernet frames built byte by byte (struct), as a guest could send them on its NIC.

Each builder returns the whole frame: Ethernet header, then ARP, IPv4 or IPv6 with their
checksums right (the frames are real, so a receiving stack would take them as they are). Only
what the anti-spoofing tests send is here; the field layouts follow RFC 826 (ARP), 791 (IPv4),
768 (UDP), 792 (ICMP), 2236/3376 (IGMP), 8200 (IPv6), 4443 (ICMPv6), 4861 (NDP), 3810 (MLDv2),
2131 (DHCP), 8415 (DHCPv6), 5798 (VRRP), 2328 (OSPF), 7761 (PIM), 2453 (RIP), 2281 (HSRP).
"""
import ipaddress
import struct

ETH_IP, ETH_ARP, ETH_IP6, ETH_VLAN, ETH_LLDP = 0x0800, 0x0806, 0x86DD, 0x8100, 0x88CC
BROADCAST = "ff:ff:ff:ff:ff:ff"
PROTO_ICMP, PROTO_IGMP, PROTO_UDP, PROTO_ICMP6, PROTO_HOPOPTS = 1, 2, 17, 58, 0


def mac_bytes(mac):
    return bytes.fromhex(mac.replace(":", ""))


def ip4(text):
    return ipaddress.IPv4Address(text).packed


def ip6(text):
    return ipaddress.IPv6Address(text).packed


def checksum(data):
    """The Internet checksum (RFC 1071)."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ether(dst, src, ethertype, payload, vlan=None):
    tag = struct.pack("!HH", ETH_VLAN, vlan) if vlan is not None else b""
    return mac_bytes(dst) + mac_bytes(src) + tag + struct.pack("!H", ethertype) + payload


def multicast_mac(group):
    """The Ethernet address an IPv4 or IPv6 multicast group maps to."""
    packed = ipaddress.ip_address(group).packed
    if len(packed) == 4:
        return "01:00:5e:" + ":".join(f"{b:02x}" for b in (packed[1] & 0x7F, packed[2], packed[3]))
    return "33:33:" + ":".join(f"{b:02x}" for b in packed[-4:])


def stp_bpdu(src_mac):
    """An 802.1D configuration BPDU claiming to be the root bridge (priority 0): 802.3 + LLC."""
    bridge_id = struct.pack("!H", 0) + mac_bytes(src_mac)
    bpdu = struct.pack("!HBBB8sI8sHHHHH", 0, 0, 0, 0, bridge_id, 0, bridge_id, 0x8001, 0, 20 * 256, 2 * 256,
                       15 * 256)
    llc = b"\x42\x42\x03" + bpdu
    return mac_bytes("01:80:c2:00:00:00") + mac_bytes(src_mac) + struct.pack("!H", len(llc)) + llc


def lldp(src_mac):
    """An LLDPDU: chassis id (MAC), port id (name), TTL, end."""
    def tlv(kind, value):
        return struct.pack("!H", (kind << 9) | len(value)) + value
    return tlv(1, b"\x04" + mac_bytes(src_mac)) + tlv(2, b"\x05eth0") + tlv(3, b"\x00\x78") + tlv(0, b"")


# --- ARP ----------------------------------------------------------------------------------------
def arp(src_mac, op, sha, spa, tha, tpa, dst=BROADCAST, htype=1, ptype=ETH_IP, hlen=6, plen=4):
    body = struct.pack("!HHBBH", htype, ptype, hlen, plen, op)
    body += mac_bytes(sha) + ip4(spa) + mac_bytes(tha) + ip4(tpa)
    if hlen != 6:  # an ARP that claims other address lengths: pad the hardware fields to them
        body += b"\0" * (2 * (hlen - 6))
    return ether(dst, src_mac, ETH_ARP, body)


# --- IPv4 ---------------------------------------------------------------------------------------
def ipv4(src_mac, dst_mac, src, dst, proto, payload, ttl=64, options=b""):
    ihl = 5 + len(options) // 4
    header = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, 4 * ihl + len(payload), 0x1234, 0, ttl, proto, 0,
                         ip4(src), ip4(dst)) + options
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return ether(dst_mac, src_mac, ETH_IP, header + payload)


def udp4(src_mac, dst_mac, src, dst, sport, dport, data, ttl=64):
    length = 8 + len(data)
    pseudo = ip4(src) + ip4(dst) + struct.pack("!BBH", 0, PROTO_UDP, length)
    segment = struct.pack("!HHHH", sport, dport, length, 0) + data
    segment = segment[:6] + struct.pack("!H", checksum(pseudo + segment) or 0xFFFF) + segment[8:]
    return ipv4(src_mac, dst_mac, src, dst, PROTO_UDP, segment, ttl=ttl)


def icmp4(src_mac, dst_mac, src, dst, icmp_type, code, body):
    message = struct.pack("!BBH", icmp_type, code, 0) + body
    message = message[:2] + struct.pack("!H", checksum(message)) + message[4:]
    return ipv4(src_mac, dst_mac, src, dst, PROTO_ICMP, message)


ROUTER_ALERT4 = b"\x94\x04\x00\x00"


def igmp(src_mac, src, group, igmp_type, body=b"", dst=None):
    """IGMP to ``dst`` (default ``group``), TTL 1 with the router alert option as hosts send it."""
    dst = dst or group
    message = struct.pack("!BBH4s", igmp_type, 100 if igmp_type == 0x11 else 0, 0, ip4(group)) + body
    message = message[:2] + struct.pack("!H", checksum(message)) + message[4:]
    return ipv4(src_mac, multicast_mac(dst), src, dst, PROTO_IGMP, message, ttl=1, options=ROUTER_ALERT4)


def igmp3_report(src_mac, src, group):
    record = struct.pack("!BBH4s", 4, 0, 0, ip4(group))  # CHANGE_TO_EXCLUDE_MODE, no sources: a join
    message = struct.pack("!BBHHH", 0x22, 0, 0, 0, 1) + record
    message = message[:2] + struct.pack("!H", checksum(message)) + message[4:]
    return ipv4(src_mac, multicast_mac("224.0.0.22"), src, "224.0.0.22", PROTO_IGMP, message, ttl=1,
                options=ROUTER_ALERT4)


# --- IPv6 ---------------------------------------------------------------------------------------
def _pseudo6(src, dst, proto, length):
    return ip6(src) + ip6(dst) + struct.pack("!IxxxB", length, proto)


def ipv6(src_mac, dst_mac, src, dst, next_header, payload, hop_limit=64):
    header = struct.pack("!IHBB16s16s", 6 << 28, len(payload), next_header, hop_limit, ip6(src), ip6(dst))
    return ether(dst_mac, src_mac, ETH_IP6, header + payload)


def udp6(src_mac, dst_mac, src, dst, sport, dport, data, hop_limit=64):
    length = 8 + len(data)
    segment = struct.pack("!HHHH", sport, dport, length, 0) + data
    csum = checksum(_pseudo6(src, dst, PROTO_UDP, length) + segment) or 0xFFFF
    return ipv6(src_mac, dst_mac, src, dst, PROTO_UDP, segment[:6] + struct.pack("!H", csum) + segment[8:],
                hop_limit)


def icmp6(src_mac, dst_mac, src, dst, icmp_type, code, body, hop_limit=255, hop_by_hop=False):
    """ICMPv6; ``hop_by_hop``: behind a hop-by-hop header with the router alert (MLD does that)."""
    message = struct.pack("!BBH", icmp_type, code, 0) + body
    csum = checksum(_pseudo6(src, dst, PROTO_ICMP6, len(message)) + message)
    message = message[:2] + struct.pack("!H", csum) + message[4:]
    if not hop_by_hop:
        return ipv6(src_mac, dst_mac, src, dst, PROTO_ICMP6, message, hop_limit)
    # next header, length 0 (8 bytes), router alert (type 5, len 2, MLD = 0), PadN of 0 bytes
    hbh = struct.pack("!BBBBHBB", PROTO_ICMP6, 0, 5, 2, 0, 1, 0)
    return ipv6(src_mac, dst_mac, src, dst, PROTO_HOPOPTS, hbh + message, hop_limit)


def solicited_node(address):
    return str(ipaddress.IPv6Address(b"\xff\x02" + b"\0" * 9 + b"\x01\xff" + ip6(address)[-3:]))


def lladdr_option(kind, mac):
    """A source (1) or target (2) link-layer address option."""
    return struct.pack("!BB", kind, 1) + mac_bytes(mac)


def nonce_option(nonce=b"\x01\x02\x03\x04\x05\x06"):
    return struct.pack("!BB", 14, 1) + nonce


def neighbor_solicit(src_mac, src, target, options=b"", dst=None):
    """NS for ``target`` to its solicited-node group (``dst`` for a unicast one)."""
    dst = dst or solicited_node(target)
    return icmp6(src_mac, multicast_mac(dst) if dst.startswith("ff") else dst_mac_of(dst), src, dst, 135, 0,
                 b"\0\0\0\0" + ip6(target) + options)


def neighbor_advert(src_mac, src, target, options=b"", dst="ff02::1", dst_mac=None, flags=0x20000000):
    """NA for ``target`` (flags: override by default, as an unsolicited one)."""
    return icmp6(src_mac, dst_mac or multicast_mac(dst), src, dst, 136, 0, struct.pack("!I", flags) + ip6(target)
                 + options)


def dst_mac_of(link_local):
    """The MAC an EUI-64 link-local address was made from."""
    iid = bytearray(ip6(link_local)[8:])
    iid[0] ^= 0x02
    return ":".join(f"{b:02x}" for b in iid[:3] + iid[5:])


def mld2_report(src_mac, src, group):
    record = struct.pack("!BBH16s", 4, 0, 0, ip6(group))  # CHANGE_TO_EXCLUDE_MODE: a join
    return icmp6(src_mac, multicast_mac("ff02::16"), src, "ff02::16", 143, 0, struct.pack("!HH", 0, 1) + record,
                 hop_limit=1, hop_by_hop=True)


def mld_query(src_mac, src):
    return icmp6(src_mac, multicast_mac("ff02::1"), src, "ff02::1", 130, 0,
                 struct.pack("!HH16s", 1000, 0, bytes(16)), hop_limit=1, hop_by_hop=True)


def router_advert(src_mac, src):
    # hop limit 64, flags 0, router lifetime 1800 s, reachable 0, retrans 0; a prefix option
    body = struct.pack("!BBHII", 64, 0, 1800, 0, 0)
    body += struct.pack("!BBBBIII16s", 3, 4, 64, 0xC0, 86400, 14400, 0, ip6("2001:db8:1::"))
    return icmp6(src_mac, multicast_mac("ff02::1"), src, "ff02::1", 134, 0, body)


def router_solicit(src_mac, src):
    return icmp6(src_mac, multicast_mac("ff02::2"), src, "ff02::2", 133, 0, b"\0\0\0\0" + lladdr_option(1, src_mac))


def redirect6(src_mac, dst_mac, src, dst, target, destination):
    return icmp6(src_mac, dst_mac, src, dst, 137, 0, b"\0\0\0\0" + ip6(target) + ip6(destination))


# --- DHCP ---------------------------------------------------------------------------------------
def bootp(op, chaddr, message_type, yiaddr="0.0.0.0", xid=0x1234ABCD):
    """A BOOTP/DHCP message: ``op`` 1 request, 2 reply; ``message_type`` option 53 (1 discover,
    2 offer)."""
    fixed = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", op, 1, 6, 0, xid, 0, 0x8000, bytes(4), ip4(yiaddr),
                        bytes(4), bytes(4), mac_bytes(chaddr) + bytes(10), b"", b"")
    return fixed + b"\x63\x82\x53\x63" + bytes([53, 1, message_type, 255])


def dhcp6(message_type, transaction=0x123456):
    """A DHCPv6 message (1 solicit, 2 advertise) with a client identifier (DUID-LL)."""
    duid = struct.pack("!HH", 3, 1) + bytes(6)
    return struct.pack("!I", (message_type << 24) | transaction) + struct.pack("!HH", 1, len(duid)) + duid


# --- routing protocols --------------------------------------------------------------------------
def vrrp2(vrid=7, priority=255, address="10.95.0.1"):
    message = struct.pack("!BBBBBBH4s", 0x21, vrid, priority, 1, 0, 1, 0, ip4(address)) + bytes(8)
    return message[:6] + struct.pack("!H", checksum(message)) + message[8:]


def ospf_hello(router_id="10.95.0.10"):
    hello = struct.pack("!4sHBBI4s4s", ip4("255.255.255.0"), 10, 2, 1, 40, bytes(4), bytes(4))
    header = struct.pack("!BBH4s4sHH8s", 2, 1, 24 + len(hello), ip4(router_id), bytes(4), 0, 0, bytes(8))
    message = header + hello
    return message[:12] + struct.pack("!H", checksum(message)) + message[14:]


def pim_hello():
    message = struct.pack("!BBHHHH", 0x20, 0, 0, 1, 2, 105)  # holdtime option
    return message[:2] + struct.pack("!H", checksum(message)) + message[4:]


def rip2_response(route="10.0.0.0"):
    return struct.pack("!BBH", 2, 2, 0) + struct.pack("!HH4s4s4sI", 2, 0, ip4(route), ip4("255.0.0.0"), bytes(4), 1)


def hsrp_hello(virtual="10.95.0.1"):
    return struct.pack("!BBBBBBBB8s4s", 0, 0, 16, 3, 10, 255, 1, 0, b"cisco\0\0\0", ip4(virtual))
