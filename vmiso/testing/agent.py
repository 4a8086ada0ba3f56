"""A throwaway agent process for crash tests: launches (and optionally destroys) one container,
so a test can SIGKILL it at a named fault point (VMISO_FAULT) and recover in a fresh process.

    python -m vmiso.testing.agent --workdir W --agent A --id ID [--destroy-fault POINT]
                                  [--network BRIDGE] -- CMD...
"""
import argparse
import os
import sys

from vmiso import Isolator, TaskSpec
from vmiso.spec import NetworkSpec


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--agent", required=True)
    parser.add_argument("--id", required=True)
    parser.add_argument("--destroy-fault", help="launch cleanly, then destroy with this fault point set")
    parser.add_argument("--network", metavar="BRIDGE", help="wire the task to this bridge")
    parser.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    iso = Isolator(workdir=args.workdir, agent_id=args.agent)
    launch_fault = os.environ.pop("VMISO_FAULT", None) if args.destroy_fault else None
    assert launch_fault is None or args.destroy_fault
    network = NetworkSpec(args.network) if args.network else None
    iso.launch(args.id, TaskSpec(cmd, network=network))
    print("launched", flush=True)
    if args.destroy_fault:
        os.environ["VMISO_FAULT"] = args.destroy_fault
        iso.destroy(args.id, grace=0)
        print("destroyed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
