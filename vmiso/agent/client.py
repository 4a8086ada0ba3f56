"""The agent's client: ``RemoteIsolator`` answers the Isolator calls the CLI makes (launch, wait,
kill, destroy, status, output, recover, containers) by asking the agent, so every ``vmiso``
subcommand runs unchanged through it, with the same output, errors and exit codes.

Standard library only (a raw HTTP/1.1 client on a unix socket, protocol.py's format): the client
install ordinary users run has no libvirt. ``route()`` decides whether a command works through an
agent or in-process (presence.py says how root finds out; users always need the agent).
"""
import base64
import json
import os
import socket
import struct
import threading
from dataclasses import dataclass, field
from urllib.parse import quote, urlencode

from ..errors import HostError
from ..spec import ResourceStatistics, validate_container_id
from . import DEFAULT_SOCKET, SOCKET_ENV, presence, protocol

CONNECT_TIMEOUT_S = 5.0
MAX_HEADER_LINE = 65536
MAX_BODY = 64 << 20  # a listing of every container with its status, with room to spare
STDIN_CHUNK = 256 * 1024

_HELD = []  # the in-process command's shared lock on the work dir (presence.py); held until exit


def connect_unix(path, timeout):
    """A blocking unix stream socket connected to ``path``. Linux makes a blocking connect to a
    listener whose queue is full (an agent under a flood of connections) wait for room, up to
    SO_SNDTIMEO, then fail with EAGAIN; a socket with a Python timeout is non-blocking and fails
    at once. SO_SNDTIMEO is cleared once connected: a wait or a followed output lasts as long as
    the task, and stdin is sent at the task's pace."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        seconds = int(timeout)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                        struct.pack("ll", seconds, int((timeout - seconds) * 1e6)))
        sock.connect(path)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 0, 0))
    except BaseException:
        sock.close()
        raise
    return sock


def route(workdir, socket_path=None):
    """The RemoteIsolator of the agent serving ``workdir``, or None when this (root) process should
    work in-process: then no agent serves it, and none can start before this process exits.
    HostError for an ordinary user when no agent answers."""
    explicit = socket_path or os.environ.get(SOCKET_ENV)
    if os.geteuid() == 0 and not explicit:
        served, lock_fd = presence.served_by(workdir)
        if served is None:
            if lock_fd is not None:
                _HELD.append(lock_fd)
            return None
        return RemoteIsolator.connect(served, workdir)
    return RemoteIsolator.connect(explicit or DEFAULT_SOCKET, workdir)


def route_read_only(workdir, socket_path=None):
    """route() for a command that only reads (stats): the agent's client when one serves the work
    dir, else None, without keeping an agent from starting meanwhile."""
    explicit = socket_path or os.environ.get(SOCKET_ENV)
    if os.geteuid() == 0 and not explicit:
        served, lock_fd = presence.served_by(workdir)
        if lock_fd is not None:
            os.close(lock_fd)
        return None if served is None else RemoteIsolator.connect(served, workdir)
    return RemoteIsolator.connect(explicit or DEFAULT_SOCKET, workdir)


class RemoteObserver:
    """accounting.observe.Observer's observe()/close(), answered by the agent (the caller's own
    containers; root's: every agent's)."""

    def __init__(self, client):
        self.client = client

    def observe(self, ids=None):
        found, errors = self.client.stats(ids)
        return Seen(found, errors)

    def close(self):
        pass


def release_work_dir():
    """Drop the in-process command's shared lock (an agent waiting for it may start)."""
    while _HELD:
        os.close(_HELD.pop())


@dataclass
class Seen:
    """What RemoteObserver.observe() returns: {id: ResourceStatistics} and {id: error text}."""

    stats: dict
    errors: dict


@dataclass
class RemoteReport:
    """What ``vmiso ps`` reads of recover()'s report: the agent recovered when it started."""

    ids: list = field(default_factory=list)
    foreign: dict = field(default_factory=dict)


class RemoteIsolator:
    """The Isolator calls of the CLI, answered by the agent at ``socket_path``."""

    remote = True

    def __init__(self, socket_path):
        self.socket_path = str(socket_path)
        self._listed = {}

    @classmethod
    def connect(cls, socket_path, workdir):
        """A client of the agent at ``socket_path`` after checking it serves ``workdir``."""
        client = cls(socket_path)
        info = client.info()
        if os.path.realpath(info["workdir"]) != os.path.realpath(str(workdir)):
            raise HostError(f"the vmiso agent at {socket_path} serves {info['workdir']}, not {workdir} "
                            f"(--workdir {info['workdir']}, or another agent's socket with --agent-socket)")
        return client

    # --- the wire -------------------------------------------------------------------------------
    def _open(self, method, path, body=None, upgrade=None):
        """Send one request; return (status, headers, reader, socket) of its answer."""
        try:
            sock = connect_unix(self.socket_path, CONNECT_TIMEOUT_S)
        except (FileNotFoundError, ConnectionRefusedError) as err:
            raise HostError(f"no vmiso agent answers at {self.socket_path} ({err.strerror}): ordinary users run "
                            f"vmiso through the agent root starts ('vmiso agent'; docs/operations.md)") from None
        except BlockingIOError:
            raise HostError(f"the vmiso agent at {self.socket_path} took no new connection for "
                            f"{CONNECT_TIMEOUT_S:g} s (its queue is full): try again") from None
        except OSError as err:
            raise HostError(f"cannot reach the vmiso agent at {self.socket_path}: {err.strerror}") from None
        data = b"" if body is None else json.dumps(body).encode()
        head = [f"{method} {protocol.API}{path} HTTP/1.1", "Host: vmiso", f"Content-Length: {len(data)}"]
        if upgrade:
            head += [f"Upgrade: {upgrade}", "Connection: Upgrade"]
        else:
            head.append("Connection: close")
        try:
            sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + data)
            reader = sock.makefile("rb")
            status_line = reader.readline(MAX_HEADER_LINE)
            parts = status_line.split(None, 2)
            if len(parts) < 2 or not parts[1].isdigit():
                raise HostError(f"the vmiso agent at {self.socket_path} answered {status_line[:80]!r}")
            headers = {}
            while True:
                line = reader.readline(MAX_HEADER_LINE)
                if line in (b"\r\n", b"\n", b""):
                    break
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
        except OSError as err:
            sock.close()
            raise HostError(f"the vmiso agent at {self.socket_path} went away: {err}") from None
        return int(parts[1]), headers, reader, sock

    def _call(self, method, path, body=None):
        """A request with a JSON answer: the answer object, or the error it carries raised."""
        code, headers, reader, sock = self._open(method, path, body)
        try:
            length = headers.get("content-length")
            raw = reader.read(min(int(length), MAX_BODY)) if length and length.isdigit() else reader.read(MAX_BODY)
        finally:
            reader.close()
            sock.close()
        if code == 503:
            raise HostError(f"the vmiso agent at {self.socket_path} is busy (too many requests); try again")
        try:
            obj = json.loads(raw)
        except ValueError:
            raise HostError(f"the vmiso agent answered {code} with a body that is not JSON") from None
        if code >= 300 or "error" in obj:
            raise protocol.error_from_wire(obj.get("error"))
        return obj

    def _frames(self, path):
        """The frames of a streamed answer, until its end frame (an error frame is raised)."""
        code, _headers, reader, sock = self._open("GET", path)
        try:
            if code != 200:
                try:
                    obj = json.loads(reader.read(MAX_BODY))
                except ValueError:
                    obj = None
                raise protocol.error_from_wire(obj.get("error") if isinstance(obj, dict) else obj)
            while True:
                line = reader.readline(protocol.MAX_FRAME)
                if not line:
                    raise HostError("the vmiso agent closed the stream before its end (was it stopped?)")
                obj = protocol.parse_frame(line)
                if "error" in obj:
                    raise protocol.error_from_wire(obj["error"])
                if obj.get("end"):
                    return
                yield obj
        finally:
            reader.close()
            sock.close()

    # --- the Isolator's calls ---------------------------------------------------------------------
    def info(self):
        return self._call("GET", "/info")

    def launch(self, container_id, spec, hints=None):
        """``hints``: what of the launch the caller left to defaults (server.py's _hints): inside
        a Slurm job the agent names and sizes those after the job. The status names the
        container the agent launched, which may not be ``container_id``."""
        path = "/containers/" + quote(validate_container_id(container_id), safe="")
        body = {"spec": protocol.spec_to_wire(spec)}
        if hints:
            body["hints"] = hints
        if spec.stdin is None:
            return protocol.status_from_wire(self._call("POST", path, body)["status"])
        code, _headers, reader, sock = self._open("POST", path, body, upgrade=protocol.STDIN_UPGRADE)
        if code != 101:
            try:
                obj = json.loads(reader.read(MAX_BODY))
            except ValueError:
                obj = None
            reader.close()
            sock.close()
            raise protocol.error_from_wire(obj.get("error") if isinstance(obj, dict) else obj)
        first = protocol.parse_frame(reader.readline(protocol.MAX_FRAME))
        if "error" in first:
            sock.close()
            raise protocol.error_from_wire(first["error"])
        threading.Thread(target=_copy_stdin, args=(spec.stdin, sock, reader), name="vmiso-stdin",
                         daemon=True).start()
        return protocol.status_from_wire(first["status"])

    def wait(self, container_id, timeout=None):
        obj = self._call("POST", self._path(container_id, "wait"), {"timeout": timeout})
        return protocol.termination_from_wire(obj["termination"])

    def kill(self, container_id, grace=5.0, reason=None):
        obj = self._call("POST", self._path(container_id, "kill"), {"grace": grace})
        return protocol.termination_from_wire(obj["termination"])

    def destroy(self, container_id, grace=5.0):
        obj = self._call("DELETE", self._path(container_id) + "?" + urlencode({"grace": grace}))
        return protocol.termination_from_wire(obj["termination"]) if obj["termination"] else None

    def status(self, container_id):
        listed = self._listed.pop(container_id, None)  # ps asks for each id it was just given
        if listed is not None:
            return listed
        return protocol.status_from_wire(self._call("GET", self._path(container_id))["status"])

    def statuses(self):
        return [protocol.status_from_wire(s) for s in self._call("GET", "/containers")["containers"]]

    def containers(self):
        return sorted(s.container_id for s in self.statuses())

    def recover(self, strict=False):
        """The agent recovered when it started: this lists what the caller may see."""
        self._listed = {s.container_id: s for s in self.statuses()}
        return RemoteReport(ids=sorted(self._listed))

    def output(self, container_id, follow=True):
        for obj in self._frames(self._path(container_id, "output") + ("" if follow else "?follow=0")):
            yield obj["stream"], base64.b64decode(obj["data"])

    def console(self, container_id):
        """The container's boot console log, in chunks."""
        for obj in self._frames(self._path(container_id, "console")):
            yield base64.b64decode(obj["data"])

    def gc(self, job=None, prefixes=(), grace=2.0):
        """Root's gc through the agent: ({id: termination dict or None}, {id: error}) removed/failed."""
        obj = self._call("POST", "/gc", {"job": job, "prefixes": list(prefixes), "grace": grace})
        return obj["removed"], obj["failed"]

    def stats(self, ids=None):
        """({id: ResourceStatistics}, {id: error text}) of the caller's running containers."""
        query = "?" + urlencode([("id", i) for i in ids]) if ids else ""
        obj = self._call("GET", "/stats" + query)
        return {k: ResourceStatistics(**v) for k, v in obj["stats"].items()}, obj["errors"]

    @staticmethod
    def _path(container_id, action=None):
        path = "/containers/" + quote(validate_container_id(container_id), safe="")
        return path + "/" + action if action else path


def _copy_stdin(source, sock, reader):
    """Copy the task's stdin into the upgraded connection, then half-close it (the task's EOF)."""
    try:
        for data in _chunks(source):
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        while reader.read1(4096):  # the agent sends nothing more; it closes when the copy is done
            pass
    except OSError:
        pass  # the task ended (or the agent went away) before taking everything, as a closed pipe
    finally:
        reader.close()
        sock.close()


def _chunks(source):
    if isinstance(source, bytes):
        for start in range(0, len(source), STDIN_CHUNK):
            yield source[start:start + STDIN_CHUNK]
        return
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:  # opened by the caller, as the caller
            yield from iter(lambda: f.read(STDIN_CHUNK), b"")
        return
    try:
        fd = source.fileno()
    except (AttributeError, OSError, ValueError):
        fd = None
    if fd is not None:
        # The descriptor itself, not the buffered object: a daemon thread blocked inside a buffered
        # read holds its lock, and the interpreter aborts at exit (SIGABRT) when the task ends
        # before the caller's stdin does.
        while data := os.read(fd, STDIN_CHUNK):
            yield data
        return
    read = getattr(source, "read1", None) or source.read
    while data := read(STDIN_CHUNK):
        yield data

