"""Pure rules (no root): names, MACs, addresses, the address store, NetworkSpec, --network."""
import json
import os
import threading

import pytest

from vmiso.cli.net import parse_network
from vmiso.errors import AlreadyExists, InvalidSpec, NetworkError
from vmiso.net import addr, ipam, port, tap
from vmiso.spec import NetworkSpec, RateLimit, TaskSpec


@pytest.mark.parametrize("cid", ["a", "x" * 64, "job.1_2-3"])
def test_tap_names_fit_and_are_stable(cid):
    name = tap.candidate_name(cid)
    assert len(name.encode()) == 15 and name.startswith("vmi") and name == tap.candidate_name(cid)
    assert tap.ifb_name(name).startswith("vmo") and len(tap.ifb_name(name)) == 15
    assert tap.candidate_name(cid, 1) != name


def test_ids_that_collide_when_shortened_get_different_names():
    a, b = "x" * 63 + "a", "x" * 63 + "b"
    assert tap.candidate_name(a) != tap.candidate_name(b)


def test_derived_macs_are_local_unicast_and_stable():
    for i in range(200):
        mac = addr.derive_mac(f"guest:c{i}")
        first = int(mac[:2], 16)
        assert first & 1 == 0 and first & 2 == 2
        assert addr.parse_mac(mac) == mac
    assert addr.derive_mac("s") == addr.derive_mac("s") != addr.derive_mac("s", 1)
    assert addr.tap_mac("02:aa:bb:cc:dd:ee") == "fe:aa:bb:cc:dd:ee"
    assert str(addr.link_local("02:00:00:00:00:01")) == "fe80::ff:fe00:1"


@pytest.mark.parametrize("mac", ["01:00:5e:00:00:01", "ff:ff:ff:ff:ff:ff", "00:00:00:00:00:00",
                                 "33:33:00:00:00:01", "02:00:00:00:00", "zz:00:00:00:00:00", 5])
def test_bad_macs(mac):
    with pytest.raises(InvalidSpec):
        addr.parse_mac(mac)


@pytest.mark.parametrize("kwargs", [
    {"bridge": "a" * 16}, {"bridge": "br/0"}, {"bridge": ""}, {"bridge": "br 0"},
    {"bridge": "br0", "vlan": 0}, {"bridge": "br0", "vlan": 4095}, {"bridge": "br0", "vlan": 1.5},
    {"bridge": "br0", "vlan": True}, {"bridge": "br0", "ip": "10.0.0.1"}, {"bridge": "br0", "ip": "10.0.0.255/24"},
    {"bridge": "br0", "ip": "224.0.0.1/24"}, {"bridge": "br0", "ip": "fe80::1/64"},
    {"bridge": "br0", "mac": "ff:ff:ff:ff:ff:ff"}, {"bridge": "br0", "isolated": "yes"},
    {"bridge": "br0", "inbound": 100},
])
def test_network_spec_refuses(kwargs):
    with pytest.raises(InvalidSpec):
        NetworkSpec(**kwargs)


def test_network_spec_normalises_and_rate_limits_validate():
    spec = NetworkSpec("br0", vlan=4094, ip=" 10.0.0.5/24", mac="02-AA-bb-cc-dd-ee", isolated=True)
    assert (spec.ip, spec.mac) == ("10.0.0.5/24", "02:aa:bb:cc:dd:ee")
    assert TaskSpec(["true"], network=spec).network is spec
    with pytest.raises(InvalidSpec):
        TaskSpec(["true"], network="br0")
    for bad in ({"average": 0}, {"average": 10, "peak": 5}, {"average": 10, "burst": 0}, {"average": float("nan")}):
        with pytest.raises(InvalidSpec):
            RateLimit(**bad)


def test_parse_network_option():
    assert parse_network("br0") == NetworkSpec("br0")
    assert parse_network("br0,vlan=12,ip=10.1.2.3/24,isolated") == NetworkSpec(
        "br0", vlan=12, ip="10.1.2.3/24", isolated=True)
    assert parse_network("br0,mac=02:00:00:00:00:09,inbound=100:200:32,outbound=50") == NetworkSpec(
        "br0", mac="02:00:00:00:00:09", inbound=RateLimit(100, 200, 32), outbound=RateLimit(50))
    for bad in ("", ",vlan=1", "br0,vlan=x", "br0,vlan=0", "br0,color=red", "br0,ip=1.2.3.4",
                "br0,isolated=maybe", "br0,vlan=1,vlan=2", "br0,inbound=1:2:3:4"):
        with pytest.raises(InvalidSpec):
            parse_network(bad)


def test_store_allocates_lowest_free_and_persists(tmp_path):
    store = ipam.Store(tmp_path)
    store.set_plan("br0", subnet="10.5.0.0/29", gateway="10.5.0.1")
    got = [store.allocate(f"c{i}", "br0")["ip"] for i in range(5)]
    assert got == [f"10.5.0.{i}/29" for i in range(2, 7)]
    with pytest.raises(NetworkError, match="no free address"):
        store.allocate("c9", "br0")
    # A new Store (another process, after a restart) sees the same leases.
    again = ipam.Store(tmp_path)
    assert again.allocate("c0", "br0")["ip"] == "10.5.0.2/29"  # same owner: same lease
    assert again.release("c2")["ip"] == "10.5.0.4/29"
    assert again.release("c2") is None
    assert again.allocate("c7", "br0")["ip"] == "10.5.0.4/29"
    assert oct(os.stat(again.path).st_mode & 0o777) == "0o600"
    with open(again.path) as f:
        assert json.loads(f.read())["version"] == 1


def test_store_refuses_bad_requests_without_changing(tmp_path):
    store = ipam.Store(tmp_path)
    store.set_plan("br0", subnet="10.6.0.0/24", gateway="10.6.0.1")
    first = store.allocate("c1", "br0", ip="10.6.0.9/24", mac="02:00:00:00:00:01")
    before = store.leases()
    for kwargs, error in (({"ip": "10.7.0.9/24"}, InvalidSpec), ({"ip": "10.6.0.9/16"}, InvalidSpec),
                          ({"ip": "10.6.0.9/24"}, AlreadyExists), ({"ip": "10.6.0.1/24"}, AlreadyExists),
                          ({"mac": "02:00:00:00:00:01"}, AlreadyExists)):
        with pytest.raises(error):
            store.allocate("c2", "br0", **kwargs)
    with pytest.raises(AlreadyExists):  # a MAC that is on the host already
        store.allocate("c2", "br0", taken_macs={addr.derive_mac("guest:c2")}, mac=addr.derive_mac("guest:c2"))
    assert store.leases() == before and first["mac"] == "02:00:00:00:00:01"
    with pytest.raises(InvalidSpec, match="no subnet"):
        store.allocate("c3", "other")
    assert store.allocate("c3", "other", ip="192.168.9.9/24")["ip"] == "192.168.9.9/24"  # no plan: as given
    with pytest.raises(InvalidSpec, match="excludes"):
        store.set_plan("br0", subnet="10.8.0.0/24")
    with pytest.raises(NetworkError, match="c1"):
        store.drop_plan("br0")


def test_derived_mac_skips_taken_ones(tmp_path):
    store = ipam.Store(tmp_path)
    taken = addr.derive_mac("guest:c1")
    lease = store.allocate("c1", "b", ip="10.0.0.2/24", taken_macs={taken})
    assert lease["mac"] == addr.derive_mac("guest:c1", 1)


def test_concurrent_allocations_never_collide(tmp_path):
    ipam.Store(tmp_path).set_plan("br0", subnet="10.9.0.0/24")
    results = []
    threads = [threading.Thread(target=lambda i=i: results.append(ipam.Store(tmp_path).allocate(f"c{i}", "br0")))
               for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({r["ip"] for r in results}) == 20 and len({r["mac"] for r in results}) == 20


def test_network_config_is_v2_with_mac_match():
    config = port.network_config({"mac": "02:00:00:00:00:01", "ip": "10.0.0.2/24", "mtu": 1400})
    assert config == {"version": 2, "ethernets": {"eth0": {
        "match": {"macaddress": "02:00:00:00:00:01"}, "set-name": "eth0", "addresses": ["10.0.0.2/24"],
        "mtu": 1400}}}


def test_importing_vmiso_net_imports_no_pyroute2():
    import subprocess
    import sys

    code = ("import sys, vmiso, vmiso.spec, vmiso.net.port, vmiso.net.api; "
            "vmiso.spec.NetworkSpec('br0'); assert 'pyroute2' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
