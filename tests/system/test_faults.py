"""Concurrency, disk full, libvirtd restarts and planted files: clear errors, nothing leaked."""
import os
import subprocess
import threading
import time

import pytest

from vmiso import AlreadyExists, Isolator, LaunchFailed, NoDiskSpace, NotFound, TaskSpec

pytestmark = pytest.mark.system


def domains():
    out = subprocess.run(["virsh", "-q", "list", "--all", "--name"], capture_output=True, text=True).stdout
    return set(out.split())


def test_eight_concurrent_launches_against_one_base(iso, cid):
    ids = [f"{cid}-{i}" for i in range(8)]
    errors = []

    def run(container_id):
        try:
            iso.launch(container_id, TaskSpec.shell(f"echo {container_id}"))
        except Exception as err:  # collected and asserted below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for container_id in ids:
        out = b"".join(data for name, data in iso.output(container_id) if name == "stdout")
        assert out == container_id.encode() + b"\n"
        assert iso.wait(container_id, timeout=120).exit_code == 0
        iso.destroy(container_id)
    assert not any(d.startswith(f"vmiso-{cid}") for d in domains())
    assert not any(n.startswith(cid) for n in os.listdir(iso.workdir.containers))


def race_once(iso, cid):
    outcome = {}

    def launch():
        try:
            iso.launch(cid, TaskSpec(["sleep", "600"]))
            outcome["launch"] = "ok"
        except (AlreadyExists, LaunchFailed) as err:
            outcome["launch"] = err

    def destroy():
        try:
            outcome["destroy"] = iso.destroy(cid, grace=0)
        except NotFound as err:
            outcome["destroy"] = err

    threads = [threading.Thread(target=launch), threading.Thread(target=destroy)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcome


def test_launch_destroy_race_on_one_id(iso, cid):
    """destroy() racing launch(): either order is fine; the only errors are the documented ones."""
    for _ in range(3):
        outcome = race_once(iso, cid)
        iso.destroy(cid, grace=0)  # whatever happened, this leaves nothing
        assert f"vmiso-{cid}" not in domains()
        assert not os.path.exists(os.path.join(iso.workdir.containers, cid))
        assert set(outcome) == {"launch", "destroy"}


def test_destroy_twice_concurrently(iso, cid):
    iso.launch(cid, TaskSpec(["sleep", "600"]))
    results = []
    threads = [threading.Thread(target=lambda: results.append(iso.destroy(cid, grace=0))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.state for r in results] == ["KILLED", "KILLED"]
    assert f"vmiso-{cid}" not in domains()


@pytest.fixture
def tiny_workdir(tmp_path, workdir):
    """A work dir on a 1 MiB tmpfs, so the disk fills up for real (ENOSPC from the kernel)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0711", "tmpfs", str(mount)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", "-l", str(mount)])


def fill(directory, leave):
    """Fill the file system of ``directory`` up to ``leave`` bytes of free space."""
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    with open(os.path.join(directory, "filler"), "wb") as f:
        f.write(b"\xff" * max(0, free - leave))


@pytest.mark.parametrize("leave", [0, 8 * 1024, 64 * 1024])
def test_disk_full_fails_cleanly(tiny_workdir, workdir, cid, leave, monkeypatch):
    """Disk admission refuses such a launch up front (NoDiskSpace); with admission out of the
    way (a host that filled up between the check and the writes), the overlay, seed or
    checkpoint write fails with LaunchFailed. Either way nothing is left half-made."""
    from vmiso import admission
    from vmiso.image import micro

    base = str(micro.find_micro(workdir).base)
    iso = Isolator(workdir=str(tiny_workdir / "w"), agent_id="vmiso-systest")
    iso.workdir.ensure()
    fill(tiny_workdir, leave)
    with pytest.raises(NoDiskSpace):
        iso.launch(cid, TaskSpec(["true"], image=base))
    assert os.listdir(iso.workdir.containers) == []
    monkeypatch.setattr(admission, "check", lambda *args: None)
    with pytest.raises(LaunchFailed) as info:
        iso.launch(cid, TaskSpec(["true"], image=base))
    assert "No space left on device" in str(info.value) or "ENOSPC" in str(info.value)
    assert os.listdir(iso.workdir.containers) == []  # nothing half-made
    assert f"vmiso-{cid}" not in domains()
    iso.host.close()


def test_planted_symlink_at_container_path_is_refused(iso, cid, tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    os.symlink(victim, os.path.join(iso.workdir.containers, cid))
    try:
        with pytest.raises(AlreadyExists):
            iso.launch(cid, TaskSpec(["true"]))
        assert list(victim.iterdir()) == []  # nothing written through the link
        iso.destroy(cid)  # removes the link, never its target
        assert victim.exists() and not os.path.lexists(os.path.join(iso.workdir.containers, cid))
    finally:
        if os.path.lexists(os.path.join(iso.workdir.containers, cid)):
            os.unlink(os.path.join(iso.workdir.containers, cid))


def ensure_libvirtd():
    """Start libvirtd the way `make setup` does and wait until it really answers, so a test that
    killed it never leaves the next test without one."""
    script = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "daemons.sh")
    subprocess.run(["bash", script], check=True, timeout=90)


def restart_libvirtd():
    subprocess.run(["pkill", "-x", "libvirtd"])
    deadline = time.time() + 30
    while subprocess.run(["pgrep", "-x", "libvirtd"], capture_output=True).returncode == 0:
        assert time.time() < deadline
        time.sleep(0.1)
    ensure_libvirtd()


def test_libvirtd_restart_while_vm_runs(iso, cid):
    iso.launch(cid, TaskSpec.shell("sleep 6; echo survived; exit 4"))
    restart_libvirtd()
    termination = iso.wait(cid, timeout=120)  # the isolator reconnects; events or reconcile follow
    assert (termination.reason, termination.exit_code) == ("guest-exited", 4)
    assert iso.host.conn().isAlive()
    iso.destroy(cid)


def test_libvirtd_dies_during_launch(iso, cid, monkeypatch):
    real_create = iso.host.create

    def create_after_libvirtd_died(xml):
        subprocess.run(["pkill", "-9", "-x", "libvirtd"])
        time.sleep(0.2)
        return real_create(xml)

    monkeypatch.setattr(iso.host, "create", create_after_libvirtd_died)
    try:
        with pytest.raises(LaunchFailed):
            iso.launch(cid, TaskSpec(["true"]))
    finally:
        deadline = time.time() + 30
        while subprocess.run(["pgrep", "-x", "libvirtd"], capture_output=True).returncode == 0:
            assert time.time() < deadline  # the SIGKILLed daemon is gone before we start one
            time.sleep(0.1)
        ensure_libvirtd()
    monkeypatch.undo()
    report = iso.recover()
    assert cid not in report.running
    assert not os.path.exists(os.path.join(iso.workdir.containers, cid))
    assert f"vmiso-{cid}" not in domains()
    iso.launch(cid, TaskSpec(["true"]))  # the isolator healed: a new launch works
    assert iso.wait(cid, timeout=60).exit_code == 0
    iso.destroy(cid)


def test_recover_racing_a_launch(iso, workdir, cid):
    """Another isolator's recover() while a launch is under way never fails or cleans it."""
    other = Isolator(workdir=workdir, agent_id=iso.agent_id)
    reports, errors = [], []

    def recover_repeatedly():
        for _ in range(20):
            try:
                reports.append(other.recover())
            except Exception as err:  # collected and asserted below
                errors.append(err)

    racer = threading.Thread(target=recover_repeatedly)
    racer.start()
    iso.launch(cid, TaskSpec.shell("exit 5"))
    racer.join()
    assert errors == []
    assert not any(cid in r.corrupt or cid in r.orphans for r in reports)
    assert iso.wait(cid, timeout=60).exit_code == 5
    iso.destroy(cid)
    other.host.close()
