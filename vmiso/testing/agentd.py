"""A real ``vmiso agent`` for tests: its own work dir (micro shared from a built one by hard
links, so nothing is rebuilt), its own socket, started as a subprocess and stopped after.

    with agent_workdir(built="/var/lib/vmiso") as workdir:
        with running_agent(workdir, socket_path, policy_text) as proc:
            ...
"""
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from ..paths import Workdir

START_TIMEOUT_S = 30


def share_micro(built, workdir):
    """Make ``workdir`` boot the micro image already built in work dir ``built``: its images
    hard-linked (same file system: no copy), the pointers copied."""
    src, dst = Workdir(built).micro_images, Workdir(workdir).micro_images
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.parent.chmod(0o755)
    shutil.copytree(src, dst, copy_function=os.link, ignore=shutil.ignore_patterns(".build-*"), dirs_exist_ok=True)


@contextlib.contextmanager
def agent_workdir(built, parent="/var/lib"):
    """A fresh work dir under ``parent`` that boots ``built``'s micro image; removed after."""
    workdir = tempfile.mkdtemp(prefix="vmiso-agenttest-", dir=parent)
    try:
        share_micro(built, workdir)
        yield workdir
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def answers(socket_path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(socket_path)
        return True
    except OSError:
        return False
    finally:
        s.close()


@contextlib.contextmanager
def running_agent(workdir, socket_path, policy_text=None, log_path=None, agent_id="vmiso", extra_args=(), env=None):
    """``vmiso agent`` serving ``workdir`` on ``socket_path`` (policy from ``policy_text``, TOML)
    as ``agent_id``; yields the Popen. Stopped with SIGTERM after (its VMs are left: the test
    removes them). Give tests an agent id of their own: domains are global to libvirt, and a
    recover() in another work dir with the same agent id destroys them as its orphans.
    ``extra_args``: more options of ``vmiso agent``; ``env``: its environment (default: ours)."""
    policy = os.path.join(os.path.dirname(socket_path), "policy.toml")
    with open(policy, "w") as f:
        f.write(policy_text or "")
    log = open(log_path or os.devnull, "ab")  # noqa: SIM115 (closed below)
    proc = start_agent(workdir, socket_path, policy, log, agent_id, extra_args, env)
    try:
        wait_until_serving(proc, socket_path)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def start_agent(workdir, socket_path, policy_path, log, agent_id="vmiso", extra_args=(), env=None):
    """The agent's process (not waited for: wait_until_serving)."""
    return subprocess.Popen([sys.executable, "-m", "vmiso", "--workdir", workdir, "--agent-id", agent_id, "agent",
                             "--socket", socket_path, "--policy", policy_path, *extra_args], stdout=log, stderr=log,
                            start_new_session=True, env=env)


def wait_until_serving(proc, socket_path):
    deadline = time.monotonic() + START_TIMEOUT_S
    while not answers(socket_path):
        if proc.poll() is not None:
            raise RuntimeError(f"vmiso agent exited with {proc.returncode} before serving {socket_path}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"vmiso agent did not serve {socket_path} within {START_TIMEOUT_S} s")
        time.sleep(0.05)


@contextlib.contextmanager
def local_users(client_script, members, others=()):
    """Real unprivileged accounts for the agent's tests: ``members`` (names) in group vmiso,
    ``others`` not, each with a home; removed afterwards. ``client_script`` (scripts/client.sh)
    is run first, so the client install they run is current."""
    subprocess.run(["bash", client_script], check=True)
    made = []
    try:
        for name in [*members, *others]:
            groups = ["-G", "vmiso"] if name in members else []
            subprocess.run(["useradd", "-m", "-s", "/bin/sh", *groups, name], check=True)
            made.append(name)
        yield
    finally:
        for name in made:
            subprocess.run(["userdel", "-r", "-f", name], capture_output=True)


def destroy_everything(workdir, agent_id):
    """Every container of ``agent_id`` in ``workdir``, destroyed in-process (after the agent stopped)."""
    from ..isolator import Isolator

    iso = Isolator(workdir=workdir, agent_id=agent_id)
    try:
        iso.recover()
        for cid in iso.containers():
            iso.destroy(cid, grace=0)
    finally:
        iso.host.close()
