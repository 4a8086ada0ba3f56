"""The task channel's exit line: found only with the right nonce at the very end; never leaks
into the output; output bytes are never lost or reordered, however the chunks fall."""
import os
import random
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmiso.virt import channel

NONCE = "0123456789abcdef"


@pytest.mark.parametrize("tail,expected", [
    (channel.exit_line(NONCE, 7), 7),
    (b"out" + channel.exit_line(NONCE, 0), 0),
    (channel.exit_line(NONCE, 255), 255),
    (channel.exit_line(NONCE, 256), None),
    (channel.exit_line("ffff", 3), None),                     # someone else's nonce
    (channel.exit_line(NONCE, 3) + b"more", None),            # not the last bytes
    (channel.exit_line(NONCE, 3)[:-1], None),                 # truncated
    (b"VMISO-" + NONCE.encode() + b" EXIT 3\n", 3),           # right after output without a newline
    (b"XVMISO-" + NONCE.encode() + b" EXIT 3", None),         # no final newline
    (b"", None),
])
def test_read_exit_code(tmp_path, tail, expected):
    path = tmp_path / "stdout"
    path.write_bytes(b"x" * 1000 + tail)
    assert channel.read_exit_code(path, NONCE) == expected


def test_read_exit_code_missing_file(tmp_path):
    assert channel.read_exit_code(tmp_path / "nope", NONCE) is None


def run_filter(chunks):
    f = channel.ExitLineFilter(NONCE)
    out = b"".join(f.feed(c) for c in chunks) + f.close()
    return out, f.exit_code


def split_randomly(data, rng):
    cuts = sorted(rng.sample(range(len(data) + 1), min(len(data), rng.randint(0, 12))))
    return [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]


@settings(max_examples=300, deadline=None)
@given(payload=st.binary(max_size=200), code=st.integers(0, 255), seed=st.integers())
def test_filter_strips_exactly_the_exit_line(payload, code, seed):
    data = payload + channel.exit_line(NONCE, code)
    out, exit_code = run_filter(split_randomly(data, random.Random(seed)))
    assert out == payload
    assert exit_code == code


@settings(max_examples=300, deadline=None)
@given(payload=st.binary(max_size=200), seed=st.integers())
def test_filter_passes_output_without_exit_line_unchanged(payload, seed):
    prefixish = channel.marker_prefix(NONCE)[: seed % 20]
    data = payload + prefixish
    out, exit_code = run_filter(split_randomly(data, random.Random(seed)))
    assert out == data
    assert exit_code is None


def test_filter_holds_back_only_a_possible_prefix():
    f = channel.ExitLineFilter(NONCE)
    assert f.feed(b"hello\n") == b"hello\n"  # a finished line is never held back
    assert f.feed(b"wor VM") == b"wor "        # "VM" may start the exit line
    assert f.feed(b"S") == b"VMS"             # it did not
    assert f.feed(b"VMISO-") == b""
    assert f.feed(NONCE.encode() + b" EXIT 4\n") == b""
    assert f.close() == b"" and f.exit_code == 4


def test_forged_prefix_does_not_hold_back_what_follows():
    """The guest knows the nonce: output after a forged marker prefix streams at once."""
    f = channel.ExitLineFilter(NONCE)
    prefix = channel.marker_prefix(NONCE)
    assert f.feed(b"a" + prefix) == b"a"               # could still become the exit line
    assert f.feed(b"x" * 100) == prefix + b"x" * 100     # it cannot any more: released whole
    assert f.feed(prefix + b"12") == b""
    assert f.feed(b"34") == prefix + b"1234"            # four digits are no exit code
    assert f.feed(channel.exit_line(NONCE, 3) + b"more") == channel.exit_line(NONCE, 3) + b"more"
    assert f.close() == b"" and f.exit_code is None


@settings(max_examples=300, deadline=None)
@given(chunks=st.lists(st.sampled_from([b"x", b"\n", b"7", b"VMISO-", NONCE.encode(), b" EXIT ",
                                         channel.marker_prefix(NONCE)]), max_size=60))
def test_filter_never_holds_more_than_one_marker(chunks):
    """Whatever the guest writes, the bytes held back never exceed an exit line's length, and
    nothing is lost or reordered."""
    f = channel.ExitLineFilter(NONCE)
    out = b""
    for chunk in chunks:
        out += f.feed(chunk)
        assert len(f.held) <= len(channel.exit_line(NONCE, 255))
    out += f.close()
    data = b"".join(chunks)
    if f.exit_code is None:
        assert out == data
    else:
        assert out + channel.exit_line(NONCE, f.exit_code) == data


def test_follow_streams_growing_files_until_finished(tmp_path):
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    done = threading.Event()

    def writer():
        for i in range(5):
            with open(out, "ab") as f:
                f.write(b"o%d" % i)
            with open(err, "ab") as f:
                f.write(b"e%d" % i)
            time.sleep(0.02)
        done.set()

    threading.Thread(target=writer).start()
    got = {0: b"", 1: b""}
    for index, data in channel.follow([str(out), str(err)], finished=done.is_set, idle_check=0.05):
        got[index] += data
    assert got == {0: b"o0o1o2o3o4", 1: b"e0e1e2e3e4"}


def test_exit_line_split_by_a_roll_over_is_found(tmp_path):
    """virtlogd renamed stdout to stdout.0 in the middle of the exit line."""
    line = channel.exit_line(NONCE, 9)
    (tmp_path / "stdout.0").write_bytes(b"a" * 5000 + line[:10])
    (tmp_path / "stdout").write_bytes(line[10:])
    assert channel.read_exit_code(str(tmp_path / "stdout"), NONCE) == 9


def test_follow_reads_across_roll_overs(tmp_path):
    """Bytes written before and after virtlogd's rename both arrive, in order, once (as long as
    the reader keeps up: a file rolled over twice between two reads is lost by design)."""
    path = tmp_path / "stdout"
    done = threading.Event()
    read = threading.Condition()
    got = bytearray()
    expected = b"".join(b"%05d\n" % i for i in range(300))

    def writer():
        for i in range(300):
            with open(path, "ab") as f:
                f.write(b"%05d\n" % i)
            if i in (100, 200):
                with read:  # let the reader catch up, then roll over as virtlogd does
                    written = (i + 1) * 6
                    assert read.wait_for(lambda: len(got) == written, timeout=10)  # noqa: B023
                os.rename(path, str(path) + ".0")
        done.set()

    threading.Thread(target=writer).start()
    for _, data in channel.follow([str(path)], finished=done.is_set, idle_check=0.02):
        with read:
            got.extend(data)
            read.notify_all()
    assert bytes(got) == expected


def test_wait_for_exit_code_sees_a_late_write(tmp_path):
    path = tmp_path / "stdout"
    path.write_bytes(b"output")

    def late():
        time.sleep(0.2)
        with open(path, "ab") as f:
            f.write(channel.exit_line(NONCE, 4))

    threading.Thread(target=late).start()
    assert channel.wait_for_exit_code(str(path), NONCE, timeout=5) == 4
    assert channel.wait_for_exit_code(str(tmp_path / "none"), NONCE, timeout=0.1) is None


# --- the stop request: written into the task channel through libvirt's unix socket --------------

def _serve_once(path, behaviour):
    """A one-connection unix socket server standing in for QEMU's chardev: 'read' reads to the end
    and hangs up (what QEMU does), 'hold' never reads; returns (thread, received bytes)."""
    import socket

    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    got = bytearray()

    def run():
        conn, _ = server.accept()
        with conn, server:
            if behaviour == "hold":
                time.sleep(1.0)
                return
            conn.sendall(b"guest output meanwhile\n")  # dropped by request_stop, logged by QEMU
            while True:
                data = conn.recv(7)  # a UART takes input a few bytes at a time
                if not data:
                    return
                got.extend(data)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, got


def test_stop_request_is_delivered_whole_before_the_hang_up(tmp_path):
    thread, got = _serve_once(tmp_path / "control.sock", "read")
    assert channel.request_stop(tmp_path / "control.sock", "ab12" * 8, timeout=2.0) is True
    thread.join(2)
    assert bytes(got) == b"VMISO-" + b"ab12" * 8 + b" TERM\n" == channel.stop_request("ab12" * 8)


def test_stop_request_lines_sigterm_as_always_any_other_signal_by_number(tmp_path):
    """SIGTERM keeps the one line a wrapper of an older vmiso knows; another signal is new."""
    nonce = "ab12" * 8
    assert channel.stop_request(nonce) == channel.stop_request(nonce, 15) == f"VMISO-{nonce} TERM\n".encode()
    assert channel.stop_request(nonce, 3) == f"VMISO-{nonce} SIG 3\n".encode()
    assert channel.stop_request(nonce, 64) == f"VMISO-{nonce} SIG 64\n".encode()
    for bad in (0, 65, -1, True, "3", None):
        with pytest.raises(ValueError):
            channel.stop_request(nonce, bad)
    thread, got = _serve_once(tmp_path / "control.sock", "read")
    assert channel.request_stop(tmp_path / "control.sock", nonce, timeout=2.0, signal=9) is True
    thread.join(2)
    assert bytes(got) == f"VMISO-{nonce} SIG 9\n".encode()


def test_stop_request_without_a_socket_or_a_reader_is_false(tmp_path):
    assert channel.request_stop(tmp_path / "absent.sock", "00" * 16) is False  # an older launch
    thread, _ = _serve_once(tmp_path / "control.sock", "hold")
    started = time.monotonic()
    assert channel.request_stop(tmp_path / "control.sock", "00" * 16, timeout=0.3) is False
    assert time.monotonic() - started < 0.9  # gives up at its timeout
    thread.join(2)


def test_a_wakeup_ends_a_follower_at_once(tmp_path):
    """follow() notices the end when it is told (a Wakeup), not at its next idle check: without
    it, a task's end reached `vmiso run` up to idle_check seconds late."""
    path = tmp_path / "stdout"
    path.write_bytes(b"all of it")
    ended, wakeup = threading.Event(), channel.Wakeup()
    got = []

    def follower():
        for _index, data in channel.follow([str(path)], finished=ended.is_set, idle_check=60, wakeup=wakeup):
            got.append(data)

    thread = threading.Thread(target=follower)
    thread.start()
    time.sleep(0.2)  # the follower has read everything and sleeps
    ended.set()
    wakeup.set()
    thread.join(10)
    assert not thread.is_alive() and got == [b"all of it"]
    wakeup.set()  # setting it again is harmless
    wakeup.close()
