"""`vmiso agent` on the real libvirtd and QEMU, with real unprivileged users (created here and
removed after) running the real client install (/opt/vmiso, scripts/client.sh) through it."""
import json
import os
import pwd
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from vmiso.agent.client import connect_unix
from vmiso.testing.agentd import (
    agent_workdir,
    destroy_everything,
    local_users,
    running_agent,
    start_agent,
    wait_until_serving,
)

pytestmark = pytest.mark.system

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLIENT = "/opt/vmiso/bin/vmiso"
# Its own agent id: libvirt's domains are global, and a recover() of another work dir with the same
# id (the CLI's default "vmiso", run by anyone meanwhile) would destroy this agent's VMs as orphans.
AGENT_ID = "vmiso-agenttest-" + secrets.token_hex(3)
POLICY = 'group = "vmiso"\nimages = ["micro"]\n[limits]\ncontainers = 3\ncpus = 3\nmem_mib = 1024\n'


class Env:
    def __init__(self, workdir, sockdir):
        self.workdir = workdir
        self.socket = os.path.join(sockdir, "agent.sock")
        self.log = os.path.join(sockdir, "agent.log")
        self.proc = None

    def argv(self, *args):
        return [CLIENT, "--workdir", self.workdir, "--agent-socket", self.socket, *args]

    def as_user(self, user, *args, input=None, timeout=120):
        """The client install, run by ``user`` in a login-less shell of their own (su)."""
        return subprocess.run(["su", "-s", "/bin/sh", user, "-c", shlex.join(self.argv(*args))], input=input,
                              capture_output=True, timeout=timeout)

    def popen_as(self, user, *args, stdin=None):
        entry = pwd.getpwnam(user)
        return subprocess.Popen(self.argv(*args), user=entry.pw_uid, group=entry.pw_gid, stdin=stdin,
                                extra_groups=os.getgrouplist(user, entry.pw_gid), cwd="/", stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env={"PATH": "/usr/bin:/bin", "HOME": entry.pw_dir})

    def as_root(self, *args, timeout=120):
        """The full install as root, finding the agent by the work dir's lock (no --agent-socket)."""
        return subprocess.run([sys.executable, "-m", "vmiso", "--workdir", self.workdir, *args],
                              capture_output=True, timeout=timeout)


@pytest.fixture(scope="module")
def users():
    """{a, b: members of group vmiso; c: not} (real accounts, removed after)."""
    tag = secrets.token_hex(3)
    names = {"a": f"vmta{tag}", "b": f"vmtb{tag}", "c": f"vmtc{tag}"}
    with local_users(os.path.join(REPO, "scripts", "client.sh"), (names["a"], names["b"]), (names["c"],)):
        yield names


@pytest.fixture(scope="module")
def env(workdir, users):
    with agent_workdir(built=workdir) as wd:
        sockdir = tempfile.mkdtemp(prefix="vmiso-agenttest-")
        os.chmod(sockdir, 0o755)
        e = Env(wd, sockdir)
        try:
            with running_agent(wd, e.socket, POLICY, log_path=e.log, agent_id=AGENT_ID) as proc:
                e.proc = proc
                yield e
                if e.proc is not proc:  # restarted by a test: stop that one
                    e.proc.send_signal(signal.SIGTERM)
                    e.proc.wait(20)
        finally:
            destroy_everything(wd, AGENT_ID)
            subprocess.run(["rm", "-rf", sockdir])


def text(proc):
    return proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")


def wait_running(env, user, cid, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc = env.as_user(user, "ps", "--json")
        states = {s["container_id"]: s["state"] for s in json.loads(proc.stdout or b"[]")}
        if states.get(cid) == "RUNNING":
            return
        time.sleep(0.3)
    raise AssertionError(f"{cid} did not run within {timeout} s")


def test_root_commands_go_through_the_agent(env):
    """Root's full install finds the agent by the work dir's lock: same output and exit codes; the
    container is the agent's (its agent id), not one this process launched in-process."""
    proc = env.as_root("--agent-id", "not-the-agent", "run", "--name", "r1", "--",
                       "sh", "-c", "echo out; echo err >&2; exit 7")
    assert proc.returncode == 7, text(proc)
    assert (proc.stdout, proc.stderr) == (b"out\n", b"err\n")
    assert env.as_root("run", "-d", "--name", "r2", "--", "sh", "-c", "echo hello; sleep 30").returncode == 0
    [status] = json.loads(env.as_root("ps", "--json").stdout)
    assert (status["container_id"], status["owner"], status["uid"]) == ("r2", AGENT_ID, None)
    deadline = time.monotonic() + 60
    while b"hello" not in env.as_root("logs", "--task", "r2").stdout:  # the guest is booting meanwhile
        assert time.monotonic() < deadline, "r2 printed nothing within 60 s"
        time.sleep(0.3)
    assert env.as_root("logs", "r2").returncode == 0
    assert env.as_root("stats", "--json").returncode == 0
    kill = env.as_root("kill", "--grace", "0", "r2")
    assert kill.stdout == b"r2 KILLED destroyed\n", text(kill)
    assert env.as_root("wait", "r2").returncode == 137
    assert env.as_root("rm", "r2").stdout == b"r2\n"
    assert json.loads(env.as_root("ps", "--json").stdout) == []


def test_users_see_and_touch_only_their_own_containers(env, users):
    a, b = users["a"], users["b"]
    start = env.as_user(b, "run", "-d", "--name", "b1", "--", "sh", "-c", "sleep 12; echo done-b; exit 3")
    assert start.returncode == 0, text(start)
    root_task = env.as_root("run", "-d", "--name", "r3", "--", "sleep", "30")
    assert root_task.returncode == 0, text(root_task)
    wait_running(env, b, "b1")

    assert json.loads(env.as_user(a, "ps", "--json").stdout) == []
    assert b"b1" not in env.as_user(a, "ps").stdout
    for args in (["kill", "b1"], ["rm", "b1"], ["logs", "b1"], ["logs", "--task", "b1"], ["wait", "b1"],
                 ["stats", "b1"], ["kill", "r3"], ["wait", "r3"], ["logs", "r3"]):
        proc = env.as_user(a, *args)
        assert proc.returncode == 125, (args, text(proc))
        assert proc.stderr.decode().strip().splitlines()[-1] == f"vmiso: error: no such container: {args[-1]}"
    # The same answer as for an id nobody uses: nothing tells A that b1 exists.
    assert env.as_user(a, "kill", "nobody-has-this").stderr.strip().endswith(b"no such container: nobody-has-this")

    # B's task was untouched: it ends as it chose, and root sees whose it was.
    statuses = {s["container_id"]: s for s in json.loads(env.as_root("ps", "--json").stdout)}
    assert statuses["b1"]["uid"] == pwd.getpwnam(b).pw_uid and statuses["b1"]["state"] == "RUNNING"
    assert [s["container_id"] for s in json.loads(env.as_user(b, "ps", "--json").stdout)] == ["b1"]
    done = env.as_user(b, "wait", "b1")
    assert done.returncode == 3, text(done)
    assert env.as_user(b, "logs", "--task", "b1").stdout == b"done-b\n"
    assert env.as_user(b, "rm", "b1").returncode == 0
    assert env.as_root("rm", "r3").returncode == 0


def test_a_users_qemu_runs_as_that_user_and_cannot_be_inspected_by_them(env, users):
    a = users["a"]
    start = env.as_user(a, "run", "-d", "--name", "a-qemu", "--", "sleep", "30")
    assert start.returncode == 0, text(start)
    try:
        [status] = [s for s in json.loads(env.as_root("ps", "--json").stdout) if s["container_id"] == "a-qemu"]
        with open(f"/proc/{status['pid']}/status") as f:
            ids = {line.split(":")[0]: line.split()[1:] for line in f if line.startswith(("Uid", "Gid"))}
        entry = pwd.getpwnam(a)
        import grp

        kvm = grp.getgrnam("kvm").gr_gid
        assert ids["Uid"] == [str(entry.pw_uid)] * 4  # real, effective, saved, fs: never root, never shared
        assert ids["Gid"] == [str(kvm)] * 4
        # Same uid, but not the same gid: the kernel refuses the user ptrace and /proc/PID/mem.
        peek = subprocess.run(["su", "-s", "/bin/sh", a, "-c", f"cat /proc/{status['pid']}/environ"],
                              capture_output=True)
        assert peek.returncode != 0 and b"Permission denied" in peek.stderr
        # The VM boots a copy of micro's kernel of its own (libvirt gives a running domain's kernel
        # to its QEMU's uid), so the shared kernel is never the user's. (Root's VMs, running as
        # libvirt-qemu, may hold it meanwhile: libvirt gives it back when the last one ends.)
        import xml.etree.ElementTree as ET

        from vmiso.image import micro

        live = subprocess.run(["virsh", "dumpxml", status["domain"]], capture_output=True, text=True, check=True)
        booted = ET.fromstring(live.stdout).findtext("os/kernel")
        assert os.path.dirname(booted) == os.path.join(str(env.workdir), "containers", "a-qemu"), booted
        assert os.stat(booted).st_uid == entry.pw_uid
        shared = os.stat(micro.find_micro(env.workdir).kernel)
        assert shared.st_uid != entry.pw_uid and shared.st_mode & 0o777 == 0o444
    finally:
        env.as_user(a, "rm", "--grace", "0", "a-qemu")


def test_policy_refusals(env, users):
    a, c = users["a"], users["c"]
    proc = env.as_user(c, "run", "--", "true")
    assert proc.returncode == 125
    assert proc.stderr.strip().endswith(b"may not run VMs: not a member of group vmiso")
    from vmiso.image import micro

    base = str(micro.find_micro(env.workdir).base)
    for args, needle in ((["--image", base], "is not one you may use"),
                         (["--image", "micro:stock"], "is not one you may use"),
                         (["--cpus", "4"], "your limit is 3"),
                         (["--mem", "2048"], "your limit is 1024 MiB"),
                         (["--network", "vmbr-none"], "is not one you may use")):
        proc = env.as_user(a, "run", *args, "--", "true")
        assert proc.returncode == 125, (args, text(proc))
        assert needle in proc.stderr.decode(), (args, text(proc))
    assert json.loads(env.as_root("ps", "--json").stdout) == []  # nothing was made


def test_volumes_only_what_the_user_can_use_and_files_are_theirs(env, users):
    a = users["a"]
    home = pwd.getpwnam(a).pw_dir
    subprocess.run(["su", "-s", "/bin/sh", a, "-c", f"mkdir -p {home}/share"], check=True)
    proc = env.as_user(a, "run", "-v", f"{home}/share:/data", "--", "sh", "-c", "echo hi > /data/out; cat /data/out")
    assert proc.returncode == 0, text(proc)
    st = os.stat(f"{home}/share/out")
    assert st.st_uid == pwd.getpwnam(a).pw_uid
    secret = tempfile.mkdtemp(prefix="vmiso-rootonly-")  # 0700 root: a user cannot read it, root's agent could
    try:
        proc = env.as_user(a, "run", "-v", f"{secret}:/data", "--", "ls", "/data")
        assert proc.returncode == 125
        assert f"HOST {secret}: {a} cannot write it".encode() in proc.stderr
        proc = env.as_user(a, "run", "-v", f"{secret}:/data:ro", "--", "ls", "/data")
        assert proc.returncode == 125 and b"cannot read it" in proc.stderr
    finally:
        os.rmdir(secret)


def test_stdin_through_the_agent(env, users):
    data = os.urandom(300_000)
    proc = env.as_user(users["a"], "run", "-i", "--", "sh", "-c", "wc -c; exit 2", input=data)
    assert proc.returncode == 2, text(proc)
    assert proc.stdout.strip() == str(len(data)).encode()


def test_stdin_may_pause_longer_than_the_request_timeout(env, users):
    """A person typing into `vmiso run -i`: the first byte may come long after the launch."""
    from vmiso.agent.server import REQUEST_TIMEOUT_S

    client = env.popen_as(users["a"], "run", "-i", "--", "sh", "-c", "cat; echo end", stdin=subprocess.PIPE)
    time.sleep(REQUEST_TIMEOUT_S + 2)
    out, err = client.communicate(input=b"late\n", timeout=60)
    assert client.returncode == 0, err
    assert out == b"late\nend\n"


def test_a_task_that_ends_before_its_stdin_does(env, users):
    """The caller's stdin stays open (a terminal nobody types into): the run ends with the task."""
    client = env.popen_as(users["a"], "run", "-i", "--", "sh", "-c", "exit 6", stdin=subprocess.PIPE)
    try:
        client.wait(timeout=60)
    finally:
        client.stdin.close()
    assert client.returncode == 6, client.stderr.read()


def test_in_process_run_ends_before_its_stdin_too(workdir, cid):
    client = subprocess.Popen([sys.executable, "-m", "vmiso", "--workdir", workdir, "run", "-i", "--name", cid, "--",
                               "sh", "-c", "exit 6"], stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        client.wait(timeout=60)
    finally:
        client.stdin.close()
    assert client.returncode == 6, client.stderr.read()


def test_a_client_that_leaves_does_not_end_its_task_but_sigterm_does(env, users):
    a = users["a"]
    client = env.popen_as(a, "run", "--name", "a-left", "--", "sh", "-c", "sleep 6; echo finished; exit 5")
    wait_running(env, a, "a-left")
    client.kill()  # SIGKILL: the client has no say any more
    client.wait()
    done = env.as_user(a, "wait", "a-left")
    assert done.returncode == 5, text(done)
    assert env.as_user(a, "logs", "--task", "a-left").stdout == b"finished\n"
    assert env.as_user(a, "rm", "a-left").returncode == 0

    client = env.popen_as(a, "run", "--name", "a-term", "--", "sh", "-c", "trap 'exit 9' TERM; sleep 60 & wait")
    wait_running(env, a, "a-term")
    client.send_signal(signal.SIGTERM)  # as scancel does: the task gets SIGTERM, the VM goes away
    out, err = client.communicate(timeout=60)
    assert client.returncode == 128 + signal.SIGTERM, err
    assert json.loads(env.as_user(a, "ps", "--json").stdout) == []


def test_the_agent_survives_sigkill_and_owners_still_wait(env, users):
    a = users["a"]
    start = env.as_user(a, "run", "-d", "--name", "a-kept", "--", "sh", "-c", "sleep 8; echo kept; exit 4")
    assert start.returncode == 0, text(start)
    wait_running(env, a, "a-kept")
    env.proc.kill()
    env.proc.wait()
    down = env.as_user(a, "ps")
    assert down.returncode == 125 and b"no vmiso agent answers" in down.stderr
    with open(env.log, "ab") as log:
        env.proc = start_agent(env.workdir, env.socket, os.path.join(os.path.dirname(env.socket), "policy.toml"),
                               log, AGENT_ID)
    wait_until_serving(env.proc, env.socket)
    [status] = json.loads(env.as_user(a, "ps", "--json").stdout)
    assert (status["container_id"], status["state"]) == ("a-kept", "RUNNING")
    done = env.as_user(a, "wait", "a-kept")
    assert done.returncode == 4, text(done)
    assert env.as_user(a, "logs", "--task", "a-kept").stdout == b"kept\n"
    assert env.as_user(a, "rm", "a-kept").returncode == 0


@pytest.mark.oci
def test_roots_run_pulls_a_missing_image_the_agent_runs_a_users_run_never_pulls(env, users, tmp_path):
    from vmiso.paths import Workdir
    from vmiso.testing import oci

    layout = oci.busybox_image(Workdir(env.workdir).test_images)
    (tmp_path / "registry").mkdir()
    with oci.Registry(tmp_path / "registry") as registry:
        user_ref = registry.push(layout, "1", "agentpull/user:1")
        ref = registry.push(layout, "1", "agentpull/root:1")
        user = env.as_user(users["a"], "run", user_ref, "echo", "hi")  # the agent's policy answers
        assert user.returncode == 125 and b"pulling" not in user.stderr, text(user)
        refused = env.as_user(users["a"], "run", "--pull", "always", user_ref, "true")
        assert refused.returncode == 125 and b"pulling images is root's" in refused.stderr, text(refused)
        assert user_ref not in env.as_root("image", "list").stdout.decode()  # nothing came in for users
        root = env.as_root("run", "--name", "pulled", ref, "echo", "hi")  # pulled here, run by the agent
        assert (root.returncode, root.stdout) == (0, b"hi\n"), text(root)
        assert root.stderr.startswith(f"vmiso: {ref}: not stored here: pulling it\n".encode()), text(root)
        assert env.as_root("image", "rm", ref).returncode == 0


FLOOD = r"""
import socket, sys
conns = []
for _ in range(200):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(sys.argv[1])
    except OSError:
        break
    conns.append(s)
print(len(conns), flush=True)
sys.stdin.read()
"""


def raw_request(path, data, read=True):
    s = connect_unix(path, 30)  # waits while the flood fills the agent's queue, as the client does
    s.settimeout(30)
    try:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # the agent may close a connection whose body it refused before reading it
    answer = b""
    try:
        while read and (chunk := s.recv(65536)):
            answer += chunk
    except ConnectionResetError:
        pass
    s.close()
    return answer


def test_fuzzed_socket_keeps_serving_everyone_else(env, users):
    a, b = users["a"], users["b"]
    entry = pwd.getpwnam(a)
    flood = subprocess.Popen(["/usr/bin/python3", "-c", FLOOD, env.socket], user=entry.pw_uid, group=entry.pw_gid,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd="/")
    root_idle = []
    try:
        assert int(flood.stdout.readline()) == 200  # connect() succeeds; the agent closes what is over A's cap
        for _ in range(200):  # and 200 idle ones of root's
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(env.socket)
            root_idle.append(s)
        malformed = [b"\x00" * 5000 + b"\r\n\r\n", b"GET /v1/containers HTTP/1.1\r\nX: " + b"y" * 100_000 + b"\r\n\r\n",
                     b"POST /v1/containers/z HTTP/1.1\r\nContent-Length: 999999999\r\n\r\n" + b"{" * 65536,
                     b"POST /v1/containers/z HTTP/1.1\r\nContent-Length: 20\r\n\r\n{\"spec\":",
                     b"GET /v1/containers/../../etc/passwd HTTP/1.1\r\n\r\n",
                     b"DELETE /v1/containers/%2e%2e HTTP/1.1\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n"]
        for data in malformed:
            answer = raw_request(env.socket, data)
            assert re.match(rb"HTTP/1\.1 (4\d\d|505) ", answer), (data[:60], answer[:200])  # refused, answered
        # Everyone else is served meanwhile: another user, and root.
        proc = env.as_user(b, "run", "--", "echo", "served")
        assert (proc.returncode, proc.stdout) == (0, b"served\n"), text(proc)
        assert env.as_root("ps").returncode == 0
        assert env.as_user(a, "ps").returncode in (0, 125)  # A's own cap may refuse A: never the others
    finally:
        flood.stdin.close()
        flood.wait(30)
        for s in root_idle:
            s.close()
    assert env.proc.poll() is None
    proc = env.as_user(a, "ps", "--json")
    assert proc.returncode == 0, text(proc)  # A is served again once its idle connections are gone
