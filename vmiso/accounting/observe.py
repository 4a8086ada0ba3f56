"""Every running container's ResourceStatistics from records alone, for any agent, changing nothing.

This is what ``vmiso metrics`` and ``vmiso stats`` read, unlike ``Isolator.usage_all()``, which
answers for the containers one agent's Isolator has adopted. An exporter scraped every few seconds
must not act: recover() adopts, concludes and cleans containers, and run from a scrape it would do
so on behalf of whichever agent id the exporter was started with, to other agents' tasks as well.
So nothing here opens a libvirt connection, takes a lock file or writes a byte: it reads

- the checkpoints (``<workdir>/containers/<id>/checkpoint.json``, state.py), which name each
  container's domain, owner agent and phase;
- QEMU's pid from libvirt's pid file (``Host.pid``), and QEMU's command line, which must name that
  domain: a pid file left behind by a QEMU that died while libvirtd was down may name a pid that
  now belongs to something else, whose numbers must not be reported as the container's;
- the counters, through the Collector (usage.py) that ``usage_all()`` uses.

A record counts as running when its phase is not terminated, it was written in this boot, and a
QEMU process for its domain exists. Anything else (launching with no VM yet, terminated, a pid
that does not exist, a record from before a reboot) is simply not running and is left exactly as
it is, for its own agent's recover() to conclude. A checkpoint that cannot be parsed is reported
in ``errors``; a directory with no checkpoint yet (a launch between mkdir and its first record)
is not.
"""
import os
import re
import threading
from dataclasses import dataclass, field

from .. import state
from ..errors import HostError, VmisoError
from ..image import qcow2
from ..paths import DEFAULT_WORKDIR, OVERLAY, Workdir
from ..virt.host import Host
from .usage import Collector, Target

RUN_DIR = "/run/libvirt/qemu"  # where libvirt keeps a running domain's <name>.pid
# A checkpoint's domain name ends up in a path: a plain name only (no "/", no leading dot).
_DOMAIN_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,199}")


@dataclass
class Observation:
    """One read: ``stats`` {id: ResourceStatistics} of the running containers whose counters
    were read, ``owners`` {id: agent id} for every container in ``stats`` or in ``errors`` whose
    record was readable, ``errors`` {id: VmisoError} for records or counters that could not be
    read."""

    stats: dict = field(default_factory=dict)
    owners: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)


class Observer:
    """Reads usage for the containers of every agent under ``workdir``. Thread-safe (reads are
    serialised: the Collector is not). Keep one for repeated reads: the Collector keeps each
    VM's files open between them. ``run_dir`` and ``proc`` are libvirt's pid directory and the
    proc file system (tests point them at generated trees)."""

    def __init__(self, workdir=DEFAULT_WORKDIR, run_dir=RUN_DIR, proc="/proc", collector=None, boot_id=None):
        self.workdir = Workdir(workdir)
        self.run_dir = run_dir
        self.proc = proc
        self.collector = collector or Collector(proc=proc)
        self.boot_id = boot_id or state.boot_id()
        self._lock = threading.Lock()
        self._disk_sizes = {}  # (id, pid) -> the overlay's virtual size (read once per VM run)

    def close(self):
        with self._lock:
            self.collector.close()

    def observe(self, ids=None):
        """An Observation of every running container (only those in ``ids``, when given)."""
        result = Observation()
        with self._lock:
            targets = []
            for cid in self._ids(ids):
                try:
                    target, owner = self._target(cid)
                except VmisoError as err:
                    result.errors[cid] = err
                    continue
                if owner is not None:
                    result.owners[cid] = owner
                if target is not None:
                    targets.append(target)
            if ids is None:
                live = {(t.key, t.pid) for t in targets}
                self._disk_sizes = {k: v for k, v in self._disk_sizes.items() if k in live}
            stats, failed = self.collector.read(targets, prune=ids is None)
        result.stats.update(stats)
        result.errors.update(failed)
        return result

    def _ids(self, ids):
        try:
            found = self.workdir.container_ids()  # [] when there is no containers/ yet
        except OSError as err:
            hint = " (the work directory is root-only: run as root)" if isinstance(err, PermissionError) else ""
            raise HostError(f"cannot list containers in {self.workdir.containers}: {err.strerror}{hint}") from err
        if ids is None:
            return found
        wanted = set(ids)
        return [cid for cid in found if cid in wanted]

    def _target(self, cid):
        """(Target, or None when not running; the owner agent id, or None when there is no
        record yet)."""
        directory = self.workdir.container_dir(cid)
        try:
            checkpoint = state.read(directory)
        except state.CheckpointError as err:
            if isinstance(err.__cause__, FileNotFoundError):
                return None, None  # a launch before its first record, or a removal under way
            raise  # reported; cleaning it up is its agent's recover()'s business
        owner = checkpoint.agent_id
        if not isinstance(owner, str):
            raise state.CheckpointError(f"checkpoint of {cid} names agent {owner!r}, not a string")
        if checkpoint.phase == state.TERMINATED or checkpoint.boot_id != self.boot_id:
            return None, owner
        domain = checkpoint.domain
        if not isinstance(domain, str) or not _DOMAIN_RE.fullmatch(domain):
            raise state.CheckpointError(f"checkpoint of {cid} names domain {domain!r}, not a plain name")
        pid = Host.pid(domain, self.run_dir)
        if pid is None or not self._is_qemu_of(pid, domain):
            return None, owner
        tap, cpus = _usage_fields(cid, checkpoint.extra)
        overlay = os.path.join(directory, OVERLAY)
        return Target(key=cid, pid=pid, overlay=overlay, tap=tap, cpus=cpus,
                      disk_limit=self._disk_size(cid, pid, overlay)), owner

    def _is_qemu_of(self, pid, domain):
        """Whether process ``pid`` is the QEMU libvirt started for ``domain`` (its
        ``-name guest=<domain>,...``); False when there is no such process."""
        try:
            with open(f"{self.proc}/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            return False
        want = domain.encode()
        for flag, value in zip(argv, argv[1:]):
            if flag == b"-name":
                name = value.split(b",", 1)[0]
                return name in (want, b"guest=" + want)
        return False

    def _disk_size(self, cid, pid, overlay):
        """The overlay's virtual size, read once per QEMU process (it changes only when the VM
        is started again)."""
        key = (cid, pid)
        if key not in self._disk_sizes:
            try:
                self._disk_sizes[key] = qcow2.inspect(overlay).virtual_size
            except VmisoError:
                self._disk_sizes[key] = None
        return self._disk_sizes[key]


def _usage_fields(cid, extra):
    """(tap, cpus) from a checkpoint's ``extra``, checked: one odd record (another version's,
    a hand-edited one) is that container's error, not the whole read's."""
    limits = extra.get("limits") or {} if isinstance(extra, dict) else None
    if isinstance(limits, dict):
        tap, cpus = extra.get("tap"), limits.get("cpus")
        if (tap is None or isinstance(tap, str)) and \
                (cpus is None or isinstance(cpus, (int, float)) and not isinstance(cpus, bool)):
            return tap, cpus
    raise state.CheckpointError(f"checkpoint of {cid} has malformed extra fields (tap, limits)")
