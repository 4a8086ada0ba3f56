"""Prometheus exporter: every running container's usage (observe.py) as metric families, and a
small HTTP server for them with bounded resources.

The exposition is prometheus_client's (text format 0.0.4 or OpenMetrics as the scraper asks,
gzip, ``name[]`` filters: its ``make_wsgi_app``); only the server around it is ours, because
prometheus_client's ``start_http_server`` runs a thread per connection with no socket timeout, so
a client that connects and stays silent holds a thread forever and a few hundred of them exhaust
the process. Here:

- connections are accepted and their request head read by one selector thread, never by a
  worker: a silent or slow client costs a descriptor, not a thread, and is closed (408) when
  its head has not arrived within ``head_timeout`` seconds; at most ``max_pending`` such
  connections are kept, the oldest one is closed to make room for a new one, so a scrape always
  gets in;
- a request whose head is complete goes to a pool of ``workers`` threads, with at most
  ``queued`` more waiting; beyond that it gets 503 at once;
- a worker writes the response under a socket timeout (``io_timeout``, which bounds the whole
  ``sendall``): a client that stops reading cannot hold it longer.

Series carry the labels ``container_id`` and ``agent_id`` (the owner recorded in the container's
checkpoint): every agent's containers on the host are exported, read-only.
"""
import collections
import io
import logging
import selectors
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from wsgiref.simple_server import WSGIRequestHandler

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..errors import HostError

log = logging.getLogger(__name__)

PREFIX = "vmiso_container_"
LABELS = ("container_id", "agent_id")
# Mesos field -> (Prometheus type, help); counters only ever grow.
METRICS = {
    "cpus_user_time_secs": ("counter", "CPU time in user mode, seconds (QEMU and the guest)"),
    "cpus_system_time_secs": ("counter", "CPU time in kernel mode, seconds"),
    "cpus_limit": ("gauge", "CPUs the VM may use"),
    "cpus_nr_periods": ("counter", "CFS periods elapsed"),
    "cpus_nr_throttled": ("counter", "CFS periods throttled"),
    "cpus_throttled_time_secs": ("counter", "time throttled, seconds"),
    "threads": ("gauge", "QEMU threads"),
    "mem_total_bytes": ("gauge", "memory charged to the VM's cgroup, QEMU included"),
    "mem_rss_bytes": ("gauge", "QEMU's resident set"),
    "mem_cache_bytes": ("gauge", "page cache charged to the VM"),
    "mem_anon_bytes": ("gauge", "anonymous memory charged to the VM"),
    "mem_file_bytes": ("gauge", "file-backed memory charged to the VM"),
    "mem_swap_bytes": ("gauge", "swap used by the VM"),
    "mem_limit_bytes": ("gauge", "the VM's memory hard limit, QEMU's overhead included"),
    "disk_used_bytes": ("gauge", "bytes allocated to the VM's overlay"),
    "disk_limit_bytes": ("gauge", "virtual size of the VM's disk"),
    **{f"net_{d}_{what}": ("counter", f"guest {d.upper()} {what}") for d in ("rx", "tx")
       for what in ("packets", "bytes", "errors", "dropped")},
}

WORKERS = 4          # threads writing responses
QUEUED = 16          # complete requests waiting for a worker; more get 503
MAX_PENDING = 256    # connections whose request head has not arrived yet
HEAD_TIMEOUT = 10.0  # seconds from accept to a complete request head
IO_TIMEOUT = 10.0    # seconds to write a response
MAX_HEAD = 8192      # bytes of request line and headers (a scraper sends a few hundred)


class ContainerMetrics:
    """A prometheus_client custom collector: one family per METRICS field, a sample per running
    container, plus how many containers ran per agent and how many could not be read."""

    def __init__(self, observer):
        self.observer = observer

    def collect(self):
        seen = self.observer.observe()
        for field, (kind, text) in METRICS.items():
            family = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(
                PREFIX + field, text, labels=LABELS)
            for cid in sorted(seen.stats):
                value = getattr(seen.stats[cid], field)
                if value is not None:
                    family.add_metric([cid, seen.owners.get(cid, "")], value)
            yield family
        running = GaugeMetricFamily("vmiso_containers_running", "running containers whose usage was read, "
                                    "per owner agent", labels=["agent_id"])
        for agent, count in sorted(collections.Counter(seen.owners.get(c, "") for c in seen.stats).items()):
            running.add_metric([agent], count)
        yield running
        yield GaugeMetricFamily("vmiso_containers_unreadable", "containers whose record or counters could "
                                "not be read (vmiso stats names them)", value=len(seen.errors))


def registry(observer):
    """A registry holding only the containers' metrics (not the exporter's own process)."""
    reg = CollectorRegistry()
    reg.register(ContainerMetrics(observer))
    return reg


class _Pending:
    __slots__ = ("address", "head", "deadline")

    def __init__(self, address, deadline):
        self.address, self.head, self.deadline = address, b"", deadline


class MetricsServer:
    """Serves the WSGI ``app`` (prometheus_client's) on ``host``:``port`` with the bounds of the
    module's docstring. ``serve_forever()`` in one thread, ``shutdown()`` from another, then
    ``close()``."""

    def __init__(self, host, port, app, workers=WORKERS, queued=QUEUED, max_pending=MAX_PENDING,
                 head_timeout=HEAD_TIMEOUT, io_timeout=IO_TIMEOUT):
        self.app = app
        self.workers, self.queued, self.max_pending = workers, queued, max_pending
        self.head_timeout, self.io_timeout = head_timeout, io_timeout
        self.socket = _listen(host, port)
        self.server_address = self.socket.getsockname()[:2]
        self.base_environ = {"SERVER_NAME": str(self.server_address[0]), "GATEWAY_INTERFACE": "CGI/1.1",
                             "SERVER_PORT": str(self.server_address[1]), "REMOTE_HOST": "",
                             "CONTENT_LENGTH": "", "SCRIPT_NAME": ""}  # as wsgiref's WSGIServer
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._pending = {}  # connection -> _Pending, oldest first (a dict keeps insertion order)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vmiso-metrics")
        self._lock = threading.Lock()
        self._inflight = 0  # requests handed to the pool, running or waiting
        self._stopping = False

    def get_app(self):  # what wsgiref's request handler asks its server for
        return self.app

    def serve_forever(self):
        self.socket.setblocking(False)
        self._wake_r.setblocking(False)
        self._selector.register(self.socket, selectors.EVENT_READ, "accept")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        while not self._stopping:
            timeout = None
            if self._pending:  # the oldest connection's deadline is the nearest (one timeout for all)
                timeout = max(0.0, next(iter(self._pending.values())).deadline - time.monotonic())
            for key, _ in self._selector.select(timeout):
                if key.data == "accept":
                    self._accept()
                elif key.data == "conn":
                    self._read(key.fileobj)
            self._expire(time.monotonic())

    def shutdown(self):
        self._stopping = True
        try:
            self._wake_w.send(b"x")
        except OSError:  # the pipe is full: a wake-up is already on its way
            pass

    def close(self):
        """Close every connection and the listener, and wait for the workers (each at most
        ``io_timeout``)."""
        for conn in list(self._pending):
            self._drop(conn)
        self._selector.close()
        self.socket.close()
        self._pool.shutdown(wait=True)
        self._wake_r.close()
        self._wake_w.close()

    def _accept(self):
        for _ in range(64):  # then back to the selector, so reads are served too
            try:
                conn, address = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:  # EMFILE and the like: drop the oldest silent client, try later
                log.warning("metrics server cannot accept: %s", err)
                if self._pending:
                    self._drop(next(iter(self._pending)), b"503 Service Unavailable")
                return
            conn.setblocking(False)
            if len(self._pending) >= self.max_pending:
                self._drop(next(iter(self._pending)), b"408 Request Timeout")
            self._pending[conn] = _Pending(address, time.monotonic() + self.head_timeout)
            self._selector.register(conn, selectors.EVENT_READ, "conn")

    def _read(self, conn):
        pending = self._pending.get(conn)
        if pending is None:  # dropped earlier in this round of events
            return
        try:
            chunk = conn.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        if not chunk:
            self._drop(conn)
            return
        pending.head += chunk
        if b"\r\n\r\n" in pending.head or b"\n\n" in pending.head:
            self._selector.unregister(conn)
            del self._pending[conn]
            self._dispatch(conn, pending)
        elif len(pending.head) > MAX_HEAD:
            self._drop(conn, b"431 Request Header Fields Too Large")

    def _expire(self, now):
        while self._pending:
            conn, pending = next(iter(self._pending.items()))
            if pending.deadline > now:
                return
            self._drop(conn, b"408 Request Timeout")

    def _drop(self, conn, status=None):
        """Forget a connection still being read; with ``status``, say why first (a few bytes into
        an empty send buffer: this never blocks)."""
        if self._pending.pop(conn, None) is not None:
            self._selector.unregister(conn)
        if status is not None:
            _reply(conn, status)
        conn.close()

    def _dispatch(self, conn, pending):
        with self._lock:
            full = self._inflight >= self.workers + self.queued
            if not full:
                self._inflight += 1
        if full:
            _reply(conn, b"503 Service Unavailable")
            conn.close()
            return
        self._pool.submit(self._serve, conn, pending)

    def _serve(self, conn, pending):
        try:
            conn.settimeout(self.io_timeout)  # blocking again, but never longer than this
            _Handler((conn, pending.head), pending.address, self)
        except OSError as err:  # the client went away or stopped reading
            log.debug("metrics client %s: %s", pending.address, err)
        except Exception:  # noqa: BLE001 - the pool would swallow it silently
            log.exception("metrics request from %s failed", pending.address)
        finally:
            conn.close()
            with self._lock:
                self._inflight -= 1


def _listen(host, port):
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                      flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as err:
        raise HostError(f"cannot listen on {host}:{port}: {err.strerror}") from err
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as err:
        sock.close()
        raise HostError(f"cannot listen on {host}:{port}: {err.strerror}") from err
    return sock


def _reply(conn, status):
    body = status + b"\n"
    try:
        conn.send(b"HTTP/1.1 " + status + b"\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    except OSError:
        pass


class _SocketWriter(io.RawIOBase):
    """The response stream: ``sendall`` under the socket's timeout, which bounds the whole call."""

    def __init__(self, sock):
        self._sock = sock

    def writable(self):
        return True

    def write(self, data):
        self._sock.sendall(data)
        return len(data)


class _LogStream(io.StringIO):
    """wsgiref writes an application's traceback to "stderr" and flushes: log it instead."""

    def flush(self):
        text = self.getvalue().rstrip()
        if text:
            log.warning("metrics request failed: %s", text)
        self.seek(0)
        self.truncate()


class _Handler(WSGIRequestHandler):
    """wsgiref's request handler on a request whose head was read already (``request`` is the
    connection and those bytes)."""

    def setup(self):
        self.connection, head = self.request
        self.rfile = io.BytesIO(head)
        self.wfile = _SocketWriter(self.connection)

    def get_stderr(self):
        return _LogStream()

    def log_message(self, *_):
        pass


def app(observer):
    """prometheus_client's WSGI application over the containers' metrics."""
    return make_wsgi_app(registry(observer))
