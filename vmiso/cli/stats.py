"""``vmiso stats`` (a table like ``docker stats``), ``vmiso metrics`` (Prometheus exposition of the
same numbers, printed once or served) and ``vmiso bench usage``.

stats and metrics are read-only (accounting/observe.py): they read the containers' records, never
recover(), so running them, or scraping them every few seconds, changes no container of any agent.
The served exposition and its server's bounds are accounting/exporter.py's."""
import argparse
import ipaddress
import json
import socket
import sys
import time

from .common import positive_int

DEFAULT_LISTEN = "127.0.0.1:9465"


def listen_address(text):
    """``HOST:PORT`` (``[v6]:PORT``; an empty host is the loopback address, never every
    address) -> (host, port), for argparse."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or "127.0.0.1", int(port)


def _loopback(host):
    try:
        return all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback
                   for info in socket.getaddrinfo(host, None))
    except (OSError, ValueError):
        return False


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
                       description="Serve the numbers of 'vmiso stats' in Prometheus' format on /metrics "
                                   "(without --listen: print them once). Read-only: every agent's running "
                                   "containers, labelled container_id and agent_id; nothing is changed.")
    p.add_argument("--listen", metavar="HOST:PORT", nargs="?", const=DEFAULT_LISTEN, type=listen_address,
                   help=f"serve over HTTP (default address {DEFAULT_LISTEN}; another interface only when "
                        "named here)")
    p.set_defaults(func=metrics)


def register_bench(bsub):
    """``vmiso bench usage`` (called by cli/bench.py's dispatcher)."""
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


def _observe(observer, args):
    seen = observer.observe(args.id or None)
    return seen.stats, seen.errors


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
    from ..agent.client import RemoteObserver, route_read_only

    remote = route_read_only(args.workdir, args.agent_socket)  # an ordinary user's always goes there
    if remote is not None:
        observer = RemoteObserver(remote)
    else:
        from ..accounting.observe import Observer

        observer = Observer(args.workdir)
    try:
        return _stats(observer, args)
    finally:
        observer.close()


def _stats(observer, args):
    found, errors = _observe(observer, args)
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
        found, errors = _observe(observer, args)


def metrics(args):
    from prometheus_client import generate_latest

    from ..accounting import exporter
    from ..accounting.observe import Observer

    observer = Observer(args.workdir)
    try:
        if not args.listen:
            sys.stdout.buffer.write(generate_latest(exporter.registry(observer)))
            return 0
        host, port = args.listen
        server = exporter.MetricsServer(host, port, exporter.app(observer))
        bound, port = server.server_address
        shown = f"[{bound}]" if ":" in bound else bound
        print(f"serving Prometheus metrics on http://{shown}:{port}/metrics (read-only)", flush=True)
        if not _loopback(host):
            print(f"vmiso: note: {host} is not a loopback address: other hosts can read every container's "
                  "usage", file=sys.stderr, flush=True)
        try:
            server.serve_forever()
        finally:
            server.shutdown()
            server.close()
        return 0
    finally:
        observer.close()


def bench_usage(args):
    from ..bench import usage as scenario

    result = scenario.run(vms=args.vms, layout=args.layout, live=args.live, workdir=args.workdir)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"usage of {result['vms']} generated VMs ({result['layout']}), median µs per VM")
    for key in ("cython_us_per_vm", "floor_us_per_vm", "python_us_per_vm", "psutil_us_per_vm", "usage_all_us_per_vm",
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
    print(f"  cython takes {result['floor_ratio']:.2f}x its floor (the same preads and fstats, nothing parsed)")
    return 0
