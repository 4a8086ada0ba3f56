"""Benchmark: wiring and unwiring one guest port with pyroute2 (what vmiso does) against the same
steps done with ``ip``/``bridge`` commands, in one run, in a throwaway network namespace (so the
host's own interfaces are never touched). Medians in milliseconds for wire + unwire."""
import contextlib
import ctypes
import os
import secrets
import statistics
import time

from .._proc import run
from . import bridge, tap

CLONE_NEWNET = 0x40000000


@contextlib.contextmanager
def scratch_namespace():
    """This thread (and what it starts) in a new named namespace, deleted afterwards."""
    name = "vmtbench" + secrets.token_hex(3)
    run(["ip", "netns", "add", name])
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
        try:
            yield name
        finally:
            libc.setns(home, CLONE_NEWNET)
    finally:
        os.close(target)
        os.close(home)
        run(["ip", "netns", "del", name], check=False)


def _with_pyroute2(name, br, mac):
    tap.create(name, bridge=br, guest_mac=mac, isolated=True)
    tap.delete(name)


def _with_ip(name, br, mac):
    run(["ip", "tuntap", "add", "dev", name, "mode", "tap", "vnet_hdr"])
    run(["ip", "link", "set", "dev", name, "address", "fe" + mac[2:], "mtu", "1500", "master", br, "up"])
    run(["bridge", "link", "set", "dev", name, "isolated", "on"])
    run(["ip", "link", "del", "dev", name])


def measure(iterations=30):
    """{"iterations", "pyroute2_ms", "ip_cmd_ms", "speedup"}: medians of wire + unwire."""
    with scratch_namespace():
        bridge.ensure("vmbench0")
        results = {}
        for label, func in (("pyroute2_ms", _with_pyroute2), ("ip_cmd_ms", _with_ip)):
            func("vmibench0", "vmbench0", "02:00:00:00:00:01")  # warm-up: imports, caches
            times = []
            for _ in range(iterations):
                start = time.perf_counter()
                func("vmibench0", "vmbench0", "02:00:00:00:00:01")
                times.append((time.perf_counter() - start) * 1000)
            results[label] = round(statistics.median(times), 3)
    results["iterations"] = iterations
    results["speedup"] = round(results["ip_cmd_ms"] / results["pyroute2_ms"], 2)
    return results
