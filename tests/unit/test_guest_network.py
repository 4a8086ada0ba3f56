"""micro-init's network set-up (vmiso/image/guest/micro-init, configure_network) run by busybox's
sh on the host, on the network-config vmiso writes (net.port.network_config, seed.seed_files): the
NIC found by its MAC under a stand-in /sys/class/net, ip(8) replaced by a function that records
its arguments, /etc/resolv.conf by a file. Hostile values never reach ip(8) or resolv.conf. The
same code on real VMs: tests/system/test_network.py, test_warm.py."""
import json
import shutil
import subprocess
from importlib import resources

import pytest

from vmiso.net import port

pytestmark = pytest.mark.skipif(shutil.which("busybox") is None, reason="needs busybox (micro's shell)")

MAC = "02:aa:bb:cc:dd:ee"


def functions():
    """configure_network and its helpers, cut from micro-init (they start at net_warn)."""
    text = resources.files("vmiso.image").joinpath("guest", "micro-init").read_text()
    start = text.index("net_warn() {")
    end = text.index('[ -f "$seed/network-config" ] && configure_network')
    return text[start:end].replace("/sys/class/net", "$SYSNET").replace("/etc/resolv.conf", "$RESOLV")


def configure(tmp_path, config_line, mtu_now="1500"):
    """(ip commands run, resolv.conf or None, console lines, exit status) for ``config_line``."""
    seed, sysnet = tmp_path / "seed", tmp_path / "net"
    seed.mkdir()
    (seed / "network-config").write_text(config_line + "\n")
    for name, mac in (("lo", "00:00:00:00:00:00"), ("eth0", MAC)):
        (sysnet / name).mkdir(parents=True)
        (sysnet / name / "address").write_text(mac + "\n")
        (sysnet / name / "mtu").write_text(mtu_now + "\n")
    (tmp_path / "functions.sh").write_text(functions())
    script = (f"console=/dev/stderr seed={seed} SYSNET={sysnet} RESOLV={tmp_path}/resolv.conf; cd {tmp_path}; "
              'ip() { echo "ip $*"; }; . ./functions.sh; configure_network; echo "status=$?"')
    out = subprocess.run(["busybox", "sh", "-c", script], capture_output=True, text=True, timeout=30)
    lines = out.stdout.splitlines()
    resolv = tmp_path / "resolv.conf"
    return lines[:-1], resolv.read_text() if resolv.exists() else None, out.stderr.splitlines(), lines[-1]


def test_vmiso_s_network_config_becomes_exactly_these_commands(tmp_path):
    lease = {"ip": "10.1.2.3/24", "mac": MAC, "mtu": 1400, "dns": ["10.1.2.1", "10.1.2.9"]}
    line = json.dumps(port.network_config(lease))  # as seed.seed_files writes it
    ip, resolv, console, status = configure(tmp_path, line)
    assert ip == ["ip link set eth0 mtu 1400", "ip link set eth0 up", "ip addr add 10.1.2.3/24 dev eth0"]
    assert resolv == "nameserver 10.1.2.1\nnameserver 10.1.2.9\n" and console == [] and status == "status=0"


def test_an_mtu_already_right_and_no_name_servers_cost_no_command(tmp_path):
    line = json.dumps(port.network_config({"ip": "10.1.2.3/24", "mac": MAC, "mtu": 1500}))
    ip, resolv, console, status = configure(tmp_path, line)
    assert ip == ["ip link set eth0 up", "ip addr add 10.1.2.3/24 dev eth0"] and resolv is None
    assert console == [] and status == "status=0"


def test_hostile_values_never_reach_ip_or_resolv_conf(tmp_path):
    (tmp_path / "10.6.6.6").write_text("")  # a glob in a value must not expand to a file's name
    eth = {"match": {"macaddress": MAC}, "set-name": "eth0; reboot", "addresses": ["10.1.2.3/24", "$(reboot)", "1*"],
           "mtu": "9000; reboot", "nameservers": {"addresses": ["10.1.2.1", "x;y", "10.6.6.*"]},
           "routes": [{"to": "10.9.0.0/16", "via": "10.1.2.1"}]}
    ip, resolv, console, status = configure(tmp_path, json.dumps({"version": 2, "ethernets": {"eth0": eth}}))
    assert ip == ["ip link set eth0 up", "ip addr add 10.1.2.3/24 dev eth0",
                  "ip route add 10.9.0.0/16 via 10.1.2.1 dev eth0"]
    assert resolv == "nameserver 10.1.2.1\n" and status == "status=0"
    assert console == ["vmiso-init: network: " + m for m in (
        "ignoring address '$(reboot)'", "ignoring address '1*'",
        "ignoring name server 'x;y'", "ignoring name server '10.6.6.*'")]


def test_no_nic_with_the_mac_is_reported_and_nothing_is_run(tmp_path):
    line = json.dumps(port.network_config({"ip": "10.1.2.3/24", "mac": "02:00:00:00:00:99"}))
    ip, resolv, console, status = configure(tmp_path, line)
    assert ip == [] and resolv is None and status == "status=1"
    assert console == ["vmiso-init: network: no interface with MAC '02:00:00:00:00:99'"]
