"""Data in and out of a real VM: stdin (-i), host directories (-v, :ro, escape attempts from a
root shell in the guest), the caller's environment (-e NAME, --env-file) and the Mesos sandbox
through the API. Shares live in /tmp, given to QEMU's user as an operator would."""
import hashlib
import os
import shutil
import stat
import tempfile
import time

import pytest

from vmiso.paths import Workdir, qemu_gid, qemu_uid

from .conftest import vmiso_cli

pytestmark = pytest.mark.system


@pytest.fixture
def share():
    """A directory QEMU's user owns (the operator's grant), removed after the test."""
    path = tempfile.mkdtemp(prefix="vmiso-share-", dir="/tmp")
    os.chown(path, qemu_uid(), qemu_gid())
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path)


def snapshot(path):
    """Every name below ``path`` with its type, mode, owner, size, mtime and content hash."""
    found = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            full = os.path.join(root, name)
            st = os.lstat(full)
            digest = None
            if stat.S_ISREG(st.st_mode):
                with open(full, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
            found[os.path.relpath(full, path)] = (st.st_mode, st.st_uid, st.st_size, st.st_mtime_ns, digest)
    return found


# --- stdin ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("data", [b"", b"\xff"], ids=["0-bytes", "1-byte"])
def test_stdin_small_inputs_arrive_exactly_with_eof(workdir, cid, data):
    proc = vmiso_cli("run", "--name", cid, "-i", "--", "sh", "-c", "od -An -tx1 -v; echo end", input=data)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [f"{b:02x}".encode() for b in data] + [b"end"]


def test_stdin_8_mib_of_random_binary_is_byte_exact(workdir, cid):
    data = os.urandom(8 << 20)
    proc = vmiso_cli("run", "--name", cid, "-i", "--", "sh", "-c", "sha256sum; exit 4", input=data)
    assert proc.returncode == 4, proc.stderr
    assert proc.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()


def test_task_exiting_before_reading_its_stdin_keeps_its_exit_code(workdir, cid):
    # More than every buffer between us and the task can hold: the copy is still blocked when
    # the task exits, so this hangs if the VM's end does not end the copy.
    started = time.monotonic()
    proc = vmiso_cli("run", "--name", cid, "-i", "--", "sh", "-c", "head -c 3; exit 3",
                     input=b"abc" + os.urandom(64 << 20), timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == b"abc"
    assert time.monotonic() - started < 30


def test_without_i_stdin_is_empty(workdir, cid):
    proc = vmiso_cli("run", "--name", cid, "--", "wc", "-c", input=b"not for the task")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == b"0"


# --- volumes -------------------------------------------------------------------------------------
def test_volume_read_write_output_is_on_the_host_when_run_returns(workdir, cid, share):
    with open(os.path.join(share, "input.txt"), "w") as f:
        f.write("4 5 6\n")
    proc = vmiso_cli("run", "--name", cid, "-v", f"{share}:/work", "-w", "/work", "--", "sh", "-c",
                     "mkdir -p out && tr ' ' + < input.txt > out/result.txt && cat out/result.txt")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"4+5+6\n"
    result = os.path.join(share, "out", "result.txt")
    with open(result) as f:
        assert f.read() == "4+5+6\n"
    st = os.stat(result)  # QEMU's user owns what the task made; the guest's mode is only an xattr
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (qemu_uid(), 0o600)
    assert os.getxattr(result, "user.virtfs.uid") == (0).to_bytes(4, "little")


def test_read_only_volume_refuses_every_change_even_after_a_remount(workdir, cid, share):
    ro = os.path.join(share, "ro")
    os.mkdir(ro)
    with open(os.path.join(ro, "keep"), "w") as f:
        f.write("original\n")
    before = snapshot(ro)
    script = """
    fails() { if "$@" 2>/dev/null; then echo "WROTE: $*"; fi; }
    try_all() {
      fails sh -c 'echo changed > /in/keep'; fails sh -c 'echo new > /in/new'; fails rm /in/keep
      fails mkdir /in/d; fails chmod 777 /in; fails touch /in/keep; fails mv /in/keep /in/moved
      fails ln -s /etc /in/link; fails mknod /in/null c 1 3
    }
    try_all
    mount -o remount,rw /in && grep ' /in ' /proc/mounts
    try_all
    cat /in/keep
    """
    proc = vmiso_cli("run", "--name", cid, "-v", f"{ro}:/in:ro", "--", "sh", "-c", script)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.decode().splitlines()
    assert not [line for line in lines if line.startswith("WROTE")], proc.stdout
    assert any(" /in 9p rw," in line for line in lines), lines  # the guest's remount did happen
    assert lines[-1] == "original"
    assert snapshot(ro) == before


def test_escape_attempts_from_the_guest_leave_nothing_outside_the_share(workdir, cid, share):
    outside = tempfile.mkdtemp(prefix="vmiso-outside-", dir="/tmp")
    try:
        with open(os.path.join(outside, "secret"), "w") as f:
            f.write("host secret\n")
        os.chmod(outside, 0o755)
        os.symlink(outside, os.path.join(share, "planted"))  # a host symlink out of the share
        script = f"""
        echo guest-side > /etc/marker
        ln -s /etc /s/etc-link && echo escaped > /s/etc-link/written-through-link
        ln -s {outside} /s/out-link && cat /s/out-link/secret
        cat /s/planted/secret
        cat /s/../{outside}/secret
        ls /s/..
        echo a > /s/file && ln /s/file /s/hard
        ln /etc/passwd /s/passwd-link
        mknod /s/null c 1 3 && mknod /s/sda b 8 0
        cp /bin/busybox /s/suid && chown 0:0 /s/suid && chmod 4755 /s/suid
        ls -l /s
        """
        before_outside = snapshot(outside)
        proc = vmiso_cli("run", "--name", cid, "-v", f"{share}:/s", "--", "sh", "-c", script)
        assert proc.returncode == 0, proc.stderr
        assert b"host secret" not in proc.stdout  # nothing outside the share was read
        assert snapshot(outside) == before_outside
        assert not os.path.exists("/etc/written-through-link")
        # The guest sees its symlinks, devices and setuid file; the host has plain files of QEMU's user.
        guest_view = proc.stdout.decode()
        assert "crw" in guest_view and "rws" in guest_view and "etc-link -> /etc" in guest_view
        for name in ("etc-link", "out-link", "null", "sda", "suid", "file", "hard"):
            st = os.lstat(os.path.join(share, name))
            assert stat.S_ISREG(st.st_mode), name
            assert st.st_uid == qemu_uid() and not st.st_mode & (stat.S_ISUID | stat.S_ISGID), name
            assert stat.S_IMODE(st.st_mode) == 0o600, name
        assert os.stat(os.path.join(share, "file")).st_ino == os.stat(os.path.join(share, "hard")).st_ino
        assert not os.path.exists(os.path.join(share, "passwd-link"))  # a hard link across file systems
        assert os.path.islink(os.path.join(share, "planted"))  # untouched
        assert sorted(os.listdir(share)) == sorted(
            ["planted", "etc-link", "out-link", "file", "hard", "null", "sda", "suid"])
    finally:
        shutil.rmtree(outside)


# --- environment ---------------------------------------------------------------------------------
def test_env_passthrough_and_env_file(workdir, cid, tmp_path):
    env_file = tmp_path / "task.env"
    env_file.write_text("# settings\nFROM_FILE=file value\nOVERRIDDEN=file\nPASSED_IN_FILE\nUNSET_IN_FILE\n")
    caller = dict(os.environ, PASSED="caller's value", PASSED_IN_FILE="from caller")
    caller.pop("UNSET_IN_FILE", None)
    caller.pop("NOT_SET", None)
    proc = vmiso_cli("run", "--name", cid, "--env-file", str(env_file), "-e", "PASSED", "-e", "NOT_SET",
                     "-e", "OVERRIDDEN=flag", "--", "sh", "-c",
                     'echo "$PASSED|$FROM_FILE|$OVERRIDDEN|$PASSED_IN_FILE|${NOT_SET-unset}|${UNSET_IN_FILE-unset}"',
                     env=caller)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"caller's value|file value|flag|from caller|unset|unset\n"


# --- the Mesos sandbox, through the API ------------------------------------------------------------
def test_mesos_sandbox_is_mounted_exported_and_the_working_directory(iso, cid, share):
    from vmiso import TaskSpec

    with open(os.path.join(share, "stdin.txt"), "w") as f:
        f.write("from the agent\n")
    iso.launch(cid, TaskSpec(["sh", "-c", 'pwd; echo "$MESOS_SANDBOX"; cat stdin.txt; echo done > result'],
                             sandbox=share))
    term = iso.wait(cid, timeout=120)
    out = b"".join(data for stream, data in iso.output(cid, follow=False) if stream == "stdout")
    iso.destroy(cid)
    assert (term.state, term.exit_code) == ("FINISHED", 0), term
    assert out == b"/mnt/mesos/sandbox\n/mnt/mesos/sandbox\nfrom the agent\n"
    with open(os.path.join(share, "result")) as f:
        assert f.read() == "done\n"


def test_api_stdin_from_a_path(iso, cid, tmp_path):
    from vmiso import TaskSpec

    source = tmp_path / "input"
    source.write_bytes(b"line 1\nline 2\n")
    iso.launch(cid, TaskSpec(["wc", "-l"], stdin=str(source)))
    term = iso.wait(cid, timeout=120)
    out = b"".join(data for stream, data in iso.output(cid, follow=False) if stream == "stdout")
    iso.destroy(cid)
    assert term.exit_code == 0 and out.strip() == b"2"


def test_bench_io_reports_every_rate(workdir):
    """`vmiso bench io` end to end on small sizes (the 256 MiB figures belong to the bench itself)."""
    import json

    proc = vmiso_cli("bench", "io", "--json", "--size", "8", "--mem", "256", timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["size_mib"] == 8 and result["volume"]["accessmode"] == "mapped"
    for name in ("vol_write", "vol_read", "disk_write", "disk_read", "stdin"):
        assert result[name + "_s"] > 0 and result[name + "_mbps"] > 0, name
    assert not [n for n in os.listdir("/var/tmp") if n.startswith("vmiso-bench-io-")]  # its share is gone


@pytest.fixture(scope="module")
def busybox_image(workdir):
    """A container image (vmiso.testing.oci's busybox) imported into the test work dir."""
    from vmiso.image.oci import importer
    from vmiso.testing import oci

    name = "vmiso-test/busybox:1"
    layout = oci.busybox_image(Workdir(workdir).test_images)
    importer.import_path(workdir, f"{layout}:1", names=[name])
    return name


def test_volume_and_stdin_in_a_container_image(busybox_image, cid, share):
    """The image's root is the task's: the volume is mounted inside it, stdin reaches it."""
    proc = vmiso_cli("run", "--name", cid, "-i", "-v", f"{share}:/data", busybox_image, "sh", "-c",
                     "test ! -e /run/vmiso/seed/vmiso/task.sh && wc -c > /data/count", input=b"12345")
    assert proc.returncode == 0, proc.stderr
    with open(os.path.join(share, "count")) as f:
        assert f.read().strip() == "5"

