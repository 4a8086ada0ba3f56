"""The Slurm job of an agent's caller, from the kernel and Slurm, never from the caller's word.

slurmd (``ProctrackType=proctrack/cgroup``) puts every process of a job step into cgroups it
creates as root, so ``/proc/<pid>/cgroup`` of the caller (SO_PEERCRED's pid) names the job:

    v1 (cgroup/v1):  /slurm[_<node>]/uid_<uid>/job_<id>/step_<step>[/task_<n>]
    v2 (systemd):    /system.slice/<node>_slurmstepd.scope/job_<id>/step_<step>/...

A user can neither create nor enter those directories of another job, and the caller's
environment (``SLURM_JOB_ID``, ``SLURM_CPUS_*``) is never read here. Where the kernel has
SO_PEERPIDFD (Linux 6.5), the caller is proven alive after its cgroups were read, so a pid reused
by another process in between cannot lend its job to the caller. Slurm itself (``squeue``, with a
format of fields no user can write into, unlike ``scontrol show job``'s JobName or WorkDir) then
says the job runs, whose it is (it must be the caller's uid) and what it holds on this node.
"""
import errno
import os
import re
import signal
import socket
from dataclasses import dataclass, field
from typing import Optional

from .. import _proc
from ..errors import CommandFailed, Forbidden, HostError

SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)  # asm-generic/socket.h (Linux 6.5)
SQUEUE_TIMEOUT_S = 15
_JOB_PATH = re.compile(r"^(?P<job_dir>(?:/[^/]+)*?/(?:slurm[^/]*/uid_(?P<uid>[0-9]+)|[^/]*slurmstepd\.scope)"
                       r"/job_(?P<job>[0-9]+))/step_(?P<step>[A-Za-z0-9_]+)(?:/|$)")
_SQUEUE_FIELDS = ("JobID", "ArrayJobID", "ArrayTaskID", "UserID", "State", "NumNodes", "tres-alloc")
_UNITS = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}


@dataclass(frozen=True)
class Job:
    """A running Slurm job step a caller's process belongs to, on this node."""

    job_id: str                   # Slurm's job id (an array task's own id)
    step: str                     # batch, extern, interactive, or the step's number
    uid: int
    cpus: int                     # CPUs the job holds on this node
    mem_mib: Optional[int]        # memory it holds on this node (None: Slurm gives no size)
    array_job: Optional[str] = None
    array_task: Optional[str] = None
    cgroups: dict = field(default_factory=dict)   # controller -> the caller's cgroup directory
    job_dirs: tuple = ()          # the job's own cgroup directories: gone when the job has ended

    @property
    def name(self):
        """How Slurm prints the job: ``<arrayjob>_<task>`` for an array task, else its id."""
        return f"{self.array_job}_{self.array_task}" if self.array_task else self.job_id

    @property
    def container_base(self):
        return f"slurm-{self.name}.{self.step}"

    def ended(self):
        """The job's cgroups are gone: slurmstepd removes them when the job's last step ended."""
        return bool(self.job_dirs) and not any(os.path.isdir(d) for d in self.job_dirs)


def parse_cgroup_file(text):
    """{controller: path} of a /proc/<pid>/cgroup file ("" is the cgroup2 hierarchy)."""
    found = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for name in parts[1].split(",") if parts[1] else [""]:
                found[name] = parts[2]
    return found


def job_paths(groups):
    """{controller: match} of the paths in ``groups`` that are a Slurm job step's."""
    return {name: m for name, path in groups.items() if (m := _JOB_PATH.match(path))}


def peer_pidfd(conn):
    """A pidfd of the process that connected ``conn`` (SO_PEERPIDFD), or None where the kernel
    has none."""
    try:
        return conn.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError as err:
        if err.errno in (errno.ENOPROTOOPT, errno.EINVAL, errno.EOPNOTSUPP):
            return None
        raise


def caller_cgroups(conn, pid, proc="/proc"):
    """{controller: path} of the caller's cgroups, read while the caller provably lives."""
    pidfd = peer_pidfd(conn) if conn is not None else None
    try:
        try:
            with open(f"{proc}/{pid}/cgroup") as f:
                text = f.read()
        except FileNotFoundError:
            raise Forbidden("your process ended while the agent looked up its Slurm job") from None
        if pidfd is not None:
            try:
                signal.pidfd_send_signal(pidfd, 0)
            except ProcessLookupError:
                raise Forbidden("your process ended while the agent looked up its Slurm job") from None
    finally:
        if pidfd is not None:
            os.close(pidfd)
    return parse_cgroup_file(text)


def mounts():
    from ..accounting import cgroups

    return cgroups.mounts()


def identify(conn, peer, proc="/proc", squeue=None, mount_points=None):
    """The Job of ``peer`` (auth.Peer; ``conn`` its connection), or None when its process is in
    no Slurm job on this node. Forbidden when the job is not the caller's or does not run."""
    groups = caller_cgroups(conn, peer.pid, proc)
    found = job_paths(groups)
    if not found:
        return None
    ids = {m["job"] for m in found.values()}
    if len(ids) != 1:
        raise HostError(f"process {peer.pid} is in the cgroups of several Slurm jobs: {sorted(ids)}")
    job_id = ids.pop()
    steps = {m["step"] for m in found.values()}
    uids = {int(m["uid"]) for m in found.values() if m["uid"] is not None}
    if uids and uids != {peer.uid}:
        raise Forbidden(f"your process is in Slurm job {job_id}, which is not yours")
    info = (squeue or query_job)(job_id)
    if info["uid"] != peer.uid:
        raise Forbidden(f"your process is in Slurm job {job_id}, which is not yours")
    if info["state"] != "RUNNING":
        raise Forbidden(f"Slurm job {job_id} is {info['state']}: it may not start VMs")
    if len(steps) != 1:
        raise HostError(f"process {peer.pid} is in several steps of Slurm job {job_id}: {sorted(steps)}")
    points = mounts() if mount_points is None else mount_points
    # The caller's own directory in each hierarchy (a task's, below the step), where QEMU joins it.
    cgroup_dirs = {name: points[name] + groups[name] for name in found if name in points}
    job_dirs = tuple(sorted({points[name] + m["job_dir"] for name, m in found.items() if name in points}))
    cpus, mem_mib = info["cpus"], info["mem_mib"]
    if info["nodes"] != 1:  # the job's TRES are the whole job's: this node's share is in its cgroups
        cpus, mem_mib = node_share(job_dirs, points)
    return Job(job_id=job_id, step=steps.pop(), uid=peer.uid,
               cpus=cpus, mem_mib=mem_mib, array_job=info["array_job"], array_task=info["array_task"],
               cgroups=cgroup_dirs, job_dirs=job_dirs)


def query_job(job_id):
    """{uid, state, nodes, cpus, mem_mib, array_job, array_task} of running job ``job_id``, from
    squeue fields no user can write text into."""
    fmt = ",".join(f"{name}:|" for name in _SQUEUE_FIELDS)
    try:
        out = _proc.run(["squeue", "-h", "-j", str(job_id), "-O", fmt], timeout=SQUEUE_TIMEOUT_S).stdout
    except CommandFailed as err:
        raise HostError(f"cannot ask Slurm about job {job_id}: {err}") from err
    for line in out.splitlines():
        values = line.split("|")
        if len(values) < len(_SQUEUE_FIELDS) or values[0].strip() != str(job_id):
            continue  # an array's pending remainder shares the array's id
        return parse_squeue_line(values)
    raise Forbidden(f"Slurm does not know job {job_id} any more")


def parse_squeue_line(values):
    _job, array_job, array_task, uid, state, nodes, tres = (v.strip() for v in values[:len(_SQUEUE_FIELDS)])
    alloc = dict(item.split("=", 1) for item in tres.split(",") if "=" in item)
    return {"uid": int(uid), "state": state, "nodes": int(nodes) if nodes.isdigit() else 1,
            "cpus": int(alloc["cpu"]) if alloc.get("cpu", "").isdigit() else None,
            "mem_mib": mem_mib(alloc.get("mem")),
            "array_job": array_job if array_task.isdigit() else None,
            "array_task": array_task if array_task.isdigit() else None}


def mem_mib(text):
    """MiB of a Slurm size ("300M", "2G", "512K"; a bare number is MiB), or None."""
    if not text:
        return None
    unit = text[-1].upper() if text[-1].isalpha() else "M"
    number = text[:-1] if text[-1].isalpha() else text
    try:
        return int(float(number) * _UNITS[unit])
    except (KeyError, ValueError):
        return None


def node_share(job_dirs, points):
    """(cpus, mem_mib) the job's cgroups on this node allow: cpuset.cpus and the memory limit
    (None where Slurm does not constrain them here)."""
    cpus = mem = None
    for d in job_dirs:
        if points.get("cpuset") and d.startswith(points["cpuset"] + "/"):
            cpus = _count_cpus(_read(os.path.join(d, "cpuset.cpus")))
        if points.get("memory") and d.startswith(points["memory"] + "/"):
            limit = _read(os.path.join(d, "memory.limit_in_bytes"))
            if limit.isdigit() and int(limit) < 1 << 60:
                mem = int(limit) >> 20
    return cpus or os.cpu_count() or 1, mem


def _read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _count_cpus(text):
    count = 0
    for part in filter(None, text.split(",")):
        low, _, high = part.partition("-")
        count += int(high or low) - int(low) + 1
    return count


# --- what a job's caller gets -------------------------------------------------------------------
MIN_GUEST_MIB = 64  # below this the micro guest does not boot


def size(job, cpus, mem_mib, given, tcg):
    """(cpus, mem_mib) of a VM for ``job``'s caller. ``given``: the sizes the caller asked for
    (flags); the others default to the job's allocation on this node. A request above the
    allocation is Forbidden. The default memory leaves QEMU's overhead (accounting/limits.py)
    inside the allocation, because QEMU is charged to the job's memory cgroup (place())."""
    from ..accounting.limits import MIB, hard_limit_bytes

    if "cpus" in given:
        if cpus > job.cpus + 1e-9:
            raise Forbidden(f"--cpus {cpus:g} is more than the {job.cpus} CPU(s) Slurm job {job.name} holds "
                            "on this node")
    else:
        cpus = job.cpus
    if "mem_mib" in given:
        if job.mem_mib is not None and mem_mib > job.mem_mib:
            raise Forbidden(f"--mem {mem_mib} is more than the {job.mem_mib} MiB Slurm job {job.name} holds "
                            "on this node")
    elif job.mem_mib is not None:
        vcpus = -(-cpus // 1)
        overhead = hard_limit_bytes(0, vcpus, tcg) // MIB
        mem_mib = int((job.mem_mib - overhead) * 64 // 65)  # the guest's 1/64 for page tables too
        if mem_mib < MIN_GUEST_MIB:
            raise Forbidden(f"Slurm job {job.name} holds {job.mem_mib} MiB on this node: QEMU's overhead "
                            f"(up to {overhead} MiB) leaves too little for a VM; ask Slurm for more (--mem) "
                            "or give vmiso run --mem")
    return cpus, mem_mib


def place(pid, job):
    """Move process ``pid`` (QEMU, all its threads at once: cgroup.procs) into the caller's
    cgroups of ``job``, in every hierarchy where Slurm placed the caller: the job's cpuset and
    memory limits then bind the VM, Slurm's accounting (jobacct_gather/cgroup reads the task's
    cpuacct and memory groups) counts it, and proctrack signals it with the step. libvirt's own
    groups keep QEMU in the hierarchies Slurm leaves alone (v1 cpu: the CPU quota; cgroup2's
    cpu.stat, which usage() reads). Memory QEMU touched before the move stays charged to
    libvirt's group (v1 moves no charges: move_charge_at_immigrate is refused by current kernels);
    the guest's RAM is touched later, as the guest uses it. HostError if a hierarchy refuses."""
    for directory in sorted(job.cgroups.values()):
        try:
            with open(os.path.join(directory, "cgroup.procs"), "w") as f:
                f.write(str(pid))
        except OSError as err:
            raise HostError(f"cannot move QEMU (pid {pid}) into Slurm job {job.name}'s cgroup {directory}: "
                            f"{err.strerror}") from err


def process_start(pid, proc="/proc"):
    """The start time of process ``pid`` (clock ticks since boot; /proc/<pid>/stat field 22), or
    None when it is gone: with the pid, it names one process for good."""
    try:
        with open(f"{proc}/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return int(data.rsplit(b")", 1)[1].split()[19])
