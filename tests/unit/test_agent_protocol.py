"""What travels on the agent's socket (vmiso/agent/protocol.py) and how the server parses requests
(vmiso/agent/server.py): specs round-trip exactly, malformed ones are refused naming the field,
errors keep their class and message, and a malformed request never reaches the Isolator."""
import grp
import json
import os
import socket
import threading

import pytest

from vmiso import errors
from vmiso.agent import client, protocol
from vmiso.agent.client import RemoteIsolator, connect_unix
from vmiso.agent.policy import Policy
from vmiso.agent.server import Agent
from vmiso.spec import NetworkSpec, RateLimit, Resources, TaskSpec, Volume


def roundtrip(spec, stdin=None):
    return protocol.spec_from_wire(json.loads(json.dumps(protocol.spec_to_wire(spec))), stdin=stdin)


def test_a_full_spec_round_trips_exactly():
    spec = TaskSpec(command=[b"printf", "%s|", "ü", b"\xff\x00"[:1], "it's"], entrypoint=["/bin/sh", "-c"],
                    env={"A": "1", "SURR": "x\udcff"}, resources=Resources(cpus=1.5, mem_mib=320, disk_gib=2),
                    image="py:3", image_format="qcow2", timeout=12.5, workdir="/tmp", user="1000:1000",
                    network=NetworkSpec("vmbr0", vlan=7, ip="10.1.2.3/24", mac="02:00:00:00:00:01", isolated=True,
                                        inbound=RateLimit(100, 200, 50), outbound=RateLimit(10)),
                    volumes=[Volume("/srv/a", "/a", True), Volume("/srv/b", "/b")], sandbox="/srv/sb",
                    stop_signal="SIGQUIT")
    back = roundtrip(spec)
    assert [os.fsencode(a) if isinstance(a, str) else a for a in spec.command] == list(back.command)
    assert back.entrypoint == (b"/bin/sh", b"-c")
    for name in ("env", "resources", "image", "image_format", "timeout", "workdir", "user", "network", "volumes",
                 "sandbox", "stop_signal"):
        assert getattr(back, name) == getattr(spec, name), name
    assert back.stop_signal == 3


def test_a_stop_signal_travels_as_its_number_and_only_when_given():
    """A spec without one sends exactly what it always sent: an older agent refuses unknown fields."""
    assert "stop_signal" not in protocol.spec_to_wire(TaskSpec(["true"]))
    assert protocol.spec_to_wire(TaskSpec(["true"], stop_signal="SIGRTMIN+1"))["stop_signal"] == 35
    assert roundtrip(TaskSpec(["true"])).stop_signal is None
    assert protocol.spec_from_wire({"command": ["dHJ1ZQ=="], "stop_signal": "usr2"}).stop_signal == 12


def test_stdin_travels_as_a_flag_and_becomes_the_given_reader():
    reader = object.__new__(type("R", (), {"read": lambda self, n: b""}))
    assert protocol.spec_to_wire(TaskSpec(["cat"], stdin=b"data"))["stdin"] is True
    assert roundtrip(TaskSpec(["cat"], stdin=b"data"), stdin=reader).stdin is reader
    assert roundtrip(TaskSpec(["cat"]), stdin=reader).stdin is None


@pytest.mark.parametrize("spec, field", [
    ("not an object", "spec"),
    ({"command": ["dHJ1ZQ=="], "shell": True}, "spec"),
    ({"command": "dHJ1ZQ=="}, "command"),
    ({"command": ["not base64!"]}, "command[0]"),
    ({"command": [7]}, "command[0]"),
    ({"command": []}, "command"),
    ({"command": ["dHJ1ZQ=="], "env": ["A=1"]}, "env"),
    ({"command": ["dHJ1ZQ=="], "env": {"1A": "x"}}, "env"),
    ({"command": ["dHJ1ZQ=="], "resources": {"cpus": "2"}}, "cpus"),
    ({"command": ["dHJ1ZQ=="], "resources": {"mem_mib": 10**12}}, "mem_mib"),
    ({"command": ["dHJ1ZQ=="], "resources": {"gpus": 1}}, "resources"),
    ({"command": ["dHJ1ZQ=="], "image": 5}, "image"),
    ({"command": ["dHJ1ZQ=="], "timeout": True}, "timeout"),
    ({"command": ["dHJ1ZQ=="], "stop_signal": True}, "stop_signal"),
    ({"command": ["dHJ1ZQ=="], "stop_signal": 0}, "stop_signal"),
    ({"command": ["dHJ1ZQ=="], "stop_signal": "SIGNOPE"}, "stop_signal"),
    ({"command": ["dHJ1ZQ=="], "stop_signal": [3]}, "stop_signal"),
    ({"command": ["dHJ1ZQ=="], "volumes": [["relative", "/a"]]}, "volumes"),
    ({"command": ["dHJ1ZQ=="], "volumes": [["/a"]]}, "volumes"),
    ({"command": ["dHJ1ZQ=="], "volumes": [["/a", "/proc"]]}, "volumes"),
    ({"command": ["dHJ1ZQ=="], "network": {"bridge": "a/b"}}, "bridge"),
    ({"command": ["dHJ1ZQ=="], "network": {"bridge": "br0", "inbound": {"average": 0}}}, "average"),
    ({"command": ["dHJ1ZQ=="], "stdin": "yes"}, "stdin"),
])
def test_malformed_specs_name_the_field(spec, field):
    with pytest.raises(errors.InvalidSpec) as info:
        protocol.spec_from_wire(spec)
    assert info.value.field == field


@pytest.mark.parametrize("err", [
    errors.NotFound("container", "job-1"),
    errors.InvalidSpec("cpus", "3 is outside 0.01..2"),
    errors.Forbidden("you run 4 containers already: your limit is 4"),
    errors.AlreadyExists("container", "x"),
    errors.Timeout("container x still running after 1 s"),
    errors.LaunchFailed("x", "create", RuntimeError("boom")),
    errors.NotOwned("x", "other", "vmiso"),
    errors.UnsafeImage("/p", "has a backing file"),
])
def test_errors_keep_their_class_and_message(err):
    status, obj = protocol.error_to_wire(err)
    back = protocol.error_from_wire(json.loads(json.dumps(obj)))
    assert type(back) is type(err) and str(back) == str(err)
    assert status == protocol.ERROR_KINDS[obj["kind"]][1]
    if isinstance(err, errors.NotFound):
        assert (status, back.what, back.name) == (404, "container", "job-1")


def test_a_malformed_error_object_is_still_one_vmiso_error():
    assert isinstance(protocol.error_from_wire("garbage"), errors.VmisoError)
    assert type(protocol.error_from_wire({"kind": "nonsense", "message": "m"})) is errors.VmisoError


class Untouchable:
    """Stands where the Isolator would: any call means a malformed request got through."""

    workdir = None
    agent_id = "t"

    def __getattr__(self, name):
        raise AssertionError(f"the Isolator was called ({name}) for a malformed request")


@pytest.fixture
def agent(tmp_path):
    # The caller is this process: root is admitted anyway, an ordinary user through its own group
    # (a request refused at admission would be answered 403 before it is parsed).
    policy = Policy.parse({"group": grp.getgrgid(os.getegid()).gr_name})
    a = Agent(Untouchable(), policy, str(tmp_path / "agent.sock"))
    a.bind()
    thread = threading.Thread(target=a.serve_forever, daemon=True)
    thread.start()
    yield a
    a.stop()
    thread.join(5)
    a.close()


def ask(agent, raw):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(agent.socket_path)
    s.sendall(raw)
    s.shutdown(socket.SHUT_WR)
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 "), data[:200]
    is_json = b"application/json" in head
    return int(head.split()[1]), json.loads(body) if is_json else body


def post(path, body, extra=""):
    return f"POST /v1{path} HTTP/1.1\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


@pytest.mark.parametrize("raw, status, kind, text", [
    (post("/containers/x", b"{not json"), 400, "invalid-spec", "not JSON"),
    (post("/containers/x", b"[1]"), 400, "invalid-spec", "JSON object"),
    (post("/containers/x", b"{}", "Transfer-Encoding: chunked\r\n"), 400, "invalid-spec", "chunked"),
    (f"POST /v1/containers/x HTTP/1.1\r\nContent-Length: {protocol.MAX_BODY + 1}\r\n\r\n".encode(), 400,
     "invalid-spec", "at most"),
    (b"POST /v1/containers/x HTTP/1.1\r\nContent-Length: -5\r\n\r\n", 400, "invalid-spec", "not a number"),
    (post("/containers/x", b'{"spec": {"command": []}}'), 400, "invalid-spec", "command"),
    (post("/containers/x/kill", b'{"grace": "soon"}'), 400, "invalid-spec", "grace"),
    (post("/containers/x/wait", b'{"timeout": -1}'), 400, "invalid-spec", "timeout"),
    (b"DELETE /v1/containers/x?grace=nan HTTP/1.1\r\n\r\n", 400, "invalid-spec", "grace"),
    (b"GET /v1/nothing HTTP/1.1\r\n\r\n", 404, "not-found", "endpoint"),
    (b"GET /v2/info HTTP/1.1\r\n\r\n", 404, "not-found", "endpoint"),
    (b"PUT /v1/containers/x HTTP/1.1\r\n\r\n", 501, None, None),
])
def test_malformed_requests_are_answered_and_reach_nothing(agent, raw, status, kind, text):
    code, body = ask(agent, raw)
    assert code == status
    if kind is not None:
        assert body["error"]["kind"] == kind and text in body["error"]["message"]


def test_garbage_and_overlong_lines_get_an_http_error(agent):
    assert ask(agent, b"\x00\x01\x02 nonsense\r\n\r\n")[0] == 400
    assert ask(agent, b"GET /v1/info HTTP/1.1\r\nX: " + b"a" * 70000 + b"\r\n\r\n")[0] == 431


def full_listener(path):
    """A listening socket that accepts nothing, with its queue already full (backlog 0 holds one)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(0)
    queued = []
    while True:  # fill the queue whatever the kernel's rounding of the backlog
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(path)
        except BlockingIOError:
            s.close()
            return listener, queued
        queued.append(s)


def test_a_client_waits_for_room_in_a_full_queue_instead_of_failing(tmp_path):
    # An agent flooded with connections has a full accept queue for a moment: a client must wait
    # for room, not fail at once with EAGAIN (what a socket with a Python timeout does).
    path = str(tmp_path / "agent.sock")
    listener, queued = full_listener(path)
    drained = []
    threading.Timer(0.3, lambda: drained.append(listener.accept())).start()
    sock = connect_unix(path, 10)
    try:
        assert drained, "connected before the queue had room"
        assert sock.getblocking() and sock.gettimeout() is None  # a wait lasts as long as the task
    finally:
        for s in [sock, listener, *queued, *(conn for conn, _ in drained)]:
            s.close()


def test_a_queue_full_for_the_whole_timeout_is_a_clear_host_error(tmp_path, monkeypatch):
    monkeypatch.setattr(client, "CONNECT_TIMEOUT_S", 0.2)
    path = str(tmp_path / "agent.sock")
    listener, queued = full_listener(path)
    try:
        with pytest.raises(BlockingIOError):
            connect_unix(path, 0.2)
        with pytest.raises(errors.HostError, match="took no new connection .*queue is full"):
            RemoteIsolator(path).info()
    finally:
        for s in [listener, *queued]:
            s.close()
