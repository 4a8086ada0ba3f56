"""Container images as the task's root, on the real libvirtd and micro's lean kernel: the image's
config honoured as ``docker run`` does (Cmd, Entrypoint, Env, WorkingDir, User), exit codes and
streams as for micro, the runtime's additions and nothing of vmiso's in the task's view, and
the image's tree inside the VM exactly as ``umoci unpack`` makes it on the host."""
import os
import re
import stat
import subprocess

import pytest

from vmiso import TaskSpec
from vmiso.image import store
from vmiso.image.oci import importer
from vmiso.paths import Workdir
from vmiso.testing import oci

from .conftest import vmiso_cli

pytestmark = [pytest.mark.system, pytest.mark.oci]

IMAGE_CACHE = Workdir(os.environ.get("VMISO_TEST_WORKDIR", "/var/lib/vmiso")).test_images
BUSYBOX = "vmiso-test/busybox:1"
BUSYBOX_QUIT = "vmiso-test/busybox-quit:1"  # the same image, StopSignal SIGQUIT


@pytest.fixture(scope="module")
def busybox(workdir):
    """The three-layer busybox image (Cmd sh, Env PATH=/bin IMAGE=busybox, WorkingDir /home/app,
    users root and app:1000), imported into the test work dir."""
    layout = oci.busybox_image(IMAGE_CACHE)
    importer.import_path(workdir, f"{layout}:1", names=[BUSYBOX])
    return BUSYBOX


def run(*args, **kw):
    return vmiso_cli("run", *args, **kw)


def test_default_command_exit_code_and_streams(busybox, cid):
    proc = run("--name", cid, busybox, "sh", "-c", "echo out; echo err >&2; exit 42")
    assert (proc.returncode, proc.stdout, proc.stderr) == (42, b"out\n", b"err\n")
    # The image's Cmd is sh: it reads the script from stdin.
    proc = run("--name", cid, "--image", busybox, "-i", input=b"echo from-the-image-cmd; exit 3\n")
    assert (proc.returncode, proc.stdout) == (3, b"from-the-image-cmd\n"), proc.stderr


def test_env_workdir_and_their_overrides(busybox, cid):
    proc = run("--name", cid, busybox, "sh", "-c", 'echo "$IMAGE $PATH $HOME"; pwd')
    assert proc.stdout == b"busybox /bin /root\n/home/app\n", proc.stderr
    proc = run("--name", cid, "-e", "IMAGE=mine", "-w", "/tmp/new", busybox, "sh", "-c", 'echo "$IMAGE"; pwd')
    assert proc.stdout == b"mine\n/tmp/new\n", proc.stderr


def test_the_task_gets_exactly_its_environment_and_arguments(busybox, cid):
    """Nothing of the wrapper's shells in the environment (env is exec'd without a shell),
    HOSTNAME as docker sets it unless the run sets one; arguments byte-exact, empty ones kept."""
    proc = run("--name", cid, "-e", "X=a b=c", busybox, "env")
    assert proc.returncode == 0, proc.stderr
    env = sorted(proc.stdout.decode().splitlines())
    assert env == sorted(["IMAGE=busybox", "PATH=/bin", "HOME=/root", f"HOSTNAME={cid}", "X=a b=c"]), env
    proc = run("--name", cid, "-e", "HOSTNAME=mine", busybox, "sh", "-c", 'echo "$HOSTNAME"')
    assert proc.stdout == b"mine\n", proc.stderr
    args = ["", "a b", "$(id)", "\\n", "é"]
    proc = run("--name", cid, busybox, "sh", "-c", 'printf "[%s]" "$@"', "sh", *args)
    assert proc.stdout == "".join(f"[{a}]" for a in args).encode(), proc.stderr


@pytest.mark.parametrize("user, expected", [
    (None, b"uid=0(root) gid=0(root)"),
    ("app", b"uid=1000(app) gid=1000(app)"),
    ("1000", b"uid=1000(app) gid=1000(app)"),
    ("1000:0", b"uid=1000(app) gid=0(root)"),
    ("4242", b"uid=4242 gid=0(root)"),
])
def test_user_by_name_and_by_uid(busybox, cid, user, expected):
    # -w /: the image's WorkingDir (/home/app, 0750 app's) is not for every user, as with docker
    proc = run("--name", cid, "-w", "/", *(["-u", user] if user else []), busybox, "id")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith(expected), proc.stdout


def test_unknown_user_and_missing_command_are_refused_before_a_vm(busybox, cid):
    proc = run("--name", cid, "-u", "nobody", busybox, "id")
    assert proc.returncode == 125 and b"nobody" in proc.stderr
    proc = run("--name", cid, busybox, "no-such-command")
    assert proc.returncode == 127 and b"no-such-command: executable file not found" in proc.stderr


def test_entrypoint_replaces_the_images(busybox, cid):
    proc = run("--name", cid, "--entrypoint", "/bin/echo", busybox, "a", "b")
    assert proc.stdout == b"a b\n", proc.stderr


def test_the_task_sees_the_image_and_a_runtimes_additions_only(busybox, cid):
    script = ("ls -1 / | busybox tr '\\n' ' '; echo; cat /etc/hostname; busybox grep -c localhost /etc/hosts; "
              "ls -1d /proc/self /dev/null /tmp; "
              "busybox cut -d' ' -f2 /proc/mounts | busybox sort | busybox tr '\\n' ' '; echo; "
              "ls -A /dev | busybox tr '\\n' ' '; echo; "
              "ls -l /dev/null /dev/zero /dev/full /dev/random /dev/urandom /dev/tty | busybox cut -c1-10 | "
              "busybox uniq | busybox tr '\\n' ' '; echo; "
              "busybox head -c 5 /dev/zero | busybox wc -c; "
              "echo x >/dev/null && busybox readlink /dev/fd && busybox readlink /dev/ptmx")
    proc = run("--name", cid, busybox, "sh", "-c", script)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.decode().split("\n")
    assert set(lines[0].split()) == {"bin", "etc", "home", "tmp", "proc", "sys", "dev"}
    assert lines[1] == cid and lines[2] == "2"
    assert sorted(lines[3:6]) == ["/dev/null", "/proc/self", "/tmp"]
    assert "vmiso" not in proc.stdout.decode() and "/run" not in lines[6]
    # A /dev of its own, as docker's: none of the VM's disks (the image's root, the seed), serial
    # or virtio ports; the character devices every program expects, usable by any user.
    assert set(lines[7].split()) == {"fd", "full", "null", "ptmx", "pts", "random", "shm", "stderr", "stdin",
                                     "stdout", "tty", "urandom", "zero"}
    assert lines[8].split() == ["crw-rw-rw-"]
    assert lines[9:12] == ["5", "/proc/self/fd", "pts/ptmx"]


def test_kill_timeout_and_usage_as_for_micro(busybox, iso, cid):
    iso.launch(cid, TaskSpec(["sh", "-c", "trap 'exit 9' TERM; echo up; while :; do sleep 1; done"], image=busybox))
    seen = b""
    for _stream, data in iso.output(cid):
        seen += data  # chunks may split "up"
        if b"up\n" in seen:
            break
    assert iso.usage(cid).mem_limit_bytes > 0
    assert (iso.kill(cid, grace=20).state, iso.wait(cid).exit_code) == ("KILLED", 9)
    iso.destroy(cid)
    proc = run("--name", cid, "--timeout", "1", busybox, "sleep", "30")
    assert proc.returncode == 124


def test_the_images_stop_signal_unless_the_run_names_one(workdir, busybox, iso, cid):
    """An image's StopSignal is what a stop sends (here the timeout's), as docker's; the run's
    --stop-signal wins over it. The image without one still gets SIGTERM."""
    layout = oci.busybox_image(IMAGE_CACHE, stop_signal="SIGQUIT")
    importer.import_path(workdir, f"{layout}:1", names=[BUSYBOX_QUIT])
    script = ('trap "echo got-quit; exit 7" QUIT; trap "echo got-term; exit 8" TERM; echo ready; '
              'while :; do sleep 0.1; done')
    for image, flags, said in ((BUSYBOX_QUIT, [], b"got-quit"), (BUSYBOX_QUIT, ["--stop-signal", "TERM"], b"got-term"),
                               (busybox, [], b"got-term")):
        proc = run("--name", cid, "--timeout", "5", *flags, image, "sh", "-c", script)  # ready well before
        assert (proc.returncode, proc.stdout) == (124, b"ready\n" + said + b"\n"), (image, flags, proc.stderr)


# Run with the image's busybox (its own applets only): one line per entry, tab-separated.
LIST_IN_GUEST = r"""
cd / || exit 1
busybox find . -xdev \( -path ./proc -o -path ./sys -o -path ./dev -o -path ./tmp \) -prune \
  -o -print | while IFS= read -r p; do
  [ "$p" = . ] && continue
  t=$(busybox stat -c '%F' "$p"); m=$(busybox stat -c '%a %u %g' "$p")
  case $t in
    directory) x=- ;;
    "symbolic link") x=$(busybox readlink "$p") ;;
    "regular file"|"regular empty file") x=$(busybox sha256sum "$p" | busybox cut -d' ' -f1) ;;
    *) x=- ;;
  esac
  printf '%s\t%s\t%s\t%s\n' "${p#.}" "$t" "$m" "$x"
done
"""


def test_the_tree_inside_the_vm_is_what_umoci_unpacks(workdir, cid, tmp_path):
    """A multi-layer image with deletions, an opaque directory, hard links across layers, a
    setuid file, a device node and a symlink chain: inside the VM, every path, type, mode,
    owner, link target and content is what ``umoci unpack`` makes of it on the host."""
    layout = oci.umoci_image(tmp_path / "umoci")
    name = "vmiso-test/umoci:t"
    importer.import_path(workdir, f"{layout}:t", names=[name])
    bundle = tmp_path / "bundle"
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:t", str(bundle)], check=True, capture_output=True)
    kinds = {stat.S_IFDIR: "directory", stat.S_IFREG: "regular file", stat.S_IFLNK: "symbolic link",
             stat.S_IFCHR: "character special file", stat.S_IFBLK: "block special file", stat.S_IFIFO: "fifo"}
    expected = {}
    for path, (kind, mode, uid, gid, detail, _xattrs, _group) in oci.snapshot(bundle / "rootfs").items():
        if path != "/":
            expected[path] = (kinds[kind], mode, uid, gid, detail if kind in (stat.S_IFREG, stat.S_IFLNK) else None)
    try:
        proc = run("--name", cid, "--entrypoint", "/bin/busybox", name, "sh", "-c", LIST_IN_GUEST, timeout=300)
    finally:
        store.rm(workdir, name)
    assert proc.returncode == 0, proc.stderr
    seen = {}
    for line in proc.stdout.decode().splitlines():
        path, kind, ids, detail = line.split("\t")
        mode, uid, gid = ids.split()
        kind = "regular file" if kind == "regular empty file" else kind
        seen[path] = (kind, int(mode, 8), int(uid), int(gid), None if detail == "-" else detail)
    for replaced in ("/dev", "/tmp", "/etc/hostname", "/etc/hosts", "/proc", "/sys"):  # the runtime's own
        expected = {p: v for p, v in expected.items() if p != replaced and not p.startswith(replaced + "/")}
        seen = {p: v for p, v in seen.items() if p != replaced and not p.startswith(replaced + "/")}
    differ = {p: (seen.get(p), v) for p, v in expected.items() if seen.get(p) != v}
    assert not differ and set(seen) == set(expected), (differ, sorted(set(seen) - set(expected)))


def test_a_networked_task_gets_its_name_servers_and_address(busybox, iso, cid, lan):
    """The bridge's plan names a name server: micro's /etc/resolv.conf and a container image's get
    it (the image's through vmiso-exec, inside its root); the image's /etc/hosts has the address."""
    from vmiso import NetworkSpec
    from vmiso.net import ipam

    bridge, prefix, _ns = lan
    ipam.Store(iso.workdir.root).set_plan(bridge, dns=[prefix + "1"])
    seen = {}
    for name, image in (("micro", "micro"), ("image", busybox)):
        iso.launch(cid + name[0], TaskSpec(["sh", "-c", "cat /etc/resolv.conf /etc/hosts"], image=image,
                                           network=NetworkSpec(bridge)))
        seen[name] = b"".join(d for s, d in iso.output(cid + name[0]) if s == "stdout").decode()
        address = iso.status(cid + name[0]).ip.split("/")[0]
        assert iso.wait(cid + name[0]).exit_code == 0
        iso.destroy(cid + name[0])
        assert f"nameserver {prefix}1\n" in seen[name], seen
    assert f"{address}\t{cid}i\n" in seen["image"], seen


def test_run_pulls_a_missing_image_first_as_docker_does(workdir, cid, tmp_path):
    """--pull missing (the default): an image reference not stored yet is pulled from its registry
    before the launch, saying so on stderr; --pull never refuses it; --pull always pulls again."""
    layout = oci.busybox_image(IMAGE_CACHE)
    (tmp_path / "registry").mkdir()
    with oci.Registry(tmp_path / "registry") as registry:
        ref = registry.push(layout, "1", f"autopull/busybox:{cid}")
        try:
            never = run("--name", cid, "--pull", "never", ref, "echo", "hi")
            assert never.returncode == 125 and b"no such image" in never.stderr, never.stderr
            assert store.lookup(workdir, ref) is None
            first = run("--name", cid, ref, "echo", "hi")
            assert (first.returncode, first.stdout) == (0, b"hi\n"), first.stderr
            lines = first.stderr.decode().splitlines()
            image = store.lookup(workdir, ref).sha256[:12]
            assert lines[0] == f"vmiso: {ref}: not stored here: pulling it"
            assert re.fullmatch(rf"vmiso: {re.escape(ref)}: pulled, image {image}, [0-3] of 3 layer\(s\) fetched",
                                lines[1]), lines
            assert ref in store.lookup(workdir, ref).names
            stored = run("--name", cid, ref, "echo", "again")  # stored now: no pull, no word
            assert (stored.returncode, stored.stdout, stored.stderr) == (0, b"again\n", b"")
            again = run("--name", cid, "--pull", "always", ref, "true")
            assert again.returncode == 0 and "pulling it again" in again.stderr.decode(), again.stderr
            assert f"pulled, image {image}, 0 of 3 layer(s) fetched" in again.stderr.decode()  # all held
        finally:
            vmiso_cli("image", "rm", ref)
