"""``vmiso bench io``: volume and own-disk sequential throughput, and stdin's, in one run."""
import json

from .common import isolator, positive_int


def register_bench(bsub):
    p = bsub.add_parser(
        "io", help="data in and out: a volume (9p) against the VM's own disk, and stdin, in MB/s",
        description="Boot micro twice through the real Isolator: one VM writes and reads a file through a "
                    "volume and through its own disk (dd, 1 MiB blocks, writes fsynced, timed by the guest's "
                    "clock), the other reads its stdin to the end. Prints MB/s of each and the ratios.",
        epilog="example: vmiso bench io --json")
    p.add_argument("--size", type=positive_int, default=256, metavar="MiB", help="file and stdin size (default 256)")
    p.add_argument("--mem", type=positive_int, default=512, metavar="MiB", help="guest memory (default 512)")
    p.add_argument("--share-parent", default="/var/tmp", metavar="DIR",
                   help="where the volume's temporary directory is made (default /var/tmp; not in the work dir)")
    p.add_argument("--json", action="store_true", help="print the result object as JSON")
    p.set_defaults(func=io)


def io(args):
    from ..bench import io as scenario
    result = scenario.run(isolator(args), size_mib=args.size, mem_mib=args.mem, share_parent=args.share_parent)
    print(json.dumps(result, indent=1) if args.json else scenario.report(result))
    return 0
