"""``vmiso run``: a command in a fresh VM, output streamed, exit code passed through."""
import argparse
import json
import os
import secrets
import signal
import sys
import threading

from .. import slurm
from ..errors import InvalidSpec
from ..spec import R_GUEST_EXITED, Resources, TaskSpec, validate_container_id
from . import pulling, taskdata, terminal
from .common import exit_code_of, isolator

TERM_GRACE = 5.0     # SIGTERM (scancel): the task's stop signal first, hard stop after this; within Slurm's KillWait


def register(sub):
    p = sub.add_parser(
        "run", help="run a command in its own VM",
        description="Run CMD in a new VM with a copy-on-write disk of its own. Prints the task's stdout "
                    "and stderr as they arrive and exits with its exit code (124: timeout, 137: killed, "
                    "125: vmiso failed). The VM and its files are removed afterwards.",
        epilog="example: vmiso run --cpus 2 --mem 512 -- sh -c 'nproc; free -m'")
    p.add_argument("--image", default=None,
                   help="micro (default; micro:lean or micro:stock picks its kernel), a stored image's name or id "
                        "(a container image too: pulled first when missing, see --pull), or the path of a base image. "
                        "As with docker, a container image may also come first: vmiso run NAME:TAG [CMD...]")
    p.add_argument("--pull", choices=pulling.PULL_POLICIES, default="missing",
                   help="as docker's: a container image reference (NAME:TAG) not stored yet is pulled first "
                        "(missing, the default); always: pull again even when stored (a moved tag); never: only "
                        "what is stored. Root pulls; an ordinary user's run uses what root pulled")
    p.add_argument("--entrypoint", metavar="CMD",
                   help="container images: run CMD instead of the image's Entrypoint (its Cmd is dropped; "
                        "'' clears it)")
    p.add_argument("-u", "--user", metavar="USER[:GROUP]",
                   help="container images: the task's user, a name from the image's /etc/passwd or a uid "
                        "(default: the image's User, else root)")
    p.add_argument("--format", choices=("qcow2", "raw"), help="the base image's format (default: qcow2; "
                                                             "raw must be declared)")
    p.add_argument("--cpus", type=float, help="CPUs: vCPUs = ceil(N), fractions become a quota "
                                              "(default: the Slurm allocation's, else 1)")
    p.add_argument("--mem", type=int, metavar="MiB", help="guest memory in MiB (default: the Slurm "
                                                          "allocation's, else 256)")
    p.add_argument("--disk", type=float, metavar="GiB", help="root disk size in GiB (default: the image's)")
    p.add_argument("--timeout", type=float, metavar="S",
                   help="after S seconds the task's stop signal (SIGTERM unless --stop-signal), a hard stop 5 s later "
                        "(exit 124)")
    p.add_argument("--stop-signal", metavar="SIGNAL",
                   help="the signal a stop sends the task first, as docker's: a name (SIGQUIT, QUIT, SIGRTMIN+3) or "
                        "a number 1..64; the hard stop still follows (vmiso kill's --grace, 5 s after --timeout "
                        "or a SIGTERM to vmiso run). Default: a container image's StopSignal, else SIGTERM")
    p.add_argument("-e", "--env", action="append", default=[], metavar="NAME[=VALUE]",
                   help="set a variable in the task's environment; NAME alone passes the caller's value "
                        "(left out when unset)")
    p.add_argument("--env-file", action="append", default=[], metavar="FILE",
                   help="read variables from FILE: NAME=VALUE lines, NAME alone passes the caller's value, "
                        "# comments (docker's format); -e wins over it")
    p.add_argument("--no-slurm-env", action="store_true",
                   help="inside a Slurm job, do not pass the job's SLURM_* variables to the task")
    p.add_argument("-v", "--volume", action="append", default=[], metavar="HOST:GUEST[:ro]",
                   help="share host directory HOST at GUEST in the VM (virtio-9p; :ro read-only, enforced on "
                        "the host); QEMU's user must be able to read it (and write it, without :ro)")
    p.add_argument("--mount", action="append", default=[], metavar="type=bind,source=HOST,target=GUEST[,readonly]",
                   help="the same as -v, in docker's --mount form")
    p.add_argument("-i", "--interactive", action="store_true",
                   help="stream this process's stdin to the task's stdin, EOF included (without -i it is empty)")
    p.add_argument("-t", "--tty", action="store_true",
                   help="refused, with the reason: a task has no terminal (its stdout and stderr are the VM's "
                        "serial channels); -i alone streams stdin")
    p.add_argument("-w", "--workdir-in-guest", dest="guest_workdir", metavar="DIR",
                   help="working directory inside the guest (default /)")
    p.add_argument("--network", metavar="BRIDGE[,vlan=N][,ip=A.B.C.D/NN][,isolated]",
                   help="a NIC on BRIDGE (also mac=MAC, inbound=/outbound=AVG[:PEAK[:BURST]] in KB/s); "
                        "the address is allocated from the bridge's subnet unless ip= is given")
    p.add_argument("--name", help="container id (default: slurm-<job>.<step> in a Slurm job, else a random one)")
    p.add_argument("-d", "--detach", action="store_true",
                   help="print the container id and return at once; the container stays until 'vmiso rm'")
    p.add_argument("--rm", action="store_true",
                   help="remove the VM and its files when the task ends: what a run without -d always does "
                        "(accepted for docker's habit; refused with -d)")
    p.add_argument("--json", action="store_true", help="with -d: print the status as JSON")
    terminal.add_raw_flag(p)
    # REMAINDER: everything from CMD on belongs to the task, options included (as docker run).
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD [ARG...]", help="the command and its arguments")
    p.set_defaults(func=run)


def looks_like_image(word):
    """A word in CMD's place that names a container image as docker's ``run IMAGE``: it has a
    tag or a registry or repository part (``python:3.12``, ``reg:5000/x``, ``library/x``) and
    is not a path (``/bin/echo``, ``./job``). Anything else is the command, as before."""
    return (":" in word or "/" in word) and not word.startswith(("/", ".", "-"))


def image_and_command(args):
    """(image, command or None) from --image and the words after the options."""
    cmd = list(args.cmd)
    image = args.image
    if cmd[:1] == ["--"]:
        cmd = cmd[1:]
    elif image is None and cmd and looks_like_image(cmd[0]):
        image, cmd = cmd[0], cmd[1:]
        cmd = cmd[1:] if cmd[:1] == ["--"] else cmd
    return image or "micro", cmd or None


def spec_from_args(args):
    image, cmd = image_and_command(args)
    if cmd is None and image.startswith("micro"):
        raise InvalidSpec("command", "missing: vmiso run [OPTIONS] [--] CMD [ARG...]")
    entrypoint = None
    if args.entrypoint is not None:
        entrypoint = [args.entrypoint] if args.entrypoint else []
    cpus, mem_mib = slurm.size(args.cpus, args.mem, os.environ)
    resources = Resources(cpus=cpus, mem_mib=mem_mib, disk_gib=args.disk)
    return TaskSpec(command=None if cmd is None else [os.fsencode(a) for a in cmd],
                    entrypoint=entrypoint, user=args.user, env=taskdata.task_env(args, os.environ),
                    resources=resources, volumes=taskdata.volumes(args),
                    stdin=_stdin() if args.interactive else None,
                    image=image, image_format=args.format, timeout=args.timeout,
                    workdir=args.guest_workdir, network=_network(args), stop_signal=args.stop_signal)


def _stdin():
    """This process's stdin for the task, unbuffered: the thread copying it may still be blocked
    in a read when the task ends, and a daemon thread inside a buffered read makes the
    interpreter abort at exit (SIGABRT) instead of returning the task's exit code."""
    return sys.stdin.buffer.raw if hasattr(sys.stdin.buffer, "raw") else sys.stdin.buffer


def _network(args):
    if not getattr(args, "network", None):
        return None
    from .net import parse_network

    return parse_network(args.network)


def run(args):
    if args.detach and args.interactive:  # the copy into the guest lives in this process
        raise InvalidSpec("stdin", "-i streams this process's stdin to the task: it cannot be used with -d")
    if args.tty:  # docker's -it habit: say why, rather than argparse's "ignored explicit argument"
        raise InvalidSpec("tty", "-t is refused: a task gets no terminal in vmiso (its stdout and stderr are the "
                                 "VM's serial channels, so isatty() is false); use -i alone to stream stdin")
    if args.detach and args.rm:  # nothing stays to remove it when it ends
        raise InvalidSpec("rm", "--rm cannot be used with -d: a detached container stays until 'vmiso rm' "
                                "(a run without -d removes its VM when the task ends)")
    spec = spec_from_args(args)
    if args.name is not None:  # like the spec, before any agent or work dir is asked
        validate_container_id(args.name)
    iso = isolator(args)
    pulling.pull_for_run(args.workdir, spec.image, args.pull, getattr(iso, "remote", False))
    if getattr(iso, "remote", False):  # the agent's client: it has no work dir to look into
        taken, record = _taken_remote(iso), None
    else:
        taken = lambda name: os.path.lexists(iso.workdir.container_dir(name))  # noqa: E731
    container_id = args.name or slurm.container_id(os.environ, taken) or "run-" + secrets.token_hex(4)
    if not getattr(iso, "remote", False):
        # Before the launch: a vmiso killed by SIGKILL at any later point leaves a record that
        # `vmiso gc` (the Slurm epilog) finds. -d runs are nobody's once this process returns.
        record = slurm.hold_record(iso.workdir.root, container_id, os.environ)
    try:
        if getattr(iso, "remote", False):
            # Inside a Slurm job the agent names and sizes what was left to defaults after the
            # job it finds the caller in (never after this environment).
            given = [name for name, flag in (("cpus", args.cpus), ("mem_mib", args.mem)) if flag is not None]
            status = iso.launch(container_id, spec, hints={"auto_name": args.name is None, "given": given,
                                                           "attached": not args.detach})
            container_id = status.container_id
        else:
            status = iso.launch(container_id, spec)
        if args.detach:
            print(json.dumps(status.to_dict()) if args.json else container_id)
            return 0
        return _attach(iso, container_id, raw=args.raw)
    finally:
        if record is not None:
            record.release()


def _taken_remote(iso):
    """Whether a container id is taken, asked of the agent (only the caller's own are seen)."""
    from ..errors import NotFound

    def taken(name):
        try:
            iso.status(name)
            return True
        except NotFound:
            return False
    return taken


def _attach(iso, container_id, raw=False):
    """Stream the output, wait, remove the VM. SIGINT/SIGTERM kill the task first."""
    received = []

    def on_signal(signum, _frame):
        received.append(signum)
        grace = TERM_GRACE if signum == signal.SIGTERM else 0
        threading.Thread(target=iso.kill, args=(container_id,), kwargs={"grace": grace}, daemon=True).start()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        streams = {"stdout": sys.stdout.buffer, "stderr": sys.stderr.buffer}
        filters = {name: terminal.filter_for(stream, raw) for name, stream in streams.items()}
        for name, data in iso.output(container_id):
            try:
                streams[name].write(filters[name].feed(data))
                streams[name].flush()
            except BrokenPipeError:  # `vmiso run ... | head`: the task runs on, its output is dropped
                streams[name] = open(os.devnull, "wb")  # noqa: SIM115 (lives as long as the run)
        for name, stream in streams.items():
            stream.write(filters[name].close())
            stream.flush()
        termination = iso.wait(container_id)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        iso.destroy(container_id, grace=0)
    if received:
        return 128 + received[0]
    code = exit_code_of(termination)
    if termination.reason != R_GUEST_EXITED:
        print(f"vmiso: {termination.message} ({termination.state}, {termination.reason})", file=sys.stderr)
    return code

