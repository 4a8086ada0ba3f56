"""`vmiso run` end to end on the real libvirtd and QEMU, booting the real micro guest."""
import hashlib
import json
import os
import subprocess
import time

import pytest

from .conftest import vmiso_cli

pytestmark = pytest.mark.system


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def container_dir(workdir, cid):
    return os.path.join(workdir, "containers", cid)


@pytest.mark.parametrize("flags", [[], ["--rm"]], ids=["default", "docker-rm"])
def test_output_streams_and_exit_code(workdir, cid, flags):
    """...and the VM's files are gone afterwards, with or without docker's --rm (the default)."""
    proc = vmiso_cli("run", *flags, "--name", cid, "--", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert proc.returncode == 7, proc.stderr
    assert proc.stdout == b"out\n"
    assert proc.stderr == b"err\n"
    assert not os.path.exists(container_dir(workdir, cid))


@pytest.mark.parametrize("image", ["micro:stock", "micro:lean"])
def test_each_micro_kernel_runs_a_task(workdir, cid, image):
    """Both kernels through libvirt: the stock one with its initramfs, the lean one without."""
    from vmiso.image import micro

    proc = vmiso_cli("run", "--name", cid, "--image", image, "--", "sh", "-c", "uname -r; echo ok >&2; exit 5")
    assert proc.returncode == 5, proc.stderr
    assert proc.stdout.decode().strip() == micro.find_micro(workdir, image.split(":")[1]).kernel_version
    assert proc.stderr == b"ok\n"


def test_unknown_micro_kernel_is_a_usage_error(workdir, cid):
    proc = vmiso_cli("run", "--name", cid, "--image", "micro:tiny", "--", "true")
    assert proc.returncode == 125
    assert b"not one of lean, stock" in proc.stderr


def test_arguments_arrive_byte_exact(workdir, cid):
    proc = vmiso_cli("run", "--name", cid, "--", "printf", "%s|", "a b", "$(id)", "it's", "ü", '"q"')
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "a b|$(id)|it's|ü|\"q\"|".encode()


def test_output_without_trailing_newline_and_binary(workdir, cid):
    proc = vmiso_cli("run", "--name", cid, "--", "sh", "-c", r"printf 'no newline\0\377\r\n\nend'")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"no newline\0\377\r\n\nend"


def test_env_and_workdir_in_guest(workdir, cid):
    proc = vmiso_cli("run", "--name", cid, "-e", "GREETING=hi there", "-e", "MULTI=a=b", "-w", "/tmp", "--",
                     "sh", "-c", 'echo "$GREETING|$MULTI|$(pwd)"')
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"hi there|a=b|/tmp\n"


def test_disks_are_isolated_and_base_untouched(workdir, cid):
    from vmiso.image import micro

    base = micro.find_micro(workdir).base
    before = sha256(base)
    first = vmiso_cli("run", "--name", cid, "--", "touch", "/bombino.txt")
    assert first.returncode == 0, first.stderr
    second = vmiso_cli("run", "--name", cid + "b", "--", "ls", "/bombino.txt")
    assert second.returncode != 0
    assert b"No such file" in second.stderr
    assert sha256(base) == before


def test_resources_reach_the_guest(workdir, cid):
    proc = vmiso_cli("run", "--name", cid, "--cpus", "2", "--mem", "512", "--",
                     "sh", "-c", "nproc; grep MemTotal /proc/meminfo")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.decode().split("\n")
    assert lines[0] == "2"
    mem_kib = int(lines[1].split()[1])
    assert 400 * 1024 < mem_kib <= 512 * 1024  # the kernel keeps some for itself


def test_timeout_kills_with_reason_timeout(workdir, cid):
    proc = vmiso_cli("run", "--name", cid, "--timeout", "2", "--", "sleep", "600")
    assert proc.returncode == 124, proc.stderr
    assert b"timeout" in proc.stderr


def test_timeout_sends_sigterm_first_as_gnu_timeout_does(workdir, cid):
    proc = vmiso_cli("run", "--name", cid, "--timeout", "2", "--",
                     "sh", "-c", 'trap "echo stopping; exit 3" TERM; while :; do sleep 1; done')
    assert proc.returncode == 124, proc.stderr
    assert proc.stdout == b"stopping\n"  # its last words are kept


def test_detach_then_kill_gives_killed(workdir, cid):
    started = vmiso_cli("run", "-d", "--name", cid, "--", "sleep", "600")
    assert started.returncode == 0, started.stderr
    assert started.stdout.decode().strip() == cid
    ps = json.loads(vmiso_cli("ps", "--json").stdout)
    assert [s["state"] for s in ps if s["container_id"] == cid] == ["RUNNING"]
    killed = vmiso_cli("kill", "--grace", "0", cid)
    assert killed.returncode == 0, killed.stderr
    assert killed.stdout.decode().split() == [cid, "KILLED", "destroyed"]
    waited = vmiso_cli("wait", "--json", cid)
    assert waited.returncode == 137
    assert json.loads(waited.stdout) == {"state": "KILLED", "reason": "destroyed", "exit_code": None,
                                         "message": "the task was killed"}
    assert vmiso_cli("rm", cid).returncode == 0
    assert not os.path.exists(container_dir(workdir, cid))


def test_detached_task_exit_code_seen_by_another_process(workdir, cid):
    assert vmiso_cli("run", "-d", "--name", cid, "--", "sh", "-c", "echo done; exit 3").returncode == 0
    waited = vmiso_cli("wait", "--json", cid)
    assert waited.returncode == 3, waited.stderr
    assert json.loads(waited.stdout)["reason"] == "guest-exited"
    logs = vmiso_cli("logs", "--task", cid)
    assert logs.stdout == b"done\n"
    console = vmiso_cli("logs", cid)
    assert b"VMISO-USERSPACE" in console.stdout
    assert vmiso_cli("rm", cid).returncode == 0


def test_qemu_killed_gives_vm_crashed(workdir, cid):
    assert vmiso_cli("run", "-d", "--name", cid, "--", "sleep", "600").returncode == 0
    pid_file = f"/run/libvirt/qemu/vmiso-{cid}.pid"
    deadline = time.time() + 10
    while not os.path.exists(pid_file) and time.time() < deadline:
        time.sleep(0.05)
    with open(pid_file) as f:
        os.kill(int(f.read()), 9)
    waited = vmiso_cli("wait", "--json", cid)
    termination = json.loads(waited.stdout)
    assert termination["state"] in ("FAILED", "LOST")
    assert termination["reason"] == "vm-crashed"
    assert termination["exit_code"] is None
    assert vmiso_cli("rm", cid).returncode == 0


def test_bad_image_fails_cleanly(workdir, cid, tmp_path):
    not_an_image = tmp_path / "x.qcow2"
    not_an_image.write_bytes(b"hello")
    proc = vmiso_cli("run", "--name", cid, "--image", str(not_an_image), "--", "true")
    assert proc.returncode == 125
    assert proc.stderr.startswith(b"vmiso: error:") and proc.stderr.count(b"\n") == 1
    assert not os.path.exists(container_dir(workdir, cid))


def test_doctor_names_the_accelerator_and_why(workdir):
    proc = vmiso_cli("doctor")
    out = proc.stdout.decode()
    line = next(line for line in out.splitlines() if "accelerator" in line)
    with open("/proc/cpuinfo") as f:
        has_vt = any(flag in f.read().split() for flag in ("vmx", "svm"))
    assert ("KVM" if has_vt else "TCG") in line
    assert "vmx/svm" in line or "KVM API" in line
    probe = next(line for line in out.splitlines() if "cpu probe" in line)
    assert "quick:" in probe and "VMISO_CPU_PROBE=full" in probe  # libvirt 9 + QEMU 7.2 here


def test_virsh_sees_our_metadata(workdir, cid):
    assert vmiso_cli("run", "-d", "--name", cid, "--", "sleep", "600").returncode == 0
    try:
        xml = subprocess.run(["virsh", "dumpxml", f"vmiso-{cid}"], capture_output=True, text=True).stdout
        assert "vmiso:instance" in xml and f"<vmiso:container>{cid}</vmiso:container>" in xml
    finally:
        assert vmiso_cli("rm", "--grace", "0", cid).returncode == 0


def test_largest_argument_and_non_utf8_bytes_arrive_intact(workdir, cid):
    big = "".join(chr(ord("a") + i % 26) for i in range(131071))  # the guest kernel's MAX_ARG_STRLEN
    raw = os.fsdecode(b"\xff\xfe-\x80")  # not UTF-8: passed through as bytes
    proc = vmiso_cli("run", "--name", cid, "--", "sh", "-c", 'printf %s "$1" | sha256sum; printf %s "$2"',
                     "_", big, raw)
    assert proc.returncode == 0, proc.stderr[-500:]
    digest, rest = proc.stdout.split(b"  -\n")
    assert digest.decode() == hashlib.sha256(big.encode()).hexdigest()
    assert rest == b"\xff\xfe-\x80"


LIBVIRTD_LOG = "/var/log/libvirt/libvirtd-vmiso.log"  # where scripts/daemons.sh sends it


@pytest.mark.skipif(not os.path.exists(LIBVIRTD_LOG), reason="libvirtd logs elsewhere (systemd)")
def test_cli_leaves_no_dropped_connection_in_libvirtds_log(workdir, cid):
    """Each command closes its libvirt connection: one dropped by process exit makes libvirtd log
    an error, and an operator reading that log would see one per task."""
    start = os.path.getsize(LIBVIRTD_LOG)
    assert vmiso_cli("run", "--name", cid, "--", "true").returncode == 0
    assert vmiso_cli("ps").returncode == 0
    time.sleep(0.5)  # libvirtd notices a dropped client from its event loop
    with open(LIBVIRTD_LOG, "rb") as f:
        f.seek(start)
        new = f.read().decode(errors="replace")
    assert "End of file while reading data" not in new, new
