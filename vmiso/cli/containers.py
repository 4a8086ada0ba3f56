"""``vmiso ps|wait|kill|rm|logs``: containers that any vmiso process launched."""
import json
import sys
import time

from ..errors import NotFound
from ..state import CheckpointError
from . import terminal
from .common import exit_code_of, isolator


def register(sub):
    p = sub.add_parser("ps", help="list containers", description="List every container with a record in "
                                                             "the work directory, running or ended.")
    p.add_argument("--json", action="store_true", help="one JSON array of status objects")
    p.set_defaults(func=ps)

    p = sub.add_parser("wait", help="wait for a container to end; exit with its exit code",
                       description="Block until the container ends, print its termination, exit with "
                                   "the task's exit code (124 timeout, 137 killed, 125 no status).")
    p.add_argument("id")
    p.add_argument("--timeout", type=float, metavar="S", help="give up after S seconds (exit 125)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=wait)

    p = sub.add_parser("kill", help="stop a container's VM (record kept)",
                       description="The task's stop signal (as docker stop: SIGTERM unless 'vmiso run "
                                   "--stop-signal' or the image's StopSignal named another), then after "
                                   "--grace seconds a hard stop of the VM (--grace 0: at once). The record stays for "
                                   "wait/ps/logs; 'vmiso rm' removes it.")
    p.add_argument("id", nargs="+")
    p.add_argument("--grace", type=float, default=5.0, metavar="S", help="seconds before a hard stop (5)")
    p.set_defaults(func=kill)

    p = sub.add_parser("rm", help="remove a container (killing it first if it runs)",
                       description="Kill the container if it runs (its stop signal to the task, a hard stop after "
                                   "--grace seconds), then remove its VM, files and record.")
    p.add_argument("id", nargs="+")
    p.add_argument("--grace", type=float, default=5.0, metavar="S", help="seconds before a hard stop (5)")
    p.set_defaults(func=rm)

    p = sub.add_parser("logs", help="print a container's boot console (or its task output)",
                       description="Print the boot console log; --task prints the task's stdout and stderr.")
    p.add_argument("id")
    p.add_argument("--task", action="store_true", help="the task's stdout/stderr instead of the console")
    p.add_argument("-f", "--follow", action="store_true", help="with --task: keep printing until the task ends")
    terminal.add_raw_flag(p)
    p.set_defaults(func=logs)


def _iso(args):
    return isolator(args)


def ps(args):
    iso = _iso(args)
    report = iso.recover()  # this agent's containers only; others' are read as they are
    statuses = []
    for cid in sorted(set(report.ids) | set(report.foreign)):
        try:
            statuses.append(iso.status(cid))
        except (NotFound, CheckpointError):
            continue  # removed (or being launched) meanwhile
    if args.json:
        print(json.dumps([s.to_dict() for s in statuses], indent=1))
        return 0
    print(f"{'CONTAINER':<24} {'STATE':<10} {'IMAGE':<12} {'ACCEL':<5} {'AGE':>7}  {'OWNER':<12} EXIT/REASON")
    for s in statuses:
        age = f"{time.time() - (s.started_at or time.time()):.0f}s"
        end = f"{s.termination.exit_code} {s.termination.reason}" if s.termination else ""
        print(f"{s.container_id:<24} {s.state:<10} {s.image:<12} {s.accel:<5} {age:>7}  {s.owner:<12} {end}")
    if getattr(iso, "remote", False):
        pool = iso.info().get("pool")  # the agent's own pool (its clients cannot read pool.json)
    else:
        from ..pool import read_status

        pool = read_status(str(iso.workdir.root))
    for slot in (pool or {}).get("slots", ()):  # warm VMs: no container yet
        print(f"{'(pool) ' + slot['id']:<24} {'WARM-' + slot['state'].upper():<10} "
              f"{pool['config']['image']:<12} {'':<5} {'':>7}  {pool['agent']:<12}")
    return 0


def wait(args):
    iso = _iso(args)
    termination = iso.wait(args.id, timeout=args.timeout)
    if args.json:
        print(json.dumps(termination.to_dict()))
    else:
        print(f"{termination.state} {termination.reason} exit_code={termination.exit_code}")
    return exit_code_of(termination)


def kill(args):
    iso = _iso(args)
    for cid in args.id:
        t = iso.kill(cid, grace=args.grace)
        print(f"{cid} {t.state} {t.reason}")
    return 0


def rm(args):
    iso = _iso(args)
    for cid in args.id:
        iso.destroy(cid, grace=args.grace)
        print(cid)
    return 0


def logs(args):
    iso = _iso(args)
    streams = {"stdout": sys.stdout.buffer, "stderr": sys.stderr.buffer}
    filters = {name: terminal.filter_for(stream, args.raw) for name, stream in streams.items()}
    if not args.task:
        for chunk in _console(iso, args.id):
            streams["stdout"].write(filters["stdout"].feed(chunk))
    else:
        for name, data in iso.output(args.id, follow=args.follow):
            streams[name].write(filters[name].feed(data))
            streams[name].flush()
    for name, stream in streams.items():
        stream.write(filters[name].close())
        stream.flush()
    return 0


def _console(iso, container_id):
    """The console log's bytes in chunks: from the agent (RemoteIsolator.console), or the file."""
    if getattr(iso, "remote", False):
        yield from iso.console(container_id)
        return
    with open(iso.console_log(container_id), "rb") as f:
        while chunk := f.read(65536):
            yield chunk
