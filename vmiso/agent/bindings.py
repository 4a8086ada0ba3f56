"""What outlives a request: which containers belong to a Slurm job, and which attached client
(``vmiso run`` without ``-d``) each one has. The agent's reaper removes a container when its job
has ended, and collects an attached run whose client died (SIGKILL) once its task has ended.

One JSON file per bound container in ``<workdir>/agent-bindings/`` (root-only, like the work
dir), so an agent started after a crash keeps collecting what the last one bound:

    {"job": {"id": "123", "dirs": [JOB CGROUP DIRS]} | null,
     "client": {"pid": PID, "start": START TIME} | null}

A client is named by its pid and its start time (/proc/<pid>/stat), which no later process of the
same pid shares. Nothing here starts or stops a VM: the server's reaper does, through the
Isolator, under the container's lock.
"""
import json
import logging
import os
import threading
import time

from ..paths import Workdir
from ..spec import CONTAINER_ID_RE
from . import jobs

log = logging.getLogger(__name__)



class Bindings:
    """The bindings of work dir ``workdir`` (None: kept in memory only, for tests)."""

    def __init__(self, workdir):
        self.directory = None if workdir is None else str(Workdir.of(workdir).agent_bindings)
        self._lock = threading.Lock()
        self._items = {}           # container id -> record
        self._ended_alone = {}     # container id -> monotonic time its abandoned task was first seen ended

    def load(self):
        if self.directory is None:
            return self
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        for name in os.listdir(self.directory):
            if not (name.endswith(".json") and CONTAINER_ID_RE.fullmatch(name[:-5])):
                continue
            try:
                with open(os.path.join(self.directory, name)) as f:
                    record = json.load(f)
            except (OSError, ValueError) as err:
                log.warning("binding %s unreadable (%s): dropped", name, err)
                self._unlink(name[:-5])
                continue
            self._items[name[:-5]] = record
        return self

    def bind(self, container_id, job=None, client_pid=None):
        """Record ``container_id``'s job (jobs.Job) and attached client's pid (None: -d)."""
        record = {"job": None if job is None else {"id": job.job_id, "dirs": list(job.job_dirs)},
                  "client": None}
        if client_pid is not None:
            start = jobs.process_start(client_pid)
            if start is not None:
                record["client"] = {"pid": client_pid, "start": start}
        if record["job"] is None and record["client"] is None:
            return
        if self.directory is not None:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            path = os.path.join(self.directory, container_id + ".json")
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(record, f)
            os.replace(tmp, path)
        with self._lock:
            self._items[container_id] = record
            self._ended_alone.pop(container_id, None)

    def drop(self, container_id):
        with self._lock:
            self._items.pop(container_id, None)
            self._ended_alone.pop(container_id, None)
        self._unlink(container_id)

    def _unlink(self, container_id):
        if self.directory is None:
            return
        try:
            os.unlink(os.path.join(self.directory, container_id + ".json"))
        except FileNotFoundError:
            pass

    def items(self):
        with self._lock:
            return dict(self._items)

    def of_job(self, job_id):
        return sorted(cid for cid, r in self.items().items() if r["job"] and r["job"]["id"] == str(job_id))

    @staticmethod
    def job_ended(record):
        dirs = record["job"]["dirs"] if record.get("job") else []
        return bool(dirs) and not any(os.path.isdir(d) for d in dirs)

    @staticmethod
    def client_gone(record):
        client = record.get("client")
        return client is not None and jobs.process_start(client["pid"]) != client["start"]

    def abandoned_for(self, container_id, ended, now):
        """Seconds since the task of abandoned ``container_id`` was first seen ended (0 at first)."""
        with self._lock:
            if not ended:
                self._ended_alone.pop(container_id, None)
                return None
            since = self._ended_alone.setdefault(container_id, now)
        return now - since


def reap(agent, bindings, keep_abandoned, now=None):
    """One pass: remove the containers of ended jobs, and abandoned attached runs whose task
    ended ``keep_abandoned`` seconds ago or more (their owner may still wait for them, read their
    logs or remove them meanwhile). Returns {container id: why} of what it removed."""
    from ..errors import NotFound, VmisoError

    now = time.monotonic() if now is None else now
    removed = {}
    for cid, record in bindings.items().items():
        try:
            status = agent.iso.status(cid)
        except NotFound:
            bindings.drop(cid)  # removed by its owner or by gc
            continue
        except VmisoError:
            continue
        why = None
        if bindings.job_ended(record):
            why = f"Slurm job {record['job']['id']} ended"
        elif bindings.client_gone(record):
            waited = bindings.abandoned_for(cid, status.termination is not None, now)
            if waited is not None and waited >= keep_abandoned:
                why = "its vmiso run is gone and its task ended"
        if why is None:
            continue
        try:
            with agent.id_lock(cid):
                agent.iso.destroy(cid, grace=0)
        except VmisoError as err:
            log.warning("cannot remove %s (%s): %s", cid, why, err)
            continue
        bindings.drop(cid)
        removed[cid] = why
        log.info("removed %s: %s", cid, why)
    return removed
