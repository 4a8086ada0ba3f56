"""``vmiso gc``: remove what no live ``vmiso`` needs any more (and, for the Slurm epilog, a job's VMs).

    vmiso gc                 recover(), then remove every container that has ended and every
                             container whose ``vmiso run`` died (SIGKILL: its run record is unheld)
    vmiso gc --job JOBID     recover(), then remove every container of Slurm job JOBID, running
                             or not (the job is over: the epilog runs after its processes ended)

A container a live ``vmiso run`` still streams is never touched without ``--job``: its record is
held. ``-d`` containers that still run are left alone (nobody can tell they are abandoned), and
so is every container of another agent id sharing the work directory.

While an agent serves the work dir, gc asks it (a root-only endpoint, the same rules): the agent
also knows the containers it bound to a job (agent/bindings.py) and which attached runs' clients
died, and it stays the work dir's one writer.
"""
import json
import os
import sys

from .. import slurm, state
from ..errors import InvalidSpec, VmisoError
from ..paths import Workdir
from .common import isolator

EXIT_PARTIAL = 1  # some container could not be removed (a Slurm epilog failing drains the node)


def register(sub):
    p = sub.add_parser(
        "gc", help="remove ended and abandoned containers (--job: a Slurm job's)",
        description="Recover, then remove every container that has ended and every container whose "
                    "'vmiso run' was killed. With --job, remove every container of that Slurm job, "
                    "running or not (for the Slurm Epilog).")
    p.add_argument("--job", metavar="JOBID", help="only the containers of this Slurm job, running or not")
    p.add_argument("--grace", type=float, default=2.0, metavar="S",
                   help="seconds a running task has after its stop signal before a hard stop (2)")
    p.add_argument("--json", action="store_true", help="print what was removed as JSON")
    p.set_defaults(func=gc)


def gc(args):
    if args.job is not None and not slurm.valid_job_id(args.job):
        raise InvalidSpec("job", f"{args.job!r} is not a Slurm job id")
    if args.job is not None and not _job_has_containers(args):
        return 0  # the Epilog runs after every job: most never used vmiso; no libvirt needed then
    iso = isolator(args)
    if getattr(iso, "remote", False):
        prefixes = slurm.job_prefixes(args.job, os.environ) if args.job is not None else []
        removed, failed = iso.gc(job=args.job, prefixes=prefixes, grace=args.grace)
        _print(args, removed, failed, _NoReport())
        return EXIT_PARTIAL if failed else 0
    report = iso.recover()
    records = slurm.read_records(iso.workdir.root)
    if args.job is not None:
        targets = job_containers(iso.containers(), records, args.job, os.environ)
    else:
        targets = unneeded_containers(iso, report, records)
    targets = [cid for cid in targets if _ours(iso, cid)]
    removed, failed = _remove_all(iso, targets, args.grace)
    _forget_stale_records(iso, records)
    _print(args, removed, failed, report)
    return EXIT_PARTIAL if failed else 0


class _NoReport:
    """The agent recovered when it started: nothing of a recover() to print."""

    orphans: list = []
    corrupt: list = []


def _job_has_containers(args):
    """A container dir, a run record or an agent's binding of the job exists (a launch makes its
    dir before its domain and removes it after, so a job without either has no VM either)."""
    workdir = Workdir(args.workdir)
    records = slurm.read_records(workdir.root)
    return bool(job_containers(workdir.container_ids(), records, args.job, os.environ)) or \
        any(job == str(args.job) for job, _held in records.values()) or \
        _bound_to(workdir.agent_bindings, str(args.job))


def _bound_to(directory, job_id):
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return False
    for name in names:
        try:
            with open(os.path.join(directory, name)) as f:
                if (json.load(f).get("job") or {}).get("id") == job_id:
                    return True
        except (OSError, ValueError, AttributeError):
            continue
    return False


def job_containers(container_ids, records, job_id, env):
    """Containers of Slurm job ``job_id``: by name, or by the job id their run recorded."""
    prefixes = tuple(slurm.job_prefixes(job_id, env))
    return sorted(cid for cid in container_ids
                  if cid.startswith(prefixes) or records.get(cid, (None, True))[0] == str(job_id))


def unneeded_containers(iso, report, records):
    """Ended containers nobody streams, and running ones whose ``vmiso run`` is gone."""
    targets = []
    for cid in report.ids:
        job, held = records.get(cid, (None, False))
        if held:
            continue  # a live `vmiso run` owns it and removes it itself
        if cid in report.terminated or cid in records:
            targets.append(cid)  # ended, or its run died (an unheld record) while it still runs
    return targets


def _ours(iso, container_id):
    """Only this agent's containers (the CLI's): another agent sharing the work directory
    supervises its own, and may still want an ended one's record."""
    try:
        return state.read(str(iso.workdir.container_dir(container_id))).agent_id == iso.agent_id
    except state.CheckpointError:
        return False  # gone meanwhile, or corrupt (recover() cleaned those)


def _remove_all(iso, targets, grace):
    removed, failed = {}, {}
    for cid in targets:
        try:
            termination = iso.destroy(cid, grace=grace)
        except VmisoError as err:
            failed[cid] = str(err)
            continue
        slurm.remove_record(iso.workdir.root, cid)
        removed[cid] = termination.to_dict() if termination is not None else None
    return removed, failed


def _forget_stale_records(iso, records):
    """Records of containers that are gone (their run died after removing the container)."""
    existing = set(iso.containers())
    for cid in records:
        if cid not in existing:
            slurm.remove_record(iso.workdir.root, cid)


def _print(args, removed, failed, report):
    if args.json:
        print(json.dumps({"removed": removed, "failed": failed, "orphans": report.orphans,
                          "corrupt": report.corrupt}))
        return
    for cid, termination in removed.items():
        how = f"{termination['state']} {termination['reason']}" if termination else "gone"
        print(f"removed {cid} ({how})")
    for cid in report.orphans:
        print(f"removed orphan domain of {cid}")
    for cid, err in failed.items():
        print(f"vmiso: error: cannot remove {cid}: {err}", file=sys.stderr)
