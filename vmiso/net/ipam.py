"""Address plans and leases, kept on disk so no address or MAC is handed out twice, across
restarts and across processes.

One JSON file per work directory, ``<workdir>/net/ipam.json`` (0600), changed only under an
exclusive flock of ``<workdir>/net/ipam.lock`` and replaced atomically (temp file, fsync,
rename), so a crash leaves the old store or the new one::

  {"version": 1,
   "plans":  {"<bridge>": {"subnet": "10.77.0.0/24", "gateway": "10.77.0.1", "isolated_ports": false,
                           "tenant_ip": true, "tenant_mac": true}},
   "leases": {"<container id>": {"bridge": "...", "ip": "10.77.0.2/24", "mac": "02:..", "tap": "vmi.."}}}

A lease is keyed by its container id: releasing by id is idempotent, and whatever a crashed
launch allocated is found again by the id alone.

Identities are the operator's policy, not the tenant's choice: a task gets a port only on a
bridge that has a plan here (made by ``vmiso net bridge create``); an address it asks for must
lie in the plan's subnet and be neither the subnet's network or broadcast address, nor the
bridge's own, nor another lease; and the plan may forbid asking for an address or a MAC at all
(``tenant_ip``/``tenant_mac`` false). A missing flag counts as true (plans written before them).
"""
import contextlib
import ipaddress
import json
import os

from ..errors import AlreadyExists, InvalidSpec, NetworkError, NotFound
from ..files import flocked, write_atomic
from ..paths import Workdir
from . import addr

VERSION = 1
STORE = "ipam.json"
LOCK = "ipam.lock"
MAX_MAC_ATTEMPTS = 64


class Store:
    """The plan and lease store of one work directory. Every method is one locked transaction."""

    def __init__(self, workdir):
        self.dir = str(Workdir.of(workdir).net)
        self.path = os.path.join(self.dir, STORE)

    @contextlib.contextmanager
    def _locked(self, write):
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        with flocked(os.path.join(self.dir, LOCK), shared=not write):
            data = self._read()
            yield data
            if write:
                self._write(data)

    def _read(self):
        try:
            with open(self.path, "rb") as f:
                data = json.loads(f.read() or b"{}")
        except FileNotFoundError:
            data = {}
        except ValueError as err:
            raise NetworkError(f"address store {self.path} is corrupt: {err}") from err
        if data and data.get("version") != VERSION:
            raise NetworkError(f"address store {self.path} has version {data.get('version')}, not {VERSION}")
        data.setdefault("version", VERSION)
        data.setdefault("plans", {})
        data.setdefault("leases", {})
        return data

    def _write(self, data):
        # The shared atomic write: a short os.write or a crash can no longer leave half a store.
        write_atomic(self.path, json.dumps(data, sort_keys=True, indent=1).encode() + b"\n", 0o600)

    # --- plans ----------------------------------------------------------------------------------
    def set_plan(self, bridge, *, subnet=None, gateway=None, isolated_ports=None, tenant_ip=None,
                 tenant_mac=None, dns=None):
        """Declare (or change) a bridge's plan; None leaves a field as it is (a new plan: no
        subnet, ports not isolated, tenants may ask for an address and a MAC, no DNS servers).
        ``dns``: the name servers guests on it are told of (IPv4 addresses; [] for none). A
        subnet that would strand a lease is refused."""
        addr.validate_ifname(bridge, "bridge")
        servers = [str(ipaddress.IPv4Address(s)) for s in _addresses(dns, "dns")] if dns is not None else None
        net = addr.parse_subnet(subnet) if subnet is not None else None
        gw = ipaddress.IPv4Address(gateway) if gateway is not None else None
        if net is not None and gw is not None and gw not in net:
            raise InvalidSpec("address", f"{gw} is not in {net}")
        with self._locked(write=True) as data:
            plan = dict(data["plans"].get(bridge, {"isolated_ports": False, "tenant_ip": True, "tenant_mac": True}))
            if net is not None:
                for cid, lease in data["leases"].items():
                    if lease["bridge"] == bridge and ipaddress.IPv4Interface(lease["ip"]).ip not in net:
                        raise InvalidSpec("subnet", f"{net} excludes {lease['ip']} leased to {cid}")
                plan["subnet"] = str(net)
            if gw is not None:
                plan["gateway"] = str(gw)
            for key, value in (("isolated_ports", isolated_ports), ("tenant_ip", tenant_ip),
                               ("tenant_mac", tenant_mac)):
                if value is not None:
                    plan[key] = bool(value)
            if servers is not None:
                plan["dns"] = servers
            data["plans"][bridge] = plan
            return dict(plan)

    def plan(self, bridge):
        """The bridge's plan as a dict, None when it has none (vmiso does not manage it)."""
        with self._locked(write=False) as data:
            plan = data["plans"].get(bridge)
            return dict(plan) if plan is not None else None

    def require_plan(self, bridge):
        """The bridge's plan; InvalidSpec (field ``bridge``) when it has none."""
        plan = self.plan(bridge)
        if plan is None:
            raise _unmanaged(self.path, bridge)
        return plan

    def drop_plan(self, bridge):
        """Forget a bridge's plan; refused while a lease is on it."""
        with self._locked(write=True) as data:
            users = sorted(c for c, lease in data["leases"].items() if lease["bridge"] == bridge)
            if users:
                raise NetworkError(f"bridge {bridge} still has leases: {', '.join(users)}")
            data["plans"].pop(bridge, None)

    # --- leases ---------------------------------------------------------------------------------
    def allocate(self, owner, bridge, *, ip=None, mac=None, tap=None, taken_macs=(), reserved_ips=()):
        """Lease an address and a MAC on ``bridge`` to ``owner``; returns the lease (a dict).

        The bridge must have a plan. ``ip``: a requested ``A.B.C.D/NN`` (the plan must allow it,
        and it must be a free host address of the plan's subnet); None: the lowest free one.
        ``mac``: requested (the plan must allow it; locally administered unicast, unused) or None
        (derived from the owner). ``taken_macs``: MACs in use on the host outside the store;
        ``reserved_ips``: the bridge's own addresses in the kernel besides the plan's gateway.
        Allocating again for an owner that holds a lease returns that lease unchanged.
        """
        with self._locked(write=True) as data:
            if owner in data["leases"]:
                return dict(data["leases"][owner])
            lease = _choose(self.path, data, owner, bridge, ip, mac, taken_macs, reserved_ips)
            lease["tap"] = tap
            data["leases"][owner] = lease
            return dict(lease)

    def check(self, owner, bridge, *, ip=None, mac=None, taken_macs=(), reserved_ips=()):
        """Raise what allocate() would raise for this request, changing nothing (a launch asks
        before it makes anything; allocate() checks again under its lock)."""
        with self._locked(write=False) as data:
            if owner not in data["leases"]:
                _choose(self.path, data, owner, bridge, ip, mac, taken_macs, reserved_ips)

    def set_tap(self, owner, tap):
        with self._locked(write=True) as data:
            if owner not in data["leases"]:
                raise NotFound("lease", owner)
            data["leases"][owner]["tap"] = tap

    def release(self, owner):
        """Free ``owner``'s lease; returns it (None when it had none). Idempotent."""
        with self._locked(write=True) as data:
            return data["leases"].pop(owner, None)

    def lease(self, owner):
        with self._locked(write=False) as data:
            lease = data["leases"].get(owner)
            return dict(lease) if lease else None

    def leases(self, bridge=None):
        with self._locked(write=False) as data:
            return {c: dict(v) for c, v in data["leases"].items() if bridge is None or v["bridge"] == bridge}


def _choose(path, data, owner, bridge, ip, mac, taken_macs, reserved_ips):
    """A new lease's bridge, ip and mac for this request, or the error that refuses it."""
    plan = data["plans"].get(bridge)
    if plan is None:
        raise _unmanaged(path, bridge)
    leases = data["leases"]
    on_bridge = {ipaddress.IPv4Interface(v["ip"]).ip: c for c, v in leases.items() if v["bridge"] == bridge}
    own = {ipaddress.IPv4Address(a) for a in reserved_ips}
    if plan.get("gateway"):
        own.add(ipaddress.IPv4Address(plan["gateway"]))
    iface = _choose_ip(bridge, plan, on_bridge, own, ip)
    used = {v["mac"] for v in leases.values()} | {m.lower() for m in taken_macs}
    return {"bridge": bridge, "ip": str(iface), "mac": _choose_mac(bridge, plan, owner, mac, used)}


def _unmanaged(path, bridge):
    return InvalidSpec("bridge", f"{bridge} is not a bridge vmiso manages (it has no plan in {path}): an "
                                 f"operator creates or adopts it with 'vmiso net bridge create {bridge} --subnet CIDR'")


def _choose_ip(bridge, plan, on_bridge, own, requested):
    net = ipaddress.IPv4Network(plan["subnet"]) if plan.get("subnet") else None
    if requested is not None:
        if not plan.get("tenant_ip", True):
            raise InvalidSpec("ip", f"bridge {bridge} does not let a task choose its address (the operator's "
                                    f"policy): leave ip= out and one is assigned")
        if net is None:
            raise InvalidSpec("ip", f"bridge {bridge} has no subnet to check {requested} against: the operator "
                                    f"declares one with 'vmiso net bridge create {bridge} --subnet CIDR'")
        iface = addr.parse_cidr(requested, "ip")  # refuses the network and broadcast addresses
        if iface.ip not in net or iface.network != net:
            raise InvalidSpec("ip", f"{iface} is outside bridge {bridge}'s subnet {net}")
        if iface.ip in own:
            raise AlreadyExists("address (the bridge's own)", str(iface.ip))
        if iface.ip in on_bridge:
            raise AlreadyExists("address", f"{iface.ip} (leased to {on_bridge[iface.ip]})")
        return iface
    if net is None:
        raise InvalidSpec("ip", f"bridge {bridge} has no subnet to allocate from: the operator declares one "
                                f"with 'vmiso net bridge create {bridge} --subnet CIDR'")
    for host in net.hosts():
        if host not in own and host not in on_bridge:
            return ipaddress.IPv4Interface(f"{host}/{net.prefixlen}")
    raise NetworkError(f"subnet {net} of bridge {bridge} has no free address")


def _choose_mac(bridge, plan, owner, requested, used):
    if requested is not None:
        if not plan.get("tenant_mac", True):
            raise InvalidSpec("mac", f"bridge {bridge} does not let a task choose its MAC (the operator's "
                                     f"policy): leave mac= out and one is assigned")
        mac = addr.guest_mac(requested)
        if mac in used or addr.tap_mac(mac) in used:
            raise AlreadyExists("MAC address", mac)
        return mac
    for attempt in range(MAX_MAC_ATTEMPTS):
        mac = addr.derive_mac("guest:" + owner, attempt)
        if mac not in used and addr.tap_mac(mac) not in used:
            return mac
    raise NetworkError(f"no free MAC address for {owner} after {MAX_MAC_ATTEMPTS} tries")


MAX_DNS_SERVERS = 3  # what resolv.conf's resolver reads (MAXNS)


def _addresses(values, field):
    """The IPv4 addresses in ``values`` (a list), checked; InvalidSpec otherwise."""
    if isinstance(values, str) or len(values) > MAX_DNS_SERVERS:
        raise InvalidSpec(field, f"must be a list of at most {MAX_DNS_SERVERS} IPv4 addresses")
    try:
        return [ipaddress.IPv4Address(v) for v in values]
    except (ipaddress.AddressValueError, ValueError) as err:
        raise InvalidSpec(field, str(err)) from err
