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
    firsts = set()
    for i in range(2000):
        mac = addr.derive_mac(f"guest:c{i}")
        first = int(mac[:2], 16)
        assert first & 1 == 0 and first & 2 == 2 and first != addr.TAP_OCTET
        assert addr.guest_mac(mac) == mac and addr.tap_mac(mac) != mac
        firsts.add(first)
    assert len(firsts) == 63  # every local unicast first octet but the taps' one
    assert addr.derive_mac("s") == addr.derive_mac("s") != addr.derive_mac("s", 1)
    assert addr.tap_mac("02:aa:bb:cc:dd:ee") == "fe:aa:bb:cc:dd:ee"
    assert str(addr.link_local("02:00:00:00:00:01")) == "fe80::ff:fe00:1"


@pytest.mark.parametrize("mac", ["01:00:5e:00:00:01", "ff:ff:ff:ff:ff:ff", "00:00:00:00:00:00",
                                 "33:33:00:00:00:01", "02:00:00:00:00", "zz:00:00:00:00:00", 5])
def test_bad_macs(mac):
    with pytest.raises(InvalidSpec):
        addr.parse_mac(mac)
    with pytest.raises(InvalidSpec):
        addr.guest_mac(mac)


@pytest.mark.parametrize("mac, why", [("00:1b:21:aa:bb:cc", "vendor"), ("a8:a1:59:00:00:01", "vendor"),
                                      ("fe:00:00:00:00:01", "taps"), ("03:00:00:00:00:01", "multicast")])
def test_guest_macs_are_locally_administered_unicast(mac, why):
    with pytest.raises(InvalidSpec, match=why) as info:
        addr.guest_mac(mac)
    assert info.value.field == "mac"
    for good in ("02:00:00:00:00:01", "06:1b:21:aa:bb:cc", "ae:00:00:00:00:01", "fa:00:00:00:00:01"):
        assert addr.guest_mac(good.upper()) == good


@pytest.mark.parametrize("kwargs", [
    {"bridge": "a" * 16}, {"bridge": "br/0"}, {"bridge": ""}, {"bridge": "br 0"},
    {"bridge": "br0", "vlan": 0}, {"bridge": "br0", "vlan": 4095}, {"bridge": "br0", "vlan": 1.5},
    {"bridge": "br0", "vlan": True}, {"bridge": "br0", "ip": "10.0.0.1"}, {"bridge": "br0", "ip": "10.0.0.255/24"},
    {"bridge": "br0", "ip": "224.0.0.1/24"}, {"bridge": "br0", "ip": "fe80::1/64"},
    {"bridge": "br0", "mac": "ff:ff:ff:ff:ff:ff"}, {"bridge": "br0", "mac": "00:1b:21:aa:bb:cc"},
    {"bridge": "br0", "mac": "fe:1b:21:aa:bb:cc"}, {"bridge": "br0", "isolated": "yes"},
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
                "br0,isolated=maybe", "br0,vlan=1,vlan=2", "br0,inbound=1:2:3:4", "br0,mac=00:1b:21:aa:bb:cc"):
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
    for kwargs in ({}, {"ip": "192.168.9.9/24"}):  # a bridge without a plan is not vmiso's: nothing goes
        with pytest.raises(InvalidSpec, match="vmiso net bridge create other") as info:
            store.allocate("c3", "other", **kwargs)
        assert info.value.field == "bridge"
    store.set_plan("other")  # adopted, but no subnet: nothing to allocate from, nothing to check against
    for kwargs in ({}, {"ip": "192.168.9.9/24"}):
        with pytest.raises(InvalidSpec, match="no subnet"):
            store.allocate("c3", "other", **kwargs)
    with pytest.raises(InvalidSpec, match="excludes"):
        store.set_plan("br0", subnet="10.8.0.0/24")
    with pytest.raises(NetworkError, match="c1"):
        store.drop_plan("br0")


def test_derived_mac_skips_taken_ones(tmp_path):
    store = ipam.Store(tmp_path)
    store.set_plan("b", subnet="10.0.0.0/24")
    taken = addr.derive_mac("guest:c1")
    lease = store.allocate("c1", "b", ip="10.0.0.2/24", taken_macs={taken})
    assert lease["mac"] == addr.derive_mac("guest:c1", 1)


def test_requested_addresses_stay_in_the_plan(tmp_path):
    store = ipam.Store(tmp_path)
    store.set_plan("br0", subnet="10.6.0.0/24", gateway="10.6.0.1")
    store.allocate("c1", "br0", ip="10.6.0.9/24")
    before = store.leases()
    refused = [
        ("10.6.1.9/24", InvalidSpec, "outside"),        # another subnet
        ("10.6.0.9/25", InvalidSpec, "outside"),        # the plan's address with another prefix
        ("10.6.0.0/24", InvalidSpec, "network"),        # the subnet's network address
        ("10.6.0.255/24", InvalidSpec, "broadcast"),    # its broadcast address
        ("10.6.0.1/24", AlreadyExists, "bridge's own"),   # the plan's gateway
        ("10.6.0.254/24", AlreadyExists, "bridge's own"),  # an address the bridge has in the kernel
        ("10.6.0.9/24", AlreadyExists, "c1"),           # another container's lease
    ]
    for ip, error, words in refused:
        for call in (store.check, store.allocate):
            with pytest.raises(error, match=words):
                call("c2", "br0", ip=ip, reserved_ips=["10.6.0.254"])
    assert store.leases() == before
    assert store.allocate("c2", "br0", ip="10.6.0.10/24", reserved_ips=["10.6.0.254"])["ip"] == "10.6.0.10/24"


def test_automatic_addresses_skip_the_bridges_own(tmp_path):
    store = ipam.Store(tmp_path)
    store.set_plan("br0", subnet="10.6.0.0/29", gateway="10.6.0.1")
    got = [store.allocate(f"c{i}", "br0", reserved_ips=["10.6.0.2", "10.6.0.5"])["ip"] for i in range(3)]
    assert got == ["10.6.0.3/29", "10.6.0.4/29", "10.6.0.6/29"]


def test_the_plan_can_forbid_tenant_addresses_and_macs(tmp_path):
    store = ipam.Store(tmp_path)
    plan = store.set_plan("br0", subnet="10.6.0.0/24", gateway="10.6.0.1")
    assert (plan["tenant_ip"], plan["tenant_mac"], plan["isolated_ports"]) == (True, True, False)
    assert store.set_plan("br0", tenant_ip=False, tenant_mac=False)["subnet"] == "10.6.0.0/24"
    for kwargs, field in (({"ip": "10.6.0.9/24"}, "ip"), ({"mac": "02:00:00:00:00:09"}, "mac")):
        for call in (store.check, store.allocate):
            with pytest.raises(InvalidSpec, match="operator's policy") as info:
                call("c1", "br0", **kwargs)
            assert info.value.field == field
    assert store.leases() == {}
    lease = store.allocate("c1", "br0")  # what vmiso assigns is still fine
    assert lease["ip"] == "10.6.0.2/24" and lease["mac"] == addr.derive_mac("guest:c1")
    assert store.set_plan("br0", subnet="10.6.0.0/24")["tenant_ip"] is False  # None keeps the policy
    store.set_plan("br0", tenant_ip=True)
    assert store.allocate("c2", "br0", ip="10.6.0.9/24")["ip"] == "10.6.0.9/24"
    with pytest.raises(InvalidSpec, match="mac"):
        store.allocate("c3", "br0", mac="02:00:00:00:00:09")
    store.set_plan("br0", tenant_mac=True)
    with pytest.raises(InvalidSpec, match="vendor"):  # the store checks MACs itself, not only NetworkSpec
        store.allocate("c3", "br0", mac="00:1b:21:aa:bb:cc")
    assert store.allocate("c3", "br0", mac="02:00:00:00:00:09")["mac"] == "02:00:00:00:00:09"


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


def test_run_refuses_a_vendor_mac_before_anything_is_made(tmp_path):
    import subprocess
    import sys

    work = tmp_path / "work"
    proc = subprocess.run([sys.executable, "-m", "vmiso", "--workdir", str(work), "run",
                           "--network", "br0,mac=00:1b:21:aa:bb:cc", "--", "true"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 125 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "vmiso: error: mac: 00:1b:21:aa:bb:cc is a globally unique (vendor) address; a guest's MAC must be "
        "locally administered unicast (first octet x2, x6, xa or xe, e.g. 02:...)"]
    assert not work.exists()


def test_importing_vmiso_net_imports_no_pyroute2():
    import subprocess
    import sys

    code = ("import sys, vmiso, vmiso.spec, vmiso.net.port, vmiso.net.api; "
            "vmiso.spec.NetworkSpec('br0'); assert 'pyroute2' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_plan_names_dns_servers_and_the_seed_carries_them(tmp_path):
    """A bridge's name servers (vmiso net bridge create --dns) reach the guest: network-config's
    nameservers (micro's /etc/resolv.conf) and a container image's oci line (vmiso-exec's)."""
    from vmiso.image import seed

    store = ipam.Store(tmp_path)
    assert store.set_plan("br0", subnet="10.6.0.0/24", dns=["10.6.0.1", "10.6.0.53"])["dns"] == ["10.6.0.1",
                                                                                                  "10.6.0.53"]
    assert store.set_plan("br0", tenant_ip=False)["dns"] == ["10.6.0.1", "10.6.0.53"]  # None keeps them
    for bad in (["10.6.0.256"], ["a.b.c.d"], "10.6.0.1", ["10.0.0.1"] * 4):
        with pytest.raises(InvalidSpec):
            store.set_plan("br0", dns=bad)
    assert store.set_plan("br0", dns=[]).get("dns") == []
    lease = {"mac": "02:00:00:00:00:09", "ip": "10.6.0.9/24", "mtu": 1500, "dns": ["10.6.0.1"]}
    config = port.network_config(lease)
    assert config["ethernets"]["eth0"]["nameservers"] == {"addresses": ["10.6.0.1"]}
    assert "nameservers" not in port.network_config(dict(lease, dns=[]))["ethernets"]["eth0"]
    assert seed.oci_line(1000, 1000, (27,), "t-1", "10.6.0.9", ["10.6.0.1", "10.6.0.2"]) == \
        b"1000 1000 27 t-1 10.6.0.9 10.6.0.1,10.6.0.2\n"
    assert seed.oci_line(0, 0, (), "t-1") == b"0 0 - t-1 - -\n"
