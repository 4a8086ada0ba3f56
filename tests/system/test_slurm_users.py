"""Slurm jobs of real unprivileged users (created here, removed after) running `vmiso run` through
the agent on the real single-node Slurm with cgroup tracking and accounting (vmiso.testing.slurm):
the job comes from the kernel and Slurm, never from SLURM_* variables; sizes within the
allocation; QEMU in the job's cgroups (sstat sees it, the job's memory limit binds it); the
containers removed when the job ends (the agent's reaper, the Epilog through the agent)."""
import json
import os
import pwd
import re
import secrets
import shlex
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from vmiso.testing.agentd import agent_workdir, destroy_everything, local_users, running_agent
from vmiso.testing.slurm import available, single_node_slurm

pytestmark = [pytest.mark.system, pytest.mark.skipif(not available(), reason="needs root and slurm-wlm, munge")]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLIENT = "/opt/vmiso/bin/vmiso"
AGENT_ID = "vmiso-slurmusers-" + secrets.token_hex(3)
POLICY = 'group = "vmiso"\nimages = ["micro"]\n[limits]\ncontainers = 4\ncpus = 4\nmem_mib = 4096\n'
KILL_WAIT = 30
KEEP_ABANDONED = 2
JOB_MEM = "700M"  # room for micro and QEMU's overhead under TCG (jobs.size)


class Node:
    def __init__(self, workdir, socket, cluster, users, out):
        self.workdir, self.socket, self.cluster, self.users, self.out = workdir, socket, cluster, users, out

    def env(self):
        return {"PATH": "/opt/vmiso/bin:/usr/bin:/bin", "VMISO_WORKDIR": self.workdir,
                "VMISO_AGENT_SOCKET": self.socket}

    def submit(self, user, *args, script):
        return self.cluster.sbatch(*args, "-o", f"{self.out}/%x-%A_%a.out", "--wrap", script, env=self.env(),
                                   user=user)

    def as_user(self, user, *args, timeout=120):
        argv = [CLIENT, "--workdir", self.workdir, "--agent-socket", self.socket, *args]
        return subprocess.run(["su", "-s", "/bin/sh", user, "-c", shlex.join(argv)], capture_output=True,
                              timeout=timeout)

    def as_root(self, *args, timeout=120):
        return subprocess.run([sys.executable, "-m", "vmiso", "--workdir", self.workdir, *args],
                              capture_output=True, timeout=timeout)

    def statuses(self):
        proc = self.as_root("ps", "--json")
        assert proc.returncode == 0, proc.stderr
        return {s["container_id"]: s for s in json.loads(proc.stdout)}


@pytest.fixture(scope="module")
def users():
    tag = secrets.token_hex(3)
    names = {"a": f"vmsa{tag}", "b": f"vmsb{tag}"}
    with local_users(os.path.join(REPO, "scripts", "client.sh"), tuple(names.values())):
        yield names


@pytest.fixture(scope="module")
def node(workdir, users):
    with agent_workdir(built=workdir) as wd:
        sockdir = tempfile.mkdtemp(prefix="vmiso-slurmusers-")
        out = os.path.join(sockdir, "out")
        os.makedirs(out)
        os.chmod(sockdir, 0o755)
        os.chmod(out, 0o1777)  # the users' jobs write their output files here
        socket = os.path.join(sockdir, "agent.sock")
        try:
            # The agent asks this Slurm (SLURM_CONF) about its callers' jobs. It stops first: the
            # Epilogs of jobs cancelled at the cluster's stop then work in-process.
            with single_node_slurm(workdir=wd, kill_wait=KILL_WAIT) as cluster, \
                    running_agent(wd, socket, POLICY, log_path=os.path.join(sockdir, "log"), agent_id=AGENT_ID,
                                  extra_args=("--keep-abandoned", str(KEEP_ABANDONED)), env=cluster.env):
                yield Node(wd, socket, cluster, users, out)
        finally:
            destroy_everything(wd, AGENT_ID)
            subprocess.run(["rm", "-rf", sockdir])


def wait_for(predicate, what, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def running(node, cid, needle=None, timeout=90):
    """Wait until container ``cid`` runs (and printed ``needle``); its status."""
    def check():
        status = node.statuses().get(cid)
        if status is None or status["state"] != "RUNNING":
            return None
        if needle and needle.encode() not in node.as_root("logs", "--task", cid).stdout:
            return None
        return status
    return wait_for(check, f"{cid} to run" + (f" and print {needle!r}" if needle else ""), timeout)


def domains():
    out = subprocess.run(["virsh", "-q", "list", "--all", "--name"], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def leftovers(node, prefix):
    found = [d for d in domains() if d.startswith("vmiso-" + prefix)]
    for sub in ("containers", "agent-bindings"):
        path = os.path.join(node.workdir, sub)
        found += [f"{sub}/{n}" for n in (os.listdir(path) if os.path.isdir(path) else []) if n.startswith(prefix)]
    return found


def test_users_array_jobs_and_isolation(node, users):
    a, b = users["a"], users["b"]
    task = 'sh -c "echo task $SLURM_ARRAY_TASK_ID; sleep 6; exit $((SLURM_ARRAY_TASK_ID + {}))"'
    job_b = node.submit(b, "--array=0-1", f"--mem={JOB_MEM}", script="vmiso run -- " + task.format(3))
    job_a = node.submit(a, "--array=0-1", f"--mem={JOB_MEM}", script="vmiso run -- " + task.format(0))
    # While one of B's tasks runs, A sees none of it and can touch none of it.
    b_cid = wait_for(lambda: next((c for c in node.statuses() if c.startswith(f"slurm-{job_b}_")
                                   and node.statuses()[c]["state"] == "RUNNING"), None), "a VM of B's job", 90)
    status = node.statuses()[b_cid]
    assert status["uid"] == pwd.getpwnam(b).pw_uid
    assert all(not c.startswith(f"slurm-{job_b}") for c in json.loads(node.as_user(a, "ps", "--json").stdout))
    for args in (["kill", b_cid], ["rm", b_cid], ["logs", b_cid], ["wait", b_cid]):
        proc = node.as_user(a, *args)
        assert proc.returncode == 125, (args, proc)
        assert proc.stderr.decode().strip().splitlines()[-1] == f"vmiso: error: no such container: {b_cid}"
    records = node.cluster.wait_done(job_b, count=2, timeout=180) + node.cluster.wait_done(job_a, count=2, timeout=180)
    codes = {(r["ArrayJobId"], int(r["ArrayTaskId"])): r["ExitCode"] for r in records}
    assert codes == {(job_b, 0): "3:0", (job_b, 1): "4:0", (job_a, 0): "0:0", (job_a, 1): "1:0"}, records
    for job in (job_a, job_b):
        for t in (0, 1):
            with open(os.path.join(node.out, f"wrap-{job}_{t}.out")) as f:
                assert f.read() == f"task {t}\n"
    wait_for(lambda: not leftovers(node, f"slurm-{job_a}_") and not leftovers(node, f"slurm-{job_b}_"),
             "the jobs' containers to go", 30)


def test_the_job_comes_from_the_kernel_not_the_environment(node, users):
    """--cpus above the allocation is refused; forged SLURM_* variables change neither the name
    nor the size; a -d container is gone within KillWait after its job ended."""
    a, b = users["a"], users["b"]
    other = node.submit(b, f"--mem={JOB_MEM}", script="sleep 60")
    script = (f"vmiso run --cpus 8 -- true; echo \"cpus8 rc=$?\"; "
              f"export SLURM_JOB_ID={other} SLURM_CPUS_PER_TASK=2 SLURM_CPUS_ON_NODE=2 SLURM_MEM_PER_NODE=64; "
              "vmiso run -- nproc; echo \"forged rc=$?\"; "
              "vmiso run -d -- sleep 600; echo \"detached rc=$?\"")
    job = node.submit(a, "--cpus-per-task=1", f"--mem={JOB_MEM}", script=script)
    [record] = node.cluster.wait_done(job, timeout=120)
    ended = time.monotonic()
    with open(os.path.join(node.out, f"wrap-{job}_4294967294.out")) as f:
        out = f.read()
    assert "cpus8 rc=125" in out, out
    assert f"vmiso: error: --cpus 8 is more than the 1 CPU(s) Slurm job {job} holds on this node" in out, out
    assert "\n1\nforged rc=0\n" in out, out  # the allocation's one CPU, not the forged two
    assert f"slurm-{job}.batch\ndetached rc=0" in out, out  # named after the real job
    assert record["ExitCode"] == "0:0", record
    gone = wait_for(lambda: not leftovers(node, f"slurm-{job}.") and time.monotonic(), "the -d container to go",
                    KILL_WAIT)
    print(f"-d container of job {job} gone {gone - ended:.1f} s after the job's completion record")
    assert node.cluster.job_state(other) == "RUNNING"  # B's job never noticed
    node.cluster.run("scancel", other)
    with open(node.cluster.epilog_log) if os.path.exists(node.cluster.epilog_log) else open(os.devnull) as f:
        assert "error" not in f.read()  # the Epilog's gc went through the agent


def test_scancel_still_cleans_everything(node, users):
    job = node.submit(users["a"], f"--mem={JOB_MEM}", script="vmiso run -- sh -c 'echo started; exec sleep 600'")
    running(node, f"slurm-{job}.batch", "started")
    cancelled = time.monotonic()
    node.cluster.run("scancel", job)
    wait_for(lambda: not leftovers(node, f"slurm-{job}."), "the job's domain, overlay and binding to go", KILL_WAIT)
    print(f"scancel of a user's job: cleaned in {time.monotonic() - cancelled:.1f} s")
    [record] = node.cluster.wait_done(job, timeout=KILL_WAIT)
    assert record["JobState"] == "CANCELLED", record


def _seconds(text):
    """Slurm's [DD-[HH:]]MM:SS[.mmm] as seconds."""
    days, _, rest = text.rpartition("-")
    parts = [float(p) for p in rest.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0.0)
    return int(days or 0) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]


def test_sstat_sees_the_vm_and_the_job_limits_bind_it(node, users):
    # 10 s, not 5: sstat's TresUsageInTot has whole seconds (cut, not rounded), which alone can be
    # most of 20 % of 5 s.
    burn = "end=$(($(date +%s) + 10)); while [ $(date +%s) -lt $end ]; do :; done; echo burned; exec sleep 600"
    job = node.submit(users["a"], "--cpus-per-task=1", f"--mem={JOB_MEM}", script=f"vmiso run -- sh -c '{burn}'")
    cid = f"slurm-{job}.batch"
    try:
        status = running(node, cid, "burned")
        with open(f"/proc/{status['pid']}/cgroup") as f:
            groups = dict(line.split(":", 2)[1:] for line in f.read().splitlines())
        for controller in ("memory", "cpuacct", "freezer", "cpuset"):
            assert re.search(rf"/job_{job}/step_batch(/|$)", groups[controller]), groups
        with open(f"/sys/fs/cgroup/memory{groups['memory'].strip()}/memory.stat") as f:
            limit = int(dict(line.split() for line in f)["hierarchical_memory_limit"])
        assert limit == 700 << 20  # the job's limit (ConstrainRAMSpace, on the job and step) binds QEMU
        stats = json.loads(node.as_root("stats", "--json", cid).stdout)
        stats = stats.get(cid, stats)
        usage = stats["cpus_user_time_secs"] + stats["cpus_system_time_secs"]
        step = node.cluster.sstat(f"{job}.batch", ["TresUsageInTot", "MaxRSS"])
        slurm_cpu = _seconds(dict(i.split("=", 1) for i in step["TresUsageInTot"].split(","))["cpu"])
        print(f"job {job}: sstat cpu {slurm_cpu:.1f} s, vmiso usage() {usage:.2f} s, sstat MaxRSS {step['MaxRSS']}, "
              f"vmiso mem_total {stats['mem_total_bytes'] >> 20} MiB")
        assert usage > 9.0
        assert abs(slurm_cpu - usage) <= 0.2 * usage, (slurm_cpu, usage)
    finally:
        node.cluster.run("scancel", job)
    wait_for(lambda: not leftovers(node, cid), "the job's container to go", KILL_WAIT)


def test_the_job_memory_limit_stops_a_vm_that_outgrows_it(node, users):
    """--mem up to the allocation is allowed, but QEMU's overhead is charged to the job too: a
    guest that fills its whole memory takes the job over its limit, and the kernel's OOM killer
    ends QEMU inside the job's cgroup, not anything outside it."""
    # Two tmpfs (each at most half the guest's memory) filled with 600 MiB of a 640 MiB guest.
    fill = "dd if=/dev/zero of=/tmp/f bs=1M count=300 && dd if=/dev/zero of=/dev/shm/f bs=1M count=300 && echo survived"
    job = node.submit(users["a"], "--mem=640M", script=f"vmiso run --mem 640 -- sh -c '{fill}'")
    [record] = node.cluster.wait_done(job, timeout=120)
    with open(os.path.join(node.out, f"wrap-{job}_4294967294.out")) as f:
        out = f.read()
    assert "survived" not in out, out
    assert record["ExitCode"] != "0:0", (record, out)
    with open(os.path.join(node.cluster.tmp, "log", "slurmd.log")) as f:
        assert re.search(rf"Detected \d+ oom-kill event\(s\) in StepId={job}\.batch", f.read()), out
    print(f"job {job} over its memory: {record['ExitCode']}; {out.strip().splitlines()[-2]}")
    wait_for(lambda: not leftovers(node, f"slurm-{job}."), "the job's container to go", KILL_WAIT)


def test_an_abandoned_attached_run_is_collected(node, users):
    """Outside Slurm: a `vmiso run` killed with SIGKILL leaves its task running; once the task has
    ended, the agent removes its container after --keep-abandoned seconds."""
    a = users["a"]
    entry = pwd.getpwnam(a)
    cid = "abandoned-" + secrets.token_hex(3)
    client = subprocess.Popen([CLIENT, "--workdir", node.workdir, "--agent-socket", node.socket, "run", "--name", cid,
                               "--", "sh", "-c", "sleep 5; exit 3"], user=entry.pw_uid, group=entry.pw_gid,
                              extra_groups=os.getgrouplist(a, entry.pw_gid), cwd="/", stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env={"PATH": "/usr/bin:/bin"})
    running(node, cid)
    client.send_signal(signal.SIGKILL)
    client.wait()
    assert node.statuses()[cid]["state"] == "RUNNING"  # the task is not killed with its client
    done = node.as_user(a, "wait", cid)
    assert done.returncode == 3, done
    wait_for(lambda: cid not in node.statuses(), "the abandoned container to be collected", KEEP_ABANDONED + 15)
    assert leftovers(node, cid) == []


def test_gc_goes_through_the_agent(node):
    proc = node.as_root("gc", "--json")
    assert proc.returncode == 0, proc
    assert json.loads(proc.stdout)["failed"] == {}
