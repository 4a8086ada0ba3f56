"""VM-isolated Slurm jobs on a real single-node Slurm (munged, slurmctld, slurmd started for this
module and stopped after it; the harness fails the module if any of them, or any job, is left).

Jobs run as root with the submitter's environment (sbatch's default --export=ALL): PATH finds the
venv's ``vmiso`` and VMISO_WORKDIR is the tests' work directory; the Epilog runs ``vmiso gc --job``.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from vmiso.testing.slurm import available, single_node_slurm

pytestmark = [pytest.mark.system, pytest.mark.skipif(not available(), reason="needs root and slurm-wlm, munge")]

KILL_WAIT = 30


@pytest.fixture(scope="module")
def cluster(workdir):
    with single_node_slurm(workdir=workdir, kill_wait=KILL_WAIT) as c:
        yield c


@pytest.fixture
def job_env(workdir):
    """What the jobs inherit through sbatch: the venv's vmiso first on PATH, the tests' work dir."""
    return {"PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"], "VMISO_WORKDIR": workdir}


def domains():
    out = subprocess.run(["virsh", "-q", "list", "--all", "--name"], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def leftovers(workdir, prefix):
    """Anything of containers named ``prefix``*: domains, container dirs (overlay, seed), run records."""
    found = [d for d in domains() if d.startswith("vmiso-" + prefix)]
    for sub in ("containers", "runs"):
        path = os.path.join(workdir, sub)
        found += [f"{sub}/{n}" for n in (os.listdir(path) if os.path.isdir(path) else []) if n.startswith(prefix)]
    return found


def wait_for(predicate, what, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return time.monotonic()
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_array_job_output_and_exit_codes(cluster, job_env, workdir, tmp_path):
    job = cluster.sbatch("--array=0-3", "-o", f"{tmp_path}/slurm-%A_%a.out", "--wrap",
                         'vmiso run -- sh -c "echo task $SLURM_ARRAY_TASK_ID; exit $SLURM_ARRAY_TASK_ID"',
                         env=job_env)
    records = cluster.wait_done(job, count=4, timeout=150)
    exit_codes = {int(r["ArrayTaskId"]): r["ExitCode"] for r in records}
    assert exit_codes == {0: "0:0", 1: "1:0", 2: "2:0", 3: "3:0"}, records
    for task in range(4):
        with open(tmp_path / f"slurm-{job}_{task}.out") as f:
            assert f.read() == f"task {task}\n"
    assert leftovers(workdir, f"slurm-{job}_") == []


def test_vm_is_sized_from_the_allocation(cluster, job_env, workdir, tmp_path):
    out = tmp_path / "out"
    job = cluster.sbatch("--cpus-per-task=2", "--mem=512M", "-o", str(out), "--wrap",
                         "vmiso run -- sh -c 'nproc; grep MemTotal /proc/meminfo'", env=job_env)
    [record] = cluster.wait_done(job, timeout=90)
    text = out.read_text()
    assert record["ExitCode"] == "0:0", text
    nproc, meminfo = text.splitlines()
    assert nproc == "2"
    mem_kib = int(meminfo.split()[1])
    assert 400 * 1024 < mem_kib <= 512 * 1024  # the guest kernel keeps some for itself
    assert leftovers(workdir, f"slurm-{job}.") == []


def _running_container(workdir, job, timeout=60):
    """Wait until the job's VM runs and its task started; return its checkpoint."""
    cid = f"slurm-{job}.batch"
    checkpoint = os.path.join(workdir, "containers", cid, "checkpoint.json")

    def started():
        if f"vmiso-{cid}" not in domains() or not os.path.exists(checkpoint):
            return False
        with open(os.path.join(workdir, "containers", cid, "stdout"), "rb") as f:
            return b"started" in f.read()
    wait_for(started, f"the VM of job {job} to run its task", timeout)
    with open(checkpoint) as f:
        return json.load(f)


def _assert_cleaned_within_kill_wait(cluster, workdir, job, cancelled_at, tap, state="CANCELLED"):
    def gone():
        return not leftovers(workdir, f"slurm-{job}.") and not os.path.exists(f"/sys/class/net/{tap}")
    done = wait_for(gone, f"job {job}'s domain, overlay, seed, tap and record to go", KILL_WAIT + 15)
    assert done - cancelled_at < KILL_WAIT, f"cleaned after {done - cancelled_at:.1f} s"
    [record] = cluster.wait_done(job, timeout=KILL_WAIT)
    assert record["JobState"] == state, record
    rules = subprocess.run(["nft", "list", "table", "bridge", "vmiso"], capture_output=True, text=True).stdout
    assert tap not in rules
    return done - cancelled_at


def _epilog_removed(cluster, job):
    if not os.path.exists(cluster.epilog_log):
        return False
    with open(cluster.epilog_log) as f:
        return f"removed slurm-{job}.batch" in f.read()


def test_scancel_vmiso_removes_its_vm(cluster, job_env, workdir, lan, tmp_path):
    """SIGTERM reaches vmiso when it is the batch step's task (exec): it stops the VM (SIGTERM to
    the task, then hard), removes everything and exits 143. With proctrack/cgroup Slurm sends
    scancel's SIGTERM to the step's tasks only (slurmstepd's children), so a vmiso under a shell
    gets SIGKILL after KillWait instead, and the Epilog cleans (next tests)."""
    bridge, _prefix, _ns = lan
    out = tmp_path / "out"
    job = cluster.sbatch("-o", str(out), "--wrap",
                         f"exec vmiso run --network {bridge} -- sh -c 'echo started; exec sleep 600'", env=job_env)
    tap = _running_container(workdir, job)["extra"]["tap"]
    assert os.path.exists(f"/sys/class/net/{tap}")
    cancelled_at = time.monotonic()
    cluster.run("scancel", job)
    took = _assert_cleaned_within_kill_wait(cluster, workdir, job, cancelled_at, tap)
    assert not _epilog_removed(cluster, job)  # vmiso did it, not the Epilog
    print(f"scancel, vmiso on SIGTERM: cleaned in {took:.1f} s")


def test_scancel_of_a_plain_script_is_cleaned(cluster, job_env, workdir, lan, tmp_path):
    """`vmiso run` as a plain command of the script: Slurm kills it with its shell; the Epilog's
    `vmiso gc --job` removes the VM."""
    bridge, _prefix, _ns = lan
    job = cluster.sbatch("-o", str(tmp_path / "out"), "--wrap",
                         f"vmiso run --network {bridge} -- sh -c 'echo started; exec sleep 600'", env=job_env)
    tap = _running_container(workdir, job)["extra"]["tap"]
    cancelled_at = time.monotonic()
    cluster.run("scancel", job)
    took = _assert_cleaned_within_kill_wait(cluster, workdir, job, cancelled_at, tap)
    print(f"scancel, plain script: cleaned in {took:.1f} s (by the Epilog: {_epilog_removed(cluster, job)})")


def test_epilog_removes_the_vm_of_a_sigkilled_vmiso(cluster, job_env, workdir, lan, tmp_path):
    """vmiso killed with SIGKILL (the job's main process: the job fails): the run record it held
    is left unheld, and the Epilog's `vmiso gc --job` removes the VM. (`scancel -s KILL` would not
    do: Slurm turns it into a plain cancel, SIGTERM first.)"""
    bridge, _prefix, _ns = lan
    job = cluster.sbatch("-o", str(tmp_path / "out"), "--wrap",
                         f"exec vmiso run --network {bridge} -- sh -c 'echo started; exec sleep 600'", env=job_env)
    tap = _running_container(workdir, job)["extra"]["tap"]
    with open(os.path.join(workdir, "runs", f"slurm-{job}.batch")) as f:
        pid = json.load(f)["pid"]
    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    took = _assert_cleaned_within_kill_wait(cluster, workdir, job, killed_at, tap, state="FAILED")
    assert _epilog_removed(cluster, job)
    print(f"SIGKILL + Epilog: cleaned in {took:.1f} s")


def test_array_job_environment_reaches_the_guest(cluster, job_env, workdir, tmp_path):
    """The classic job script with the variable single-quoted: the guest's shell expands it, so
    each task must see its own SLURM_* variables (passed by default) and write its own file."""
    import tempfile

    from vmiso.paths import qemu_gid, qemu_uid

    share = tempfile.mkdtemp(prefix="vmiso-slurm-share-", dir="/tmp")
    os.chown(share, qemu_uid(), qemu_gid())
    try:
        job = cluster.sbatch("--array=0-2", "-o", f"{tmp_path}/slurm-%A_%a.out", "--wrap",
                             f"exec vmiso run -v {share}:/out -- sh -c "
                             "'echo $SLURM_ARRAY_TASK_ID $SLURM_ARRAY_JOB_ID > /out/task-$SLURM_ARRAY_TASK_ID'",
                             env=job_env)
        records = cluster.wait_done(job, count=3, timeout=150)
        assert sorted(r["ExitCode"] for r in records) == ["0:0"] * 3, records
        assert sorted(os.listdir(share)) == ["task-0", "task-1", "task-2"]
        for task in range(3):
            with open(os.path.join(share, f"task-{task}")) as f:
                assert f.read() == f"{task} {job}\n"
        assert leftovers(workdir, f"slurm-{job}_") == []
    finally:
        subprocess.run(["rm", "-rf", share], check=True)
