"""``vmiso net``: operator bridges (create/delete/list/show), guest leases, and the wiring
benchmark; also the ``--network`` option's parser for ``vmiso run``. Only calls vmiso.net."""
import argparse
import json

from ..errors import InvalidSpec
from ..spec import NetworkSpec, RateLimit


def register(sub):
    p = sub.add_parser("net", help="bridges, address plans and guest ports",
                       description="Operator networking. Every 'create' converges on the declared state "
                                   "and is safe to repeat; inspect the result with ip, bridge and nft too.")
    nsub = p.add_subparsers(dest="net_command", metavar="COMMAND")
    nsub.required = True

    b = nsub.add_parser("bridge", help="create, delete, list or show bridges")
    bsub = b.add_subparsers(dest="bridge_command", metavar="ACTION")
    bsub.required = True
    c = bsub.add_parser("create", help="create a bridge, or adopt and converge an existing one",
                        description="STP off, guest router advertisements kept from the host, the MTU "
                                    "set on the bridge and all its ports. Tasks may use only bridges "
                                    "made or adopted this way (they have an address plan).")
    c.add_argument("name")
    c.add_argument("--mtu", type=int, help="MTU of the bridge and every port (68-65535)")
    c.add_argument("--vlan-filtering", action="store_true",
                   help="filter VLANs (needs the kernel's CONFIG_BRIDGE_VLAN_FILTERING)")
    c.add_argument("--address", metavar="CIDR", help="the bridge's own address, e.g. 10.77.0.1/24; its "
                                                     "subnet becomes the guests' unless --subnet")
    c.add_argument("--subnet", metavar="CIDR", help="the subnet guests get addresses from")
    c.add_argument("--isolated-ports", action="store_true", default=None,
                   help="guest ports are isolated: they reach the bridge and other ports, not each other")
    c.add_argument("--tenant-ip", action=argparse.BooleanOptionalAction, default=None,
                   help="whether a task may ask for its own address (--network ...,ip=); default: yes on a "
                        "new plan, unchanged on an existing one")
    c.add_argument("--tenant-mac", action=argparse.BooleanOptionalAction, default=None,
                   help="whether a task may ask for its own MAC (--network ...,mac=); default as --tenant-ip")
    c.add_argument("--dns", metavar="A.B.C.D[,...]",
                   help="name servers guests on this bridge are told of (their /etc/resolv.conf); '' for none")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=bridge_create)
    d = bsub.add_parser("delete", help="delete a bridge (refused while guests are on it)")
    d.add_argument("name")
    d.add_argument("--force", action="store_true", help="delete even with guests on it")
    d.set_defaults(func=bridge_delete)
    ls = bsub.add_parser("list", help="every bridge of this host")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=bridge_list)
    s = bsub.add_parser("show", help="one bridge: ports, addresses, plan, leases")
    s.add_argument("name")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=bridge_show)

    bench = nsub.add_parser("bench", help="the same as 'vmiso bench net' (kept for old scripts)",
                            description="Measured in a throwaway network namespace; medians in ms.")
    bench.add_argument("-n", "--iterations", type=int, default=30)
    bench.add_argument("--json", action="store_true")
    bench.set_defaults(func=run_bench)


def register_bench(bsub):
    """``vmiso bench net``: for the bench command to call with its sub-parsers."""
    q = bsub.add_parser("net", help="wire+unwire one guest port: pyroute2 vs ip/bridge commands")
    q.add_argument("-n", "--iterations", type=int, default=30)
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=run_bench)


def _print(obj, as_json):
    if as_json:
        print(json.dumps(obj, indent=1, sort_keys=True))
        return
    for bridge in obj if isinstance(obj, list) else [obj]:
        ports = ", ".join(p["name"] + (" (isolated)" if p["isolated"] else "") for p in bridge["ports"]) or "-"
        print(f"{bridge['name']}: mtu {bridge['mtu']}, stp {'on' if bridge['stp'] else 'off'}, vlan filtering "
              f"{'on' if bridge['vlan_filtering'] else 'off'}, addresses {' '.join(bridge['addresses']) or '-'}, "
              f"subnet {bridge['subnet'] or '-'}, ports {ports}")
        if bridge["managed"]:
            print(f"  plan: isolated ports {_yes(bridge['isolated_ports'])}, tenant ip= {_yes(bridge['tenant_ip'])}, "
                  f"tenant mac= {_yes(bridge['tenant_mac'])}, dns {' '.join(bridge['dns']) or '-'}")
        else:
            print("  no plan: not vmiso's (tasks cannot use it until 'vmiso net bridge create' adopts it)")
        for cid, lease in bridge["leases"].items():
            print(f"  {cid}: {lease['ip']} {lease['mac']} {lease.get('tap') or ''}")


def _yes(flag):
    return "yes" if flag else "no"


def bridge_create(args):
    from ..net import api

    _print(api.create_bridge(args.workdir, args.name, mtu=args.mtu, vlan_filtering=args.vlan_filtering,
                             address=args.address, subnet=args.subnet, isolated_ports=args.isolated_ports,
                             tenant_ip=args.tenant_ip, tenant_mac=args.tenant_mac,
                             dns=None if args.dns is None else [s for s in args.dns.split(",") if s]),
           args.json)


def bridge_delete(args):
    from ..net import api

    api.delete_bridge(args.workdir, args.name, force=args.force)


def bridge_list(args):
    from ..net import api

    _print(api.list_bridges(args.workdir), args.json)


def bridge_show(args):
    from ..net import api

    _print(api.show_bridge(args.workdir, args.name), args.json)


def run_bench(args):
    from ..net import bench

    result = bench.measure(max(1, args.iterations))
    if args.json:
        print(json.dumps(result))
    else:
        print(f"wire+unwire one port ({result['iterations']} runs, medians): pyroute2 {result['pyroute2_ms']} ms, "
              f"ip/bridge commands {result['ip_cmd_ms']} ms ({result['speedup']}x)")


# --- vmiso run --network ------------------------------------------------------------------------
_FLAGS = ("isolated",)
_VALUES = ("vlan", "ip", "mac", "inbound", "outbound")


def _rate(key, text):
    parts = text.split(":")
    if not 1 <= len(parts) <= 3 or not all(p.isdigit() for p in parts if p):
        raise InvalidSpec("network", f"{key}={text!r} is not AVERAGE[:PEAK[:BURST]] (KB/s, KB/s, KB)")
    average, peak, burst = (parts + ["", ""])[:3]
    return RateLimit(int(average), int(peak) if peak else None, int(burst) if burst else None)


def parse_network(text):
    """``BRIDGE[,vlan=N][,ip=A.B.C.D/NN][,mac=M][,isolated][,inbound=A[:P[:B]]][,outbound=...]``
    as a NetworkSpec; InvalidSpec (field ``network``) for anything else."""
    bridge, *items = str(text).split(",")
    if not bridge:
        raise InvalidSpec("network", f"{text!r}: the bridge name comes first (BRIDGE[,vlan=N][,ip=CIDR][,isolated])")
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if key in options:
            raise InvalidSpec("network", f"{key} given twice")
        if key in _FLAGS and (not sep or value in ("1", "true", "yes", "on")):
            options[key] = True
        elif key in _FLAGS and value in ("0", "false", "no", "off"):
            options[key] = False
        elif key in _VALUES and sep:
            options[key] = value
        else:
            raise InvalidSpec("network", f"{item!r} is not one of vlan=N, ip=CIDR, mac=MAC, isolated, "
                                         f"inbound=AVG[:PEAK[:BURST]], outbound=...")
    if "vlan" in options:
        if not options["vlan"].isdigit():
            raise InvalidSpec("vlan", f"{options['vlan']!r} is not a number")
        options["vlan"] = int(options["vlan"])
    for key in ("inbound", "outbound"):
        if key in options:
            options[key] = _rate(key, options[key])
    return NetworkSpec(bridge, **options)
