"""One guest's network end to end, as the Isolator uses it: plan, wire, unwire, release.

  check()    refuses a request the bridge's plan refuses (a bridge vmiso does not manage, an
             address or MAC the plan or another lease rules out), changing nothing and asking
             no netlink: what a launch asks before it makes anything.
  plan()     checks the bridge (and the kernel, for a VLAN), then leases an address, a MAC and a
             tap name in the work directory's store (ipam.py). Before the seed is built: the
             guest learns its address from the seed's network-config.
  wire()     tap on the bridge (tap.py), anti-spoofing (filter.py), rate limits (ratelimit.py);
             before the domain is created, so the guest's first frame is already filtered.
  unwire()   the reverse; every part is tried even if one fails, and each is idempotent.
  release()  unwire() plus the lease: what the Isolator calls when the VM has ended.

Nothing here is imported when vmiso is (the Isolator imports it only for tasks with a network).
"""
import logging
import os

from ..errors import NotFound
from . import _nl, features, filter, ipam, ratelimit, tap

log = logging.getLogger(__name__)


def check(workdir, container_id, spec):
    """Raise what the bridge's plan says against NetworkSpec ``spec``, changing nothing. Only
    the store is read: plan() checks all of it again under the store's lock, with the kernel's
    facts too (the bridge is there, its own addresses, the host's MACs)."""
    ipam.Store(workdir).check(container_id, spec.bridge, ip=spec.ip, mac=spec.mac)


def plan(workdir, container_id, spec):
    """Lease what ``container_id``'s NIC needs per NetworkSpec ``spec``; returns the lease dict
    (bridge, ip, mac, tap). Bad input raises before anything is stored."""
    store = ipam.Store(workdir)
    store.require_plan(spec.bridge)  # first: a bridge that is not vmiso's is not even looked up
    bridge_link, own = _bridge(spec.bridge)
    if spec.vlan is not None:
        features.require_vlan_filtering(f"VLAN {spec.vlan} on bridge {spec.bridge}", bridge_link)
    reserved = {lease.get("tap") for lease in store.leases().values()}
    name = tap.choose_name(container_id, reserved)
    lease = store.allocate(container_id, spec.bridge, ip=spec.ip, mac=spec.mac, tap=name,
                           taken_macs=tap.host_macs(), reserved_ips=own)
    lease["mtu"] = bridge_link.get("IFLA_MTU")
    lease["dns"] = (store.plan(spec.bridge) or {}).get("dns", [])
    return lease


def _bridge(name):
    """The bridge's link message and its IPv4 addresses in the kernel; NotFound if it is none."""
    with _nl.iproute() as ipr, _nl.doing(f"looking up bridge {name}"):
        index = _nl.link_index(ipr, name)
        link = ipr.get_links(index)[0] if index is not None else None
        if link is None or _nl.kind(link) != "bridge":
            raise NotFound("bridge", name)
        own = [a.split("/")[0] for a in _nl.addresses(ipr, index) if ":" not in a]
    return link, own


def network_config(lease):
    """The seed's ``network-config`` (version 2) for ``lease``: the NIC matched by its MAC and
    named eth0, the static address, the bridge's MTU. No default route: vmiso's guests reach
    their own subnet only, unless the operator's image configures more."""
    eth = {"match": {"macaddress": lease["mac"]}, "set-name": "eth0", "addresses": [lease["ip"]]}
    if lease.get("mtu"):
        eth["mtu"] = lease["mtu"]
    if lease.get("dns"):
        eth["nameservers"] = {"addresses": list(lease["dns"])}
    return {"version": 2, "ethernets": {"eth0": eth}}


def wire(workdir, lease, spec):
    """Make the guest's port: tap, filters, limits. On failure, removes all of it."""
    isolated = spec.isolated or bool((ipam.Store(workdir).plan(spec.bridge) or {}).get("isolated_ports"))
    name = lease["tap"]
    try:
        tap.create(name, bridge=spec.bridge, guest_mac=lease["mac"], vlan=spec.vlan, isolated=isolated)
        filter.protect(name, lease["mac"], lease["ip"])
        if spec.inbound is not None or spec.outbound is not None:
            ratelimit.apply(name, spec.inbound, spec.outbound)
    except BaseException:
        unwire(name)
        raise


def unwire(name):
    """Remove the port ``name``: the tap first (no frame can pass after it), then its filter
    chain and its ifb. Tries every part; raises the first error after trying all."""
    first = None
    for step in (tap.delete, filter.unprotect, ratelimit.remove):
        try:
            step(name)
        except Exception as err:  # noqa: BLE001 - every part must be tried; the first error is raised
            log.warning("unwiring %s: %s", name, err)
            first = first or err
    if first is not None:
        raise first


def release(workdir, container_id, name=None):
    """Unwire ``container_id``'s port and free its lease. Idempotent; ``name`` is the tap from
    the checkpoint (used when the store has no lease, e.g. after a crash between the two)."""
    store = ipam.Store(workdir)
    if name is None and not os.path.exists(store.path):
        return  # no network was ever planned in this work directory
    lease = store.lease(container_id)
    names = {n for n in (name, lease and lease.get("tap")) if n}
    for n in names:
        unwire(n)
    store.release(container_id)
