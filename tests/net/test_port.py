"""A guest's port in a throwaway namespace: tap, anti-spoofing rules and rate limits are made
before the guest could start and are all gone after release; checked with ip, nft -j and tc -j.
Traffic is tested too: frames from a veth that plays the guest, spoofed or not."""
import json
import re

import pytest

from vmiso.errors import AlreadyExists, InvalidSpec, NotFound
from vmiso.net import api, filter, ipam, port, ratelimit, tap
from vmiso.spec import NetworkSpec, RateLimit

from . import nsutil

pytestmark = pytest.mark.netns


def link_names():
    return {link["ifname"] for link in nsutil.ip_json("link", "show")}


def ruleset():
    return [o for o in nsutil.run_json("nft", "-j", "list", "ruleset")["nftables"] if "metainfo" not in o]


@pytest.fixture
def br(ns, wd):
    api.create_bridge(wd, "br0", mtu=1400, address="10.90.0.1/24")
    return "br0"


def test_wire_and_release(br, wd):
    spec = NetworkSpec(br, isolated=True, inbound=RateLimit(500, 1000, 64), outbound=RateLimit(250))
    lease = port.plan(wd, "c1", spec)
    assert lease["ip"] == "10.90.0.2/24"  # .1 is the bridge's own
    name = lease["tap"]
    assert len(name.encode()) <= 15 and name.startswith("vmi")
    port.wire(wd, lease, spec)
    link = nsutil.ip_json("-d", "link", "show", "dev", name)[0]
    assert link["master"] == br and link["mtu"] == 1400 and link["address"] == "fe" + lease["mac"][2:]
    assert link["linkinfo"]["info_slave_data"]["isolated"] is True
    assert link["linkinfo"]["info_data"]["type"] == "tap" and link["linkinfo"]["info_data"]["user"] in (
        "libvirt-qemu", "qemu", "root")
    chains = {o["chain"]["name"] for o in ruleset() if "chain" in o}
    assert chains == {"guest_ports", "port_" + name, "l4_" + name}
    qdiscs = ratelimit.show(name)
    assert {q["kind"] for q in qdiscs[name]} == {"htb", "ingress"}
    assert [q["kind"] for q in qdiscs[tap.ifb_name(name)]] == ["htb"]
    # tc's kbps are kilobytes (1000 bytes) per second: 500 KB/s = 4 Mbit/s, peak 8 Mbit/s.
    assert "rate 4Mbit ceil 8Mbit" in nsutil.run("tc", "class", "show", "dev", name).stdout
    assert "rate 2Mbit ceil 2Mbit" in nsutil.run("tc", "class", "show", "dev", tap.ifb_name(name)).stdout
    assert "mirred" in nsutil.run("tc", "filter", "show", "dev", name, "ingress").stdout
    # Again: the same lease, and wiring an existing tap is refused, not adopted.
    assert port.plan(wd, "c1", spec) == lease
    with pytest.raises(AlreadyExists):
        tap.create(name, bridge=br, guest_mac=lease["mac"])
    port.release(wd, "c1", name)
    assert name not in link_names() and tap.ifb_name(name) not in link_names()
    assert ruleset() == []  # the table goes with its last port
    assert ipam.Store(wd).lease("c1") is None
    port.release(wd, "c1", name)  # idempotent


def test_release_keeps_other_ports(br, wd):
    spec = NetworkSpec(br)
    leases = [port.plan(wd, cid, spec) for cid in ("c1", "c2")]
    for lease in leases:
        port.wire(wd, lease, spec)
    port.release(wd, "c1", leases[0]["tap"])
    assert filter.protected() == [leases[1]["tap"]]
    port.release(wd, "c2", leases[1]["tap"])
    assert filter.protected() == []


def test_bad_requests_change_nothing(br, wd):
    before_links, before_store = link_names(), ipam.Store(wd).leases()
    port.wire(wd, port.plan(wd, "c1", NetworkSpec(br, ip="10.90.0.50/24", mac="02:11:22:33:44:55")),
              NetworkSpec(br, ip="10.90.0.50/24", mac="02:11:22:33:44:55"))
    before_links, before_store = link_names(), ipam.Store(wd).leases()
    ipam.Store(wd).set_plan("gonebr", subnet="10.92.0.0/24")
    nsutil.run("ip", "link", "add", "otherbr", "type", "bridge")  # someone else's: no plan
    before_links, before_store = link_names(), ipam.Store(wd).leases()
    bad = [
        (InvalidSpec, NetworkSpec("nosuchbr")),                      # neither a plan nor a bridge
        (InvalidSpec, NetworkSpec("otherbr")),                       # a bridge, but not vmiso's
        (NotFound, NetworkSpec("gonebr")),                           # a plan whose bridge is gone
        (InvalidSpec, NetworkSpec(br, ip="10.91.0.5/24")),           # outside the subnet
        (AlreadyExists, NetworkSpec(br, ip="10.90.0.50/24")),        # taken
        (AlreadyExists, NetworkSpec(br, ip="10.90.0.1/24")),         # the bridge's own
        (AlreadyExists, NetworkSpec(br, mac="02:11:22:33:44:55")),   # duplicate MAC
    ]
    for error, spec in bad:
        with pytest.raises(error):
            port.plan(wd, "c2", spec)
        if spec.bridge != "gonebr":  # the one fact only the kernel has; plan() asks it
            with pytest.raises(error):
                port.check(wd, "c2", spec)
    port.check(wd, "c2", NetworkSpec("gonebr"))
    assert link_names() == before_links and ipam.Store(wd).leases() == before_store
    with pytest.raises(InvalidSpec):
        NetworkSpec(br, mac="01:00:5e:00:00:01")  # multicast: refused before anything runs
    port.release(wd, "c1")


def test_only_bridges_with_a_plan_take_guests(ns, wd):
    """A bridge vmiso did not make is refused, naming the command that adopts it; adopted, it works."""
    nsutil.run("ip", "link", "add", "lan0", "type", "bridge")
    nsutil.run("ip", "addr", "add", "10.93.0.1/24", "dev", "lan0")
    with pytest.raises(InvalidSpec, match="vmiso net bridge create lan0") as info:
        port.plan(wd, "c1", NetworkSpec("lan0"))
    assert info.value.field == "bridge" and ipam.Store(wd).leases() == {}
    info = api.create_bridge(wd, "lan0", subnet="10.93.0.0/24")
    assert info["managed"] and info["addresses"][0] == "10.93.0.1/24"
    lease = port.plan(wd, "c1", NetworkSpec("lan0"))
    assert lease["ip"] == "10.93.0.2/24"  # .1 is the bridge's own address in the kernel, though not in the plan
    with pytest.raises(AlreadyExists, match="bridge's own"):
        port.plan(wd, "c2", NetworkSpec("lan0", ip="10.93.0.1/24"))
    port.release(wd, "c1")


def test_operator_forbids_tenant_identities(ns, wd):
    api.create_bridge(wd, "br0", address="10.94.0.1/24", tenant_ip=False, tenant_mac=False)
    for spec, field in ((NetworkSpec("br0", ip="10.94.0.9/24"), "ip"),
                        (NetworkSpec("br0", mac="02:00:00:00:00:09"), "mac")):
        with pytest.raises(InvalidSpec, match="operator's policy") as info:
            port.plan(wd, "c1", spec)
        assert info.value.field == field
    assert ipam.Store(wd).leases() == {} and not [n for n in link_names() if n.startswith("vmi")]
    lease = port.plan(wd, "c1", NetworkSpec("br0"))
    assert lease["ip"] == "10.94.0.2/24"
    port.release(wd, "c1")


def _guest_veth(br, mac, ip):
    """A veth on the bridge standing in for a guest, its far end in a namespace of its own,
    filtered as the guest's tap would be (the rules match on the bridge port's name)."""
    inner = nsutil.unique("vmtg")
    nsutil.run("ip", "netns", "add", inner)
    nsutil.run("ip", "link", "add", "vmigst0", "type", "veth", "peer", "name", "eth0", "netns", inner)
    nsutil.run("ip", "link", "set", "vmigst0", "master", br, "up")
    nsutil.run("ip", "link", "set", "eth0", "address", mac, "up", ns=inner)
    nsutil.run("ip", "link", "set", "lo", "up", ns=inner)
    nsutil.run("ip", "addr", "add", ip, "dev", "eth0", ns=inner)
    filter.protect("vmigst0", mac, ip)
    return inner


def _ping(inner, target):
    return nsutil.run("busybox", "ping", "-c", "1", "-W", "2", target, ns=inner, check=False).returncode == 0


def test_spoofed_traffic_is_dropped(br, wd):
    inner = _guest_veth(br, "02:00:00:00:00:0a", "10.90.0.10/24")
    try:
        assert _ping(inner, "10.90.0.1")              # its own MAC and IP: through
        nsutil.run("ip", "addr", "flush", "dev", "eth0", ns=inner)
        nsutil.run("ip", "addr", "add", "10.90.0.11/24", "dev", "eth0", ns=inner)
        nsutil.run("ip", "neigh", "flush", "all", ns=inner)
        assert not _ping(inner, "10.90.0.1")          # another IP: dropped
        nsutil.run("ip", "addr", "flush", "dev", "eth0", ns=inner)
        nsutil.run("ip", "addr", "add", "10.90.0.10/24", "dev", "eth0", ns=inner)
        nsutil.run("ip", "link", "set", "eth0", "address", "02:00:00:00:00:0b", ns=inner)
        assert not _ping(inner, "10.90.0.1")          # another MAC: dropped
        assert filter.drops("vmigst0") > 0
    finally:
        filter.unprotect("vmigst0")
        nsutil.run("ip", "netns", "del", inner, check=False)
    assert ruleset() == []


def test_rules_are_what_the_docs_say(br):
    filter.protect("vmiaaaa", "02:00:00:00:00:01", "10.90.0.7/24")
    filter.protect("vmiaaaa", "02:00:00:00:00:01", "10.90.0.7/24")  # idempotent: replaced, not doubled
    chains = ["port_vmiaaaa", "l4_vmiaaaa"]
    rules = [o["rule"] for chain in chains for o in ruleset() if "rule" in o and o["rule"]["chain"] == chain]
    expected = filter.port_rules("vmiaaaa", "02:00:00:00:00:01", "10.90.0.7/24")
    assert list(expected) == chains and len(rules) == sum(map(len, expected.values()))
    text = "".join(nsutil.run("nft", "list", "chain", "bridge", "vmiso", chain).stdout for chain in chains)
    for needle in ("ether saddr != 02:00:00:00:00:01", "arp saddr ip != { 0.0.0.0, 10.90.0.7 }",
                   "ip saddr != 10.90.0.7", "ip6 saddr != { ::, fe80::ff:fe00:1 }",
                   "@th,64,128 != 0xfe80000000000000000000fffe000001",  # NA/DAD targets: its link-local
                   "@th,208,48 != 0x20000000001",  # NS/NA link-layer address options: its MAC
                   "udp sport { 67, 68, 546, 547 }", "udp dport { 67, 68, 546, 547 }",
                   "meta l4proto { eigrp, ospf, pim, vrrp }", "limit rate over 100/second burst 200 packets"):
        assert needle in text, text
    assert "accept" not in text  # nothing is let through early: every frame meets every rule
    # Only frames nft parsed to their transport header go on to the transport chain; the rest of
    # IPv4/IPv6 is dropped right after.
    assert "meta l4proto 0-255 goto l4_vmiaaaa" in text and "ether type { ip, ip6 } counter" in text
    # Every other rule counts its drops under a name, and the names are the module docstring's table.
    drops = [r for r in rules if "goto" not in json.dumps(r["expr"])]
    assert len(drops) == len(rules) - 1
    assert all(r["expr"][-2:] == [{"counter": {"packets": 0, "bytes": 0}}, {"drop": None}] for r in drops)
    names = [r["comment"] for r in drops]
    documented = re.findall(r"^  ([a-z0-9-]+) {2,}\S", filter.__doc__, re.MULTILINE)
    assert sorted(set(names)) == sorted(documented) and list(dict.fromkeys(names)) == documented
    assert filter.drop_counts("vmiaaaa") == dict.fromkeys(documented, 0)
    assert filter.unprotect("vmiaaaa") is True
    assert filter.unprotect("vmiaaaa") is False
    assert json.dumps(ruleset()) == "[]"
