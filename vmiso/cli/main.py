"""``vmiso``: the command line. Each subcommand only calls the API and prints.

Exit codes: a task's own exit code for ``run``/``wait``; 124 when the task hit its timeout,
137 when it was killed, 125 for vmiso's own failures (one line on stderr, like ``docker run``).
"""
import argparse
import importlib
import logging
import os
import sys

from ..errors import NotOwned, VmisoError
from .common import EXIT_VMISO_ERROR, close_isolators, size_arg

# The module that registers each command, in the order `vmiso --help` lists them. `vmiso CMD`
# imports and registers only CMD's module: the others' imports and argparse set-up were a tenth
# of `vmiso run`'s own start (tests/unit/test_cli.py checks this table against the modules).
COMMANDS = {"run": "run", "ps": "containers", "wait": "containers", "kill": "containers", "rm": "containers",
            "logs": "containers", "gc": "gc", "image": "image", "doctor": "doctor", "bench": "bench",
            "net": "net", "stats": "stats", "metrics": "stats", "slurm": "slurm", "agent": "agent"}

DESCRIPTION = """\
Run tasks in their own QEMU/KVM virtual machines.

  vmiso run -- sh -c 'echo hello; exit 3'     run a command in a fresh VM, print its output, exit 3
  vmiso run -d --name job1 -- sleep 60        start it in the background
  vmiso ps | vmiso wait job1 | vmiso kill job1 | vmiso logs job1 | vmiso rm job1
  vmiso image build-micro                     build the small default guest (once)
  vmiso doctor                                what this host lacks, and how to fix it
"""


class Parser(argparse.ArgumentParser):
    """argparse, but usage errors exit 125 like docker's: 1-124 belong to the task."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(EXIT_VMISO_ERROR, f"vmiso: error: {message}\n")


def build_parser(command=None):
    """The whole parser; ``command``: only that command's module registered (it must be one)."""
    parser = Parser(
        prog="vmiso", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    _global_options(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    names = [COMMANDS[command]] if command is not None else list(dict.fromkeys(COMMANDS.values()))
    for name in names:
        importlib.import_module(f"{__package__}.{name}").register(sub)
    return parser


def _command_word(argv):
    """The command ``argv`` names (after the global options), or None: none, or not a command."""
    pre = Parser(prog="vmiso", add_help=False)
    _global_options(pre)
    pre.add_argument("command", nargs="?")
    known, _rest = pre.parse_known_args(argv)
    return known.command if known.command in COMMANDS else None


def _global_options(parser):
    parser.add_argument("--workdir", default=os.environ.get("VMISO_WORKDIR", "/var/lib/vmiso"),
                        help="work directory (default: $VMISO_WORKDIR or /var/lib/vmiso)")
    parser.add_argument("--uri", default=os.environ.get("VMISO_URI", "qemu:///system"),
                        help="libvirt connection URI (default: $VMISO_URI or qemu:///system)")
    parser.add_argument("--agent-id", default=os.environ.get("VMISO_AGENT_ID", "vmiso"), metavar="ID",
                        help="act as this agent: only its containers can be killed, removed or "
                             "collected; others' are read-only (default: $VMISO_AGENT_ID or vmiso)")
    parser.add_argument("--accel", choices=("auto", "kvm", "tcg"), default=os.environ.get("VMISO_ACCEL", "auto"),
                        help="accelerator: KVM where it really works, TCG otherwise (default: $VMISO_ACCEL or auto)")
    parser.add_argument("--disk-reserve", type=size_arg, default=os.environ.get("VMISO_DISK_RESERVE"),
                        metavar="SIZE", help="keep this much free on the work dir's file system: a launch that "
                                             "would not is refused (e.g. 10G; default: $VMISO_DISK_RESERVE or "
                                             "5%% of the file system, at most 2G)")
    parser.add_argument("--disk-overcommit", type=float, default=float(os.environ.get("VMISO_DISK_OVERCOMMIT", 4)),
                        metavar="RATIO", help="thin disks of running VMs may promise up to RATIO times the usable "
                                              "space (default: $VMISO_DISK_OVERCOMMIT or 4)")
    parser.add_argument("--agent-socket", default=None, metavar="PATH",
                        help="the vmiso agent's socket, when it is not the work dir's (default: "
                             "$VMISO_AGENT_SOCKET, else the one the work dir's agent recorded, else "
                             "/run/vmiso/agent.sock); commands go through an agent whenever one serves the work dir")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what vmiso does")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(_command_word(argv))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="vmiso: %(levelname)s: %(message)s")
    try:
        return args.func(args) or 0
    except NotOwned as err:
        print(f"vmiso: error: {err} (--agent-id {err.owner} acts as that agent)", file=sys.stderr)
        return EXIT_VMISO_ERROR
    except VmisoError as err:
        print(f"vmiso: error: {err}", file=sys.stderr)
        return EXIT_VMISO_ERROR
    except KeyboardInterrupt:
        return 130
    finally:
        close_isolators()


if __name__ == "__main__":
    sys.exit(main())
