"""The wrapper's stop listener (vmiso/image/guest/task.sh, listen_for_stop) run by busybox's sh
(micro's shell) and dash (a Debian cloud image's /bin/sh) on the host, fed the lines the host
writes (virt/channel.stop_request) and hostile ones: only this launch's two request lines, a
signal number 1..64, reach kill(1), and nothing on the channel is ever run. kill is replaced by
a function that records its arguments. The same on real VMs: tests/system/test_isolator.py.
Then the listener's end: report_exit writes the exit line whole even when the channel is slow.
"""
import os
import select
import shutil
import subprocess
import time
from importlib import resources

import pytest

from vmiso.virt import channel

NONCE = "0123456789abcdef" * 2
SHELLS = [pytest.param(shell, marks=pytest.mark.skipif(shutil.which(shell[0]) is None, reason=f"no {shell[0]}"))
          for shell in (["busybox", "sh"], ["dash"])]


def function(name):
    """Shell function ``name``, cut from task.sh."""
    text = resources.files("vmiso.image").joinpath("guest", "task.sh").read_text()
    start = text.index(f"{name}() {{")
    return text[start:text.index("\n}\n", start) + 3]


def listener():
    return function("listen_for_stop")


def kills(tmp_path, shell, lines, pid="4242"):
    """The kill commands the listener runs for ``lines`` (bytes) on the channel's input."""
    (tmp_path / "in").write_bytes(b"".join(lines))
    (tmp_path / "pid").write_text(pid + "\n" if pid else "")
    (tmp_path / "listener.sh").write_text(listener())
    script = (f'nonce={NONCE} out={tmp_path}/in pidfile={tmp_path}/pid; cd {tmp_path}; '
              'kill() { echo "kill $*"; }; reboot() { echo REBOOTED; }; . ./listener.sh; listen_for_stop')
    out = subprocess.run([*shell, "-c", script], capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    return out.stdout.splitlines()


@pytest.mark.parametrize("shell", SHELLS)
def test_the_hosts_lines_become_exactly_these_kills(tmp_path, shell):
    lines = [channel.stop_request(NONCE, n) for n in (15, 3, 9, 1, 10, 34, 59, 60, 64)]
    assert kills(tmp_path, shell, lines) == ["kill -TERM 4242", "kill -3 4242", "kill -9 4242", "kill -1 4242",
                                             "kill -10 4242", "kill -34 4242", "kill -59 4242", "kill -60 4242",
                                             "kill -64 4242"]


@pytest.mark.parametrize("shell", SHELLS)
def test_anything_else_on_the_channel_is_ignored(tmp_path, shell):
    prefix = f"VMISO-{NONCE} ".encode()
    hostile = [prefix + b"SIG " + s + b"\n" for s in (b"0", b"65", b"99", b"100", b"03", b"-9", b"+3", b"", b"3 ",
                                                      b" 3", b"3;reboot", b"$(reboot)", b"`reboot`", b"9 1",
                                                      b"QUIT", b"*", b"6[0-4]")]
    hostile += [prefix + b"TERM \n", prefix + b"KILL\n", b"VMISO-" + b"f" * 32 + b" SIG 9\n",
                b"x" + prefix + b"SIG 9\n", prefix[:-1] + b"\n", b"\n", b"reboot\n"]
    assert kills(tmp_path, shell, hostile) == []
    # ...and the listener goes on reading: a good line after them still counts.
    assert kills(tmp_path, shell, hostile + [channel.stop_request(NONCE, 2)]) == ["kill -2 4242"]


@pytest.mark.parametrize("shell", SHELLS)
def test_no_task_pid_no_kill(tmp_path, shell):
    """Before the task wrote its pid, and after it ended (the wrapper empties the file)."""
    assert kills(tmp_path, shell, [channel.stop_request(NONCE, 3)], pid="") == []


@pytest.mark.parametrize("shell", SHELLS)
def test_the_exit_line_survives_the_listeners_end_on_a_slow_channel(tmp_path, shell):
    """The channel is a FIFO filled to the brim, so writing the exit line blocks, as on a UART
    still sending the task's last output; the listener (here a sleep) is stopped meanwhile.
    busybox's sh takes SIGCHLD without SA_RESTART: a child that ends during the write interrupts
    it, and the line was lost (1 run in 5 to 20 of a 2-vCPU task, on real VMs)."""
    fifo = str(tmp_path / "ttyS1")
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    try:
        full = 0
        try:
            while True:
                full += os.write(writer, b"x" * 4096)
        except BlockingIOError:
            pass
        (tmp_path / "report.sh").write_text(function("report_exit"))
        script = f'nonce={NONCE} out={fifo}; . ./report.sh; sleep 30 & listener=$!; report_exit 7'
        wrapper = subprocess.Popen([*shell, "-c", script], cwd=tmp_path, stderr=subprocess.PIPE)
        time.sleep(0.5)  # the wrapper is blocked in the write; the listener died meanwhile
        os.close(writer)
        writer = None
        data = b""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if select.select([reader], [], [], 0.2)[0]:
                chunk = os.read(reader, 65536)
                if chunk:
                    data += chunk
                elif wrapper.poll() is not None:  # it has ended: everything it wrote is here
                    break
                else:  # no writer yet (a slow start): the wrapper is still to open the FIFO
                    time.sleep(0.01)
        assert wrapper.wait(timeout=10) == 0 and wrapper.stderr.read() == b""
    finally:
        os.close(reader)
        if writer is not None:
            os.close(writer)
    assert len(data) == full + len(f"VMISO-{NONCE} EXIT 7\n")
    (tmp_path / "stdout").write_bytes(data)
    assert channel.read_exit_code(tmp_path / "stdout", NONCE) == 7
