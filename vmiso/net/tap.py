"""A guest's tap device: its name, creation, bridge port settings and removal (pyroute2).

vmiso makes the tap itself (libvirt gets it as ``managed='no'``), so every port setting is in
place before QEMU starts: owner (the QEMU user), the bridge, the bridge's MTU, the untagged VLAN,
port isolation, the tap's MAC (the guest's with 0xfe first, see addr.tap_mac).
Names are ``vmi`` + 12 hex digits of a hash of the container id: 15 bytes, and a name another
interface holds already is skipped (a different attempt number, a different hash).
"""
import errno
import pwd

from ..errors import AlreadyExists, KernelFeatureMissing, NetworkError, NotFound
from . import _nl, addr, features
from .bridge import TAP_PREFIX

QEMU_USERS = ("libvirt-qemu", "qemu")
MAX_NAME_ATTEMPTS = 32


def candidate_name(container_id, attempt=0):
    return addr.short_name(TAP_PREFIX, "tap:" + container_id, attempt)


def ifb_name(tap):
    """The tap's companion ifb device (outbound rate limits): same hash, another prefix."""
    return "vmo" + tap[len(TAP_PREFIX):]


def choose_name(container_id, reserved=()):
    """A free tap name for ``container_id``: not an existing interface, not in ``reserved``."""
    with _nl.iproute() as ipr, _nl.doing("choosing a tap name"):
        for attempt in range(MAX_NAME_ATTEMPTS):
            name = candidate_name(container_id, attempt)
            if name not in reserved and _nl.link_index(ipr, name) is None \
                    and _nl.link_index(ipr, ifb_name(name)) is None:
                return name
    raise NetworkError(f"no free interface name for {container_id} after {MAX_NAME_ATTEMPTS} tries")


def host_macs():
    """Every MAC on this namespace's interfaces (a guest's MAC must not collide with them)."""
    with _nl.iproute() as ipr, _nl.doing("listing interfaces"):
        return {link.get("IFLA_ADDRESS") for link in ipr.get_links() if link.get("IFLA_ADDRESS")}


def _qemu_owner():
    for user in QEMU_USERS:
        try:
            entry = pwd.getpwnam(user)
            return entry.pw_uid, entry.pw_gid
        except KeyError:
            continue
    return None


def create(name, *, bridge, guest_mac, vlan=None, isolated=False):
    """Create tap ``name`` on ``bridge`` with every port setting. Refuses an existing ``name``
    (never adopts someone else's interface); on any failure removes what it made."""
    addr.validate_ifname(name, "tap")
    with _nl.iproute() as ipr:
        with _nl.doing(f"checking bridge {bridge}"):
            bridge_index = _nl.link_index(ipr, bridge)
            if bridge_index is None:
                raise NotFound("bridge", bridge)
            bridge_link = ipr.get_links(bridge_index)[0]
            if _nl.kind(bridge_link) != "bridge":
                raise NotFound("bridge", bridge)
            if vlan is not None:
                features.require_vlan_filtering(f"VLAN {vlan} on bridge {bridge}", bridge_link)
            if _nl.link_index(ipr, name) is not None:
                # pyroute2's tuntap "add" would silently attach to an existing persistent tap.
                raise AlreadyExists("interface", name)
        owner = _qemu_owner()
        ifr = {"no_pi": True, "vnet_hdr": True}  # what QEMU asks for when it attaches
        try:
            with _nl.doing(f"creating tap {name}"):
                extra = {"uid": owner[0], "gid": owner[1]} if owner else {}
                ipr.link("add", ifname=name, kind="tuntap", mode="tap", ifr=ifr, **extra)
            with _nl.doing(f"attaching tap {name} to {bridge}"):
                index = _nl.link_index(ipr, name)
                ipr.link("set", index=index, address=addr.tap_mac(guest_mac),
                         mtu=bridge_link.get("IFLA_MTU"), master=bridge_index)
                if isolated:
                    ipr.brport("set", index=index, isolated=1)
                if vlan is not None:
                    _set_pvid(ipr, index, vlan)
                ipr.link("set", index=index, state="up")
        except BaseException:
            delete(name)
            raise


def _set_pvid(ipr, index, vlan):
    """The port's only VLAN is ``vlan``, untagged both ways (the guest never sees a tag)."""
    try:
        ipr.vlan_filter("del", index=index, vlan_info={"vid": 1})  # the bridge's default PVID
        ipr.vlan_filter("add", index=index, vlan_info={"vid": vlan, "flags": ["pvid", "untagged"]})
    except _nl.netlink_error_type() as err:
        if err.code == errno.EOPNOTSUPP:
            raise KernelFeatureMissing(features.VLAN_FILTERING, f"VLAN {vlan}") from err
        raise


def delete(name):
    """Remove tap ``name`` (its qdiscs go with it); no error if it is gone. Only vmiso's names."""
    if not name.startswith(TAP_PREFIX):
        raise NetworkError(f"refusing to delete {name!r}: not a vmiso tap name")
    with _nl.iproute() as ipr, _nl.doing(f"deleting tap {name}"):
        index = _nl.link_index(ipr, name)
        if index is None:
            return False
        try:
            ipr.link("del", index=index)
        except _nl.netlink_error_type() as err:
            if err.code != errno.ENODEV:  # gone between lookup and delete: that is the goal
                raise
    return True


def counters(name):
    """The tap's kernel counters (IFLA_STATS64) as a dict, or None when the tap is gone."""
    with _nl.iproute() as ipr, _nl.doing(f"reading tap {name}"):
        index = _nl.link_index(ipr, name)
        if index is None:
            return None
        return dict(ipr.get_links(index)[0].get("IFLA_STATS64") or {})
