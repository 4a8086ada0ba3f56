"""Slurm awareness for ``vmiso run``, and run records for ``vmiso gc``.

Inside a Slurm job or step (``SLURM_JOB_ID`` set), ``vmiso run`` sizes the VM from the allocation
and names the container after the job: ``slurm-<jobid>[_<arraytask>].<stepid>``. Everything here
is pure logic over an environment mapping, except the run records at the end.

Run records (``<workdir>/runs/<container id>``) say which live ``vmiso run`` process owns a
container. The record is written before the launch and flock()ed for the life of the process, so a
``vmiso run`` killed with SIGKILL leaves a record nobody holds: ``vmiso gc`` then knows the VM is
abandoned, and ``vmiso gc --job J`` (the Slurm epilog) finds the job's containers from the job id
recorded there even when ``--name`` was given.
"""
import fcntl
import json
import os
import re
import shlex
import sys

from .errors import AlreadyExists
from .paths import Workdir
from .spec import CONTAINER_ID_RE, Resources

# Slurm's special step ids (slurm.h): what a batch script, the extern step and salloc see.
SPECIAL_STEPS = {"4294967294": "batch", "4294967295": "extern", "4294967293": "interactive"}
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
MAX_ID = 64


def in_job(env):
    return bool(env.get("SLURM_JOB_ID"))


# --- sizing -------------------------------------------------------------------------------------
def _positive_int(value):
    """Slurm's number, or None when unset or not a positive integer (e.g. '2(x3)' lists)."""
    try:
        number = int(str(value).strip())
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


def slurm_cpus(env):
    """CPUs of the allocation for one task: --cpus-per-task if given, else the node's share."""
    return _positive_int(env.get("SLURM_CPUS_PER_TASK")) or _positive_int(env.get("SLURM_CPUS_ON_NODE"))


def slurm_mem_mib(env, cpus):
    """Memory of the allocation in MiB (Slurm's unit): per node, else per CPU times the CPUs."""
    per_node = _positive_int(env.get("SLURM_MEM_PER_NODE"))
    if per_node:
        return per_node
    per_cpu = _positive_int(env.get("SLURM_MEM_PER_CPU"))
    if per_cpu and cpus:
        return int(per_cpu * cpus)
    return None


def size(cpus, mem_mib, env):
    """(cpus, mem_mib) for the VM: what the flags say, else the Slurm allocation's, else
    Resources' defaults. A flag always wins, also over the other value's Slurm source."""
    default = Resources()
    if in_job(env):
        cpus = cpus if cpus is not None else slurm_cpus(env)
        if mem_mib is None:
            # Memory per CPU scales with the CPUs Slurm gave, not with a --cpus override.
            mem_mib = slurm_mem_mib(env, slurm_cpus(env))
    return (cpus if cpus is not None else default.cpus,
            mem_mib if mem_mib is not None else default.mem_mib)


# --- naming -------------------------------------------------------------------------------------
def step_name(env):
    step = env.get("SLURM_STEP_ID") or env.get("SLURM_STEPID")
    if not step:
        return "batch"  # a batch script's environment carries no step id
    return SPECIAL_STEPS.get(step, step)


def job_name(env):
    """``<jobid>`` or, for an array task, ``<arrayjobid>_<taskid>`` (as Slurm prints it: %A_%a)."""
    array_job, task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return env["SLURM_JOB_ID"]


def container_base(env):
    """``slurm-<job>.<step>``, made valid for CONTAINER_ID_RE (odd characters become '-'),
    or None outside Slurm."""
    if not in_job(env):
        return None
    name = _UNSAFE.sub("-", f"slurm-{job_name(env)}.{step_name(env)}")
    return name[:MAX_ID]


def container_id(env, taken=lambda name: False):
    """The container id for this job step; ``.2``, ``.3``... when ``taken(name)`` (two
    ``vmiso run`` in one step, or the record of an earlier one not yet removed)."""
    base = container_base(env)
    if base is None:
        return None
    if not taken(base):
        return base
    for n in range(2, 1000):
        suffix = f".{n}"
        name = base[:MAX_ID - len(suffix)] + suffix
        if not taken(name):
            return name
    return None  # let the caller fall back to a random id


def job_prefixes(job_id, env):
    """Container-id prefixes of Slurm job ``job_id``: ``slurm-<id>.`` and, when ``env`` is that
    job's (the epilog's environment) and it is an array task, ``slurm-<array>_<task>.``."""
    prefixes = [f"slurm-{job_id}."]
    if env.get("SLURM_JOB_ID") == str(job_id) and env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        prefixes.append(f"slurm-{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}.")
    return prefixes


def valid_job_id(job_id):
    """Job ids are numbers; anything else never reaches a path or a pattern."""
    return bool(re.fullmatch(r"[0-9]{1,20}", str(job_id)))


# --- run records --------------------------------------------------------------------------------
class RunRecord:
    """Held by one ``vmiso run`` process for one container; released when it exits (or dies)."""

    def __init__(self, workdir, container_id, job_id=None):
        directory = str(Workdir.of(workdir).runs)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.path = os.path.join(directory, container_id)
        self.fd = _open_locked(self.path)
        os.ftruncate(self.fd, 0)
        os.write(self.fd, json.dumps({"container": container_id, "job": job_id, "pid": os.getpid()}).encode())

    def release(self, remove=True):
        """Drop the record (after the container is removed) and the lock."""
        if self.fd is None:
            return
        if remove:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        os.close(self.fd)
        self.fd = None


def _open_locked(path):
    """Open and flock ``path``; retry if gc unlinked it between our open and our lock.
    AlreadyExists if another live process holds it (never wait: it holds it until it exits)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)  # a live `vmiso run` owns a container of this name
            raise AlreadyExists("container", os.path.basename(path)) from None
        try:
            if os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def hold_record(workdir, container_id, env):
    if not CONTAINER_ID_RE.fullmatch(container_id):
        return None  # launch rejects it with a proper error
    return RunRecord(workdir, container_id, env.get("SLURM_JOB_ID"))


def read_records(workdir):
    """{container id: (job id or None, held)}: ``held`` is False once the owning process is gone."""
    directory = str(Workdir.of(workdir).runs)
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return {}
    records = {}
    for name in names:
        if CONTAINER_ID_RE.fullmatch(name):
            record = _read_record(os.path.join(directory, name))
            if record is not None:
                records[name] = record
    return records


def _read_record(path):
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            held = False
        except BlockingIOError:
            held = True
        try:
            job = json.loads(os.read(fd, 4096) or b"{}").get("job")
        except ValueError:
            job = None  # written but not yet filled: its owner holds it, or died at once
        return (job, held)
    finally:
        os.close(fd)


def remove_record(workdir, container_id):
    """Remove a record if nobody holds it (under its lock, so a run taking it is never robbed)."""
    path = os.path.join(Workdir.of(workdir).runs, container_id)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.stat(path, follow_symlinks=False).st_ino != os.fstat(fd).st_ino:
            return False  # another gc removed ours and a new run made its own
        os.unlink(path)
        return True
    except (BlockingIOError, FileNotFoundError):
        return False
    finally:
        os.close(fd)


# --- operator set-up ----------------------------------------------------------------------------
DEFAULT_EPILOG = "/etc/slurm/vmiso-epilog.sh"
MIN_KILL_WAIT = 30  # seconds; vmiso needs its SIGTERM grace (5 s) plus a hard stop and clean-up


def vmiso_command():
    """The argv that runs this vmiso: the venv's script next to this Python, else ``-m vmiso``."""
    script = os.path.join(os.path.dirname(sys.executable), "vmiso")
    if os.access(script, os.X_OK):
        return [script]
    return [sys.executable, "-m", "vmiso"]


def epilog_script(vmiso_argv, workdir=None, log=None):
    """The Epilog script: remove the ended job's VMs on this node. Slurm runs it as root (the
    SlurmdUser) with SLURM_JOB_ID (and SLURM_ARRAY_* for array tasks) after the job's processes
    ended, including a ``vmiso run`` that SIGKILL ended before it could remove its VM."""
    argv = list(vmiso_argv) + (["--workdir", str(workdir)] if workdir else []) + ["gc", "--job"]
    out = f" >>{shlex.quote(str(log))} 2>&1" if log else ""
    return (
        "#!/bin/sh\n"
        "# Slurm Epilog written by `vmiso slurm install-epilog`: remove the VMs of the job that just\n"
        "# ended on this node. A non-zero exit drains the node (a VM could not be removed).\n"
        '[ -n "$SLURM_JOB_ID" ] || exit 0\n'
        "# slurmd gives the Epilog a bare environment; vmiso runs nft and ip from the sbin dirs.\n"
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin; export PATH\n"
        f'exec {" ".join(shlex.quote(a) for a in argv)} "$SLURM_JOB_ID"{out}\n'
    )


def config_lines(epilog=DEFAULT_EPILOG):
    """The slurm.conf lines a vmiso node wants, with why (printed by ``vmiso slurm config``)."""
    return [
        "# --- vmiso: VM-isolated jobs (add to slurm.conf on every node and the controller) ---",
        "# Remove each job's VMs when it ends, also after a `vmiso run` killed with SIGKILL:",
        f"Epilog={epilog}",
        "# scancel sends SIGTERM, then SIGKILL after KillWait: vmiso needs a few seconds to stop and",
        "# remove its VM (its stop signal to the task, a hard stop 5 s later, its files), so keep KillWait",
        f"# at {MIN_KILL_WAIT} or more:",
        f"KillWait={MIN_KILL_WAIT}",
        "# vmiso sizes each VM from the allocation (SLURM_CPUS_PER_TASK / SLURM_CPUS_ON_NODE,",
        "# SLURM_MEM_PER_NODE / SLURM_MEM_PER_CPU): make memory a consumable so jobs get a size,",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core_Memory",
        "DefMemPerCPU=512",
        "# Jobs of ordinary users go through the vmiso agent, which finds each caller's job in its",
        "# cgroups, sizes the VM within the job's allocation and moves QEMU into the job's cgroups",
        "# (the job's limits bind it, sstat/sacct count it): track, confine and account by cgroups,",
        "# with CgroupPlugin=cgroup/v1 (or v2), ConstrainCores=yes, ConstrainRAMSpace=yes in cgroup.conf.",
        "ProctrackType=proctrack/cgroup",
        "TaskPlugin=task/cgroup",
        "JobAcctGatherType=jobacct_gather/cgroup",
        "# A root in-process run's QEMU stays under libvirtd, outside the job, and needs ~100-250 MiB",
        "# beyond the guest's memory: keep the node's RealMemory (or MemSpecLimit) that much below.",
    ]
