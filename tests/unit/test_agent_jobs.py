"""The agent's Slurm side without Slurm: a caller's job from its cgroup file, squeue's answer,
the sizes a job's VM gets, and the reaper's decisions over bindings."""
import os
import socket

import pytest

from vmiso.agent import bindings, jobs
from vmiso.agent.auth import Peer
from vmiso.errors import Forbidden, NotFound

V1 = """9:name=systemd:/
6:freezer:/slurm_vm/uid_1001/job_77/step_batch
4:memory:/slurm_vm/uid_1001/job_77/step_batch/task_0
3:cpuset:/slurm_vm/uid_1001/job_77/step_batch
2:cpuacct:/slurm_vm/uid_1001/job_77/step_batch/task_0
1:cpu:/
0::/
"""
MOUNTS = {c: f"/sys/fs/cgroup/{c}" for c in ("freezer", "memory", "cpuset", "cpuacct", "cpu")}


def fake_proc(tmp_path, pid, text):
    d = tmp_path / str(pid)
    d.mkdir()
    (d / "cgroup").write_text(text)
    return str(tmp_path)


def squeue(uid=1001, state="RUNNING", tres="cpu=2,mem=700M,node=1,billing=2", array=("77", "N/A")):
    return lambda job: jobs.parse_squeue_line([job, array[0], array[1], str(uid), state, "1", tres, ""])


def test_job_paths_v1_and_v2():
    groups = jobs.parse_cgroup_file(V1)
    found = jobs.job_paths(groups)
    assert sorted(found) == ["cpuacct", "cpuset", "freezer", "memory"]
    assert {m["job"] for m in found.values()} == {"77"} and {m["step"] for m in found.values()} == {"batch"}
    assert found["memory"]["job_dir"] == "/slurm_vm/uid_1001/job_77"
    v2 = jobs.job_paths({"": "/system.slice/node1_slurmstepd.scope/job_9/step_0/user/task_0"})
    assert (v2[""]["job"], v2[""]["step"], v2[""]["uid"]) == ("9", "0", None)
    assert jobs.job_paths({"memory": "/machine/qemu-1-x.libvirt-qemu", "": "/"}) == {}
    # A directory a user could name to look like a job, deeper than slurmd's own: not a job.
    assert jobs.job_paths({"memory": "/user.slice/job_5/step_0"}) == {}


def test_identify_takes_the_job_from_the_cgroups_and_squeue(tmp_path):
    proc = fake_proc(tmp_path, 4242, V1)
    job = jobs.identify(None, Peer(4242, 1001, 1001), proc=proc, squeue=squeue(), mount_points=MOUNTS)
    assert (job.job_id, job.step, job.uid, job.cpus, job.mem_mib) == ("77", "batch", 1001, 2, 700)
    assert job.container_base == "slurm-77.batch"
    assert job.cgroups["memory"] == "/sys/fs/cgroup/memory/slurm_vm/uid_1001/job_77/step_batch/task_0"
    assert "cpu" not in job.cgroups  # Slurm left it to libvirt: QEMU keeps libvirt's CPU quota
    assert job.job_dirs == tuple(f"/sys/fs/cgroup/{c}/slurm_vm/uid_1001/job_77"
                                 for c in ("cpuacct", "cpuset", "freezer", "memory"))
    array = jobs.identify(None, Peer(4242, 1001, 1001), proc=proc, squeue=squeue(array=("70", "3")),
                          mount_points=MOUNTS)
    assert array.container_base == "slurm-70_3.batch"


def test_identify_outside_slurm_and_refusals(tmp_path):
    proc = fake_proc(tmp_path, 1, "0::/user.slice\n4:memory:/\n")
    assert jobs.identify(None, Peer(1, 1001, 1001), proc=proc, squeue=squeue(), mount_points=MOUNTS) is None
    proc = fake_proc(tmp_path, 2, V1)
    with pytest.raises(Forbidden, match="not yours"):  # the cgroup path's uid is another's
        jobs.identify(None, Peer(2, 1002, 1002), proc=proc, squeue=squeue(), mount_points=MOUNTS)
    with pytest.raises(Forbidden, match="not yours"):  # Slurm says the job is another's
        jobs.identify(None, Peer(2, 1001, 1001), proc=proc, squeue=squeue(uid=1002), mount_points=MOUNTS)
    with pytest.raises(Forbidden, match="COMPLETING"):
        jobs.identify(None, Peer(2, 1001, 1001), proc=proc, squeue=squeue(state="COMPLETING"), mount_points=MOUNTS)
    with pytest.raises(Forbidden, match="ended"):
        jobs.identify(None, Peer(3, 1001, 1001), proc=proc, squeue=squeue(), mount_points=MOUNTS)


def test_peer_pidfd_proves_the_caller_alive():
    a, b = socket.socketpair()
    with a, b:
        fd = jobs.peer_pidfd(a)
        if fd is None:
            pytest.skip("this kernel has no SO_PEERPIDFD")
        os.close(fd)
        with open(f"/proc/{os.getpid()}/cgroup") as f:
            assert jobs.parse_cgroup_file(f.read()) == jobs.caller_cgroups(a, os.getpid())


def test_squeue_fields_and_sizes():
    info = jobs.parse_squeue_line(["5", "5", "N/A", "0", "RUNNING", "1", "cpu=1,mem=2G,node=1", ""])
    assert (info["cpus"], info["mem_mib"], info["array_task"]) == (1, 2048, None)
    assert [jobs.mem_mib(t) for t in ("300M", "512K", "1.5G", "64", "", "x")] == [300, 0, 1536, 64, None, None]
    job = jobs.Job("5", "batch", 1000, cpus=1, mem_mib=700)
    assert jobs.size(job, 8, 256, given=set(), tcg=True)[0] == 1  # the allocation, not the forged default
    cpus, mem = jobs.size(job, 1, 256, given=set(), tcg=True)
    from vmiso.accounting.limits import MIB, hard_limit_bytes

    assert hard_limit_bytes(mem, 1, True) <= 700 * MIB < hard_limit_bytes(mem + 16, 1, True)
    with pytest.raises(Forbidden, match=r"--cpus 8 is more than the 1 CPU\(s\) Slurm job 5 holds on this node"):
        jobs.size(job, 8, 256, given={"cpus"}, tcg=True)
    with pytest.raises(Forbidden, match="--mem 800 is more than the 700 MiB"):
        jobs.size(job, 1, 800, given={"mem_mib"}, tcg=True)
    assert jobs.size(job, 1, 700, given={"mem_mib"}, tcg=True) == (1, 700)  # up to the allocation
    with pytest.raises(Forbidden, match="too little for a VM"):
        jobs.size(jobs.Job("5", "batch", 1000, cpus=1, mem_mib=256), 1, 256, given=set(), tcg=True)


class FakeAgent:
    """The parts of server.Agent the reaper uses, over a dict of statuses."""

    def __init__(self, statuses):
        self.statuses, self.destroyed = statuses, []
        self.iso = self

    def status(self, cid):
        if cid not in self.statuses:
            raise NotFound("container", cid)
        return self.statuses[cid]

    def destroy(self, cid, grace=5.0):
        self.destroyed.append(cid)
        self.statuses.pop(cid)

    def id_lock(self, cid):
        import contextlib

        return contextlib.nullcontext()


class Status:
    def __init__(self, ended):
        self.termination = object() if ended else None


def test_reaper_removes_ended_jobs_and_abandoned_runs_after_keep(tmp_path):
    job_dir = tmp_path / "job_1"
    job_dir.mkdir()
    b = bindings.Bindings(tmp_path).load()
    b.bind("slurm-1.batch", jobs.Job("1", "batch", 1000, 1, 100, job_dirs=(str(job_dir),)))
    b.bind("mine", client_pid=os.getpid())       # a live attached client
    b.bind("left", client_pid=os.getpid())
    b._items["left"]["client"]["start"] -= 1     # ... whose client is gone (another process)
    b.bind("detached")                           # -d outside a job: nothing to watch, not recorded
    agent = FakeAgent({"slurm-1.batch": Status(False), "mine": Status(True), "left": Status(True)})
    assert bindings.reap(agent, b, keep_abandoned=5, now=100) == {}
    assert bindings.reap(agent, b, keep_abandoned=5, now=104) == {}
    assert bindings.reap(agent, b, keep_abandoned=5, now=105) == {"left": "its vmiso run is gone and its task ended"}
    job_dir.rmdir()  # slurmstepd removed the job's cgroups: the job ended
    assert bindings.reap(agent, b, keep_abandoned=5, now=106) == {"slurm-1.batch": "Slurm job 1 ended"}
    assert agent.destroyed == ["left", "slurm-1.batch"]
    assert sorted(b.items()) == ["mine"]
    # A restarted agent finds what the last one bound.
    assert sorted(bindings.Bindings(tmp_path).load().items()) == ["mine"]
    del agent.statuses["mine"]  # removed by its owner meanwhile
    bindings.reap(agent, b, keep_abandoned=5, now=107)
    assert b.items() == {} and os.listdir(b.directory) == []
