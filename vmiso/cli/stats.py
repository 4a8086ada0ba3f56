"""``vmiso stats`` (a table like ``docker stats``), ``vmiso metrics`` (Prometheus text exposition
of the same numbers) and ``vmiso bench usage``. They only call the API and print."""
import json
import sys
import time

PREFIX = "vmiso_container_"
# Mesos field -> (Prometheus type, help); counters only ever grow.
METRICS = {
    "cpus_user_time_secs": ("counter", "CPU time in user mode, seconds (QEMU and the guest)"),
    "cpus_system_time_secs": ("counter", "CPU time in kernel mode, seconds"),
    "cpus_limit": ("gauge", "CPUs the VM may use"),
    "cpus_nr_periods": ("counter", "CFS periods elapsed"),
    "cpus_nr_throttled": ("counter", "CFS periods throttled"),
    "cpus_throttled_time_secs": ("counter", "time throttled, seconds"),
    "threads": ("gauge", "QEMU threads"),
    "mem_total_bytes": ("gauge", "memory charged to the VM's cgroup, QEMU included"),
    "mem_rss_bytes": ("gauge", "QEMU's resident set"),
    "mem_cache_bytes": ("gauge", "page cache charged to the VM"),
    "mem_anon_bytes": ("gauge", "anonymous memory charged to the VM"),
    "mem_file_bytes": ("gauge", "file-backed memory charged to the VM"),
    "mem_swap_bytes": ("gauge", "swap used by the VM"),
    "mem_limit_bytes": ("gauge", "the VM's memory hard limit, QEMU's overhead included"),
    "disk_used_bytes": ("gauge", "bytes allocated to the VM's overlay"),
    "disk_limit_bytes": ("gauge", "virtual size of the VM's disk"),
    **{f"net_{d}_{what}": ("counter", f"guest {d.upper()} {what}") for d in ("rx", "tx")
       for what in ("packets", "bytes", "errors", "dropped")},
}


def register(sub):
    p = sub.add_parser("stats", help="resource usage of running containers (like docker stats)",
                       description="CPU, memory, disk and network of every running container, from its VM's "
                                   "cgroup, QEMU process, overlay and tap (the guest's view: tap TX = guest RX).")
    p.add_argument("id", nargs="*", help="only these containers")
    p.add_argument("--json", action="store_true", help="one JSON object {id: ResourceStatistics}")
    p.add_argument("--watch", action="store_true", help="redraw every --interval seconds until ^C")
    p.add_argument("--interval", type=float, default=1.0, metavar="S")
    p.set_defaults(func=stats)

    p = sub.add_parser("metrics", help="serve usage as Prometheus metrics",
                       description="Serve the numbers of 'vmiso stats' in Prometheus' text format on /metrics "
                                   "(without --listen: print them once).")
    p.add_argument("--listen", metavar="HOST:PORT", help="e.g. 127.0.0.1:9465")
    p.set_defaults(func=metrics)


def register_bench(bsub):
    """``vmiso bench usage`` (called by cli/bench.py's dispatcher)."""
    from .bench import positive_int

    p = bsub.add_parser("usage", help="usage_all: Cython reader vs Python twin vs psutil vs libvirt",
                        description="Read N VMs' counters from a generated /proc and cgroup tree in the kernel's "
                                    "formats with each reader in one run; with --live K also K real micro VMs "
                                    "and libvirt's getAllDomainStats. Medians, microseconds per VM.")
    p.add_argument("--vms", type=positive_int, default=1000, metavar="N")
    p.add_argument("--layout", choices=("hybrid", "v2"), default="hybrid",
                   help="cgroup v1 + v2 as on these hosts, or pure v2")
    p.add_argument("--live", type=int, default=0, metavar="K", help="also boot and measure K live VMs (0)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=bench_usage)


def _collect(args):
    from .main import isolator

    iso = isolator(args)
    iso.recover()
    errors = {}
    found = iso.usage_all(errors)
    if args.id:
        found = {k: v for k, v in found.items() if k in args.id}
    return iso, found, errors


def _row(cid, s, before, elapsed):
    cpu = "-"
    if before is not None and elapsed > 0:
        used = (s.cpus_user_time_secs + s.cpus_system_time_secs) - \
            (before.cpus_user_time_secs + before.cpus_system_time_secs)
        cpu = f"{100 * used / elapsed:.1f}%"
    mem = f"{_size(s.mem_total_bytes)} / {_size(s.mem_limit_bytes)}"
    net = f"{_size(s.net_rx_bytes)} / {_size(s.net_tx_bytes)}"
    disk = f"{_size(s.disk_used_bytes)} / {_size(s.disk_limit_bytes)}"
    return f"{cid:<24} {cpu:>7} {s.cpus_limit or 0:>5.2f} {mem:>21} {net:>19} {disk:>19} {s.threads or 0:>4}"


def _size(n):
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def stats(args):
    iso, found, errors = _collect(args)
    if args.json:
        print(json.dumps({k: v.to_dict() for k, v in found.items()}, indent=1))
        return 0
    previous, last = {}, time.monotonic()
    while True:
        now = time.monotonic()
        if args.watch:
            sys.stdout.write("\x1b[H\x1b[2J")
        print(f"{'CONTAINER':<24} {'CPU %':>7} {'CPUS':>5} {'MEM USAGE / LIMIT':>21} {'NET RX / TX':>19} "
              f"{'DISK USED / SIZE':>19} {'THR':>4}")
        for cid in sorted(found):
            print(_row(cid, found[cid], previous.get(cid), now - last))
        for cid, err in sorted(errors.items()):
            print(f"{cid:<24} unavailable: {err}")
        if not args.watch:
            return 0
        sys.stdout.flush()
        previous, last = found, now
        time.sleep(args.interval)
        errors = {}
        found = iso.usage_all(errors)
        if args.id:
            found = {k: v for k, v in found.items() if k in args.id}


def exposition(found):
    """Prometheus text format (version 0.0.4) of {id: ResourceStatistics}."""
    lines = []
    for field, (kind, text) in METRICS.items():
        rows = [(cid, getattr(s, field)) for cid, s in sorted(found.items()) if getattr(s, field) is not None]
        if not rows:
            continue
        name = PREFIX + field + ("_total" if kind == "counter" and not field.endswith("_total") else "")
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
        lines += [f'{name}{{container_id="{cid}"}} {value}' for cid, value in rows]
    lines.append(f"{PREFIX}up {len(found)}")
    return "\n".join(lines) + "\n"


def metrics(args):
    from .main import isolator

    iso = isolator(args)
    iso.recover()
    if not args.listen:
        sys.stdout.write(exposition(iso.usage_all()))
        return 0
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    host, _, port = args.listen.rpartition(":")
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            if self.path.split("?")[0] not in ("/", "/metrics"):
                self.send_error(404)
                return
            with lock:
                iso.recover()  # containers launched by other processes since the last scrape
                body = exposition(iso.usage_all()).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_):
            pass

    server = ThreadingHTTPServer((host or "127.0.0.1", int(port)), Handler)
    print(f"serving Prometheus metrics on http://{host or '127.0.0.1'}:{server.server_port}/metrics", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


def bench_usage(args):
    from ..bench import usage as scenario

    result = scenario.run(vms=args.vms, layout=args.layout, live=args.live, workdir=args.workdir)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"usage of {result['vms']} generated VMs ({result['layout']}), median µs per VM")
    for key in ("cython_us_per_vm", "python_us_per_vm", "psutil_us_per_vm", "usage_all_us_per_vm",
                "cython_refresh_us_per_vm", "python_refresh_us_per_vm",  # once per LIMITS_TTL
                "live_cython_us_per_vm", "live_python_us_per_vm", "live_psutil_us_per_vm", "libvirt_us_per_vm"):
        if key in result:
            value = result[key]
            print(f"  {key:<24} {'-' if value is None else f'{value:10.2f}'}")
    if result.get("cython_us_per_vm") is None:
        print("  (no Cython extension loaded: VMISO_NO_EXTENSIONS=1, or not built)")
        return 0
    for name in ("python", "psutil"):
        if result.get(f"speedup_vs_{name}"):
            print(f"  cython is {result[f'speedup_vs_{name}']:.1f}x faster than {name}")
    return 0
