"""Anti-spoofing for guest ports: a ``bridge``-family nftables table owned by vmiso.

::

  table bridge vmiso {
    map ports { type ifname : verdict }              tap name -> jump port_<tap>
    chain guest_ports { type filter hook prerouting priority -200; iifname vmap @ports }
    chain port_<tap> { ... }                         one per guest: what may leave its tap
    chain l4_<tap> { ... }                           its transport rules (port_<tap> goes there)
  }

The prerouting hook sees every frame a guest sends before the bridge forwards or delivers it,
so a dropped frame reaches neither another guest nor the host. What a guest may send is what a
host with one static IPv4 address and an EUI-64 link-local IPv6 address needs, and nothing that
claims another host's identity or a router's, a DHCP server's or a multicast querier's role:

  ether-source      frames from any MAC but its own
  ethertype         anything but IPv4, ARP and IPv6 (VLAN tags, STP BPDUs and other 802.3/LLC,
                    PPPoE, MPLS...)
  arp-format        ARP that is not Ethernet/IPv4 request or reply (its offsets would lie)
  arp-source        ARP whose sender MAC or IPv4 is not its own (0.0.0.0: address probes)
  ipv4-source       IPv4 from any address but its own
  ipv6-source       IPv6 from any address but its link-local one or :: (duplicate address detection)
  ipv6-unspecified  from ::, anything but neighbour solicitations and MLD reports
  ndp-target        neighbour advertisements for an address that is not its own (NDP poisoning),
                    and duplicate address probes (NS from ::) for one that is not its own
  ndp-format        NS/NA of another size than a bare one or one with a single 8-byte option, or
                    with an option other than a link-layer address or a nonce
  ndp-lladdr        NS/NA whose link-layer address option is not its own MAC
  multicast-rate    broadcast and multicast frames beyond MULTICAST_RATE per second (a storm)
  ip-malformed      IPv4/IPv6 whose header nft cannot follow to the transport header (lengths
                    that lie), so no rule below could see its ports or type
  icmp-type         ICMPv4 but echo, unreachable, time exceeded, parameter problem (redirects,
                    router advertisements, source quench, timestamps, address masks)
  icmpv6-type       ICMPv6 but those, packet too big, neighbour discovery, router solicitations
                    and MLD reports (router advertisements, redirects, MLD queries, renumbering)
  igmp-type         IGMP but membership reports and leaves (queries: it is no querier)
  router-protocol   EIGRP (88), OSPF (89), PIM (103), VRRP/CARP (112), over IPv4 and IPv6
  dhcp              UDP from or to ports 67, 68, 546, 547: vmiso's guests have static addresses,
                    so no DHCP/DHCPv6 client (pool starvation) and no server (rogue offers)
  router-port       UDP from or to RIP (520), RIPng (521), HSRP (1985), HSRPv6 (2029), GLBP (3222)

Each drop rule counts (its comment is the name above; drop_counts() reads them by name). TCP
routing protocols (BGP, LDP) stay allowed: they need a configured peer, not a trusting segment.
Frames to the reserved 01:80:c2:00:00:0X addresses (LLDP, LACP, PAUSE, 802.1X) are the bridge's
own business: it hands them to the port's own interface or drops them, before its prerouting
hook; what it forwards of them (STP BPDUs while STP is off, whatever an operator's
group_fwd_mask names) passes the hook like any frame, and the ethertype rule drops it.

Every change is one ``nft -f -`` transaction (all of it or nothing), made under a host-wide
flock so two processes never interleave their read-then-write. The table is deleted with its
last port, so a host without guests has no trace of vmiso in its ruleset.
"""
import ipaddress
import json

from .._proc import run
from ..errors import CommandFailed, NetworkError
from ..files import flocked
from . import addr

FAMILY = "bridge"
TABLE = "vmiso"
MAP = "ports"
BASE_CHAIN = "guest_ports"  # not "fwd": that is an nft keyword
PRIORITY = -200
LOCK_PATH = "/run/vmiso-nft.lock"


def port_chain(tap):
    return "port_" + addr.validate_ifname(tap, "tap")


MULTICAST_RATE = 100   # broadcast + multicast frames per second a guest may send (ARP, NDP, mDNS...)
MULTICAST_BURST = 200  # ... of which this many at once
ICMP_TYPES = "echo-reply, destination-unreachable, echo-request, time-exceeded, parameter-problem"
ICMPV6_TYPES = ("destination-unreachable, packet-too-big, time-exceeded, parameter-problem, echo-request, "
                "echo-reply, mld-listener-report, mld-listener-done, nd-router-solicit, nd-neighbor-solicit, "
                "nd-neighbor-advert, mld2-listener-report")
IGMP_TYPES = "membership-report-v1, membership-report-v2, membership-report-v3, leave-group"
ROUTER_PROTOCOLS = "88, 89, 103, 112"           # EIGRP, OSPF, PIM, VRRP/CARP
DHCP_PORTS = "67, 68, 546, 547"                 # DHCP server, client; DHCPv6 client, server
ROUTER_PORTS = "520, 521, 1985, 2029, 3222"     # RIP, RIPng, HSRP, HSRPv6, GLBP
ND = "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert }"
# In an NS/NA (RFC 4861): the target address at bytes 8-23 of the ICMPv6 header, the first
# option at 24 (type, length in 8-byte units, then a link-layer address's 6 bytes).
ND_TARGET = "@th,64,128"
ND_OPTION_TYPE, ND_OPTION_HEAD, ND_OPTION_LLADDR = "@th,192,8", "@th,192,16", "@th,208,48"


def transport_chain(tap):
    return "l4_" + addr.validate_ifname(tap, "tap")


def _rule(name, match):
    return f'{match} counter drop comment "{name}"'


def port_rules(tap, mac, ip, multicast_rate=MULTICAST_RATE, multicast_burst=MULTICAST_BURST):
    """{chain: [nft statements in order]} of a guest's port: its port chain, and the transport
    chain that the port chain hands every IP frame whose transport header nft found. Each drop
    rule ends in a counter, a drop and its name as the comment (the module docstring says what
    each is for)."""
    mac = addr.parse_mac(mac)
    ip = ipaddress.IPv4Interface(ip).ip
    ll = addr.link_local(mac)
    own6 = f"0x{int(ll):032x}"  # its IPv6 addresses: the link-local one only (vmiso assigns no other)
    mac_hex = "0x" + mac.replace(":", "")
    port = [
        _rule("ether-source", f"ether saddr != {mac}"),
        _rule("ethertype", "ether type != { ip, arp, ip6 }"),
        _rule("arp-format", "arp htype != 1"),
        _rule("arp-format", "arp ptype != ip"),
        _rule("arp-format", "arp hlen != 6"),
        _rule("arp-format", "arp plen != 4"),
        _rule("arp-format", "arp operation != { request, reply }"),
        _rule("arp-source", f"arp saddr ether != {mac}"),
        _rule("arp-source", f"arp saddr ip != {{ 0.0.0.0, {ip} }}"),
        _rule("ipv4-source", f"ip saddr != {ip}"),
        _rule("ipv6-source", f"ip6 saddr != {{ ::, {ll} }}"),
        _rule("ipv6-unspecified", "ip6 saddr :: meta l4proto != ipv6-icmp"),
        _rule("ipv6-unspecified", "ip6 saddr :: icmpv6 type != { nd-neighbor-solicit, mld-listener-report, "
                                  "mld2-listener-report }"),
        _rule("ndp-target", f"icmpv6 type nd-neighbor-advert {ND_TARGET} != {own6}"),
        _rule("ndp-target", f"ip6 saddr :: icmpv6 type nd-neighbor-solicit {ND_TARGET} != {own6}"),
        _rule("ndp-format", f"{ND} ip6 length != {{ 24, 32 }}"),
        _rule("ndp-format", f"{ND} ip6 length 32 {ND_OPTION_TYPE} != {{ 1, 2, 14 }}"),  # lladdr, nonce
        _rule("ndp-lladdr", f"{ND} {ND_OPTION_HEAD} {{ 0x0101, 0x0201 }} {ND_OPTION_LLADDR} != {mac_hex}"),
        # The limit is this rule's own state, and the chain is the port's own: one budget per
        # guest, spent by every broadcast and multicast frame that got this far.
        _rule("multicast-rate", f"ether daddr & 01:00:00:00:00:00 == 01:00:00:00:00:00 "
                                f"limit rate over {int(multicast_rate)}/second burst {int(multicast_burst)} packets"),
        # A transport rule cannot match what nft could not parse (it does not drop it either):
        # only frames whose transport protocol nft knows go on, and the IP frames left are dropped.
        f"meta l4proto 0-255 goto {transport_chain(tap)}",
        _rule("ip-malformed", "ether type { ip, ip6 }"),
    ]
    transport = [
        _rule("icmp-type", f"icmp type != {{ {ICMP_TYPES} }}"),
        _rule("icmpv6-type", f"icmpv6 type != {{ {ICMPV6_TYPES} }}"),
        _rule("igmp-type", f"igmp type != {{ {IGMP_TYPES} }}"),
        _rule("router-protocol", f"meta l4proto {{ {ROUTER_PROTOCOLS} }}"),
        _rule("dhcp", f"udp sport {{ {DHCP_PORTS} }}"),
        _rule("dhcp", f"udp dport {{ {DHCP_PORTS} }}"),
        _rule("router-port", f"udp sport {{ {ROUTER_PORTS} }}"),
        _rule("router-port", f"udp dport {{ {ROUTER_PORTS} }}"),
    ]
    return {port_chain(tap): port, transport_chain(tap): transport}


def _nft(script):
    try:
        return run(["nft", "-f", "-"], input=script, timeout=30)
    except CommandFailed as err:
        raise NetworkError(f"nft refused a change to table {FAMILY} {TABLE}: "
                           f"{(err.stderr or '').strip().splitlines()[:1]}") from err


def _table():
    """The table as nft's JSON objects, or None when it does not exist."""
    proc = run(["nft", "-j", "list", "table", FAMILY, TABLE], timeout=30, check=False)
    if proc.returncode != 0:
        if "No such file or directory" in proc.stderr:
            return None
        raise NetworkError(f"nft cannot list table {FAMILY} {TABLE}: {proc.stderr.strip()}")
    return [item for item in json.loads(proc.stdout)["nftables"] if "metainfo" not in item]


def _ports(objects):
    """{tap: chain} of the map's elements."""
    for item in objects:
        m = item.get("map")
        if m and m["name"] == MAP:
            return {elem[0]: elem[1]["jump"]["target"] for elem in m.get("elem", [])}
    return {}


def _chains(objects):
    return {item["chain"]["name"] for item in objects if "chain" in item}


def _base_script():
    t = f"{FAMILY} {TABLE}"
    return (f"add table {t}\n"
            f"add map {t} {MAP} {{ type ifname : verdict ; }}\n"
            f"add chain {t} {BASE_CHAIN} {{ type filter hook prerouting priority {PRIORITY} ; policy accept ; }}\n"
            f"add rule {t} {BASE_CHAIN} iifname vmap @{MAP}\n")


def protect(tap, mac, ip):
    """Install (or replace) ``tap``'s chains: only ``mac`` and ``ip`` may leave it."""
    chains = port_rules(tap, mac, ip)
    t = f"{FAMILY} {TABLE}"
    with flocked(LOCK_PATH):
        script = "" if _table() is not None else _base_script()
        script += "".join(f"add chain {t} {chain}\nflush chain {t} {chain}\n" for chain in chains)
        script += "".join(f"add rule {t} {chain} {rule}\n" for chain, rules in chains.items() for rule in rules)
        script += f'add element {t} {MAP} {{ "{tap}" : jump {port_chain(tap)} }}\n'
        _nft(script)


def unprotect(tap):
    """Remove ``tap``'s chain and map entry (and the table with its last port). Idempotent."""
    mine = [port_chain(tap), transport_chain(tap)]  # the port chain refers to the other: first
    t = f"{FAMILY} {TABLE}"
    with flocked(LOCK_PATH):
        objects = _table()
        if objects is None:
            return False
        ports, chains = _ports(objects), _chains(objects)
        if tap not in ports and not chains.intersection(mine):
            return False
        if set(ports) <= {tap} and chains <= {BASE_CHAIN, *mine}:
            _nft(f"delete table {t}\n")
            return True
        script = f'delete element {t} {MAP} {{ "{tap}" }}\n' if tap in ports else ""
        script += "".join(f"flush chain {t} {chain}\n" for chain in mine if chain in chains)
        script += "".join(f"delete chain {t} {chain}\n" for chain in mine if chain in chains)
        _nft(script)
    return True


def protected():
    """The taps that have a port chain now."""
    objects = _table()
    return sorted(_ports(objects)) if objects else []


def drop_counts(tap):
    """{rule name: packets dropped so far} of ``tap``'s chains (empty when it has none)."""
    counts = {}
    for chain in (port_chain(tap), transport_chain(tap)):
        proc = run(["nft", "-j", "list", "chain", FAMILY, TABLE, chain], timeout=30, check=False)
        if proc.returncode != 0:
            continue
        for item in json.loads(proc.stdout)["nftables"]:
            rule = item.get("rule")
            if rule is not None and "comment" in rule:
                packets = sum(expr["counter"]["packets"] for expr in rule["expr"] if "counter" in expr)
                counts[rule["comment"]] = counts.get(rule["comment"], 0) + packets
    return counts


def drops(tap):
    """Packets ``tap``'s port chain has dropped so far (0 when it has no chain)."""
    return sum(drop_counts(tap).values())
