"""The warm pool's logic on the FakeHost (which plays micro's init on the claim port): VMs
booted ahead up to the size and the memory cap, a fitting launch claims one and sends the
task's seed files, a crashed pool VM is replaced, a claim that fails destroys its VM, and a dead
owner's pool VMs are destroyed by recover(). The guest side (micro-init) is tested with real VMs
in tests/system/test_warm.py."""
import io
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import pytest

from vmiso import InvalidSpec, Isolator, LaunchFailed, PoolConfig, Resources, TaskSpec, state

AGENT = "agent-fake"
pytestmark = pytest.mark.usefixtures("fast_conclusion")


@pytest.fixture
def short_tmp():
    """A directory with a short path: a warm VM's sockets (containers/.pool-<id>/control.sock)
    must fit a unix socket's 107 bytes, which pytest's tmp_path under a long user name does not."""
    path = tempfile.mkdtemp(prefix="vp")
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


def make(short_tmp, host, base, **config):
    iso = Isolator(workdir=str(short_tmp / "w"), accel="tcg", agent_id=AGENT, host=host)
    iso.pool.configure(PoolConfig(image=base, **{"refill_delay_s": 0, **config})) if config else None
    return iso


def pool_domains(host):
    return sorted(n for n in host.domains if n.startswith("vmiso-pool-"))


def claimed_files(dom):
    assert dom.claim_done.wait(10)
    with tarfile.open(fileobj=io.BytesIO(dom.claimed)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_a_fitting_launch_claims_a_ready_vm_and_the_pool_refills(short_tmp, host, base):
    iso = make(short_tmp, host, base, size=1)
    assert iso.pool.wait_ready(1, timeout=10)
    (first,) = pool_domains(host)
    status = iso.launch("c1", TaskSpec(["echo", "hi"], image=base))
    assert status.state == "RUNNING" and status.domain == first  # the warm VM is the container's now
    assert iso.timeline("c1").keys() >= {"launch:claim", "launch:dir", "launch:running"}
    files = claimed_files(host.domains[first])
    assert files["vmiso/argv"] and files["vmiso/nonce"] and files["vmiso/task.sh"] and len(files["entropy"]) == 64
    assert b'"local-hostname": "c1"' in files["meta-data"] and int(files["clock"]) > 0
    assert "c1" in iso.containers() and not any(n.startswith(".pool-") and n.endswith(first[-12:])
                                                 for n in os.listdir(iso.workdir.containers))
    assert iso.pool.wait_ready(1, timeout=10)  # a replacement was booted
    assert len(pool_domains(host)) == 2  # the claimed one (running c1) and the new one
    host.guest_exits(first, 0)
    assert iso.wait("c1", timeout=10).exit_code == 0
    iso.destroy("c1")
    iso.pool.close()
    assert pool_domains(host) == [] and iso.containers() == []
    assert not [n for n in os.listdir(iso.workdir.containers) if n.startswith(".pool-")]


def test_a_warm_task_keeps_its_stop_signal(short_tmp, host, base):
    """The stop signal is no part of the VM: a task with one claims a warm VM, its checkpoint
    records it, and kill sends it as for a cold launch."""
    from tests.unit.test_isolator_fake import play_stop_listener

    iso = make(short_tmp, host, base, size=1)
    assert iso.pool.wait_ready(1, timeout=10)
    (first,) = pool_domains(host)
    iso.launch("c1", TaskSpec(["sleep", "9"], image=base, stop_signal="SIGINT"))
    assert iso.status("c1").domain == first
    claimed_files(host.domains[first])
    cp = state.read(str(iso.workdir.container_dir("c1")))
    assert cp.extra["warm"] and cp.extra["stop_signal"] == 2
    got = play_stop_listener(iso, host, "c1", 130, domain=first)
    assert iso.kill("c1", grace=5).exit_code == 130
    assert bytes(got) == f"VMISO-{cp.nonce} SIG 2\n".encode()
    iso.destroy("c1")
    iso.pool.close()


def test_two_warm_tasks_get_different_vms_identities_and_entropy(short_tmp, host, base):
    iso = make(short_tmp, host, base, size=2)
    assert iso.pool.wait_ready(2, timeout=10)
    a = iso.launch("task-a", TaskSpec(["true"], image=base)).domain
    b = iso.launch("task-b", TaskSpec(["true"], image=base)).domain
    fa, fb = claimed_files(host.domains[a]), claimed_files(host.domains[b])
    assert a != b and fa["entropy"] != fb["entropy"] and fa["vmiso/nonce"] != fb["vmiso/nonce"]
    assert fa["meta-data"] != fb["meta-data"]
    iso.pool.close()


def test_launches_that_do_not_fit_boot_cold(short_tmp, host, base):
    iso = make(short_tmp, host, base, size=1)
    assert iso.pool.wait_ready(1, timeout=10)
    for cid, spec in (("mem", TaskSpec(["true"], image=base, resources=Resources(mem_mib=512))),
                      ("disk", TaskSpec(["true"], image=base, resources=Resources(disk_gib=1))),
                      ("stdin", TaskSpec(["cat"], image=base, stdin=b"x"))):
        assert iso.launch(cid, spec).domain == "vmiso-" + cid
    assert iso.pool.status()["ready"] == 1 and iso.pool.stats["claims"] == 0
    iso.pool.close()


def test_a_crashed_pool_vm_is_replaced(short_tmp, host, base):
    iso = make(short_tmp, host, base, size=1)
    assert iso.pool.wait_ready(1, timeout=10)
    (first,) = pool_domains(host)
    host.stop(first, "crashed")
    assert iso.pool.wait_ready(1, timeout=10)
    (second,) = pool_domains(host)
    assert second != first and iso.pool.stats["replaced"] == 1
    iso.pool.close()


def test_the_memory_cap_bounds_the_pool(short_tmp, host, base):
    iso = make(short_tmp, host, base)
    one = iso.pool.vm_bytes(PoolConfig(image=base)) >> 20
    with pytest.raises(InvalidSpec):
        iso.pool.configure(PoolConfig(image=base, size=2, max_mem_mib=one - 1))
    iso.pool.configure(PoolConfig(image=base, size=5, max_mem_mib=2 * one + one // 2))
    assert iso.pool.wait_ready(2, timeout=10) and not iso.pool.wait_ready(3, timeout=0.3)
    status = iso.pool.status()
    assert status["target"] == 2 and len(pool_domains(host)) == 2
    assert status["mem_bytes"] <= status["cap_bytes"]
    iso.pool.configure(PoolConfig(image=base, size=1))  # shrinking destroys the surplus
    assert len(pool_domains(host)) == 1
    iso.pool.close()


def test_a_failed_claim_destroys_its_vm_and_leaves_nothing(short_tmp, host, base):
    iso = make(short_tmp, host, base, size=1)
    assert iso.pool.wait_ready(1, timeout=10)
    (first,) = pool_domains(host)
    host.fail_next["set_metadata"] = 1
    with pytest.raises(LaunchFailed):
        iso.launch("c1", TaskSpec(["true"], image=base))
    assert first not in host.domains and iso.containers() == []
    assert not os.path.exists(iso.workdir.container_dir("c1"))
    iso.pool.close()


def test_a_dead_owners_full_pool_leaves_no_vm_after_recover(short_tmp, host, base):
    owner = make(short_tmp, host, base, size=2)
    assert owner.pool.wait_ready(2, timeout=10)
    with owner.pool.cond:
        owner.pool.closed = True  # the process dies: no refill, nobody holds the VMs
        owner.pool.slots.clear()
        owner.pool.cond.notify_all()
    host.close()
    again = make(short_tmp, host, base)
    report = again.recover()
    assert len(report.pool) == 2 and pool_domains(host) == []
    assert not [n for n in os.listdir(again.workdir.containers) if n.startswith(".pool-")]
    assert report.orphans == []  # pool VMs are the pool's to destroy, not orphans


def test_a_warm_vms_logs_keep_their_directory_from_boot_to_destroy(short_tmp, host, base):
    """virtlogd rolls a log over by the path it opened it at: the claim renames the VM's directory
    but never the one its logs are in (paths.log_dir), and destroy() removes both."""
    iso = make(short_tmp, host, base, size=1, refill_delay_s=3600)
    assert iso.pool.wait_ready(1, timeout=10)
    (first,) = pool_domains(host)
    slot_id = first[len("vmiso-pool-"):]
    logs = os.path.join(iso.workdir.containers, ".logs-" + slot_id)
    assert host.domains[first].stdout == os.path.join(logs, "stdout")  # what virtlogd was given at boot
    iso.launch("c1", TaskSpec(["echo", "hi"], image=base))
    assert iso.console_log("c1") == os.path.join(logs, "console.log")
    with open(os.path.join(logs, "stdout"), "ab") as f:
        f.write(b"hello\n")
    host.guest_exits(first, 0)
    assert iso.wait("c1", timeout=10).exit_code == 0
    assert b"".join(data for _, data in iso.output("c1", follow=False)) == b"hello\n"
    iso.destroy("c1")
    assert not os.path.lexists(logs) and not os.path.lexists(iso.workdir.container_dir("c1"))
    iso.pool.close()
    assert os.listdir(iso.workdir.containers) == []


def test_recover_removes_only_the_logs_no_vm_or_container_names(short_tmp, host, base):
    iso = make(short_tmp, host, base, size=1, refill_delay_s=3600)
    assert iso.pool.wait_ready(1, timeout=10)
    (pooled,) = pool_domains(host)
    iso.launch("c1", TaskSpec(["true"], image=base))  # claims it: its logs are the container's now
    iso.pool.configure(PoolConfig(image=base, size=1, refill_delay_s=0))
    assert iso.pool.wait_ready(1, timeout=10)  # a new pool VM, unclaimed, with logs of its own
    stray = os.path.join(iso.workdir.containers, ".logs-0123456789ab")
    os.mkdir(stray)  # a crash between removing a container's directory and its logs
    before = set(os.listdir(iso.workdir.containers))
    iso.recover()
    assert set(os.listdir(iso.workdir.containers)) == before - {".logs-0123456789ab"}
    assert os.path.isdir(os.path.dirname(iso.console_log("c1")))
    host.guest_exits(pooled, 0)
    iso.destroy("c1")
    iso.pool.close()
    assert os.listdir(iso.workdir.containers) == []


def test_a_log_directory_is_named_by_a_slot_id_only(short_tmp):
    from vmiso.errors import HostError
    from vmiso.paths import Workdir, log_dir

    containers = short_tmp / "containers"
    assert log_dir(containers / "c1") == str(containers / "c1")
    assert log_dir(containers / "c1", "0123456789ab") == str(containers / ".logs-0123456789ab")
    for bad in ("../../etc", "0123456789AB", "", "0123456789abc", 7):
        with pytest.raises(HostError):
            log_dir(containers / "c1", bad)
    work = Workdir(short_tmp)
    containers.mkdir()
    target = short_tmp / "target"
    target.mkdir()
    (target / "keep").write_bytes(b"x")
    os.symlink(target, containers / ".logs-0123456789ab")  # planted: removed as a link, never followed
    with pytest.raises(FileExistsError):
        work.make_log_dir("0123456789ab")
    work.remove_log_dir("0123456789ab")
    assert not os.path.lexists(containers / ".logs-0123456789ab") and (target / "keep").exists()


def test_ps_through_the_agent_lists_the_pool_vms_as_in_process_ps_does(short_tmp, host, base, monkeypatch, capsys):
    """The agent's clients cannot read <workdir>/pool.json: its info answer carries the pool's
    VMs, and `vmiso ps` through it prints the same WARM rows as in-process."""
    import argparse
    import threading

    from vmiso.agent.client import RemoteIsolator
    from vmiso.agent.policy import Policy
    from vmiso.agent.server import Agent
    from vmiso.cli import containers

    iso = make(short_tmp, host, base, size=2)
    assert iso.pool.wait_ready(2, timeout=10)
    agent = Agent(iso, Policy.parse({}), str(short_tmp / "a.sock"))
    agent.bind()
    thread = threading.Thread(target=agent.serve_forever, daemon=True)
    thread.start()
    args = argparse.Namespace(json=False)
    try:
        monkeypatch.setattr(containers, "_iso", lambda args: iso)
        containers.ps(args)
        in_process = [line for line in capsys.readouterr().out.splitlines() if "WARM-" in line]
        client = RemoteIsolator.connect(agent.socket_path, iso.workdir.root)
        monkeypatch.setattr(containers, "_iso", lambda args: client)
        containers.ps(args)
        through_agent = [line for line in capsys.readouterr().out.splitlines() if "WARM-" in line]
    finally:
        agent.stop()
        thread.join(5)
        agent.close()
        iso.pool.close()
    assert len(in_process) == 2 and sorted(in_process) == sorted(through_agent)
    assert all("WARM-READY" in line and AGENT in line for line in through_agent)


def test_a_stored_image_a_warm_vm_boots_is_in_use_and_not_collected(short_tmp, host, base):
    """A warm VM not claimed yet holds an overlay on its base: `image rm` refuses the image
    naming the warm VM, and gc keeps it unnamed while the VM is there, then collects it."""
    from vmiso.errors import InUse
    from vmiso.image import store

    work = short_tmp / "w"
    sha = store.add(str(work), base).image.sha256  # unnamed: gc's to collect once unused
    iso = make(short_tmp, host, sha, size=1)
    assert iso.pool.wait_ready(1, timeout=10)
    slot = next(n for n in os.listdir(iso.workdir.containers) if n.startswith(".pool-"))
    with pytest.raises(InUse) as info:
        store.rm(str(work), sha)
    assert info.value.users == [f"warm VM {slot[len('.pool-'):]}"]
    assert store.gc(str(work), dry_run=True) == []
    iso.pool.configure(None)
    assert not any(n.startswith(".pool-") for n in os.listdir(iso.workdir.containers))
    assert [(c.kind, c.id) for c in store.gc(str(work))] == [("store", sha)]
