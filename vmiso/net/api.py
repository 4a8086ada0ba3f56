"""The operator's API (``vmiso net``): bridges in the kernel plus their address plans.

A bridge's facts (MTU, STP, VLAN filtering, ports, addresses) live in the kernel and are read
back from it; what only vmiso knows (the subnet it allocates guests from, the address reserved
for the bridge, whether guest ports are isolated, whether a task may choose its address or MAC)
lives in the work directory's store. Only a bridge with a plan there takes guests: "create" on a
bridge someone else made adopts it (and converges it like one of vmiso's own).
"""
import ipaddress

from ..errors import InvalidSpec, NetworkError
from . import addr, bridge, ipam


def create_bridge(workdir, name, *, mtu=None, vlan_filtering=False, address=None, subnet=None,
                  isolated_ports=None, tenant_ip=None, tenant_mac=None, dns=None):
    """Ensure bridge ``name`` and its plan. ``address`` (A.B.C.D/NN) goes on the bridge and its
    subnet becomes the plan's unless ``subnet`` says otherwise; the address is never leased.
    ``tenant_ip``/``tenant_mac`` False: a task may not ask for its own address/MAC here. None
    keeps what the plan says. Everything is checked before anything changes; safe to repeat."""
    iface = addr.parse_cidr(address, "address") if address is not None else None
    net = addr.parse_subnet(subnet) if subnet is not None else (iface.network if iface else None)
    if iface is not None and iface.ip not in net:
        raise InvalidSpec("address", f"{iface} is not in the subnet {net}")
    store = ipam.Store(workdir)
    if net is not None:
        for cid, lease in store.leases(name).items():
            if ipaddress.IPv4Interface(lease["ip"]).ip not in net:
                raise InvalidSpec("subnet", f"{net} excludes {lease['ip']} leased to {cid}")
    info = bridge.ensure(name, mtu=mtu, vlan_filtering=vlan_filtering,
                         address=str(iface) if iface else None)
    store.set_plan(name, subnet=str(net) if net else None, gateway=str(iface.ip) if iface else None,
                   isolated_ports=isolated_ports, tenant_ip=tenant_ip, tenant_mac=tenant_mac, dns=dns)
    return _with_plan(info, store)


def delete_bridge(workdir, name, force=False):
    """Delete the bridge and its plan; refused while guests are on it (unless ``force``)."""
    store = ipam.Store(workdir)
    users = sorted(store.leases(name))
    if users and not force:
        raise NetworkError(f"bridge {name} still has leases: {', '.join(users)}")
    removed = bridge.delete(name, force=force)
    if not users:
        store.drop_plan(name)
    return removed


def show_bridge(workdir, name):
    return _with_plan(bridge.show(name), ipam.Store(workdir))


def list_bridges(workdir):
    store = ipam.Store(workdir)
    return [_with_plan(info, store) for info in bridge.list_bridges()]


def _with_plan(info, store):
    """``info`` plus the plan: ``managed`` (it has one: tasks may use the bridge), the subnet,
    the gateway, and the policies (None where there is no plan)."""
    plan = store.plan(info["name"])
    info = dict(info)
    info["managed"] = plan is not None
    plan = plan or {}
    info["subnet"] = plan.get("subnet")
    info["gateway"] = plan.get("gateway")
    info["isolated_ports"] = bool(plan.get("isolated_ports", False))
    info["dns"] = list(plan.get("dns", []))
    for key in ("tenant_ip", "tenant_mac"):
        info[key] = bool(plan.get(key, True)) if info["managed"] else None
    info["leases"] = {cid: {k: v for k, v in lease.items() if k != "bridge"}
                      for cid, lease in sorted(store.leases(info["name"]).items())}
    return info
