"""Data in and out without a VM: the env options (-e NAME, --env-file, the Slurm job's), volume
and stdin validation, the host-side volume checks, and what the seed and the domain carry."""
import base64
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from types import SimpleNamespace

import pytest

from vmiso import InvalidSpec, TaskSpec, Volume
from vmiso.cli import taskdata
from vmiso.image import seed
from vmiso.spec import MESOS_SANDBOX
from vmiso.virt import volumes

from .test_domain import design

# The host-side volume checks are the Isolator's: an ordinary user's `vmiso run` leaves them to the
# agent (vmiso.agent.client.route), and with no agent running ends at "no vmiso agent answers".
in_process = pytest.mark.skipif(os.geteuid() != 0, reason="the Isolator's checks run in the CLI's process "
                                                         "for root only (an ordinary user's go through the agent)")


def args(env=(), env_file=(), no_slurm_env=False, volume=(), mount=()):
    return SimpleNamespace(env=list(env), env_file=list(env_file), no_slurm_env=no_slurm_env,
                           volume=list(volume), mount=list(mount))


# --- environment ---------------------------------------------------------------------------------
def test_e_name_alone_passes_the_callers_value_and_skips_an_unset_one():
    caller = {"HOME": "/root", "EMPTY": ""}
    assert taskdata.parse_env(["HOME", "EMPTY", "UNSET", "X=1=2", "Y="], caller) == {
        "HOME": "/root", "EMPTY": "", "X": "1=2", "Y": ""}
    with pytest.raises(InvalidSpec, match="not a valid variable name"):
        taskdata.parse_env(["1BAD"], caller)
    with pytest.raises(InvalidSpec, match="not a valid variable name"):
        taskdata.parse_env(["=x"], caller)


def test_env_file_in_dockers_format(tmp_path):
    path = tmp_path / "env"
    path.write_bytes(b"# a comment\n\nA=1\n  B=two words  \nC=x=y\nPASSED\nNOT_SET\nQ='quoted'\r\nE=\n")
    assert taskdata.read_env_file(str(path), {"PASSED": "p"}) == {
        "A": "1", "B": "two words  ", "C": "x=y", "PASSED": "p", "Q": "'quoted'", "E": ""}
    path.write_text("A=1\nBAD NAME=2\n")
    with pytest.raises(InvalidSpec, match=r"env:2\) is not a valid variable name"):
        taskdata.read_env_file(str(path), {})
    with pytest.raises(InvalidSpec, match="cannot read"):
        taskdata.read_env_file(str(tmp_path / "missing"), {})


def test_slurm_variables_pass_by_default_and_explicit_ones_win(tmp_path):
    job = {"SLURM_JOB_ID": "7", "SLURM_ARRAY_TASK_ID": "3", "SLURM_NTASKS": "1", "HOME": "/root"}
    assert taskdata.task_env(args(), job) == {"SLURM_JOB_ID": "7", "SLURM_ARRAY_TASK_ID": "3", "SLURM_NTASKS": "1"}
    assert taskdata.task_env(args(no_slurm_env=True), job) == {}
    assert taskdata.task_env(args(), {"SLURM_NTASKS": "1"}) == {}  # not in a job: nothing of Slurm's
    env_file = tmp_path / "env"
    env_file.write_text("SLURM_NTASKS=from-file\nA=file\n")
    env = taskdata.task_env(args(env=["SLURM_ARRAY_TASK_ID=9", "A=flag"], env_file=[str(env_file)]), job)
    assert env["SLURM_ARRAY_TASK_ID"] == "9" and env["SLURM_NTASKS"] == "from-file" and env["A"] == "flag"


# --- volumes -------------------------------------------------------------------------------------
def test_volume_flags_as_docker_spells_them():
    assert taskdata.parse_volume("/h:/g") == Volume("/h", "/g")
    assert taskdata.parse_volume("/h:/g:ro") == Volume("/h", "/g", readonly=True)
    assert taskdata.parse_volume("/h:/g:rw") == Volume("/h", "/g")
    for bad in ("/h", "/h:/g:x", "/a:b:c:d"):
        with pytest.raises(InvalidSpec, match="HOST:GUEST"):
            taskdata.parse_volume(bad)
    assert taskdata.parse_mount("type=bind,source=/h,target=/g,readonly") == Volume("/h", "/g", readonly=True)
    assert taskdata.parse_mount("src=/h,dst=/g,ro=false") == Volume("/h", "/g")
    for bad in ("type=volume,source=/h,target=/g", "source=/h", "source=/h,target=/g,bogus=1",
                "source=/h,target=/g,readonly=maybe"):
        with pytest.raises(InvalidSpec, match="--mount"):
            taskdata.parse_mount(bad)


@pytest.mark.parametrize("host,guest,needle", [
    ("rel", "/g", "HOST 'rel' is not an absolute path"),
    ("/h", "g", "GUEST 'g' is not an absolute path"),
    ("/h", "/", "may not be /"),
    ("/h", "//", "may not be /"),
    ("/h", "/proc", "may not be"),
    ("/h", "/sys/", "may not be"),
    ("/h", "/dev", "may not be"),
    ("/h", "/dev/shm/x", "may not be"),
    ("/h", "/run/vmiso/seed", "may not be"),
    ("/h", "/a/../proc", "contains '..'"),
    ("/h\0", "/g", "not an absolute path"),
])
def test_bad_volumes(host, guest, needle):
    with pytest.raises(InvalidSpec, match=needle):
        Volume(host, guest)


def test_guest_paths_are_normalised_and_unique():
    assert Volume("/h", "/data//in/").guest == "/data/in"
    assert Volume("/h", "/proc2").guest == "/proc2"  # only /proc itself and below are refused
    with pytest.raises(InvalidSpec, match="GUEST /g is given twice"):
        TaskSpec(["true"], volumes=[Volume("/a", "/g"), ("/b", "/g/", True)])
    with pytest.raises(InvalidSpec, match="given twice"):
        TaskSpec(["true"], volumes=[("/a", MESOS_SANDBOX)], sandbox="/s")
    with pytest.raises(InvalidSpec, match="at most 16"):
        TaskSpec(["true"], volumes=[(f"/h{i}", f"/g{i}") for i in range(17)])
    with pytest.raises(InvalidSpec, match="list of vmiso.Volume"):
        TaskSpec(["true"], volumes=Volume("/a", "/g"))


def test_sandbox_is_a_volume_the_env_and_the_default_workdir():
    spec = TaskSpec(["true"], sandbox="/var/sandbox/x", env={"MESOS_SANDBOX": "/elsewhere"})
    assert spec.volumes == (Volume("/var/sandbox/x", MESOS_SANDBOX),)
    assert spec.env["MESOS_SANDBOX"] == MESOS_SANDBOX and spec.workdir == MESOS_SANDBOX
    assert TaskSpec(["true"], sandbox="/s", workdir="/tmp").workdir == "/tmp"


def test_a_spec_with_a_sandbox_can_be_replaced():
    """dataclasses.replace runs __post_init__ again (the agent resizes a spec inside a Slurm
    job so): the sandbox stays one volume, not a second one refused as "given twice"."""
    import dataclasses

    from vmiso import Resources

    spec = TaskSpec(["true"], sandbox="/var/sandbox/x", volumes=[("/data", "/in")])
    resized = dataclasses.replace(spec, resources=Resources(cpus=2, mem_mib=512))
    assert resized.volumes == spec.volumes == (Volume("/data", "/in"), Volume("/var/sandbox/x", MESOS_SANDBOX))
    assert resized.env == spec.env and resized.workdir == MESOS_SANDBOX


def test_stdin_takes_bytes_paths_and_file_objects(tmp_path):
    assert TaskSpec(["cat"], stdin=bytearray(b"ab")).stdin == b"ab"
    assert TaskSpec(["cat"], stdin=tmp_path).stdin == tmp_path
    with open(os.devnull, "rb") as f:
        assert TaskSpec(["cat"], stdin=f).stdin is f
    with pytest.raises(InvalidSpec, match="stdin: must be bytes, a path or a binary file object"):
        TaskSpec(["cat"], stdin=5)


def qemu_can_use(path):
    import pwd

    entry = pwd.getpwnam("libvirt-qemu")
    os.chown(path, entry.pw_uid, entry.pw_gid)


@pytest.mark.skipif(os.geteuid() != 0, reason="checks QEMU's access as root does")
def test_host_checks_before_launch(tmp_path):
    base = tmp_path.parent  # pytest's tmp dirs are root's and 0700: QEMU's user cannot pass them
    share = tmp_path / "share"
    share.mkdir()
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    with pytest.raises(InvalidSpec, match="does not exist"):
        volumes.prepare([Volume(str(tmp_path / "missing"), "/g")], work)
    (tmp_path / "file").write_text("x")
    with pytest.raises(InvalidSpec, match="is not a directory"):
        volumes.prepare([Volume(str(tmp_path / "file"), "/g")], work)
    for inside in (work, work / "sub", tmp_path, "/"):
        with pytest.raises(InvalidSpec, match="inside vmiso's work directory"):
            volumes.prepare([Volume(str(inside), "/g")], work)
    os.symlink(work / "sub", tmp_path / "link")  # resolved first: a link into the work dir is the work dir
    with pytest.raises(InvalidSpec, match="inside vmiso's work directory"):
        volumes.prepare([Volume(str(tmp_path / "link"), "/g")], work)
    with pytest.raises(InvalidSpec, match="libvirt-qemu cannot read"):
        volumes.prepare([Volume(str(share), "/g", readonly=True)], work)
    with pytest.raises(InvalidSpec, match="outside the directories this agent may share"):
        volumes.prepare([Volume(str(share), "/g")], work, roots=[str(tmp_path / "elsewhere")])
    assert base  # (used above only to say why)


@pytest.mark.skipif(os.geteuid() != 0, reason="checks QEMU's access as root does")
def test_qemu_access_is_asked_of_the_kernel(tmp_path):
    import tempfile

    top = tempfile.mkdtemp(prefix="vmiso-unit-", dir="/tmp")
    try:
        share = os.path.join(top, "share")
        os.mkdir(share, 0o755)
        os.chmod(top, 0o711)
        work = tmp_path / "work"
        [s] = volumes.prepare([Volume(share, "/data", readonly=True)], work)  # r-x for others: enough for ro
        assert s == volumes.Share(share, "/data", True, "vmiso0")
        with pytest.raises(InvalidSpec, match="libvirt-qemu cannot write"):
            volumes.prepare([Volume(share, "/data")], work)
        qemu_can_use(share)
        assert [s.readonly for s in volumes.prepare([Volume(share, "/a"), Volume(share, "/b", True)], work)] == [
            False, True]
        os.chmod(top, 0o700)  # a parent QEMU cannot pass
        with pytest.raises(InvalidSpec, match="and x on its parents"):
            volumes.prepare([Volume(share, "/data", readonly=True)], work)
    finally:
        subprocess.run(["rm", "-rf", top], check=True)


def test_seed_carries_volumes_parents_first_and_the_stdin_port():
    shares = [volumes.Share("/h2", "/data/in", True, "vmiso0"), volumes.Share("/h1", "/data", False, "vmiso1")]
    lines = volumes.seed_lines(shares).decode().splitlines()
    assert [line.split()[:2] for line in lines] == [["vmiso1", "rw"], ["vmiso0", "ro"]]
    assert [base64.b64decode(line.split()[2]) for line in lines] == [b"/data", b"/data/in"]
    files = seed.seed_files(instance_id="i", hostname="h", argv=["true"], env={}, nonce="n",
                            data_files=seed.data_files(volumes.seed_lines(shares), "vmiso.stdin"))
    assert files["vmiso/stdin"] == b"vmiso.stdin\n" and files["vmiso/volumes"] == "".join(
        line + "\n" for line in lines).encode()
    assert b"/run/vmiso/volumes" in files["user-data"]  # cloud-init writes them too
    plain = seed.seed_files(instance_id="i", hostname="h", argv=["true"], env={}, nonce="n")
    assert "vmiso/volumes" not in plain and "vmiso/stdin" not in plain


def test_domain_has_9p_shares_and_the_stdin_port_on_the_root_bus():
    fs = volumes.filesystems([volumes.Share("/srv/in'<&", "/in", True, "vmiso0"),
                              volumes.Share("/srv/out", "/out", False, "vmiso1")])
    root = ET.fromstring(design(filesystems=fs, stdin_socket="/w/c/stdin.sock").to_xml())
    shares = root.findall("devices/filesystem")
    assert [s.get("accessmode") for s in shares] == ["mapped", "mapped"]
    assert [s.find("source").get("dir") for s in shares] == ["/srv/in'<&", "/srv/out"]
    assert [s.find("target").get("dir") for s in shares] == ["vmiso0", "vmiso1"]
    assert [s.find("readonly") is not None for s in shares] == [True, False]
    [chan] = root.findall("devices/channel")
    assert chan.get("type") == "unix" and chan.find("source").attrib == {"mode": "connect", "path": "/w/c/stdin.sock"}
    assert chan.find("target").attrib == {"type": "virtio", "name": "vmiso.stdin"}
    controller = root.find("devices/controller[@type='virtio-serial']")
    slots = [el.find("address").get("slot") for el in (*shares, controller)]
    assert all(s is not None for s in slots)
    every_slot = [a.get("slot") for a in root.iter("address")]
    assert len(every_slot) == len(set(every_slot))
    plain = ET.fromstring(design().to_xml())
    assert plain.find("devices/filesystem") is None and plain.find("devices/channel") is None


@pytest.mark.parametrize("argv,needle", [
    (["-v", "rel:/g"], "HOST 'rel' is not an absolute path"),
    pytest.param(["-v", "/nonexistent-vmiso:/g"], "does not exist", marks=in_process),
    (["-v", "/tmp:g"], "is not an absolute path"),
    (["-v", "/tmp:/"], "may not be /"),
    (["-v", "/tmp:/proc"], "may not be"),
    (["-v", "/tmp:/sys"], "may not be"),
    (["-v", "/tmp:/dev"], "may not be"),
    (["-v", "/tmp:/g", "-v", "/var/tmp:/g"], "given twice"),
    (["--mount", "type=bind,source=/tmp"], "--mount"),
    (["-e", "BAD NAME"], "not a valid variable name"),
    (["--env-file", "/nonexistent-vmiso"], "cannot read"),
    (["-i", "-d"], "cannot be used with -d"),
    (["--rm", "-d"], "--rm cannot be used with -d"),
    (["-it"], "-t is refused: a task gets no terminal"),
])
def test_bad_data_options_exit_125_with_one_line_and_make_nothing(tmp_path, argv, needle):
    work = tmp_path / "work"
    proc = subprocess.run([sys.executable, "-m", "vmiso", "--workdir", str(work), "run", *argv, "--", "true"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 125, proc.stderr
    [line] = proc.stderr.strip().splitlines()[-1:]
    assert line.startswith("vmiso: error:") and needle in line, proc.stderr
    assert not (work / "containers").exists()


@in_process
def test_work_dir_host_exits_125_and_makes_nothing(tmp_path):
    work = tmp_path / "work"
    (work / "images").mkdir(parents=True)
    before = sorted(p.name for p in work.iterdir())
    proc = subprocess.run([sys.executable, "-m", "vmiso", "--workdir", str(work), "run", "-v",
                           f"{work}/images:/g", "--", "true"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 125
    assert "inside vmiso's work directory" in proc.stderr.strip().splitlines()[-1]
    assert sorted(p.name for p in work.iterdir() if p.name != "runs") == before
