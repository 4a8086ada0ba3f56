"""Bridges in a throwaway namespace, checked with ``ip -d -j link``: ensure is idempotent, bad
input changes nothing, delete leaves nothing."""
import json

import pytest

from vmiso.errors import AlreadyExists, InvalidSpec, KernelFeatureMissing, NetworkError, NotFound
from vmiso.net import api, bridge, features, port
from vmiso.spec import NetworkSpec

from . import nsutil

pytestmark = pytest.mark.netns


def links():
    """``ip -d -j link`` by name, without the running timers (they change by themselves)."""
    out = {}
    for link in nsutil.ip_json("-d", "link", "show"):
        data = link.get("linkinfo", {}).get("info_data")
        if isinstance(data, dict):
            for key in [k for k in data if k.endswith("_timer")]:
                del data[key]
        out[link["ifname"]] = link
    return out


def test_create_is_idempotent_and_converges(ns, wd):
    info = api.create_bridge(wd, "br0", mtu=1400, address="10.77.0.1/24", isolated_ports=True)
    assert info["mtu"] == 1400 and not info["stp"] and info["subnet"] == "10.77.0.0/24"
    first = links()["br0"]
    assert first["mtu"] == 1400 and first["linkinfo"]["info_data"]["stp_state"] == 0
    assert [a["local"] for a in nsutil.ip_json("addr", "show", "dev", "br0")[0]["addr_info"]] == ["10.77.0.1"]
    assert nsutil.run("cat", "/proc/sys/net/ipv6/conf/br0/accept_ra").stdout.strip() == "0"
    again = api.create_bridge(wd, "br0", mtu=1400, address="10.77.0.1/24", isolated_ports=True)
    assert again == info
    second = links()["br0"]
    assert (second["address"], second["mtu"], second["linkinfo"]) == (first["address"], first["mtu"],
                                                                        first["linkinfo"])
    # Converge: STP switched on by hand goes off again; a new MTU reaches the bridge and its ports.
    nsutil.run("ip", "link", "set", "br0", "type", "bridge", "stp_state", "1")
    nsutil.run("ip", "link", "add", "vmtx0", "type", "veth", "peer", "name", "vmtx1")
    nsutil.run("ip", "link", "set", "vmtx0", "master", "br0")
    api.create_bridge(wd, "br0", mtu=1300)
    now = links()
    assert now["br0"]["linkinfo"]["info_data"]["stp_state"] == 0
    assert now["br0"]["mtu"] == 1300 and now["vmtx0"]["mtu"] == 1300


def test_bad_input_changes_nothing(ns, wd):
    api.create_bridge(wd, "br0", address="10.77.0.1/24")
    before = links()
    for kwargs in ({"mtu": 67}, {"mtu": 65536}, {"mtu": "1500"}, {"address": "10.77.0.0/24"},
                   {"address": "300.1.1.1/24"}, {"address": "10.1.1.1/24", "subnet": "10.2.0.0/24"}):
        with pytest.raises(InvalidSpec):
            api.create_bridge(wd, "br0", **kwargs)
    with pytest.raises(InvalidSpec):
        api.create_bridge(wd, "bad/name")
    with pytest.raises(InvalidSpec):
        api.create_bridge(wd, "a" * 16)
    nsutil.run("ip", "link", "add", "vmtx0", "type", "veth", "peer", "name", "vmtx1")
    with pytest.raises(AlreadyExists):  # an interface that is no bridge is never touched
        api.create_bridge(wd, "vmtx0")
    assert {k: v for k, v in links().items() if not k.startswith("vmtx")} == before
    with pytest.raises(NotFound):
        api.show_bridge(wd, "nope")


def test_cli_stores_and_shows_the_tenant_policy(ns, wd, capsys):
    from vmiso.cli.main import main

    argv = ["--workdir", str(wd), "net", "bridge"]
    assert main([*argv, "create", "br0", "--address", "10.77.0.1/24", "--no-tenant-ip", "--no-tenant-mac",
                 "--json"]) == 0
    created = json.loads(capsys.readouterr().out)
    assert (created["managed"], created["tenant_ip"], created["tenant_mac"]) == (True, False, False)
    assert main([*argv, "create", "br0", "--tenant-mac"]) == 0  # only what is given changes
    text = capsys.readouterr().out
    assert "tenant ip= no, tenant mac= yes" in text, text
    assert main([*argv, "show", "br0", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["tenant_ip"], shown["tenant_mac"], shown["subnet"]) == (False, True, "10.77.0.0/24")
    nsutil.run("ip", "link", "add", "lan0", "type", "bridge")
    assert main([*argv, "list", "--json"]) == 0
    listed = {b["name"]: b for b in json.loads(capsys.readouterr().out)}
    assert listed["br0"]["tenant_ip"] is False
    assert (listed["lan0"]["managed"], listed["lan0"]["tenant_ip"]) == (False, None)
    assert main([*argv, "list"]) == 0
    assert "lan0: " in (out := capsys.readouterr().out) and "no plan: not vmiso's" in out, out
    assert main([*argv, "create", "lan0"]) == 0  # adopting: a plan, the defaults
    assert "tenant ip= yes, tenant mac= yes" in capsys.readouterr().out


def test_mtu_above_what_a_port_allows_is_refused(ns, wd):
    api.create_bridge(wd, "br0")
    nsutil.run("ip", "tuntap", "add", "dev", "vmtx0", "mode", "tap")
    nsutil.run("ip", "link", "set", "vmtx0", "master", "br0")
    with pytest.raises(InvalidSpec, match="mtu"):
        api.create_bridge(wd, "br0", mtu=65535)  # a tap's maximum is 65521
    assert links()["vmtx0"]["mtu"] == 1500


def test_delete_leaves_nothing_and_is_idempotent(ns, wd):
    api.create_bridge(wd, "br0", subnet="10.78.0.0/24")
    assert [b["name"] for b in api.list_bridges(wd)] == ["br0"]
    assert api.delete_bridge(wd, "br0") is True
    assert "br0" not in links()
    assert api.delete_bridge(wd, "br0") is False
    assert api.list_bridges(wd) == []
    with pytest.raises(NotFound):
        api.show_bridge(wd, "br0")


def test_delete_refused_while_a_guest_is_on_it(ns, wd):
    api.create_bridge(wd, "br0", subnet="10.79.0.0/24")
    spec = NetworkSpec("br0")
    lease = port.plan(wd, "c1", spec)
    port.wire(wd, lease, spec)
    with pytest.raises(NetworkError, match="c1"):
        api.delete_bridge(wd, "br0")
    assert "br0" in links()
    port.release(wd, "c1", lease["tap"])
    assert api.delete_bridge(wd, "br0") is True


def test_vlan_filtering_detected(ns, wd):
    api.create_bridge(wd, "br0")
    link = links()["br0"]
    has_pvid = "vlan_default_pvid" in link["linkinfo"]["info_data"]
    assert bridge.show("br0")["vlan_filtering_supported"] is has_pvid


@pytest.mark.skipif(features.vlan_filtering_available(), reason="the kernel has bridge VLAN filtering")
def test_vlan_request_without_the_kernel_feature_names_it_and_changes_nothing(ns, wd):
    before = links()
    with pytest.raises(KernelFeatureMissing, match="CONFIG_BRIDGE_VLAN_FILTERING"):
        api.create_bridge(wd, "br0", vlan_filtering=True)
    assert links() == before
    api.create_bridge(wd, "br1", subnet="10.80.0.0/24")
    before = links()
    with pytest.raises(KernelFeatureMissing) as info:
        port.plan(wd, "c1", NetworkSpec("br1", vlan=10))
    assert info.value.feature == features.VLAN_FILTERING
    assert links() == before and api.show_bridge(wd, "br1")["leases"] == {}


@pytest.mark.skipif(not features.vlan_filtering_available(),
                    reason=f"this kernel lacks {features.VLAN_FILTERING}")
def test_vlan_port_gets_untagged_pvid(ns, wd):
    api.create_bridge(wd, "br0", vlan_filtering=True, subnet="10.81.0.0/24")
    spec = NetworkSpec("br0", vlan=42)
    lease = port.plan(wd, "c1", spec)
    port.wire(wd, lease, spec)
    vlans = {e["ifname"]: e["vlans"] for e in nsutil.run_json("bridge", "-j", "vlan", "show")}
    assert vlans[lease["tap"]] == [{"vlan": 42, "flags": ["PVID", "Egress Untagged"]}]
    port.release(wd, "c1", lease["tap"])
