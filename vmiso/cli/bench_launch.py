"""``vmiso bench launch``: launch latency phase by phase, against the Mesos-prototype baseline."""
import json

from .common import positive_int


def register_bench(bsub):
    p = bsub.add_parser(
        "launch", help="launch latency, phase by phase (and the 2016 prototype path with --baseline)",
        description="Run N launches of a command (default: true) on micro (or in a container image) through "
                    "the real Isolator and "
                    "report the median and p90 of every phase: host preparation (image, overlay, seed, XML), "
                    "createXML, first console byte, guest userspace, task start and exit, VM gone, cleaned "
                    "up. --baseline alternates them with the Mesos prototype's path (whole-disk copy of a "
                    "1 GiB image, genisoimage seed, persistent define + start, end seen by polling the "
                    "console) for the same task.",
        epilog="example: vmiso bench launch -n 10 --baseline --plot launch.svg")
    p.add_argument("-n", type=positive_int, default=5, metavar="N", help="launches (default 5; each variant)")
    p.add_argument("--concurrency", type=positive_int, default=1, metavar="C",
                   help="launches at once; reports throughput (default 1)")
    p.add_argument("--baseline", action="store_true", help="also run the prototype path, in the same run")
    p.add_argument("--json", action="store_true", help="print the result object as JSON")
    p.add_argument("--warm", action="store_true",
                   help="also N launches into warm VMs (a pool booted ahead, vmiso/pool.py): warm_run_true_s")
    p.add_argument("--pool-size", type=positive_int, default=1, metavar="N", help="with --warm: the pool's size (1)")
    p.add_argument("--no-cli", dest="cli", action="store_false",
                   help="skip the whole 'vmiso run' processes timed between the launches (cli_run_true_s)")
    p.add_argument("--plot", metavar="FILE.svg", help="write a waterfall of every launch's phases")
    p.add_argument("--mem", type=int, default=256, metavar="MiB", help="guest memory (default 256)")
    p.add_argument("--image", default="micro", metavar="micro|micro:stock|NAME|ID",
                   help="the micro build to boot (default micro; micro:stock compares Debian's kernel), or a "
                        "stored container image: the task runs in its root (no --baseline)")
    p.add_argument("--network", metavar="BRIDGE",
                   help="give every task a NIC on BRIDGE (a vmiso-managed bridge: vmiso net bridge create): "
                        "cold, warm (the NIC hot-plugged at claim) and vmiso run alike (no --baseline: the "
                        "prototype path had no network)")
    p.add_argument("--command", nargs="+", default=["true"], metavar="ARG",
                   help="the task's command (default: true)")
    p.set_defaults(func=launch)


def launch(args):
    from ..bench import launch as scenario

    result = scenario.run(n=args.n, concurrency=args.concurrency, with_baseline=args.baseline,
                          command=args.command, workdir=args.workdir, mem_mib=args.mem,
                          progress=True, image=args.image, with_cli=args.cli, warm=args.warm,
                          pool_size=args.pool_size, network=args.network)
    if args.plot:
        from ..bench import plot

        plot.write(args.plot, result)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(scenario.report(result))
    return 0 if not result["failures"] and not result.get("baseline_failures") and not result.get("cli_failures") \
        and not result.get("warm_failures") else 1
