"""Anti-spoofing for guest ports: a ``bridge``-family nftables table owned by vmiso.

::

  table bridge vmiso {
    map ports { type ifname : verdict }              tap name -> jump port_<tap>
    chain guest_ports { type filter hook prerouting priority -200; iifname vmap @ports }
    chain port_<tap> { ... }                         one per guest: what may leave its tap
  }

The prerouting hook sees every frame a guest sends before the bridge forwards or delivers it,
so a dropped frame reaches neither another guest nor the host. A guest may send only its own
MAC, its own IPv4 (in ARP and IP; 0.0.0.0 only as a DHCP client), IPv6 only from its EUI-64
link-local address (or :: during address autoconfiguration), no VLAN tags, no other ethertypes,
and no DHCP/DHCPv6 server replies, router advertisements or redirects. Each drop rule counts.

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


def port_rules(mac, ip):
    """The rules of a guest's port chain, as nft statements (in order)."""
    mac = addr.parse_mac(mac)
    ip = ipaddress.IPv4Interface(ip).ip
    ll = addr.link_local(mac)
    return [
        f"ether saddr != {mac} counter drop",
        "ether type != { ip, arp, ip6 } counter drop",  # VLAN tags (8021q, 8021ad) among them
        f"arp saddr ether != {mac} counter drop",
        f"arp saddr ip != {{ 0.0.0.0, {ip} }} counter drop",
        "ip saddr 0.0.0.0 ip daddr 255.255.255.255 udp sport 68 udp dport 67 accept",
        f"ip saddr != {ip} counter drop",
        f"ip6 saddr != {{ ::, {ll} }} counter drop",
        "udp sport { 67, 547 } counter drop",  # DHCP and DHCPv6 server replies
        "icmpv6 type { nd-router-advert, nd-redirect } counter drop",
    ]


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
    """Install (or replace) ``tap``'s port chain: only ``mac`` and ``ip`` may leave it."""
    chain = port_chain(tap)
    t = f"{FAMILY} {TABLE}"
    rules = "".join(f"add rule {t} {chain} {rule}\n" for rule in port_rules(mac, ip))
    with flocked(LOCK_PATH):
        script = "" if _table() is not None else _base_script()
        script += (f"add chain {t} {chain}\n"
                   f"flush chain {t} {chain}\n"
                   f"{rules}"
                   f'add element {t} {MAP} {{ "{tap}" : jump {chain} }}\n')
        _nft(script)


def unprotect(tap):
    """Remove ``tap``'s chain and map entry (and the table with its last port). Idempotent."""
    chain = port_chain(tap)
    t = f"{FAMILY} {TABLE}"
    with flocked(LOCK_PATH):
        objects = _table()
        if objects is None:
            return False
        ports, chains = _ports(objects), _chains(objects)
        if tap not in ports and chain not in chains:
            return False
        if set(ports) <= {tap} and chains <= {BASE_CHAIN, chain}:
            _nft(f"delete table {t}\n")
            return True
        script = f'delete element {t} {MAP} {{ "{tap}" }}\n' if tap in ports else ""
        if chain in chains:
            script += f"flush chain {t} {chain}\ndelete chain {t} {chain}\n"
        _nft(script)
    return True


def protected():
    """The taps that have a port chain now."""
    objects = _table()
    return sorted(_ports(objects)) if objects else []


def drops(tap):
    """Packets ``tap``'s port chain has dropped so far (0 when it has no chain)."""
    proc = run(["nft", "-j", "list", "chain", FAMILY, TABLE, port_chain(tap)], timeout=30, check=False)
    if proc.returncode != 0:
        return 0
    return sum(expr["counter"]["packets"] for item in json.loads(proc.stdout)["nftables"]
               for expr in item.get("rule", {}).get("expr", []) if "counter" in expr)
