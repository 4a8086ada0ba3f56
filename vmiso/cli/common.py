"""What every ``vmiso`` subcommand shares, and nothing else: the Isolator the arguments describe
(this process's own, or the agent's client), closing it, the exit codes, argument types. A leaf:
it imports no other CLI module, so the CLI's imports run one way (main -> subcommands -> here).
"""
import argparse
import sys

from ..errors import HostError
from ..spec import R_DESTROYED, R_GUEST_EXITED, R_TIMEOUT

EXIT_VMISO_ERROR = 125  # vmiso itself failed (1-124 belong to the task, as docker run's)
EXIT_TIMEOUT = 124      # as GNU timeout
EXIT_KILLED = 137       # as docker: 128 + SIGKILL
EXIT_NO_STATUS = 125    # the VM ended without reporting a status


def exit_code_of(termination):
    """The exit code ``vmiso run`` and ``vmiso wait`` end with for ``termination``."""
    if termination.reason == R_GUEST_EXITED:
        return termination.exit_code
    if termination.reason == R_TIMEOUT:
        return EXIT_TIMEOUT
    if termination.reason == R_DESTROYED:
        return EXIT_KILLED
    return EXIT_NO_STATUS


def positive_int(text):
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def size_arg(text):
    """Bytes from "123", "512M", "10G" (binary units, as qemu-img and dd read them)."""
    unit = text[-1:].upper() if text[-1:].isalpha() else ""
    number = text[: len(text) - len(unit)]
    try:
        if unit not in _UNITS:
            raise ValueError(text)
        return int(float(number) * _UNITS[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 512M or 10G") from None


_OPENED = []  # the Isolators this command made


def isolator(args, in_process=False):
    """The Isolator the CLI's arguments describe (imported late: --help needs no libvirt): the
    agent's client when an agent serves the work dir (always for an ordinary user), else this
    process's own. ``in_process``: a command the agent does not serve (HostError if one runs)."""
    from ..agent.client import route

    remote = route(args.workdir, args.agent_socket)
    if remote is not None:
        if in_process:
            raise HostError(f"the vmiso agent at {remote.socket_path} serves {args.workdir}: 'vmiso {args.command}' "
                            "works only in-process, while no agent serves the work dir")
        return remote
    try:
        from ..isolator import Isolator
    except ImportError as err:  # the client install (scripts/client.sh) has no libvirt
        raise HostError(f"no vmiso agent serves {args.workdir}, and this vmiso ({sys.argv[0]}) is the client "
                        f"install, which cannot work in-process ({err.name or err} is missing): start the agent "
                        "('make agent') or use the full install (.venv/bin/vmiso)") from err

    iso = Isolator(workdir=args.workdir, uri=args.uri, accel=args.accel, agent_id=args.agent_id,
                   disk_reserve=args.disk_reserve, disk_overcommit=args.disk_overcommit)
    _OPENED.append(iso)
    return iso


def close_isolators():
    """Close their libvirt connections before exiting: a connection dropped by process exit makes
    libvirtd log an "End of file while reading data" error for every command."""
    while _OPENED:
        _OPENED.pop().host.close()
    from ..agent.client import release_work_dir

    release_work_dir()
