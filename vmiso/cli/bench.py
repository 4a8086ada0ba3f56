"""``vmiso bench``: measurement scenarios, one sub-subcommand each, every one with its baseline
measured in the same run. ``--json`` prints the scenario's result object as it is."""
import json

from .common import positive_int


def register(sub):
    p = sub.add_parser("bench", help="measure vmiso's hot paths against their baselines")
    bsub = p.add_subparsers(dest="bench_command", metavar="SCENARIO")
    bsub.required = True
    from . import bench_image, bench_io, bench_launch, net, stats  # each scenario's module adds its own

    for add in (_register_qcow2, stats.register_bench, bench_launch.register_bench, bench_io.register_bench,
                bench_image.register_bench, net.register_bench):
        add(bsub)


# -- qcow2 -------------------------------------------------------------------------------------

def _register_qcow2(bsub):
    q = bsub.add_parser(
        "qcow2", help="overlay creation: the Cython writer vs its Python twin vs qemu-img create",
        description="Write the same 10 GiB overlay over the same base with the Cython writer, its pure-Python "
                    "twin and the whole 'qemu-img create -f qcow2 -b BASE -F qcow2' process, on tmpfs when "
                    "there is one, and print the medians in microseconds and the speedups; beside them the "
                    "floor: the same open, pwrite, ftruncate and close calls with nothing computed.")
    q.add_argument("--json", action="store_true", help="print the result object as JSON")
    q.add_argument("-n", "--iterations", type=positive_int, default=200, metavar="N",
                   help="overlays per writer (default 200; qemu-img makes at most 30)")
    q.set_defaults(func=qcow2)


def qcow2(args):
    from ..bench import qcow2 as scenario

    result = scenario.run(iterations=args.iterations)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"overlay creation, median of {result['iterations']} ({result['implementation']} in use)")
    rows = (("cython writer", result["cython_us"], None),
            ("python twin", result["python_us"], result["speedup_vs_python"]),
            ("qemu-img create", result["qemu_img_us"], result["speedup_vs_qemu_img"]))
    for label, micros, speedup in rows:
        if micros is None:
            print(f"  {label:<16} {'not built':>10}")
            continue
        ratio = f"   cython is {speedup:.2f}x faster" if speedup else ""
        print(f"  {label:<16} {micros:>10.1f} us{ratio}")
    print(f"  {'floor':<16} {result['floor_us']:>10.1f} us   the same system calls alone; "
          f"the writer takes {result['floor_ratio']:.2f}x that")
    return 0
