"""vmiso metrics and vmiso stats are read-only, and the metrics server is bounded.

A work dir holds a container in every phase (running with a live QEMU, running whose pid does not
exist, running whose pid now belongs to another VM, launching, destroying, terminated, from before
a reboot, corrupt, with malformed fields, not yet recorded), owned by two agents; QEMU's processes
and cgroups are a generated /proc and cgroup tree in the kernel's formats (vmiso/bench/usage.py)
and libvirt's pid files a directory of ours. Everything is real: the Collector, prometheus_client,
sockets."""
import http.client
import os
import re
import socket
import subprocess
import sys
import threading
import time
from contextlib import closing

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from vmiso import state
from vmiso.accounting import exporter
from vmiso.accounting.observe import Observation, Observer
from vmiso.bench import usage as tree
from vmiso.cli.main import build_parser
from vmiso.errors import HostError
from vmiso.image import qcow2

GIB = 1 << 30


def record(workdir, cid, agent, phase, boot, **fields):
    directory = workdir / "containers" / cid
    directory.mkdir(parents=True)
    state.write(directory, state.Checkpoint(container_id=cid, agent_id=agent, domain=f"vmiso-{cid}",
                                            nonce="n", phase=phase, boot_id=boot, **fields))
    return directory


def qemu(proc, pid, domain):
    """What libvirt's QEMU shows as its command line (only -name matters here)."""
    with open(f"{proc}/{pid}/cmdline", "wb") as f:
        f.write(b"\0".join([b"/usr/bin/qemu-system-x86_64", b"-name", f"guest={domain},debug-threads=on".encode(),
                            b"-S", b""]))


@pytest.fixture
def host(tmp_path):
    """(workdir, run_dir, proc) with the containers of the module's docstring."""
    targets = tree.make_tree(str(tmp_path / "host"), 3)
    proc, run_dir, workdir = str(tmp_path / "host" / "proc"), tmp_path / "run", tmp_path / "work"
    run_dir.mkdir()
    boot = state.boot_id()
    base = tmp_path / "base.raw"
    base.write_bytes(b"\0" * 65536)
    limits = {"cpus": 1.0, "vcpus": 1, "mem_mib": 256, "mem_max_mib": 256}
    live = {"mt-mine": ("agent-a", targets[0]), "mt-theirs": ("agent-b", targets[1])}
    for cid, (agent, target) in live.items():
        directory = record(workdir, cid, agent, state.RUNNING, boot, extra={"tap": target.tap, "limits": limits})
        qcow2.create_overlay(directory / "overlay.qcow2", base, "raw", size=2 * GIB)
        (run_dir / f"vmiso-{cid}.pid").write_text(str(target.pid))
        qemu(proc, target.pid, f"vmiso-{cid}")
    record(workdir, "mt-gone", "agent-a", state.RUNNING, boot)
    (run_dir / "vmiso-mt-gone.pid").write_text("4000000")  # no such process
    record(workdir, "mt-reused", "agent-b", state.RUNNING, boot)
    (run_dir / "vmiso-mt-reused.pid").write_text(str(targets[1].pid))  # the pid now belongs to another VM
    record(workdir, "mt-starting", "agent-a", state.LAUNCHING, boot)
    record(workdir, "mt-stopping", "agent-b", state.DESTROYING, boot, remove_requested=True)
    record(workdir, "mt-ended", "agent-a", state.TERMINATED, boot,
           termination={"state": "FINISHED", "reason": "guest-exited", "exit_code": 0})
    record(workdir, "mt-rebooted", "agent-b", state.RUNNING, "another-boot")
    (workdir / "containers" / "mt-corrupt").mkdir()
    (workdir / "containers" / "mt-corrupt" / "checkpoint.json").write_bytes(b'{"version": 1, "contai')
    record(workdir, "mt-odd", "agent-a", state.RUNNING, boot, extra={"tap": 7})  # another version's?
    (run_dir / "vmiso-mt-odd.pid").write_text(str(targets[2].pid))
    qemu(proc, targets[2].pid, "vmiso-mt-odd")
    (workdir / "containers" / "mt-unrecorded").mkdir()
    # A dead writer's temp file: recover() would remove it.
    (workdir / "containers" / "mt-mine" / ".checkpoint.json.999999999.0a0b0c0d").write_bytes(b"{")
    return workdir, run_dir, proc


@pytest.fixture
def observer(host):
    workdir, run_dir, proc = host
    obs = Observer(workdir, run_dir=str(run_dir), proc=proc)
    yield obs
    obs.close()


@pytest.fixture
def serve():
    """serve(app or observer, **bounds) -> a running MetricsServer on 127.0.0.1 (stopped after)."""
    servers = []

    def start(app, **bounds):
        if isinstance(app, Observer):
            app = exporter.app(app)
        server = exporter.MetricsServer("127.0.0.1", 0, app, **bounds)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        servers.append((server, thread))
        return server

    yield start
    for server, thread in servers:
        server.shutdown()
        thread.join(timeout=30)
        server.close()


def scrape(server, headers=None, timeout=10):
    conn = http.client.HTTPConnection(*server.server_address, timeout=timeout)
    try:
        conn.request("GET", "/metrics", headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def listing(*roots):
    """Every path under ``roots`` (and the roots) with its type, size, mtime and inode."""
    found = {}
    for root in roots:
        for directory, _, files in os.walk(root):
            for path in [directory] + [os.path.join(directory, name) for name in files]:
                st = os.lstat(path)
                found[path] = (st.st_mode, st.st_size, st.st_mtime_ns, st.st_ino)
    return found


def test_observer_reads_every_agents_running_containers_and_nothing_else(observer):
    seen = observer.observe()
    assert sorted(seen.stats) == ["mt-mine", "mt-theirs"]
    assert sorted(seen.errors) == ["mt-corrupt", "mt-odd"] and "JSON" in str(seen.errors["mt-corrupt"])
    assert "malformed" in str(seen.errors["mt-odd"])
    assert seen.owners["mt-mine"] == "agent-a" and seen.owners["mt-theirs"] == "agent-b"
    assert seen.owners["mt-ended"] == "agent-a"  # read, not running: no series
    mine, v = seen.stats["mt-mine"], tree.values(0)
    assert mine.cpus_user_time_secs == v["user"] / 1e6
    assert mine.net_rx_bytes == v["tb"]  # the tap's TX is the guest's RX
    assert mine.cpus_limit == v["quota"] / v["period"]
    assert mine.disk_limit_bytes == 2 * GIB
    assert seen.stats["mt-theirs"].threads == tree.values(1)["threads"]
    assert sorted(observer.observe(["mt-theirs", "mt-ended"]).stats) == ["mt-theirs"]


def test_no_work_dir_is_no_container_and_an_unlistable_one_an_error(tmp_path):
    with closing(Observer(tmp_path / "none")) as obs:
        assert obs.observe() == Observation() and not (tmp_path / "none").exists()
    (tmp_path / "containers").write_text("")  # a file where the directory should be
    with closing(Observer(tmp_path)) as obs, \
            pytest.raises(HostError, match="cannot list containers in .*containers: Not a directory"):
        obs.observe()


def test_a_scrape_changes_no_file_under_the_work_dir(host, observer, serve):
    workdir, run_dir, _ = host
    before = listing(workdir, run_dir)
    server = serve(observer)
    for _ in range(3):
        status, _, body = scrape(server)
        assert status == 200 and b'container_id="mt-mine"' in body
    observer.observe()
    assert listing(workdir, run_dir) == before


def cli(*args, workdir):
    return subprocess.run([sys.executable, "-m", "vmiso", "--workdir", str(workdir), *args],
                          capture_output=True, text=True, timeout=60)


def test_the_metrics_command_changes_no_file_and_never_recovers(host):
    """Through the real CLI (the host's own /run/libvirt/qemu and /proc: none of these VMs runs
    there). recover() would have concluded the "running" records and removed the temp file."""
    workdir, run_dir, _ = host
    before = listing(workdir, run_dir)
    printed = cli("metrics", workdir=workdir)
    assert printed.returncode == 0, printed.stderr
    families = {f.name: f for f in text_string_to_metric_families(printed.stdout)}
    assert families["vmiso_containers_unreadable"].samples[0].value == 1
    assert listing(workdir, run_dir) == before


@pytest.mark.skipif(os.geteuid() != 0, reason="`vmiso stats` reads the work dir in its own process for root "
                                              "only (an ordinary user's asks the agent: route_read_only)")
def test_the_stats_command_changes_no_file_and_never_recovers(host):
    """As the metrics command above."""
    workdir, run_dir, _ = host
    before = listing(workdir, run_dir)
    table = cli("stats", workdir=workdir)
    assert table.returncode == 0, table.stderr
    assert table.stdout.startswith("CONTAINER") and re.search(r"^mt-corrupt +unavailable: ", table.stdout, re.M)
    as_json = cli("stats", "--json", workdir=workdir)
    assert as_json.returncode == 0 and as_json.stdout.strip() == "{}"
    assert listing(workdir, run_dir) == before


def test_the_exposition_parses_and_labels_each_series_with_its_owner(observer, serve):
    server = serve(observer)
    status, headers, body = scrape(server)
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    user = {s.labels["container_id"]: s for s in families["vmiso_container_cpus_user_time_secs"].samples}
    assert user["mt-mine"].labels == {"container_id": "mt-mine", "agent_id": "agent-a"}
    assert user["mt-theirs"].labels == {"container_id": "mt-theirs", "agent_id": "agent-b"}
    assert user["mt-mine"].name == "vmiso_container_cpus_user_time_secs_total"
    assert user["mt-mine"].value == tree.values(0)["user"] / 1e6
    assert set(user) == {"mt-mine", "mt-theirs"}
    assert families["vmiso_container_cpus_user_time_secs"].type == "counter"
    assert families["vmiso_container_mem_limit_bytes"].type == "gauge"
    assert set(exporter.METRICS) <= {name[len(exporter.PREFIX):] for name in families}
    running = {s.labels["agent_id"]: s.value for s in families["vmiso_containers_running"].samples}
    assert running == {"agent-a": 1, "agent-b": 1}
    assert families["vmiso_containers_unreadable"].samples[0].value == 2  # mt-corrupt, mt-odd
    # Prometheus asks for OpenMetrics: prometheus_client's negotiation answers it.
    status, headers, body = scrape(server, {"Accept": "application/openmetrics-text; version=1.0.0"})
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    parsed = {f.name: f for f in parse_openmetrics(body.decode())}
    assert {s.labels["agent_id"] for s in parsed["vmiso_container_mem_total_bytes"].samples} == {"agent-a", "agent-b"}


def idle_connections(server, n):
    conns = []
    for _ in range(n):
        conns.append(socket.create_connection(server.server_address, timeout=10))
    return conns


def test_idle_connections_neither_block_a_scrape_nor_take_threads(observer, serve):
    server = serve(observer)
    threads = threading.active_count()
    conns = idle_connections(server, 200)
    try:
        started = time.monotonic()
        status, _, body = scrape(server, timeout=10)
        assert status == 200 and b'agent_id="agent-b"' in body
        assert time.monotonic() - started < 10
        assert threading.active_count() <= threads + exporter.WORKERS
    finally:
        for conn in conns:
            conn.close()


def test_beyond_max_pending_the_oldest_silent_connection_makes_room(observer, serve):
    server = serve(observer, max_pending=8)
    conns = idle_connections(server, 40)
    try:
        status, _, _ = scrape(server)
        assert status == 200
        answers = [conn.recv(64) for conn in conns[:32]]  # each was evicted to make room
        assert all(a.startswith(b"HTTP/1.1 408") for a in answers)
    finally:
        for conn in conns:
            conn.close()


def test_a_client_that_never_finishes_its_request_is_closed(observer, serve):
    server = serve(observer, head_timeout=0.5)
    with socket.create_connection(server.server_address, timeout=10) as conn:
        conn.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        answer = b""
        while chunk := conn.recv(4096):  # until the server closes
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 408")


def test_requests_beyond_workers_and_queue_get_503(serve):
    release, entered = threading.Event(), threading.Semaphore(0)

    def slow_app(environ, start_response):
        entered.release()
        release.wait(30)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"done\n"]

    server = serve(slow_app, workers=1, queued=1)
    conns = idle_connections(server, 3)
    try:
        for conn in conns:
            conn.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            if conn is conns[0]:
                assert entered.acquire(timeout=10)  # the worker holds the first one
        assert conns[2].recv(64).startswith(b"HTTP/1.1 503")
        release.set()
        for conn in conns[:2]:
            assert b"200 OK" in conn.recv(4096)
    finally:
        release.set()
        for conn in conns:
            conn.close()


def test_a_client_that_stops_reading_frees_its_worker(serve):
    big, writing = b"x" * (64 << 20), threading.Event()  # far more than the sockets' buffers hold

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        if environ["PATH_INFO"] == "/big":
            writing.set()
            return [big]
        return [b"small\n"]

    server = serve(app, workers=1, queued=1, io_timeout=0.5)
    with socket.create_connection(server.server_address, timeout=10) as stuck:
        stuck.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")  # and never reads the answer
        assert writing.wait(10)
        conn = http.client.HTTPConnection(*server.server_address, timeout=30)
        conn.request("GET", "/small")
        response = conn.getresponse()
        assert (response.status, response.read()) == (200, b"small\n")
        conn.close()


@pytest.mark.parametrize("given,expected", [
    ([], None),
    (["--listen"], ("127.0.0.1", 9465)),
    (["--listen", ":9000"], ("127.0.0.1", 9000)),
    (["--listen", "[::1]:9000"], ("::1", 9000)),
    (["--listen", "0.0.0.0:9465"], ("0.0.0.0", 9465)),  # every interface only when asked for
])
def test_listen_address(given, expected):
    assert build_parser().parse_args(["metrics", *given]).listen == expected


def test_a_bad_listen_address_exits_125(tmp_path):
    proc = cli("metrics", "--listen", "localhost", workdir=tmp_path)
    assert proc.returncode == 125 and "HOST:PORT" in proc.stderr


def test_metrics_listen_serves_until_interrupted(host):
    workdir, _, _ = host
    proc = subprocess.Popen([sys.executable, "-m", "vmiso", "--workdir", str(workdir), "metrics", "--listen",
                             "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/metrics", line)
        assert match, (line, proc.stderr.read() if proc.poll() is not None else "")
        conn = http.client.HTTPConnection("127.0.0.1", int(match.group(1)), timeout=10)
        conn.request("GET", "/metrics")
        body = conn.getresponse().read().decode()
        conn.close()
        assert "vmiso_containers_unreadable 1.0" in body
    finally:
        proc.send_signal(2)
        assert proc.wait(timeout=30) == 130
        proc.stdout.close()
        proc.stderr.close()
