"""``vmiso bench image``: a container image's import (cold, warm) and launch against micro's."""
import json
import sys

from .common import positive_int


def register_bench(bsub):
    p = bsub.add_parser(
        "image", help="container images: import cold and warm, and run -- true against micro, in one run",
        description="Import a ~100 MB Debian image with python3 (built once from Debian's packages) from its "
                    "OCI layout, cold (empty layer cache) and warm (layers cached, root file system built "
                    "again); then launch 'true' on micro, 'true' in the image and 'python3 -c pass' in the "
                    "image, interleaved, through the real Isolator, and report medians. Runs in a temporary "
                    "work dir under WORKDIR/cache/bench: the store is not touched.",
        epilog="example: vmiso bench image -n 9 --json")
    p.add_argument("-n", type=positive_int, default=5, metavar="N", help="launches of each kind (default 5)")
    p.add_argument("--imports", type=positive_int, default=1, metavar="K",
                   help="cold and warm imports each (default 1)")
    p.add_argument("--mem", type=positive_int, default=256, metavar="MiB", help="guest memory (default 256)")
    p.add_argument("--json", action="store_true", help="print the result object as JSON")
    p.set_defaults(func=image)


def image(args):
    from ..bench import image as scenario

    def note(text):
        if sys.stderr.isatty():
            sys.stderr.write(f"\rbench image: {text}\x1b[K")
            sys.stderr.flush()

    try:
        result = scenario.run(workdir=args.workdir, n=args.n, imports=args.imports, mem_mib=args.mem,
                              uri=args.uri, accel=args.accel, progress=note)
    finally:
        if sys.stderr.isatty():
            sys.stderr.write("\r\x1b[K")
    print(json.dumps(result, indent=1) if args.json else scenario.report(result))
    return 0
