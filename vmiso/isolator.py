"""The Isolator: the Mesos-containerizer-shaped facade an agent calls.

It orchestrates (validate, image, overlay, seed, domain, checkpoint) and owns the rollback order;
it makes no libvirt or netlink call of its own (virt/ and net/ do). Every step that creates
something has an undo, and a failed launch undoes what it did. The truth about a container is
derived from its checkpoint, libvirt's live domains and the task channel, so any process (the
agent after a restart, another ``vmiso`` command) sees the same thing.
"""
from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from typing import TYPE_CHECKING, Optional

from . import admission, faults, state, taskrun
from .accounting import live as accounting
from .container import LAUNCH_LOCK, Container, decide_termination, guest_hostname, hold_launch_lock, new_uuid
from .errors import AlreadyExists, InvalidSpec, LaunchFailed, NotFound, NotOwned, Timeout, VmisoError
from .image import qcow2, seed
from .image.resolve import resolve
from .paths import (
    CONSOLE_LOG,
    CONTROL_SOCKET,
    DEFAULT_WORKDIR,
    INITRD,
    KERNEL,
    OVERLAY,
    SEED,
    STDERR,
    STDIN_SOCKET,
    STDOUT,
    Workdir,
    qemu_gid,
)
from .spec import (
    R_DESTROYED,
    R_IO_ERROR,
    R_TIMEOUT,
    ContainerStatus,
    TaskSpec,
    Termination,
    validate_container_id,
)
from .virt import accel as accel_mod
from .virt import channel, cpuprobe, domain, volumes
from .virt import stdin as stdin_channel
from .virt.host import DEFAULT_URI, Host

if TYPE_CHECKING:
    from collections.abc import Iterator

    from .accounting.limits import DiskLimits
    from .errors import StatsError
    from .recovery import RecoveryReport
    from .spec import RateLimit, Resources, ResourceStatistics

log = logging.getLogger(__name__)

DOMAIN_PREFIX = "vmiso-"
RECONCILE_EVERY = 5.0  # events are hints: wait() re-checks libvirt this often
EXIT_LINE_GRACE = 2.0  # seconds virtlogd may lag behind the stop event when writing the exit line
ENDED_TIMELINES = 64  # destroyed containers whose timeline() still answers
RELEASE_WAIT = 30.0  # destroy() after QEMU exited: how long libvirt's teardown may take before a destroy
RELEASE_RECHECK = 1.0  # ... and how often libvirt is asked meanwhile (its stopped event may be lost)
TIMEOUT_GRACE = 5.0  # at TaskSpec.timeout the task gets SIGTERM, and this long before a hard stop


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
        self.host.on_reconnect = self._reconcile_all
        self._containers = {}
        self._ended = {}  # destroyed containers' terminations, so wait() after destroy() answers
        self._ended_timelines = {}  # the last ENDED_TIMELINES destroyed containers' timelines (bench)
        self._lock = threading.RLock()
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
            with self._lock:
                if container_id in self._containers:
                    raise AlreadyExists("container", container_id)
            slot = self.pool.take()
            if slot is not None:
                from . import warm

                return warm.launch(self, container_id, spec, image, task, slot, started, resolved)
        with self._lock:
            if container_id in self._containers:
                raise AlreadyExists("container", container_id)
            disk_bytes = size or image.virtual_size
            admission.check(self.workdir.containers, self._disks_in_use(), disk_bytes, self.disk_policy)
            try:
                directory = str(self.workdir.make_container_dir(container_id, qemu_uid=uid))
            except FileExistsError as err:
                raise AlreadyExists("container", container_id) from err
            except OSError as err:  # ENOSPC, EACCES...: nothing was made
                raise LaunchFailed(container_id, "dir", err) from err
            try:
                lock_fd = hold_launch_lock(directory)
            except OSError as err:
                self.workdir.remove_container_dir(container_id)
                raise LaunchFailed(container_id, "dir", err) from err
            checkpoint = state.Checkpoint(
                container_id=container_id, agent_id=self.agent_id, domain=DOMAIN_PREFIX + container_id,
                nonce=secrets.token_hex(16), boot_id=state.boot_id(), accel=self.accel.name,
                image=image.name, base=image.base, created_at=time.time(),
                deadline=time.time() + spec.timeout if spec.timeout else None,
            )
            checkpoint.extra["limits"] = accounting.limits_record(spec.resources)
            checkpoint.extra["disk_bytes"] = disk_bytes
            if shares:
                checkpoint.extra["volumes"] = [s.record() for s in shares]
            if spec.stdin is not None:
                checkpoint.extra["stdin"] = True
            if uid is not None:
                checkpoint.extra["uid"] = uid
            c = Container(container_id, directory, checkpoint)
            c.timeline.update({"launch:start": started, "launch:image": resolved})
            c.op.acquire()  # a kill or destroy racing this launch waits until it is done
            self._containers[container_id] = c
        step = "dir"
        created = None
        listener = None  # the stdin socket QEMU connects to (virt/stdin.py)
        try:
            self._step(c, "launch:dir")
            step = "checkpoint"
            # Not fsynced (most of the host preparation's time, docs/performance.md): a crashed process leaves it
            # in the page cache; after power loss no VM is left to find. RUNNING fsyncs both.
            state.write(directory, checkpoint, durable=False)
            self._step(c, "launch:checkpoint")
            step = "overlay"
            qcow2.create_overlay_on_verified(c.path(OVERLAY), image.base, image.base_format,
                                             disk_bytes)
            self._step(c, "launch:overlay")
            if uid is not None:
                image = _own_kernel(c, image)
            network_config = None
            if spec.network is not None:
                step = "network"  # address and MAC first: the seed carries them to the guest
                network_config = self._plan_network(c, spec.network)
            step = "seed"
            hostname = guest_hostname(container_id)
            oci = None
            if task.user is not None:
                address = c.checkpoint.extra["ip"].split("/")[0] if "ip" in c.checkpoint.extra else None
                uid_in_image, gid_in_image, groups_in_image = task.user
                dns = (network_config or {}).get("ethernets", {}).get("eth0", {}).get("nameservers", {})
                oci = seed.oci_line(uid_in_image, gid_in_image, groups_in_image, hostname, address,
                                    dns.get("addresses", ()))
            files = seed.seed_files(instance_id=new_uuid(), hostname=hostname,
                                    argv=task.argv, env=task.env, nonce=checkpoint.nonce,
                                    data_files=_data_files(shares, spec),
                                    workdir=task.workdir, network_config=network_config, oci=oci)
            seed.write_seed(c.path(SEED), files)
            self._step(c, "launch:seed")
            if spec.network is not None:
                step = "network"  # tap, filters, limits: in place before the guest's first frame
                from .net import port

                port.wire(self.workdir.root, c.checkpoint.extra, spec.network)
                self._step(c, "launch:network")
            if spec.stdin is not None:
                step = "stdin"  # listening before QEMU starts: it connects while it starts
                listener = stdin_channel.listen(c.path(STDIN_SOCKET), uid)
                self._step(c, "launch:stdin")
            step = "xml"
            xml = self._domain_xml(c, spec, image)
            c.timeline["launch:xml"] = time.monotonic()  # host preparation ends here
            step = "create"
            self.host.watch(c.domain, lambda event, detail: self._on_lifecycle(c, event, detail))
            dom = self.host.create(xml)
            created = dom  # rollback destroys this domain only: never one looked up by name
            # Not in the XML: libvirt would also raise QEMU's RLIMIT_MEMLOCK to it (refused here).
            self.host.set_memory_hard_limit(dom, accounting.hard_limit(spec.resources, checkpoint.accel))
            self.host.watch_exit(c.domain, lambda: self._on_exit(c))
            self._step(c, "launch:create")
            step = "running"
            checkpoint.phase = state.RUNNING
            state.write(directory, checkpoint)
            self._step(c, "launch:running")
        except BaseException as err:
            self._undo_launch(c, created)
            if listener is not None:
                listener.close()
            os.close(lock_fd)
            c.op.release()
            if isinstance(err, (KeyboardInterrupt, SystemExit)):
                raise
            raise LaunchFailed(container_id, step, err) from err
        self._launched(c, lock_fd)
        if listener is not None:
            stdin_channel.feed(listener, spec.stdin, c.timeline)
        return self.status(container_id)

    def _launched(self, c, lock_fd):
        """A launch (cold or warm) succeeded: free its lock, let kill/destroy in, start the timeout."""
        os.unlink(c.path(LAUNCH_LOCK))
        os.close(lock_fd)
        c.op.release()
        self._arm_timer(c)

    def _ownership(self, c):
        """The domain metadata that makes ``c``'s VM provably this agent's and this work dir's
        (recovery.py reads it back)."""
        return {"agent": self.agent_id, "container": c.id, "boot-id": c.checkpoint.boot_id,
                "workdir": str(self.workdir.root)}

    def _disks_in_use(self):
        """(overlay path, virtual size) of each VM this Isolator runs (call with _lock held)."""
        return [(c.path(OVERLAY), c.checkpoint.extra.get("disk_bytes", 0))
                for c in self._containers.values() if not c.released]

    @staticmethod
    def _step(c, name):
        """A named launch step is done: note when (for `vmiso bench`), then the fault point."""
        c.timeline[name] = time.monotonic()
        faults.hit(name)

    def timeline(self, container_id: str) -> dict[str, float]:
        """When each named step of this container's launch completed, and when its VM exited,
        its status was known, libvirt reported it stopped, ... (time.monotonic()); also for a
        container this Isolator destroyed lately."""
        validate_container_id(container_id)
        with self._lock:
            ended = self._ended_timelines.get(container_id)
            if ended is not None and container_id not in self._containers:
                return dict(ended)
        return dict(self._get(container_id).timeline)

    def cpu_probe(self) -> cpuprobe.CpuProbe:
        """How libvirt reads each new guest's CPU on this host (virt/cpuprobe.py); asked once."""
        if self._cpu_probe is None:
            libvirt_version, qemu_version = self.host.versions()
            self._cpu_probe = cpuprobe.choose(libvirt_version, qemu_version, wanted=self._cpu_probe_wanted)
        return self._cpu_probe

    def _domain_xml(self, c, spec, image):
        extra = c.checkpoint.extra
        nics = [domain.Interface(extra["tap"], extra["mac"])] if "tap" in extra else []
        config = domain.design(
            name=c.domain, uuid=new_uuid(), accel=self.accel, resources=spec.resources,
            overlay=c.path(OVERLAY), base=image.base, base_format=image.base_format, seed=c.path(SEED),
            logs=(c.path(CONSOLE_LOG), c.path(STDOUT), c.path(STDERR)),
            metadata=self._ownership(c),
            boot=image if image.kernel else None, interfaces=nics, quick_cpu_probe=self.cpu_probe().quick,
            control_socket=c.path(CONTROL_SOCKET), **_data_devices(c), system_disk=image.system_disk,
            dac_label=(extra["uid"], qemu_gid()) if "uid" in extra else None,
        )
        return config.to_xml()

    def _plan_network(self, c, network):
        """Lease the container's address, MAC and tap name; record them in the checkpoint (the
        tap before it exists, so a crash at any later point still finds it)."""
        from .net import port

        lease = port.plan(self.workdir.root, c.id, network)
        c.checkpoint.extra.update(tap=lease["tap"], mac=lease["mac"], ip=lease["ip"], bridge=lease["bridge"])
        state.write(c.dir, c.checkpoint)
        return port.network_config(lease)

    def _release_network(self, c):
        """Remove the container's tap, filter rules and rate limits, and free its lease.
        Idempotent; a no-op for containers without a network."""
        from .net import port

        try:
            port.release(self.workdir.root, c.id, c.checkpoint.extra.get("tap"))
        except VmisoError as err:
            log.warning("releasing the network of %s: %s", c.id, err)

    def _undo_launch(self, c, created):
        """Remove whatever a failed launch made: the domain ``created`` returned (None if it
        made none), then the files, then the record. A domain of the same name that createXML
        refused to replace is somebody else's and is never touched."""
        # Stop listening first: the domain's stop event would otherwise conclude (and write a
        # checkpoint into) the directory while it is being removed.
        self.host.unwatch(c.domain)
        self.host.unwatch_exit(c.domain)
        with c.cond:
            c.removed = True
        try:
            if created is not None:
                self.host.destroy(created)
        except VmisoError as err:
            log.warning("undoing launch of %s: %s", c.id, err)
        self._release_network(c)
        self.workdir.remove_container_dir(c.id)
        with self._lock:
            self._containers.pop(c.id, None)

    # --- events and conclusions -------------------------------------------------------------
    def _on_lifecycle(self, c, event, detail):
        if event == "stopped":
            with c.cond:
                c.stop_detail = detail
            # Conclude off the event thread: it must never block on file I/O or locks.
            threading.Thread(target=self._conclude, args=(c,), daemon=True).start()
        elif event == "suspended":
            c.paused = detail or "paused"
            if detail == "ioerror":
                # A disk error QEMU did not pass to the guest (an overlay's policy is "report",
                # so this is a base or a VM of an older vmiso): it would stay paused forever.
                log.warning("container %s: its VM was paused by a disk I/O error; stopping it", c.id)
                threading.Thread(target=self._kill_quietly, args=(c.id, R_IO_ERROR), daemon=True).start()
        elif event in ("resumed", "started"):
            c.paused = None

    def _on_exit(self, c):
        """QEMU's process ended (virt/exits.py, before libvirt's teardown is done): if the guest
        reported an exit status, record the termination now. Off the watcher's thread."""
        threading.Thread(target=self._record_exit, args=(c,), name="vmiso-exit", daemon=True).start()

    def _record_exit(self, c):
        if c.foreign or c.termination is not None or c.removed:
            return
        c.timeline["vm:exited"] = time.monotonic()
        # virtlogd copies QEMU's output asynchronously: give it a moment for the exit line.
        exit_code = channel.wait_for_exit_code(c.path(STDOUT), c.checkpoint.nonce, EXIT_LINE_GRACE)
        if exit_code is None:
            return  # how it ended (crash, destroy, power-off) is libvirt's to say: its event decides
        with c.cond:
            if c.termination is None and not c.removed:
                self._record(c, None, exit_code)

    def _record(self, c, stop_detail, exit_code):
        """First half of a conclusion (call with c.cond held): decide the termination, checkpoint
        it with the cleanup still pending, wake wait() and output() followers."""
        try:
            on_disk = state.read(c.dir)  # another process may have asked for a kill or destroy
            c.checkpoint.kill_reason = on_disk.kill_reason or c.checkpoint.kill_reason
            c.checkpoint.remove_requested = on_disk.remove_requested or c.checkpoint.remove_requested
        except state.CheckpointError:
            pass
        termination = decide_termination(c.checkpoint, stop_detail, exit_code)
        c.checkpoint.phase = state.TERMINATED
        c.checkpoint.termination = termination.to_dict()
        c.checkpoint.cleanup_pending = True
        try:
            state.write(c.dir, c.checkpoint)
        except OSError as err:
            log.warning("cannot checkpoint termination of %s: %s", c.id, err)
        if c.timer is not None:
            c.timer.cancel()
        c.termination = termination
        c.timeline["vm:status"] = time.monotonic()
        c.cond.notify_all()
        for wakeup in c.wakeups:  # output() followers: finish now, not at their next idle check
            wakeup.set()
        faults.hit("conclude:recorded")
        return termination

    def _conclude(self, c):
        """The domain is gone for libvirt: decide how the task ended (unless QEMU's exit told
        already), record it, then free the VM's disk, seed, network and watches."""
        if c.foreign:
            return c.termination  # its own agent concludes it
        with c.cond:
            if c.removed or c.released:
                return c.termination  # concluded already, or a failed launch being undone
            c.timeline["vm:stopped"] = time.monotonic()
            if c.termination is None:
                if c.stop_detail is None:  # nobody heard the event: libvirt's log still tells
                    c.stop_detail = self.host.stop_reason(c.domain, c.checkpoint.created_at)
                # A guest that powered itself off has normally reported: wait a moment for virtlogd.
                grace = EXIT_LINE_GRACE if c.stop_detail == "shutdown" else 0
                exit_code = channel.wait_for_exit_code(c.path(STDOUT), c.checkpoint.nonce, grace)
                self._record(c, c.stop_detail, exit_code)
            self._release(c)
            return c.termination

    def _release(self, c):
        """Second half of a conclusion (call with c.cond held, the domain gone): delete the
        overlay, seed and kernel copy, release the network, stop watching; checkpoint that."""
        for name in (OVERLAY, SEED, KERNEL, INITRD):
            try:
                os.unlink(c.path(name))
            except FileNotFoundError:
                pass
        self._release_network(c)
        if c.timer is not None:
            c.timer.cancel()
        self.host.unwatch(c.domain)
        self.host.unwatch_exit(c.domain)
        if c.checkpoint.cleanup_pending:
            c.checkpoint.cleanup_pending = False
            try:
                # Not fsynced: a lost write only makes recover() repeat this idempotent cleanup.
                state.write(c.dir, c.checkpoint, durable=False)
            except OSError as err:
                log.warning("cannot checkpoint the cleanup of %s: %s", c.id, err)
        c.released = True
        c.timeline["vm:concluded"] = time.monotonic()
        c.cond.notify_all()

    def _await_release(self, c):
        """Block until the container's VM is gone for libvirt and released (its termination may
        have been recorded before, when QEMU exited): removing its files during libvirt's
        teardown makes libvirt log errors restoring their labels. Bounded: a teardown that
        outlasts RELEASE_WAIT is cut short by a destroy, then the files go regardless."""
        deadline = time.monotonic() + RELEASE_WAIT
        while True:
            with c.cond:
                if c.released or c.foreign:
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                c.cond.wait(min(left, RELEASE_RECHECK))
            self._reconcile(c)  # events are hints: libvirt may have finished without telling
        dom = self.host.lookup(c.domain)
        log.warning("container %s: libvirt still has its domain %.0f s after QEMU exited; destroying it",
                    c.id, RELEASE_WAIT)
        if dom is not None:
            self.host.destroy(dom)
        with c.cond:
            if not c.released:
                self._release(c)

    def _reconcile(self, c):
        """Events are hints: if libvirt no longer has the domain, conclude now."""
        if not c.foreign and not c.released and not c.removed and self.host.lookup(c.domain) is None:
            self._conclude(c)

    def _reconcile_all(self):
        """After a reconnect to libvirt: events may have been missed, ask libvirt again."""
        with self._lock:
            supervised = [c for c in self._containers.values() if not c.released]
        for c in supervised:
            try:
                self._reconcile(c)
            except VmisoError as err:
                log.warning("reconciling %s after reconnect: %s", c.id, err)

    def _arm_timer(self, c):
        deadline = c.checkpoint.deadline
        if deadline is None or c.termination is not None:
            return
        c.timer = threading.Timer(max(0.0, deadline - time.time()), self._kill_quietly, (c.id, R_TIMEOUT))
        c.timer.daemon = True
        c.timer.start()

    def _kill_quietly(self, container_id, reason):
        try:
            self.kill(container_id, grace=TIMEOUT_GRACE, reason=reason)
        except VmisoError as err:
            log.warning("timeout kill of %s failed: %s", container_id, err)

    # --- the API ----------------------------------------------------------------------------
    def wait(self, container_id: str, timeout: Optional[float] = None) -> Termination:
        """Block until the container ends; return its Termination. Timeout if ``timeout`` passes."""
        c = self._get(container_id, allow_ended=True)
        if isinstance(c, Termination):
            return c
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
            self._reconcile(c)

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
        """Stop the VM: SIGTERM to the task (through the task channel; the ACPI power button
        for a VM without one), ``grace`` seconds for it to end, then destroy. Keeps the record
        (wait, status, logs still answer); returns the Termination. NotOwned for another
        agent's container."""
        c = self._own(container_id)
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
            if not channel.request_stop(c.path(CONTROL_SOCKET), c.checkpoint.nonce, timeout=min(1.0, grace)):
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
            c = self._own(container_id)
        except NotFound:
            if os.path.islink(self.workdir.container_dir(container_id)):
                self.workdir.remove_container_dir(container_id)  # unlinks it; never its target
            return self._ended.get(container_id)
        with c.op:
            if c.removed:
                return self._ended.get(container_id)
            termination = self._kill_locked(c, grace, R_DESTROYED, remove=True)
            self._await_release(c)
            faults.hit("destroy:cleanup")
            self._remove(c, termination)
        return termination

    def _remove(self, c, termination):
        """The last step of destroy: forget the container and delete its directory."""
        self._release_network(c)
        self.workdir.remove_container_dir(c.id)
        self.workdir.remove_log_dir(c.warm_slot)  # a warm VM's logs (paths.log_dir); after the record
        self.host.remove_log(c.domain)
        c.removed = True
        with self._lock:
            self._containers.pop(c.id, None)
            self._ended[c.id] = termination
            self._ended_timelines[c.id] = c.timeline
            while len(self._ended_timelines) > ENDED_TIMELINES:
                del self._ended_timelines[next(iter(self._ended_timelines))]

    def status(self, container_id: str) -> ContainerStatus:
        c = self._get(container_id)
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
        c = self._get(container_id)
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
        return self._get(container_id).path(CONSOLE_LOG)

    # --- usage and live limits (vmiso/accounting/) -------------------------------------------
    @property
    def _accounting(self):
        with self._lock:
            if "_accounting_" not in self.__dict__:
                self._accounting_ = accounting.Accounting(self)
            return self._accounting_

    def usage(self, container_id: str) -> ResourceStatistics:
        """ResourceStatistics of a running container (StatsError if its VM is gone)."""
        return self._accounting.usage(container_id)

    def usage_all(self, errors: Optional[dict[str, StatsError]] = None) -> dict[str, ResourceStatistics]:
        """{id: ResourceStatistics} of every running container this Isolator supervises (recover()
        adopts the others), in one batch read. A VM that could not be read is left out; pass a
        dict as ``errors`` to get {id: StatsError} of those."""
        return self._accounting.usage_all(errors)

    def update(self, container_id: str, resources: Resources, disk: Optional[DiskLimits] = None,
               inbound: Optional[RateLimit] = None, outbound: Optional[RateLimit] = None) -> None:
        """Change a running container's limits live: CPU quota and shares (``resources.cpus``, at
        most its vCPUs), guest memory through the balloon (``resources.mem_mib``, at most what it
        was launched with) with the cgroup's hard limit following it, QEMU's overhead included;
        ``disk`` (accounting.limits.DiskLimits) throttles its disk, ``inbound``/``outbound``
        (spec.RateLimit) its network. ``resources.disk_gib`` cannot change live and is ignored."""
        return self._accounting.update(container_id, resources, disk=disk, inbound=inbound, outbound=outbound)

    # --- adoption ---------------------------------------------------------------------------
    def _get(self, container_id, allow_ended=False):
        """The container, supervised by this Isolator (adopted from its checkpoint if needed);
        another agent's is read afresh each time and never supervised."""
        validate_container_id(container_id)
        with self._lock:
            c = self._containers.get(container_id)
            if c is not None:
                return c
            if allow_ended and container_id in self._ended:
                return self._ended[container_id]
            from .recovery import adopt

            c = adopt(self, container_id)
            if c.foreign:
                return c
            self._containers[container_id] = c
        if c.termination is None:
            self._reconcile(c)
            self._arm_timer(c)
        return c

    def _own(self, container_id):
        """_get(), for calls that change the container: NotOwned if another agent's."""
        c = self._get(container_id)
        if c.foreign:
            raise NotOwned(container_id, c.owner, self.agent_id)
        return c




def _local_uid(uid):
    """launch()'s ``uid``: None for the operator's (root's) containers, else a user's uid."""
    if uid is None or uid == 0:
        return None  # QEMU never runs as root
    if isinstance(uid, bool) or not isinstance(uid, int) or not 0 < uid < 2**32 - 1:
        raise InvalidSpec("uid", f"{uid!r} is not a user id")
    if qemu_gid() is None:
        raise InvalidSpec("uid", "this host has no QEMU user (libvirt-qemu or qemu) whose group a user's QEMU needs")
    return uid


def _own_kernel(c, image):
    """``image`` booting private copies of its kernel and initrd in the container's directory.
    libvirt chowns a domain's kernel to the uid its QEMU runs as while it runs, and refuses a
    second uid on a file in use: a shared kernel would be one user's file while their VM runs
    and no other user's VM could start."""
    import dataclasses
    import shutil

    if image.kernel is None:
        return image
    kernel = shutil.copyfile(image.kernel, c.path(KERNEL))
    initrd = shutil.copyfile(image.initrd, c.path(INITRD)) if image.initrd else None
    return dataclasses.replace(image, kernel=kernel, initrd=initrd)


def _data_files(shares, spec):
    """The seed's data-in files: which shares to mount where, and whether stdin is a port."""
    return seed.data_files(volumes.seed_lines(shares),
                           domain.STDIN_PORT_NAME if spec.stdin is not None else None)


def _data_devices(c):
    """domain.design()'s volumes and stdin socket, from what launch recorded in the checkpoint."""
    extra = c.checkpoint.extra
    shares = [volumes.Share.from_record(r) for r in extra.get("volumes", ())]
    return {"filesystems": volumes.filesystems(shares),
            "stdin_socket": c.path(STDIN_SOCKET) if extra.get("stdin") else None}


def _recorded_termination(directory):
    """The Termination a container's checkpoint records, or None (none yet, or unreadable)."""
    try:
        recorded = state.read(directory).termination
    except state.CheckpointError:
        return None
    return Termination.from_dict(recorded) if recorded else None
