"""A real single-node Slurm for tests: munged, slurmctld and slurmd started in a temp dir, stopped after.

    with single_node_slurm(workdir="/var/lib/vmiso") as cluster:
        job = cluster.sbatch("--wrap", "vmiso run -- true")
        [record] = cluster.wait_done(job)      # the job completion log's record(s) of the job
        assert record["ExitCode"] == "0:0"

Everything lives in the temp dir: a munge key and munged's socket (Slurm finds it through
``AuthInfo=socket=``), slurm.conf (the daemons and the client commands read ``SLURM_CONF``),
state, spool, logs, pid files, the job completion log and an Epilog running ``vmiso gc --job``.
The daemons run in the foreground as our children and listen on 127.0.0.1 only, on free ports
of their own (``CommunicationParameters=NoCtldInAddrAny,NoInAddrAny``); on exit
``scontrol shutdown`` stops them; the exit fails if any process started under this
slurm.conf (daemons, slurmstepd, jobs) is still alive. Needs root and Debian's ``slurm-wlm munge``.
"""
import contextlib
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time

from .. import slurm as vmiso_slurm

KILL_WAIT = 30
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
MEM_RESERVE_MIB = 2048  # left to the host (libvirtd, QEMU's overhead): slurmd checks RealMemory
ACCT_FREQUENCY = 2  # seconds between slurmstepd's samples of a task's cgroups (sstat's MaxRSS)
# cgroup.conf: the v1 plugin on this hybrid layout (no systemd to ask for a v2 scope); cores and
# memory of each job confined, devices left alone (QEMU opens /dev/kvm and tun before it is moved).
CGROUP_CONF = ("CgroupPlugin=cgroup/v1", "CgroupMountpoint=/sys/fs/cgroup", "CgroupAutomount=no",
               "ConstrainCores=yes", "ConstrainRAMSpace=yes", "AllowedRAMSpace=100", "ConstrainSwapSpace=no",
               "ConstrainDevices=no")


class SlurmError(RuntimeError):
    """The test Slurm failed to start or to stop cleanly; the message carries its logs' tail."""


@contextlib.contextmanager
def single_node_slurm(workdir=None, vmiso_argv=None, kill_wait=KILL_WAIT, def_mem_per_cpu=256):
    """Start munged, slurmctld and slurmd; yield a Cluster; stop them all and check it."""
    with tempfile.TemporaryDirectory(prefix="vmiso-slurm-") as tmp:
        cluster = Cluster(tmp, workdir, vmiso_argv or vmiso_slurm.vmiso_command(), kill_wait, def_mem_per_cpu)
        try:
            cluster.start()
            yield cluster
        finally:
            cluster.stop()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mem_mib():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    raise SlurmError("no MemTotal in /proc/meminfo")


class Cluster:
    """One single-node Slurm in ``tmp``. ``env`` is what client commands need (SLURM_CONF)."""

    def __init__(self, tmp, workdir, vmiso_argv, kill_wait, def_mem_per_cpu):
        self.tmp = tmp
        self.node = socket.gethostname().split(".")[0]
        self.conf = os.path.join(tmp, "slurm.conf")
        self.jobcomp = os.path.join(tmp, "jobcomp.log")
        self.munge_socket = os.path.join(tmp, "munge", "munge.socket")
        self.epilog_log = os.path.join(tmp, "epilog.log")
        self.workdir = workdir
        self.vmiso_argv = list(vmiso_argv)
        self.kill_wait = kill_wait
        self.def_mem_per_cpu = def_mem_per_cpu
        self.env = dict(os.environ, SLURM_CONF=self.conf)
        self.procs = {}  # name -> Popen

    # --- start --------------------------------------------------------------------------------
    def start(self):
        for sub in ("munge", "state", "spool", "log", "run"):
            os.makedirs(os.path.join(self.tmp, sub), mode=0o700, exist_ok=True)
        # Ordinary users submit too: their sbatch reads slurm.conf and talks to munged's socket.
        for path in (self.tmp, os.path.join(self.tmp, "munge")):
            os.chmod(path, 0o755)
        self._write_epilog()
        self._write_conf()
        self._start_munged()
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", self.conf])
        self._spawn("slurmd", ["slurmd", "-D", "-N", self.node, "-f", self.conf])
        self._wait_idle()

    def _write_epilog(self):
        self.epilog = os.path.join(self.tmp, "epilog.sh")
        with open(self.epilog, "w") as f:
            f.write(vmiso_slurm.epilog_script(self.vmiso_argv, workdir=self.workdir, log=self.epilog_log))
        os.chmod(self.epilog, 0o755)

    def _write_conf(self):
        t = self.tmp
        cpus = max(2, os.cpu_count() or 1)  # the tests ask for --cpus-per-task=2
        lines = [
            "ClusterName=vmisotest",
            # Job ids (and so container names) that an earlier test Slurm's leftovers do not share.
            f"FirstJobId={random.randint(100_000, 9_000_000)}",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={t}/state", f"SlurmdSpoolDir={t}/spool",
            f"SlurmctldPidFile={t}/run/slurmctld.pid", f"SlurmdPidFile={t}/run/slurmd.pid",
            f"SlurmctldLogFile={t}/log/slurmctld.log", f"SlurmdLogFile={t}/log/slurmd.log",
            "SlurmctldDebug=info", "SlurmdDebug=info",
            # Processes tracked, confined and accounted by cgroups (cgroup.conf, written below):
            # what a cluster node runs, and where the agent puts a user's QEMU (README "Slurm").
            "ProctrackType=proctrack/cgroup", "TaskPlugin=task/cgroup",
            "JobAcctGatherType=jobacct_gather/cgroup", f"JobAcctGatherFrequency=task={ACCT_FREQUENCY}",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core_Memory",
            f"DefMemPerCPU={self.def_mem_per_cpu}",
            "JobCompType=jobcomp/filetxt", f"JobCompLoc={self.jobcomp}",
            "AccountingStorageType=accounting_storage/none",
            "MpiDefault=none", "SwitchType=switch/none", "ReturnToService=2", "MailProg=/bin/true",
            f"KillWait={self.kill_wait}", f"Epilog={self.epilog}",
            # Decide at once on submit and completion (the tests wait on it), not every 60 s.
            "SchedulerParameters=sched_interval=2,defer_batch=0",
            "SlurmdParameters=config_overrides",  # CPUs may exceed a 1-core CI machine's
            # Listen on the addresses above (127.0.0.1), not on every address of the host.
            "CommunicationParameters=NoCtldInAddrAny,NoInAddrAny",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={cpus} "
            f"RealMemory={max(1024, _mem_mib() - MEM_RESERVE_MIB)} State=UNKNOWN",
            f"PartitionName=test Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
        ]
        with open(self.conf, "w") as f:
            os.fchmod(f.fileno(), 0o644)
            f.write("\n".join(lines) + "\n")
        # slurmd and slurmstepd read cgroup.conf next to slurm.conf.
        with open(os.path.join(t, "cgroup.conf"), "w") as f:
            os.fchmod(f.fileno(), 0o644)
            f.write("\n".join(CGROUP_CONF) + "\n")

    def _start_munged(self):
        key = os.path.join(self.tmp, "munge", "munge.key")
        with open(key, "wb") as f:
            os.fchmod(f.fileno(), 0o400)
            f.write(os.urandom(1024))
        m = os.path.join(self.tmp, "munge")
        # --force: munged wants a socket directory anyone may traverse; ours is the test's own.
        self._spawn("munged", ["munged", "-F", "--force", f"--key-file={key}", f"--socket={self.munge_socket}",
                               f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log",
                               f"--seed-file={m}/munged.seed"])
        self._until(lambda: os.path.exists(self.munge_socket), "munged's socket")

    def _spawn(self, name, argv):
        with open(os.path.join(self.tmp, "log", name + ".out"), "wb") as log:
            # A session of their own: a Ctrl-C to pytest must not reach the daemons before stop().
            self.procs[name] = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, start_new_session=True)

    def _node_idle(self):
        out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout
        return f"{self.node} idle" in out.splitlines()

    def _wait_idle(self):
        self._until(self._node_idle, "the node to be idle in sinfo")

    def _until(self, predicate, what, timeout=START_TIMEOUT):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise SlurmError(f"{name} exited with {proc.returncode}\n{self.logs()}")
            if predicate():
                return
            time.sleep(0.2)
        raise SlurmError(f"timed out waiting for {what}\n{self.logs()}")

    # --- use ----------------------------------------------------------------------------------
    def run(self, *argv, check=True, timeout=60, env=None):
        """A Slurm client command against this cluster; CompletedProcess (text)."""
        return subprocess.run(argv, env=dict(self.env, **(env or {})), capture_output=True, text=True,
                              timeout=timeout, check=check)

    def sbatch(self, *args, env=None, user=None):
        """Submit (as ``user``, a login name, when given: the job runs as them); return the job id
        (for an array, the array's job id)."""
        if user is None:
            out = self.run("sbatch", "--parsable", *args, env=env).stdout.strip()
        else:
            exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in dict(env or {}, SLURM_CONF=self.conf).items())
            out = subprocess.run(["su", "-s", "/bin/sh", user, "-c", f"cd /tmp && env {exports} sbatch --parsable "
                                  + shlex.join(args)], capture_output=True, text=True, timeout=60, check=True).stdout
        return out.strip().split(";")[0]

    def sstat(self, step, fields):
        """{field: value} of running job step ``step`` ("<job>.batch"), from slurmstepd's accounting."""
        out = self.run("sstat", "-a", "-n", "-P", "-j", step, "-o", ",".join(("JobID", *fields))).stdout
        for line in out.splitlines():
            values = line.split("|")
            if values[0] == step:
                return dict(zip(fields, values[1:]))
        raise SlurmError(f"sstat knows no step {step}: {out!r}")

    def completions(self):
        """Every record of the job completion log, as dicts (JobId, ArrayJobId, ExitCode, ...)."""
        try:
            with open(self.jobcomp) as f:
                text = f.read()
        except FileNotFoundError:
            return []
        return [dict(field.split("=", 1) for field in line.split() if "=" in field)
                for line in text.splitlines() if line.strip()]

    def jobs_of(self, job_id):
        """Completion records of ``job_id`` and of its array tasks."""
        return [r for r in self.completions() if job_id in (r.get("JobId"), r.get("ArrayJobId"))]

    def wait_done(self, job_id, count=1, timeout=120):
        """Wait until ``count`` completion records of ``job_id`` (or its array) are written."""
        self._until(lambda: len(self.jobs_of(job_id)) >= count, f"job {job_id} to complete", timeout)
        return self.jobs_of(job_id)

    def job_state(self, job_id):
        out = self.run("squeue", "-h", "-j", job_id, "-o", "%T", check=False).stdout.split()
        return out[0] if out else None

    def logs(self, lines=30):
        tails = []
        for name in ("slurmctld.log", "slurmd.log", "munged.out", "slurmctld.out", "slurmd.out"):
            path = os.path.join(self.tmp, "log", name)
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    tails.append(f"--- {name}\n" + "".join(f.readlines()[-lines:]))
        return "\n".join(tails)

    # --- stop ---------------------------------------------------------------------------------
    def stop(self):
        """scontrol shutdown, stop munged last (slurmd needs it to say goodbye), then check."""
        slurm_procs = [p for n, p in self.procs.items() if n != "munged"]
        if any(p.poll() is None for p in slurm_procs):
            self._cancel_all()
            self.run("scontrol", "shutdown", check=False, timeout=STOP_TIMEOUT)
        problems = [name for name, proc in self.procs.items() if name != "munged" and not _ended(proc)]
        munged = self.procs.get("munged")
        if munged is not None and munged.poll() is None:
            munged.terminate()
            if not _ended(munged):
                problems.append("munged")
        stray = self.leftovers()
        for pid in stray:
            _kill(pid)
        _remove_empty_cgroups(self.node)
        if problems or stray:
            raise SlurmError(f"still running after stop: {problems} daemons, pids {stray}\n{self.logs()}")

    def _cancel_all(self):
        """A test that failed half-way may leave jobs: cancel them and let their Epilog run
        (shutdown alone leaves slurmstepd and the jobs running, and their VMs)."""
        def queue():
            return self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
        if not queue():
            return
        self.run("scancel", "--quiet", *queue(), check=False)
        with contextlib.suppress(SlurmError):  # stop() reports what is left
            # The node stays "completing" until the Epilog (vmiso gc --job) is done.
            self._until(lambda: not queue() and self._node_idle(), "the cancelled jobs to end",
                        timeout=self.kill_wait + 15)

    def leftovers(self):
        """Pids of processes started under this slurm.conf: slurmstepd and jobs inherit SLURM_CONF."""
        needle = f"SLURM_CONF={self.conf}".encode()
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if needle in f.read().split(b"\0"):
                        pids.append(int(entry))
            except OSError:
                continue
        return pids


def _remove_empty_cgroups(node, root="/sys/fs/cgroup"):
    """slurmd leaves its empty base cgroups (``slurm_<node>/uid_N``) in every v1 hierarchy: remove
    them, deepest first. A cgroup that holds a process (another Slurm's) refuses: it stays."""
    for controller in os.listdir(root):
        base = os.path.join(root, controller, f"slurm_{node}")
        if not os.path.isdir(base):
            continue
        for directory, _subdirs, _files in sorted(os.walk(base), key=lambda w: -w[0].count("/")):
            with contextlib.suppress(OSError):
                os.rmdir(directory)


def _ended(proc, timeout=STOP_TIMEOUT):
    """Wait for ``proc``; kill it (and report False) if it does not end in time."""
    try:
        proc.wait(timeout)
        return True
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return False


def _kill(pid):
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def available():
    """True where the tests can run a Slurm: root and the daemons installed."""
    return os.geteuid() == 0 and all(shutil.which(t) for t in ("munged", "slurmctld", "slurmd", "sbatch"))
