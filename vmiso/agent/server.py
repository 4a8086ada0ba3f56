"""The agent's server: the Isolator API over HTTP+JSON on a unix socket (protocol.py).

Library: the standard library's http.server, for the request parsing only (request line and
header limits, HTTP/1.1 framing), driven by a connection manager of our own: a root daemon gains
no dependency, and nothing in it hands a connection a thread before it has sent a request.

Bounds (a local user must not starve the others):
- a connection costs only a file descriptor until its first bytes arrive (a selector watches
  idle ones); one idle for IDLE_TIMEOUT_S is closed;
- at most MAX_CONNECTIONS connections, and PER_USER_CONNECTIONS per ordinary user (root is not
  capped per user: it is the operator); one over is closed at once;
- one request per connection; a request is handled on its own thread, at most MAX_ACTIVE at once
  and PER_USER_ACTIVE per ordinary user; one over gets 503 at once, never a queue;
- the request line and headers must arrive within REQUEST_TIMEOUT_S of each read, a body is at
  most protocol.MAX_BODY bytes and must be sent with Content-Length;
- a long request (wait, a followed output) notices its client leaving and ends; a launch never
  ends its container because its client left (only an explicit kill or rm does).

Ownership: every request acts as its caller (auth.Peer from SO_PEERCRED). An ordinary user's
container records their uid (Isolator.launch(uid=)); another user's container, or root's, is
"no such container" to them in every endpoint, with the same message as an id nobody uses.

Slurm (jobs.py): a caller whose process is in a Slurm job's cgroups on this node launches into
that job: the container is named after the job and step, sized within the job's allocation, its
QEMU moved into the caller's cgroups, and bound to the job (bindings.py): the reaper removes it
when the job has ended, as does the Epilog through the root-only ``POST /v1/gc``.
"""
import dataclasses
import http.server
import json
import logging
import os
import secrets
import select
import selectors
import socket
import stat
import threading
import time
from urllib.parse import parse_qs, unquote, urlsplit

from .. import __version__
from ..errors import Forbidden, InvalidSpec, NotFound, Timeout, VmisoError
from . import KEEP_ABANDONED_S, auth, bindings, jobs, protocol

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 1000
PER_USER_CONNECTIONS = 128
MAX_ACTIVE = 256
PER_USER_ACTIVE = 64
IDLE_TIMEOUT_S = 30.0
REQUEST_TIMEOUT_S = 10.0
LIVENESS_S = 1.0   # how often a long request looks whether its client is still there
LINGER_S = 1.0     # after the answer: how long, and how much, of a client's unread input is drained
LINGER_BYTES = 1 << 20
REAP_EVERY_S = 1.0         # how often bound containers are checked (job ended, client gone)
SLURM_PREFIX = "slurm-"    # container names the agent gives Slurm jobs' containers only


class Agent:
    """Serves ``iso`` (an Isolator, already recovered) on ``socket_path`` under ``policy``."""

    def __init__(self, iso, policy, socket_path, socket_mode=0o666, keep_abandoned=KEEP_ABANDONED_S):
        self.iso = iso
        self.policy = policy
        self.keep_abandoned = keep_abandoned
        self.bindings = bindings.Bindings(iso.workdir.root if iso.workdir is not None else None).load()
        self.socket_path = str(socket_path)
        self.socket_mode = socket_mode
        self._stop = threading.Event()
        self._wake = socket.socketpair()  # stop() wakes the selector through it
        self._lock = threading.Lock()
        self._conns = {}       # uid -> open connections (idle or active)
        self._active = {}      # uid -> requests being handled
        self._id_locks = {}    # container id -> [lock, users]: launch, kill and rm of one id in turn
        self._user_locks = {}  # uid -> lock: one launch at a time per user (limits are checked in it)
        self.listener = None

    # --- connections ------------------------------------------------------------------------
    def bind(self):
        """Listen on the socket (replacing a stale one; another live agent's is never replaced)."""
        os.makedirs(os.path.dirname(self.socket_path), mode=0o755, exist_ok=True)
        try:
            if stat.S_ISSOCK(os.lstat(self.socket_path).st_mode):
                os.unlink(self.socket_path)  # the work dir's lock proved no agent serves it
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        tmp = f"{self.socket_path}.{os.getpid()}.tmp"
        try:
            sock.bind(tmp)
            os.chmod(tmp, self.socket_mode)  # before it is visible at its name
            os.rename(tmp, self.socket_path)
            sock.listen(256)
        except BaseException:
            sock.close()
            raise
        sock.setblocking(False)
        self.listener = sock

    def serve_forever(self):
        threading.Thread(target=self._reaper, name="vmiso-agent-reaper", daemon=True).start()
        sel = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ)
        sel.register(self._wake[0], selectors.EVENT_READ)
        idle = {}  # socket -> (peer, deadline)
        try:
            while not self._stop.is_set():
                for key, _ in sel.select(timeout=1.0):
                    if key.fileobj is self.listener:
                        self._accept(sel, idle)
                    elif key.fileobj is self._wake[0]:
                        continue
                    else:
                        sel.unregister(key.fileobj)
                        peer, _deadline = idle.pop(key.fileobj)
                        self._dispatch(key.fileobj, peer)
                now = time.monotonic()
                for conn in [c for c, (_p, deadline) in idle.items() if deadline < now]:
                    sel.unregister(conn)
                    self._close(conn, idle.pop(conn)[0])
        finally:
            for conn, (peer, _) in idle.items():
                self._close(conn, peer)
            sel.close()

    def _accept(self, sel, idle):
        for _ in range(64):  # a burst of connections, then back to the others
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:  # EMFILE: refuse for now, serve what is open
                log.warning("accept: %s", err)
                return
            peer = auth.peer_of(conn)
            with self._lock:
                total = sum(self._conns.values())
                mine = self._conns.get(peer.uid, 0)
                if total >= MAX_CONNECTIONS or (not peer.root and mine >= PER_USER_CONNECTIONS):
                    conn.close()
                    continue
                self._conns[peer.uid] = mine + 1
            conn.setblocking(False)
            sel.register(conn, selectors.EVENT_READ)
            idle[conn] = (peer, time.monotonic() + IDLE_TIMEOUT_S)

    def _close(self, conn, peer):
        try:
            conn.close()
        finally:
            with self._lock:
                self._conns[peer.uid] -= 1
                if not self._conns[peer.uid]:
                    del self._conns[peer.uid]

    def _dispatch(self, conn, peer):
        with self._lock:
            busy = sum(self._active.values()) >= MAX_ACTIVE or \
                (not peer.root and self._active.get(peer.uid, 0) >= PER_USER_ACTIVE)
            if not busy:
                self._active[peer.uid] = self._active.get(peer.uid, 0) + 1
        if busy:
            try:
                conn.send(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            except OSError:
                pass
            self._close(conn, peer)
            return
        threading.Thread(target=self._handle, args=(conn, peer), name=f"vmiso-agent-{peer.uid}", daemon=True).start()

    def _handle(self, conn, peer):
        try:
            conn.setblocking(True)
            Handler(conn, peer, self)
            _linger(conn)
        except Exception:  # a handler's own failures are answered inside; this is the socket's
            log.debug("connection of uid %s", peer.uid, exc_info=True)
        finally:
            with self._lock:
                self._active[peer.uid] -= 1
                if not self._active[peer.uid]:
                    del self._active[peer.uid]
            self._close(conn, peer)

    def _reaper(self):
        while not self._stop.wait(REAP_EVERY_S):
            try:
                bindings.reap(self, self.bindings, self.keep_abandoned)
            except Exception:  # the next pass tries again; serving goes on
                log.exception("reaper")

    def stop(self):
        """Stop serving (SIGTERM): no new requests; running VMs are left exactly as they are."""
        self._stop.set()
        try:
            self._wake[1].send(b"x")
        except OSError:
            pass

    def close(self):
        for s in self._wake:
            s.close()
        if self.listener is not None:
            self.listener.close()
            try:
                os.unlink(self.socket_path)
            except FileNotFoundError:
                pass

    # --- ownership ----------------------------------------------------------------------------
    def visible(self, peer, container_id):
        """The container's status if ``peer`` may see it; NotFound (as for an unused id) if not."""
        status = self.iso.status(container_id)
        if not peer.root and status.uid != peer.uid:
            raise NotFound("container", container_id)
        return status

    def statuses(self, peer):
        out = []
        for cid in self.iso.containers():
            try:
                out.append(self.visible(peer, cid))
            except VmisoError:
                continue  # removed meanwhile, being launched, unreadable, or not the caller's
        return out

    def id_lock(self, container_id):
        return _RefLock(self._id_locks, self._lock, container_id)

    def user_lock(self, uid):
        with self._lock:
            return self._user_locks.setdefault(uid, threading.Lock())


def _linger(conn):
    """Close gently: a socket closed with unread input resets the connection, and the client may
    lose the answer (an error about the very body it is still sending). Read and drop what the
    client still sends, at most LINGER_BYTES for LINGER_S, after our side is shut down."""
    try:
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(LINGER_S)
        deadline = time.monotonic() + LINGER_S
        left = LINGER_BYTES
        while left > 0 and time.monotonic() < deadline:
            data = conn.recv(min(left, 65536))
            if not data:
                return
            left -= len(data)
    except OSError:
        pass


class _RefLock:
    """A lock per key, dropped from ``table`` when nobody holds or waits for it."""

    def __init__(self, table, guard, key):
        self.table, self.guard, self.key = table, guard, key

    def __enter__(self):
        with self.guard:
            entry = self.table.setdefault(self.key, [threading.Lock(), 0])
            entry[1] += 1
        entry[0].acquire()

    def __exit__(self, *exc):
        with self.guard:
            entry = self.table[self.key]
            entry[0].release()
            entry[1] -= 1
            if not entry[1]:
                del self.table[self.key]


class _Stdin:
    """The task's stdin, read from an upgraded connection until the client shuts down its side."""

    def __init__(self, rfile):
        self.rfile = rfile
        self.eof = threading.Event()

    def read1(self, n):
        try:
            data = self.rfile.read1(n)
        except (OSError, ValueError):  # reset by the client, or closed under us
            data = b""
        if not data:
            self.eof.set()
        return data

    read = read1


class Handler(http.server.BaseHTTPRequestHandler):
    """One request on one connection, as ``peer``."""

    protocol_version = "HTTP/1.1"
    server_version = f"vmiso-agent/{__version__}"
    timeout = REQUEST_TIMEOUT_S

    def __init__(self, conn, peer, agent):
        self.peer = peer
        self.agent = agent
        super().__init__(conn, ("uid", peer.uid), agent)

    def handle(self):
        self.close_connection = True
        self.handle_one_request()  # one request per connection

    def send_error(self, code, message=None, explain=None):
        self.request_version = "HTTP/1.1"  # garbage gets a status line too, not HTTP/0.9's bare body
        super().send_error(code, message, explain)

    def log_message(self, fmt, *args):
        log.debug("uid %s: " + fmt, self.peer.uid, *args)

    def do_GET(self):
        self._route("GET")

    def do_POST(self):
        self._route("POST")

    def do_DELETE(self):
        self._route("DELETE")

    # --- plumbing -----------------------------------------------------------------------------
    def _route(self, method):
        try:
            if "Transfer-Encoding" in self.headers:
                raise InvalidSpec("request", "send the body with Content-Length, not chunked")
            url = urlsplit(self.path)
            parts = [unquote(p) for p in url.path.split("/") if p]
            query = parse_qs(url.query, max_num_fields=64)
            if parts[:1] != [protocol.API.strip("/")]:
                raise NotFound("endpoint", url.path)
            rest = parts[1:]
            # /v1/RESOURCE, /v1/RESOURCE/ID, /v1/RESOURCE/ID/ACTION: the id is never matched as a word
            shape = tuple(p if i != 1 else "*" for i, p in enumerate(rest))
            endpoint = ROUTES.get((method, shape))
            if endpoint is None:
                raise NotFound("endpoint", f"{method} {url.path}")
            endpoint(self, *rest[1:2], query=query)
        except VmisoError as err:
            self._error(err)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client left
        except Exception:
            log.exception("request %s %s of uid %s", method, self.path, self.peer.uid)
            self._error(VmisoError("internal error in the agent (see its log)"))

    def _body(self):
        length = self.headers.get("Content-Length", "0")
        if not length.isdigit():
            raise InvalidSpec("request", "Content-Length is not a number")
        if int(length) > protocol.MAX_BODY:
            raise InvalidSpec("request", f"the body is {length} bytes; at most {protocol.MAX_BODY}")
        raw = self.rfile.read(int(length))
        if len(raw) != int(length):
            raise InvalidSpec("request", "the body ended early")
        if not raw:
            return {}
        try:
            body = json.loads(raw)
        except ValueError as err:
            raise InvalidSpec("request", "the body is not JSON") from err
        if not isinstance(body, dict):
            raise InvalidSpec("request", "the body must be a JSON object")
        return body

    def _send(self, code, obj):
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _error(self, err):
        code, obj = protocol.error_to_wire(err)
        try:
            if getattr(self, "_streaming", False):
                self.wfile.write(protocol.frame({"error": obj}))
            else:
                self._send(code, {"error": obj})
        except OSError:
            pass

    def _start_stream(self, code=200, upgrade=None):
        self.send_response(code)
        if upgrade:
            self.send_header("Upgrade", upgrade)
            self.send_header("Connection", "Upgrade")
        else:
            self.send_header("Content-Type", protocol.NDJSON)
            self.send_header("Connection", "close")
        self.end_headers()
        self._streaming = True

    def client_gone(self):
        """The client closed its connection (or reset it): a long request may end."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def _admit(self):
        self.agent.policy.admit(self.peer, auth.groups_of(self.peer.uid))


# --- endpoints ---------------------------------------------------------------------------------
def info(h, query):
    try:
        h._admit()
        may_run, why = True, ""
    except Forbidden as err:
        may_run, why = False, str(err)
    h._send(200, {"workdir": str(h.agent.iso.workdir.root), "agent_id": h.agent.iso.agent_id,
                  "pid": os.getpid(), "version": __version__, "socket": h.agent.socket_path,
                  "caller": {"uid": h.peer.uid, "gid": h.peer.gid, "pid": h.peer.pid},
                  "may_run": may_run, "why_not": why, "policy": h.agent.policy.source,
                  "pool": _pool_rows(h.agent.iso)})


def _pool_rows(iso):
    """The agent's warm VMs as `vmiso ps` shows them, shaped as pool.read_status's (None: no
    pool). Booted for nobody yet: no task, owner or address in them to hide from any caller."""
    status = iso.pool.status()
    if not status["config"]:
        return None
    return {"config": {"image": status["config"]["image"]}, "agent": status["agent"],
            "slots": [{"id": s["id"], "state": s["state"]} for s in status["slots"]]}


def list_containers(h, query):
    h._send(200, {"containers": [s.to_dict() for s in h.agent.statuses(h.peer)]})


def get_status(h, cid, query):
    h._send(200, {"status": h.agent.visible(h.peer, cid).to_dict()})


def launch(h, cid, query):
    h._admit()
    body = h._body()
    upgrade = h.headers.get("Upgrade", "") == protocol.STDIN_UPGRADE
    stdin = _Stdin(h.rfile) if upgrade else None
    spec = protocol.spec_from_wire(body.get("spec"), stdin=stdin)
    if upgrade != (spec.stdin is not None):
        raise InvalidSpec("stdin", f"a task with stdin is launched with Upgrade: {protocol.STDIN_UPGRADE}, "
                                   "and only such a task")
    peer, agent = h.peer, h.agent
    hints = _hints(body.get("hints"))
    # The caller's Slurm job, from the kernel and Slurm: its name, sizes and cgroups, never the
    # SLURM_* variables the client saw (the name and sizes it sent are defaults only).
    job = jobs.identify(h.connection, peer)
    if job is not None:
        cpus, mem_mib = jobs.size(job, spec.resources.cpus, spec.resources.mem_mib, hints["given"],
                                  tcg=agent.iso.accel.name == "tcg")
        spec = dataclasses.replace(spec, resources=dataclasses.replace(spec.resources, cpus=cpus, mem_mib=mem_mib))
    if job is not None and hints["auto_name"]:
        cid = _job_container_id(agent, job)
    elif cid.startswith(SLURM_PREFIX) and not peer.root:
        if not hints["auto_name"]:
            raise Forbidden(f"names {SLURM_PREFIX}* are given to Slurm jobs' containers by the agent; choose another")
        cid = "run-" + secrets.token_hex(4)  # a SLURM_JOB_ID outside a job on this node names nothing
    if upgrade:
        # The copy into the guest starts reading during the launch, and stdin may pause as long as
        # its source does (a person typing): no read timeout from here on.
        h.connection.settimeout(None)
    with agent.id_lock(cid), agent.user_lock(peer.uid):
        if not peer.root:
            running = [s for s in agent.statuses(peer) if s.termination is None]
            agent.policy.check_launch(peer, spec, running)
            for volume in spec.volumes:
                auth.check_path(peer.uid, volume.host, write=not volume.readonly)
        status = agent.iso.launch(cid, spec, uid=None if peer.root else peer.uid)
        if job is not None:
            try:
                jobs.place(status.pid, job)
            except VmisoError:
                agent.iso.destroy(cid, grace=0)
                raise
        agent.bindings.bind(cid, job, peer.pid if hints["attached"] else None)
    if not upgrade:
        h._send(201, {"status": status.to_dict()})
        return
    h._start_stream(101, upgrade=protocol.STDIN_UPGRADE)
    h.wfile.write(protocol.frame({"status": status.to_dict()}))
    # Serve the copy until the client's EOF or the task's end; a client that leaves ends the
    # copy (EOF to the task), never the task.
    while not stdin.eof.wait(LIVENESS_S):
        if agent.iso.status(cid).termination is not None:
            return


def _hints(value):
    """What the client says of a launch's defaults: ``auto_name`` (the id was not the user's
    choice), ``given`` (the sizes the user asked for), ``attached`` (a ``vmiso run`` without -d
    streams it and removes it when done)."""
    value = value if isinstance(value, dict) else {}
    given = value.get("given")
    return {"auto_name": value.get("auto_name") is True, "attached": value.get("attached") is True,
            "given": {g for g in given if g in ("cpus", "mem_mib")} if isinstance(given, list) else set()}


def _job_container_id(agent, job):
    """``slurm-<job>.<step>``, then ``.2``, ``.3``... when taken (by anyone: names are global)."""
    from .. import slurm

    def taken(name):
        try:
            agent.iso.status(name)
            return True
        except NotFound:
            return False
    env = {"SLURM_JOB_ID": job.job_id, "SLURM_STEP_ID": job.step}
    if job.array_task:
        env.update(SLURM_ARRAY_JOB_ID=job.array_job, SLURM_ARRAY_TASK_ID=job.array_task)
    return slurm.container_id(env, taken) or f"{job.container_base}.{secrets.token_hex(3)}"


def wait(h, cid, query):
    body = h._body()
    timeout = body.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0):
        raise InvalidSpec("timeout", "must be a non-negative number or null")
    h.agent.visible(h.peer, cid)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        left = LIVENESS_S if deadline is None else min(LIVENESS_S, deadline - time.monotonic())
        try:
            termination = h.agent.iso.wait(cid, timeout=max(0.0, left))
            break
        except Timeout:
            if deadline is not None and time.monotonic() >= deadline:
                raise Timeout(f"container {cid} still running after {timeout} s") from None
            if h.client_gone():
                return
    h._send(200, {"termination": termination.to_dict()})


def _grace(value):
    if value is None:
        return 5.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 3600:
        raise InvalidSpec("grace", "must be a number of seconds, 0..3600")
    return float(value)


def kill(h, cid, query):
    grace = _grace(h._body().get("grace"))
    with h.agent.id_lock(cid):
        h.agent.visible(h.peer, cid)
        termination = h.agent.iso.kill(cid, grace=grace)
    h._send(200, {"termination": termination.to_dict()})


def remove(h, cid, query):
    grace = _grace(_query_number(query, "grace"))
    with h.agent.id_lock(cid):
        if not h.peer.root:
            h.agent.visible(h.peer, cid)  # root's rm of an unknown id is no error, as in-process
        termination = h.agent.iso.destroy(cid, grace=grace)
        h.agent.bindings.drop(cid)
    h._send(200, {"termination": termination.to_dict() if termination else None})


def gc(h, query):
    """Root's ``vmiso gc`` (the Slurm Epilog's ``--job``) through the agent: with ``job``, every
    container of that job (bound to it, or named ``slurm-<job>.``/a given prefix), running or not;
    without, every ended container nobody's attached ``vmiso run`` still streams and every one
    whose attached ``vmiso run`` died."""
    if not h.peer.root:
        raise Forbidden("vmiso gc is root's")
    body = h._body()
    job, grace = body.get("job"), _grace(body.get("grace"))
    prefixes = body.get("prefixes") or []
    if job is not None and not (isinstance(job, str) and job.isdigit() and len(job) <= 20):
        raise InvalidSpec("job", f"{job!r} is not a Slurm job id")
    if not isinstance(prefixes, list) or not all(isinstance(p, str) and p.startswith(SLURM_PREFIX) for p in prefixes):
        raise InvalidSpec("prefixes", f"must be a list of {SLURM_PREFIX}* names")
    agent = h.agent
    bound = agent.bindings.items()
    if job is not None:
        names = tuple([f"{SLURM_PREFIX}{job}."] + prefixes)
        targets = set(agent.bindings.of_job(job)) | {c for c in agent.iso.containers() if c.startswith(names)}
    else:
        targets = set()
        for status in agent.statuses(h.peer):
            record = bound.get(status.container_id)
            attached_alive = record is not None and record.get("client") and not agent.bindings.client_gone(record)
            if (status.termination is not None and not attached_alive) or \
                    (record is not None and agent.bindings.client_gone(record)):
                targets.add(status.container_id)
    removed, failed = {}, {}
    for cid in sorted(targets):
        try:
            with agent.id_lock(cid):
                termination = agent.iso.destroy(cid, grace=grace)
        except VmisoError as err:
            failed[cid] = str(err)
            continue
        agent.bindings.drop(cid)
        removed[cid] = termination.to_dict() if termination else None
    h._send(200, {"removed": removed, "failed": failed})


def _query_number(query, name):
    if name not in query:
        return None
    try:
        return float(query[name][0])
    except ValueError:
        raise InvalidSpec(name, f"{query[name][0]!r} is not a number") from None


def output(h, cid, query):
    follow = query.get("follow", ["1"])[0] not in ("0", "false")
    h.agent.visible(h.peer, cid)
    chunks = h.agent.iso.output(cid, follow=follow)
    h._start_stream()
    for stream, data in chunks:
        h.wfile.write(protocol.output_frame(stream, data))  # BrokenPipe: the client left; the task runs on
    h.wfile.write(protocol.frame({"end": True}))


def console(h, cid, query):
    h.agent.visible(h.peer, cid)
    path = h.agent.iso.console_log(cid)
    try:
        f = open(path, "rb")  # noqa: SIM115 (read whole below)
    except FileNotFoundError:
        raise NotFound("console log of container", cid) from None
    with f:
        h._start_stream()
        while chunk := f.read(65536):
            h.wfile.write(protocol.output_frame("stdout", chunk))
    h.wfile.write(protocol.frame({"end": True}))


def stats(h, query):
    from ..accounting.observe import Observer

    wanted = query.get("id") or None
    if h.peer.root:
        ids = wanted
    else:
        mine = {s.container_id for s in h.agent.statuses(h.peer)}
        ids = sorted(mine if wanted is None else mine & set(wanted))
        for cid in set(wanted or ()) - mine:
            raise NotFound("container", cid)
    observer = Observer(h.agent.iso.workdir.root)
    try:
        seen = observer.observe(ids)
    finally:
        observer.close()
    h._send(200, {"stats": {k: v.to_dict() for k, v in seen.stats.items()},
                  "errors": {k: str(v) for k, v in seen.errors.items()}})


ROUTES = {
    ("GET", ("info",)): info,
    ("GET", ("containers",)): list_containers,
    ("GET", ("containers", "*")): get_status,
    ("POST", ("containers", "*")): launch,
    ("DELETE", ("containers", "*")): remove,
    ("POST", ("containers", "*", "wait")): wait,
    ("POST", ("containers", "*", "kill")): kill,
    ("GET", ("containers", "*", "output")): output,
    ("GET", ("containers", "*", "console")): console,
    ("GET", ("stats",)): stats,
    ("POST", ("gc",)): gc,
}
