"""The Isolator: the Mesos-containerizer-shaped facade an agent calls.

It owns the public calls and what they promise: a launch is validated here (spec, uid, volumes,
stdin, image, network plan) before anything is made, then handed to a warm VM (warm.py) or a
cold boot (cold.py), each with its own rollback; kill and destroy are ordered here; supervision
(the container table, how an end is learned, recorded and cleaned up) is the Supervisor's
(supervisor.py), recovery after a restart recovery.py's, usage and live limits accounting/'s.
It makes no libvirt or netlink call of its own (virt/ and net/ do). The truth about a container
is derived from its checkpoint, libvirt's live domains and the task channel, so any process
(the agent after a restart, another ``vmiso`` command) sees the same thing.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Optional

from . import admission, cold, faults, state, taskrun
from .accounting import live as accounting
from .errors import AlreadyExists, InvalidSpec, NotFound, Timeout
from .image.resolve import resolve
from .paths import (
    CONSOLE_LOG,
    CONTROL_SOCKET,
    DEFAULT_WORKDIR,
    STDERR,
    STDOUT,
    Workdir,
    qemu_gid,
)
from .spec import (
    R_DESTROYED,
    ContainerStatus,
    TaskSpec,
    Termination,
    validate_container_id,
)
from .supervisor import Supervisor
from .virt import accel as accel_mod
from .virt import channel, cpuprobe, volumes
from .virt import stdin as stdin_channel
from .virt.host import DEFAULT_URI, Host

if TYPE_CHECKING:
    from collections.abc import Iterator

    from .accounting.limits import DiskLimits
    from .errors import StatsError
    from .recovery import RecoveryReport
    from .spec import RateLimit, Resources, ResourceStatistics

log = logging.getLogger(__name__)

RECONCILE_EVERY = 5.0  # events are hints: wait() re-checks libvirt this often
TIMEOUT_GRACE = 5.0  # at TaskSpec.timeout the task gets its stop signal, and this long before a hard stop


class Isolator:
    """Runs tasks in VMs. Thread-safe; one per agent process.

    ``agent_id`` is written into each container's checkpoint and its domain's metadata. A
    container of another agent id (two agents sharing a work dir, or an agent and the ``vmiso``
    CLI) is read-only here in every path: status, wait, output and usage read it; kill, destroy,
    update raise NotOwned; recover() and adoption never conclude, clean or watch it.
    """

    def __init__(self, workdir=DEFAULT_WORKDIR, uri=DEFAULT_URI, accel="auto", agent_id="vmiso",
                 cpu_probe=None, disk_reserve=None, disk_overcommit=admission.DEFAULT_OVERCOMMIT,
                 image_paths=True, volume_roots=None, host=None, pool=None):
        """``disk_reserve`` (bytes kept free on the work dir's file system) and
        ``disk_overcommit`` (how far thin disks may promise more than is free) are the disk
        admission policy (vmiso/admission.py); a launch that does not fit raises NoDiskSpace.
        ``image_paths=False`` makes TaskSpec.image accept only micro and stored images (names
        or ids), never a path on the host: for an agent whose specs come from tenants.
        ``volume_roots``: directories under which TaskSpec.volumes and sandboxes must lie
        (None: anywhere QEMU's user can reach; ``()``: no volumes at all). ``host``: the
        libvirt side (default: a virt.host.Host on ``uri``); tests pass a FakeHost. ``pool``: a
        vmiso.PoolConfig of warm VMs to keep booted (vmiso/pool.py; ``iso.pool.configure()``
        changes it later); launches that fit it take a ready VM instead of booting one."""
        self.image_paths = image_paths
        self.volume_roots = None if volume_roots is None else tuple(str(r) for r in volume_roots)
        self.disk_policy = admission.Policy(reserve=disk_reserve, overcommit=disk_overcommit)
        self.workdir = Workdir(workdir)
        # The seam: anything with Host's interface (vmiso.testing.fakehost.FakeHost in unit tests).
        self.host = Host(uri) if host is None else host
        self.accel = accel_mod.choose(accel)
        self._cpu_probe_wanted = cpuprobe.setting(cpu_probe)  # "quick" or "full" (virt/cpuprobe.py)
        self._cpu_probe = None
        self.agent_id = agent_id
        # The containers this Isolator supervises, and how each one's end is recorded and cleaned.
        self.supervisor = Supervisor(self.host, self.workdir, agent_id, stop=self._stop)
        self.host.on_reconnect = self.supervisor.reconcile_all
        self._accounting = None
        self._accounting_lock = threading.Lock()
        from .pool import Pool

        self.pool = Pool(self)
        if pool is not None:
            self.pool.configure(pool)

    # --- launch -----------------------------------------------------------------------------
    def launch(self, container_id: str, spec: TaskSpec, uid: Optional[int] = None) -> ContainerStatus:
        """Start ``spec`` in a new VM; return its ContainerStatus. LaunchFailed leaves nothing.
        ``uid``: the local user the container belongs to (an agent's caller): its QEMU runs as
        that uid with QEMU's group instead of as QEMU's user, its volumes must be that user's to
        use, its image must be micro or a stored one (never a host path), and its status names
        it. None (or 0): QEMU's own user, as for every container of the operator."""
        started = time.monotonic()
        validate_container_id(container_id)
        self.workdir.check_socket_path(self.workdir.container_dir(container_id), "container_id")
        if not isinstance(spec, TaskSpec):
            raise InvalidSpec("spec", "must be a vmiso.TaskSpec")
        uid = _local_uid(uid)
        # Host directories and the stdin source are checked before anything is made.
        shares = volumes.prepare(spec.volumes, self.workdir.root, self.volume_roots, uid=uid)
        stdin_channel.check_source(spec.stdin)
        self.workdir.ensure()
        image = resolve(self.workdir, spec.image, spec.image_format, allow_paths=self.image_paths and uid is None)
        task = taskrun.plan(spec, image)  # argv, env, workdir, user: what the guest runs
        resolved = time.monotonic()
        size = spec.resources.disk_bytes
        if size is not None and size < image.virtual_size:
            raise InvalidSpec("disk_gib", f"{spec.resources.disk_gib} GiB is smaller than the image "
                                          f"({image.virtual_size / 1024**3:.2f} GiB)")
        if spec.network is not None:  # a bridge, address or MAC the operator's plan refuses: before anything is made
            from .net import port

            port.check(self.workdir.root, container_id, spec.network)
        if self.pool.config is not None and task.user is None and self.pool.fits(spec, image, uid):
            if self.supervisor.supervises(container_id):
                raise AlreadyExists("container", container_id)
            slot = self.pool.take()
            if slot is not None:
                from . import warm

                return warm.launch(self, container_id, spec, image, task, slot, started, resolved)
        return cold.launch(self, container_id, spec, image, task, uid, shares, started, resolved)

    def timeline(self, container_id: str) -> dict[str, float]:
        """When each named step of this container's launch completed, and when its VM exited,
        its status was known, libvirt reported it stopped, ... (time.monotonic()); also for a
        container this Isolator destroyed lately."""
        validate_container_id(container_id)
        ended = self.supervisor.ended_timeline(container_id)
        if ended is not None:
            return ended
        return dict(self.supervisor.get(container_id).timeline)

    def cpu_probe(self) -> cpuprobe.CpuProbe:
        """How libvirt reads each new guest's CPU on this host (virt/cpuprobe.py); asked once."""
        if self._cpu_probe is None:
            libvirt_version, qemu_version = self.host.versions()
            self._cpu_probe = cpuprobe.choose(libvirt_version, qemu_version, wanted=self._cpu_probe_wanted)
        return self._cpu_probe

    def _stop(self, container_id, reason):
        """The Supervisor's way to stop a task: at its deadline, or when a disk error paused it."""
        self.kill(container_id, grace=TIMEOUT_GRACE, reason=reason)

    # --- the API ----------------------------------------------------------------------------
    def wait(self, container_id: str, timeout: Optional[float] = None) -> Termination:
        """Block until the container ends; return its Termination. Timeout if ``timeout`` passes."""
        validate_container_id(container_id)
        termination = self.supervisor.ended(container_id)
        if termination is not None:
            return termination
        c = self.supervisor.get(container_id)
        if c.foreign:
            return self._wait_foreign(c, timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with c.cond:
                if c.termination is not None:
                    return c.termination
                left = RECONCILE_EVERY if deadline is None else min(RECONCILE_EVERY, deadline - time.monotonic())
                if left <= 0:
                    raise Timeout(f"container {container_id} still running after {timeout} s")
                c.cond.wait(left)
                if c.termination is not None:
                    return c.termination
            self.supervisor.reconcile(c)

    def _wait_foreign(self, c, timeout):
        """wait() for another agent's container: its owner records the termination in the
        checkpoint; read it as it changes, touching nothing."""
        deadline = None if timeout is None else time.monotonic() + timeout
        watcher = channel.Inotify([c.dir])
        try:
            while True:
                termination = _recorded_termination(c.dir)
                if termination is not None:
                    return termination
                if not os.path.isdir(c.dir):
                    raise NotFound("container", c.id)  # removed by its owner
                left = RECONCILE_EVERY if deadline is None else min(RECONCILE_EVERY, deadline - time.monotonic())
                if left <= 0:
                    raise Timeout(f"container {c.id} still running after {timeout} s")
                watcher.wait(left)
        finally:
            watcher.close()

    def kill(self, container_id: str, grace: float = 5.0, reason: str = R_DESTROYED) -> Termination:
        """Stop the VM: the task's stop signal (SIGTERM unless its spec or image named another)
        through the task channel (the ACPI power button for a VM without one), ``grace``
        seconds for it to end, then destroy. Keeps the record (wait, status, logs still
        answer); returns the Termination. NotOwned for another agent's container."""
        c = self.supervisor.own(container_id)
        with c.op:
            if c.removed:
                raise NotFound("container", container_id)
            return self._kill_locked(c, grace, reason)

    def _kill_locked(self, c, grace, reason, remove=False):
        if c.termination is not None:
            return c.termination
        with c.cond:
            c.checkpoint.kill_reason = c.checkpoint.kill_reason or reason
            c.checkpoint.phase = state.DESTROYING
            c.checkpoint.remove_requested = c.checkpoint.remove_requested or remove
            state.write(c.dir, c.checkpoint)
        faults.hit("destroy:kill")
        dom = self.host.lookup(c.domain)
        if dom is not None and grace > 0:
            # Within the grace: a guest that takes no input costs at most a second of it.
            if not channel.request_stop(c.path(CONTROL_SOCKET), c.checkpoint.nonce, timeout=min(1.0, grace),
                                        signal=c.stop_signal):
                self.host.shutdown(dom)  # launched without the socket: the guest's power button
            try:
                return self.wait(c.id, timeout=grace)
            except Timeout:
                pass
        if dom is not None:
            self.host.destroy(dom)
        faults.hit("destroy:stopped")
        return self.wait(c.id)

    def destroy(self, container_id: str, grace: float = 5.0) -> Optional[Termination]:
        """Kill the VM if it runs, then remove everything of the container. Idempotent: an
        unknown or already destroyed id is no error. Returns the Termination (or None)."""
        validate_container_id(container_id)
        try:
            c = self.supervisor.own(container_id)
        except NotFound:
            if os.path.islink(self.workdir.container_dir(container_id)):
                self.workdir.remove_container_dir(container_id)  # unlinks it; never its target
            return self.supervisor.ended(container_id)
        with c.op:
            if c.removed:
                return self.supervisor.ended(container_id)
            termination = self._kill_locked(c, grace, R_DESTROYED, remove=True)
            self.supervisor.await_release(c)
            faults.hit("destroy:cleanup")
            self.supervisor.remove(c, termination)
        return termination

    def status(self, container_id: str) -> ContainerStatus:
        c = self.supervisor.get(container_id)
        cp = c.checkpoint
        if c.termination is not None:
            state_name = c.termination.state
        elif cp.phase == state.LAUNCHING:
            state_name = "LAUNCHING"
        else:
            state_name = "PAUSED" if c.paused else "RUNNING"
        return ContainerStatus(
            container_id=c.id, state=state_name, domain=cp.domain, accel=cp.accel,
            pid=Host.pid(cp.domain) if c.termination is None else None, started_at=cp.created_at,
            termination=c.termination, image=cp.image,
            ip=cp.extra.get("ip"), mac=cp.extra.get("mac"), owner=c.owner, uid=cp.extra.get("uid"),
            cpus=cp.extra.get("limits", {}).get("cpus"), mem_mib=cp.extra.get("limits", {}).get("mem_mib"),
        )

    def containers(self) -> list[str]:
        """Ids of every container with a record in the work directory (running or ended)."""
        return self.workdir.container_ids()

    def recover(self, strict: bool = False) -> RecoveryReport:
        """Bring every container of this agent back under supervision after a restart: adopt
        running VMs, conclude the ones that ended while nobody watched, fail and clean
        interrupted launches, finish interrupted destroys, destroy orphan domains that carry this
        agent's ownership metadata (never anyone else's). A corrupt checkpoint raises
        CheckpointError when ``strict``, is counted and cleaned otherwise. Idempotent.
        Returns a RecoveryReport."""
        from .recovery import recover

        return recover(self, strict=strict)

    def output(self, container_id: str, follow: bool = True) -> Iterator[tuple[str, bytes]]:
        """Yield ("stdout"|"stderr", bytes) as the task writes them, until it has ended and
        everything is read (``follow=False``: only what is there now). The exit line is not part
        of the output."""
        c = self.supervisor.get(container_id)
        names = ("stdout", "stderr")
        exit_filter = channel.ExitLineFilter(c.checkpoint.nonce)
        if c.foreign:  # its owner records the end; a removed directory is an end too
            def ended():
                return _recorded_termination(c.dir) is not None or not os.path.isdir(c.dir)
        else:
            def ended():
                return c.termination is not None
        wakeup = channel.Wakeup()
        with c.cond:
            c.wakeups.add(wakeup)
        try:
            for index, data in channel.follow([c.path(STDOUT), c.path(STDERR)],
                                              finished=lambda: not follow or ended(), wakeup=wakeup):
                if index == 0:
                    data = exit_filter.feed(data)
                if data:
                    yield names[index], data
        finally:
            with c.cond:
                c.wakeups.discard(wakeup)
            wakeup.close()
        rest = exit_filter.close()
        if rest:
            yield "stdout", rest

    def console_log(self, container_id: str) -> str:
        """The path of the container's boot console log."""
        return self.supervisor.get(container_id).path(CONSOLE_LOG)

    # --- usage and live limits (vmiso/accounting/) -------------------------------------------
    @property
    def accounting(self) -> accounting.Accounting:
        """The usage reader and live limits (accounting/live.py), made at first use."""
        with self._accounting_lock:
            if self._accounting is None:
                self._accounting = accounting.Accounting(self)
            return self._accounting

    def usage(self, container_id: str) -> ResourceStatistics:
        """ResourceStatistics of a running container (StatsError if its VM is gone)."""
        return self.accounting.usage(container_id)

    def usage_all(self, errors: Optional[dict[str, StatsError]] = None) -> dict[str, ResourceStatistics]:
        """{id: ResourceStatistics} of every running container this Isolator supervises (recover()
        adopts the others), in one batch read. A VM that could not be read is left out; pass a
        dict as ``errors`` to get {id: StatsError} of those."""
        return self.accounting.usage_all(errors)

    def update(self, container_id: str, resources: Resources, disk: Optional[DiskLimits] = None,
               inbound: Optional[RateLimit] = None, outbound: Optional[RateLimit] = None) -> None:
        """Change a running container's limits live: CPU quota and shares (``resources.cpus``, at
        most its vCPUs), guest memory through the balloon (``resources.mem_mib``, at most what it
        was launched with) with the cgroup's hard limit following it, QEMU's overhead included;
        ``disk`` (accounting.limits.DiskLimits) throttles its disk, ``inbound``/``outbound``
        (spec.RateLimit) its network. ``resources.disk_gib`` cannot change live and is ignored."""
        return self.accounting.update(container_id, resources, disk=disk, inbound=inbound, outbound=outbound)


def _local_uid(uid):
    """launch()'s ``uid``: None for the operator's (root's) containers, else a user's uid."""
    if uid is None or uid == 0:
        return None  # QEMU never runs as root
    if isinstance(uid, bool) or not isinstance(uid, int) or not 0 < uid < 2**32 - 1:
        raise InvalidSpec("uid", f"{uid!r} is not a user id")
    if qemu_gid() is None:
        raise InvalidSpec("uid", "this host has no QEMU user (libvirt-qemu or qemu) whose group a user's QEMU needs")
    return uid


def _recorded_termination(directory):
    """The Termination a container's checkpoint records, or None (none yet, or unreadable)."""
    try:
        recorded = state.read(directory).termination
    except state.CheckpointError:
        return None
    return Termination.from_dict(recorded) if recorded else None
