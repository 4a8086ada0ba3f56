"""Operator bridges in the kernel: ensure (create or converge), delete, inspect.

``ensure`` is safe to repeat: it creates what is missing and converges what differs (STP off,
MTU on the bridge and every port, VLAN filtering, an address) and leaves the rest alone. Every
argument is checked, and every kernel feature it needs detected, before anything is changed.
Guest router advertisements are kept from the host by accept_ra=0 on the bridge (the per-port
filters drop them before other guests see them, see filter.py).
"""
import errno
import ipaddress

from ..errors import AlreadyExists, InvalidSpec, KernelFeatureMissing, NetworkError
from . import _nl, addr, features

MIN_MTU = 68        # IPv4's minimum; the kernel's own floor for Ethernet devices
MAX_MTU = 65535     # ETH_MAX_MTU; ports may allow less (a tap: 65521)
TAP_PREFIX = "vmi"  # ports vmiso made itself (tap.py): the bridge is in use while one is there


def validate_mtu(mtu, ceiling=MAX_MTU):
    if isinstance(mtu, bool) or not isinstance(mtu, int) or not MIN_MTU <= mtu <= ceiling:
        raise InvalidSpec("mtu", f"{mtu!r} is outside {MIN_MTU}..{ceiling}")
    return mtu


def ensure(name, *, mtu=None, vlan_filtering=False, address=None):
    """Create bridge ``name`` or converge it to the declared state; return show(name)."""
    addr.validate_ifname(name, "bridge")
    if mtu is not None:
        validate_mtu(mtu)
    iface = addr.parse_cidr(address, "address") if address is not None else None
    with _nl.iproute() as ipr, _nl.doing(f"ensuring bridge {name}"):
        link = _existing_bridge(ipr, name)
        if vlan_filtering:
            features.require_vlan_filtering(f"bridge {name} with --vlan-filtering", link)
        if link is not None and mtu is not None:
            ports = _ports(ipr, link["index"])
            ceiling = min([MAX_MTU] + [p.get("IFLA_MAX_MTU") or MAX_MTU for p in ports])
            validate_mtu(mtu, ceiling)  # a port that cannot follow would leave them inconsistent
        if link is None:
            attrs = {"br_stp_state": 0, "address": addr.derive_mac("bridge:" + name)}
            if vlan_filtering:
                attrs["br_vlan_filtering"] = 1
            _create(ipr, name, attrs)
            link = _existing_bridge(ipr, name)
        _converge(ipr, link, mtu, vlan_filtering)
        if iface is not None:
            _ensure_address(ipr, link["index"], iface)
        ipr.link("set", index=link["index"], state="up")
    _no_router_advertisements(name)
    return show(name)


def _create(ipr, name, attrs):
    try:
        ipr.link("add", ifname=name, kind="bridge", **attrs)
    except _nl.netlink_error_type() as err:
        if err.code == errno.EOPNOTSUPP and "br_vlan_filtering" in attrs:
            raise KernelFeatureMissing(features.VLAN_FILTERING, f"creating bridge {name}") from err
        if err.code == errno.EEXIST:
            raise AlreadyExists("interface", name) from err
        raise


def _existing_bridge(ipr, name):
    """The bridge's link message, None when absent; an interface of another kind is refused."""
    index = _nl.link_index(ipr, name)
    if index is None:
        return None
    link = ipr.get_links(index)[0]
    if _nl.kind(link) != "bridge":
        raise AlreadyExists("interface (not a bridge)", name)
    return link


def _converge(ipr, link, mtu, vlan_filtering):
    data = _nl.info_data(link)
    index = link["index"]
    if data.get("IFLA_BR_STP_STATE", 0) != 0:
        ipr.link("set", index=index, kind="bridge", br_stp_state=0)
    if bool(data.get("IFLA_BR_VLAN_FILTERING", 0)) != bool(vlan_filtering):
        ipr.link("set", index=index, kind="bridge", br_vlan_filtering=int(bool(vlan_filtering)))
    if mtu is not None:
        # The bridge first, then its ports: a bridge's MTU set by hand no longer follows them.
        if link.get("IFLA_MTU") != mtu:
            ipr.link("set", index=index, mtu=mtu)
        for port in _ports(ipr, index):
            if port.get("IFLA_MTU") != mtu:
                ipr.link("set", index=port["index"], mtu=mtu)


def _ensure_address(ipr, index, iface):
    have = {ipaddress.ip_interface(a) for a in _nl.addresses(ipr, index)}
    if iface not in have:
        ipr.addr("add", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen)


def _no_router_advertisements(name):
    """The host never takes a router advertisement that came in over this bridge."""
    try:
        with open(f"/proc/sys/net/ipv6/conf/{name}/accept_ra", "w") as f:
            f.write("0\n")
    except FileNotFoundError:
        pass  # IPv6 disabled: nothing to accept


def _ports(ipr, index):
    return [link for link in ipr.get_links() if link.get("IFLA_MASTER") == index]


def delete(name, force=False):
    """Remove bridge ``name``; no error if it is gone. A bridge that still has vmiso's taps is
    refused unless ``force`` (their VMs would lose their network)."""
    addr.validate_ifname(name, "bridge")
    with _nl.iproute() as ipr, _nl.doing(f"deleting bridge {name}"):
        link = _existing_bridge(ipr, name)
        if link is None:
            return False
        taps = [p.get("IFLA_IFNAME") for p in _ports(ipr, link["index"])
                if p.get("IFLA_IFNAME", "").startswith(TAP_PREFIX)]
        if taps and not force:
            raise NetworkError(f"bridge {name} still has guest ports: {', '.join(taps)}", errno.EBUSY)
        ipr.link("del", index=link["index"])
    return True


def show(name):
    """What the kernel says about bridge ``name`` (NotFound if there is none), as a dict."""
    addr.validate_ifname(name, "bridge")
    with _nl.iproute() as ipr, _nl.doing(f"reading bridge {name}"):
        link = _existing_bridge(ipr, name)
        if link is None:
            from ..errors import NotFound

            raise NotFound("bridge", name)
        return _describe(ipr, link)


def list_bridges():
    """show() of every bridge in this network namespace, by name."""
    with _nl.iproute() as ipr, _nl.doing("listing bridges"):
        links = [link for link in ipr.get_links() if _nl.kind(link) == "bridge"]
        return sorted((_describe(ipr, link) for link in links), key=lambda b: b["name"])


def _describe(ipr, link):
    data = _nl.info_data(link)
    ports = []
    for port in _ports(ipr, link["index"]):
        slave = port.get_nested("IFLA_LINKINFO", "IFLA_INFO_SLAVE_DATA")
        slave = dict(slave["attrs"]) if slave else {}
        ports.append({"name": port.get("IFLA_IFNAME"), "mtu": port.get("IFLA_MTU"),
                      "kind": _nl.kind(port), "isolated": bool(slave.get("IFLA_BRPORT_ISOLATED", 0))})
    return {
        "name": link.get("IFLA_IFNAME"),
        "mac": link.get("IFLA_ADDRESS"),
        "mtu": link.get("IFLA_MTU"),
        "up": link.get("IFLA_OPERSTATE") == "UP" or bool(link["flags"] & 1),
        "stp": bool(data.get("IFLA_BR_STP_STATE", 0)),
        "vlan_filtering": bool(data.get("IFLA_BR_VLAN_FILTERING", 0)),
        "vlan_filtering_supported": features.vlan_filtering_available(link),
        "addresses": _nl.addresses(ipr, link["index"]),
        "ports": sorted(ports, key=lambda p: p["name"]),
    }
