"""What is not ours is never touched, and a hostile guest or spec cannot steer the host side:
another agent's running task survives every CLI command and another agent's recover(); a
foreign domain under our name survives a failed launch; a forged exit-marker prefix holds
nothing back; task variables named like the wrapper's reach the task; a full disk ends a task
instead of pausing its VM. Each on the real libvirtd and micro guest."""
import os
import pwd
import re
import secrets
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from vmiso import Isolator, NoDiskSpace, NotOwned, TaskSpec
from vmiso.image import seed

from .conftest import vmiso_cli, wait_for_stdout

pytestmark = pytest.mark.system

# Waits for SIGTERM, then exits 7: a task that runs until its owner stops it.
UNTIL_TERM = "trap 'echo bye; exit 7' TERM; echo started; while :; do sleep 1; done"


def files_of(directory):
    """{name: (size, mtime_ns)} of every file in ``directory``."""
    return {name: (os.lstat(os.path.join(directory, name)).st_size,
                   os.lstat(os.path.join(directory, name)).st_mtime_ns) for name in os.listdir(directory)}


def test_another_agents_task_survives_every_command(workdir, cid):
    owner = Isolator(workdir=workdir, agent_id="agent-a-" + secrets.token_hex(3))
    other = Isolator(workdir=workdir, agent_id="agent-b-" + secrets.token_hex(3))
    directory = os.path.join(workdir, "containers", cid)
    try:
        owner.launch(cid, TaskSpec.shell(UNTIL_TERM))
        wait_for_stdout(owner, cid, b"started")
        with open(os.path.join(directory, "checkpoint.json"), "rb") as f:
            checkpoint = f.read()
        for args in (["ps"], ["ps", "--json"], ["stats", "--json"], ["logs", cid], ["logs", "--task", cid],
                     ["gc"], ["metrics"]):
            proc = vmiso_cli(*args)
            assert proc.returncode == 0, (args, proc.stderr)
            assert owner.status(cid).state == "RUNNING", args
            assert {"overlay.qcow2", "seed.iso", "checkpoint.json"} <= set(os.listdir(directory)), args
        assert cid.encode() in vmiso_cli("ps").stdout and owner.agent_id.encode() in vmiso_cli("ps").stdout
        for args in (["kill", cid], ["rm", cid]):
            proc = vmiso_cli(*args)
            assert proc.returncode == 125, args
            assert f"belongs to agent '{owner.agent_id}'".encode() in proc.stderr, proc.stderr
        report = other.recover()
        assert report.foreign.get(cid) == owner.agent_id and cid not in report.ids
        with pytest.raises(NotOwned):
            other.kill(cid)
        with pytest.raises(NotOwned):
            other.destroy(cid)
        assert other.status(cid).state == "RUNNING" and other.status(cid).owner == owner.agent_id
        with open(os.path.join(directory, "checkpoint.json"), "rb") as f:
            assert f.read() == checkpoint
        # The other agent may wait for it, read-only: it sees the end its owner records.
        seen_by_other = []
        waiter = threading.Thread(target=lambda: seen_by_other.append(other.wait(cid, timeout=60)))
        waiter.start()
        termination = owner.kill(cid, grace=30)
        assert (termination.state, termination.exit_code) == ("KILLED", 7)
        waiter.join(70)
        assert seen_by_other == [termination]
    finally:
        owner.destroy(cid, grace=0)
        owner.host.close()
        other.host.close()


FOREIGN_XML = """<domain type='qemu'>
  <name>{name}</name><memory unit='MiB'>32</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator></devices>
</domain>"""


def test_foreign_domain_under_our_name_survives_a_failed_run(workdir, tmp_path):
    cid = "foreign-" + secrets.token_hex(4)
    name = f"vmiso-{cid}"
    xml = tmp_path / "foreign.xml"
    xml.write_text(FOREIGN_XML.format(name=name))
    subprocess.run(["virsh", "create", str(xml)], check=True, capture_output=True)
    try:
        proc = vmiso_cli("run", "--name", cid, "--", "true")
        assert proc.returncode == 125
        assert b"launch" in proc.stderr and b"already" in proc.stderr, proc.stderr
        state = subprocess.run(["virsh", "domstate", name], capture_output=True, text=True)
        assert state.stdout.strip() == "running", state
        assert not os.path.exists(os.path.join(workdir, "containers", cid))
    finally:
        subprocess.run(["virsh", "destroy", name], capture_output=True)


def test_forged_exit_prefix_holds_nothing_back(iso, cid):
    """The guest can read its nonce and print the marker's prefix: a megabyte after it streams
    at once, seconds before the task ends."""
    script = ('printf "VMISO-%s EXIT " "$(cat /run/vmiso/seed/vmiso/nonce)"; '
              "head -c 1048576 /dev/zero | tr '\\0' x; sleep 6; exit 3")
    iso.launch(cid, TaskSpec.shell(script))
    got, mb_at = 0, None
    for stream, data in iso.output(cid):
        if stream == "stdout":
            got += len(data)
            if got >= 1048576 and mb_at is None:
                mb_at = time.monotonic()
    termination = iso.wait(cid)
    ended_at = time.monotonic()
    assert termination.exit_code == 3
    assert got == 1048576 + len(b"VMISO-") + 32 + len(b" EXIT ")
    assert mb_at is not None and ended_at - mb_at > 3, f"the megabyte came {ended_at - mb_at:.1f} s before the end"
    iso.destroy(cid)


def wrapper_variables():
    """Every shell variable the guest wrapper assigns or reads into."""
    text = seed.wrapper_script().decode()
    names = set(re.findall(r"(?m)(?:^|[\s;(])([A-Za-z_][A-Za-z0-9_]*)=", text))
    names |= set(re.findall(r"\bread -r ([A-Za-z_][A-Za-z0-9_]*)", text))
    names |= set(re.findall(r"\bfor ([A-Za-z_][A-Za-z0-9_]*) in", text))
    return names - {"IFS"}  # set per command (IFS= read); checked below all the same


def test_task_variables_named_like_the_wrappers_reach_the_task(iso, cid):
    names = wrapper_variables()
    assert {"d", "out", "err", "nonce", "workdir", "line", "v", "pidfile", "code"} <= names
    env = {name: f"/task-value-of-{name}" for name in names}
    env.update(IFS=":", PATH="/bin:/sbin:/usr/bin")
    iso.launch(cid, TaskSpec(["env"], env=env, workdir="/tmp"))
    out = b"".join(data for stream, data in iso.output(cid) if stream == "stdout").decode()
    termination = iso.wait(cid)
    assert (termination.reason, termination.exit_code) == ("guest-exited", 0), out
    seen = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    for name, value in env.items():
        assert seen.get(name) == value, (name, seen.get(name))
    assert seen.get("PWD") == "/tmp"
    iso.destroy(cid)


def test_cli_env_named_like_the_wrapper_variables(workdir, cid):
    """The case from the issue, through the CLI: the working directory and stderr still work."""
    proc = vmiso_cli("run", "--name", cid, "-e", "err=/tmp/x", "-e", "out=/tmp/y", "-e", "d=/nonexistent",
                     "-e", "nonce=1", "-e", "workdir=/etc", "-w", "/tmp", "--", "sh", "-c", "pwd; echo E >&2")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"/tmp\n", b"E\n")


def test_launch_that_cannot_fit_is_refused_with_the_numbers(workdir, cid):
    free = shutil.disk_usage(os.path.join(workdir, "containers")).free
    proc = vmiso_cli("--disk-reserve", str(free + (1 << 30)), "run", "--name", cid, "--", "true")
    assert proc.returncode == 125
    assert re.search(rb"not enough disk space in .*: [0-9.]+ GiB free, [0-9.]+ GiB of it reserved", proc.stderr), \
        proc.stderr
    assert not os.path.exists(os.path.join(workdir, "containers", cid))
    iso = Isolator(workdir=workdir, disk_overcommit=1e-6)  # any disk promises too much
    try:
        with pytest.raises(NoDiskSpace) as info:
            iso.launch(cid, TaskSpec(["true"]))
        assert info.value.new > 0 and "running disks may still grow" in str(info.value)
        assert not os.path.exists(os.path.join(workdir, "containers", cid))
    finally:
        iso.host.close()


@pytest.fixture
def tiny_workdir(workdir):
    """A work dir whose containers/ is a 48 MiB ext4 file system (root keeps its 5 % reserve,
    so virtlogd can still write the logs once QEMU's user has no space left); the images are
    hard links to the shared work dir's. Under /tmp, not pytest's 0700 tmp_path: QEMU's user
    must pass."""
    top = Path(tempfile.mkdtemp(prefix="vmiso-tiny-", dir="/tmp"))
    os.chmod(top, 0o711)
    root = top / "workdir"
    root.mkdir()
    subprocess.run(["cp", "-al", os.path.join(workdir, "images"), str(root / "images")], check=True)
    image = top / "containers.ext4"
    subprocess.run(["truncate", "-s", "48M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    (root / "containers").mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(root / "containers")], check=True)
    os.chmod(root, 0o711)
    try:
        yield str(root)
    finally:
        subprocess.run(["umount", str(root / "containers")], check=True)
        shutil.rmtree(top)


def test_guest_filling_the_host_file_system_gets_io_errors_and_ends(tiny_workdir, cid):
    iso = Isolator(workdir=tiny_workdir, disk_reserve=0, disk_overcommit=1000)
    try:
        iso.launch(cid, TaskSpec.shell("dd if=/dev/zero of=/big bs=1M count=200 conv=fsync 2>&1; echo dd=$?"))
        termination = iso.wait(cid, timeout=240)  # a VM paused on ENOSPC would never end
        out = b"".join(data for stream, data in iso.output(cid, follow=False) if stream == "stdout")
        assert termination.reason == "guest-exited", (termination, out)
        assert b"dd=1" in out and b"Input/output error" in out, out
        iso.destroy(cid)
    finally:
        iso.host.close()


def test_container_files_are_not_for_group_kvm(iso, cid):
    """Only root and QEMU's user may pass into a container's directory: another member of QEMU's
    group (kvm) can neither read the task's output nor reach its control socket."""
    user = "vmiso-kvm-" + secrets.token_hex(2)
    subprocess.run(["useradd", "-M", "-G", "kvm", user], check=True)
    try:
        iso.launch(cid, TaskSpec.shell(UNTIL_TERM))
        wait_for_stdout(iso, cid, b"started")
        directory = os.path.join(iso.workdir.containers, cid)
        for path in (str(iso.workdir.containers), directory):
            st = os.stat(path)
            assert st.st_uid == 0 and st.st_gid == 0 and not st.st_mode & stat.S_IRWXO, path
        for target in (os.path.join(directory, "stdout"), os.path.join(directory, "control.sock")):
            probe = subprocess.run(["su", "-s", "/bin/sh", user, "-c", f"cat {target} </dev/null"],
                                   capture_output=True, text=True, timeout=30)
            assert probe.returncode != 0 and "Permission denied" in probe.stderr, probe
        qemu = pwd.getpwnam("libvirt-qemu").pw_name
        probe = subprocess.run(["su", "-s", "/bin/sh", qemu, "-c", f"test -S {directory}/control.sock"])
        assert probe.returncode == 0  # QEMU's own user still reaches its files
        assert iso.kill(cid, grace=30).exit_code == 7
    finally:
        iso.destroy(cid, grace=0)
        subprocess.run(["userdel", user], check=True)
