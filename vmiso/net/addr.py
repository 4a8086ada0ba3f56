"""Pure rules for network names and addresses: interface names, MACs (a guest's among them), IPv4 CIDRs.

No netlink here (spec.py validates with these, and importing vmiso must stay cheap). Every
check raises InvalidSpec naming the field, so bad input is refused before anything changes.
"""
import hashlib
import ipaddress
import re

from ..errors import InvalidSpec

IFNAMSIZ = 15  # the kernel's limit in bytes, without the NUL
# What `ip` accepts and nft/tc can quote safely: no '/', ':', whitespace, quotes or control bytes.
_IFNAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}")
_MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")


def validate_ifname(name, field="bridge"):
    """Return ``name`` if it is a usable interface name (<= 15 bytes, plain characters)."""
    if not isinstance(name, str) or not _IFNAME_RE.fullmatch(name) or name in (".", ".."):
        raise InvalidSpec(field, f"{name!r} is not a valid interface name (1-15 of A-Z a-z 0-9 _ . -)")
    return name


def parse_mac(text, field="mac"):
    """``text`` as a normalised lowercase MAC; multicast, broadcast and all-zero MACs refused."""
    if not isinstance(text, str):
        raise InvalidSpec(field, f"must be a string, not {type(text).__name__}")
    mac = text.strip().lower().replace("-", ":")
    if not _MAC_RE.fullmatch(mac):
        raise InvalidSpec(field, f"{text!r} is not a MAC address (six hex octets)")
    first = int(mac[:2], 16)
    if first & 1:  # the I/G bit: multicast, and broadcast ff:ff:ff:ff:ff:ff with it
        raise InvalidSpec(field, f"{mac} is a multicast or broadcast address, not a unicast one")
    if mac == "00:00:00:00:00:00":
        raise InvalidSpec(field, "00:00:00:00:00:00 is not a usable address")
    return mac


def guest_mac(text, field="mac"):
    """``text`` as a MAC a guest may have: locally administered unicast. A globally unique
    (vendor) MAC names someone's hardware, which a tenant must not be able to impersonate, and
    ``fe:..`` is the host side of vmiso's own taps (tap_mac), so both are refused."""
    mac = parse_mac(text, field)
    first = int(mac[:2], 16)
    if not first & 0x02:  # the U/L bit
        raise InvalidSpec(field, f"{mac} is a globally unique (vendor) address; a guest's MAC must be "
                                 f"locally administered unicast (first octet x2, x6, xa or xe, e.g. 02:...)")
    if first == TAP_OCTET:
        raise InvalidSpec(field, f"{mac}: MACs beginning with {TAP_OCTET:02x} are the host side of vmiso's taps")
    return mac


TAP_OCTET = 0xFE  # first octet of every tap's own MAC (tap_mac); never a guest's


def derive_mac(seed, attempt=0):
    """A locally administered unicast MAC from ``seed`` (stable: same seed, same MAC), never
    beginning with TAP_OCTET (its tap's MAC would then be its own)."""
    digest = hashlib.sha256(f"{seed}\0{attempt}".encode()).digest()
    octets = bytearray(digest[:6])
    octets[0] = (octets[0] & 0xFC) | 0x02  # U/L bit set (local), I/G bit clear (unicast)
    if octets[0] == TAP_OCTET:
        octets[0] = 0x02
    return ":".join(f"{b:02x}" for b in octets)


def tap_mac(guest_mac):
    """The tap's own MAC: the guest's with the first octet 0xfe, as libvirt does, so the high
    byte keeps the bridge from ever taking a tap's address as its own."""
    return f"{TAP_OCTET:02x}" + guest_mac[2:]


def link_local(mac):
    """The EUI-64 IPv6 link-local address a guest derives from ``mac``."""
    octets = bytes.fromhex(mac.replace(":", ""))
    eui = bytes([octets[0] ^ 0x02]) + octets[1:3] + b"\xff\xfe" + octets[3:]
    return ipaddress.IPv6Address(b"\xfe\x80" + b"\0" * 6 + eui)


def parse_cidr(text, field="ip"):
    """``A.B.C.D/NN`` as an IPv4Interface; the subnet's network and broadcast addresses refused."""
    if not isinstance(text, str) or "/" not in text:
        raise InvalidSpec(field, f"{text!r} is not an IPv4 address with a prefix length (A.B.C.D/NN)")
    try:
        iface = ipaddress.IPv4Interface(text.strip())
    except ValueError as err:
        raise InvalidSpec(field, f"{text!r} is not an IPv4 address with a prefix length: {err}") from err
    net = iface.network
    if net.prefixlen < 31 and iface.ip in (net.network_address, net.broadcast_address):
        raise InvalidSpec(field, f"{iface.ip} is the network or broadcast address of {net}")
    if iface.ip.is_multicast or iface.ip.is_unspecified or iface.ip.is_loopback:
        raise InvalidSpec(field, f"{iface.ip} cannot be a host's address")
    return iface


def parse_subnet(text, field="subnet"):
    """``A.B.C.D/NN`` as an IPv4Network (host bits must be zero)."""
    try:
        net = ipaddress.IPv4Network(str(text).strip(), strict=True)
    except ValueError as err:
        raise InvalidSpec(field, f"{text!r} is not an IPv4 subnet: {err}") from err
    if net.prefixlen > 30:
        raise InvalidSpec(field, f"{net} is too small for guests (at most /30)")
    return net


def short_name(prefix, seed, attempt=0):
    """``prefix`` + hex of a hash of ``seed``, exactly IFNAMSIZ bytes: a name that is the same for
    the same seed and collides with another seed's only by hash chance (callers check)."""
    digest = hashlib.sha256(f"{seed}\0{attempt}".encode()).hexdigest()
    return prefix + digest[:IFNAMSIZ - len(prefix)]
