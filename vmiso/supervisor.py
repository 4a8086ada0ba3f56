"""The Supervisor: the containers one Isolator supervises, and how each one's end is learned,
recorded and cleaned up.

It owns the table of containers (by id, plus the terminations and timelines of the ones lately
destroyed), turns libvirt's lifecycle events and QEMU's exit into a Termination
(container.decide_termination), checkpoints it, and releases what the VM held: overlay, seed,
kernel copy, network lease, watches. It decides nothing about launching or stopping: the
Isolator (isolator.py), a cold launch (cold.py), a warm one (warm.py), recovery (recovery.py) and
accounting (accounting/live.py) call it through the methods below, never its fields.

Internal API, stable inside the package (not exported by ``vmiso``):

  look up    get(id), own(id), supervises(id), ended(id), ended_timeline(id), running(), disks_in_use()
  launch     add(c), forget(c), step(c, name), ownership(c), launched(c, lock_fd), launch_failed(...),
             watch(c), watch_lifecycle(c), watch_exit(c), unwatch(c),
             lease_network(c, network), release_network(c), arm_timer(c)
  the end    conclude(c), release(c), await_release(c), remove(c, termination),
             reconcile(c), reconcile_all()

Locks: the table has one re-entrant lock (held to look up, add or remove a container, and while
an unseen one is adopted from its checkpoint, which may ask libvirt); each container has
``c.cond`` (its termination and release) and ``c.op`` (serialises launch, kill and destroy,
taken by the callers). Events arrive on libvirt's thread and QEMU's exit on the exit watcher's:
both hand the work to a thread of its own, so neither ever blocks on file I/O or a lock.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Callable, NoReturn, Optional

from . import faults, state
from .container import LAUNCH_LOCK, Container, decide_termination
from .errors import AlreadyExists, LaunchFailed, NotOwned, VmisoError
from .paths import INITRD, KERNEL, OVERLAY, SEED, STDOUT, Workdir
from .spec import R_IO_ERROR, R_TIMEOUT, Termination, validate_container_id
from .virt import channel

if TYPE_CHECKING:
    from .spec import NetworkSpec

log = logging.getLogger(__name__)

EXIT_LINE_GRACE = 2.0  # seconds virtlogd may lag behind the stop event when writing the exit line
ENDED_TIMELINES = 64  # destroyed containers whose timeline() still answers
RELEASE_WAIT = 30.0  # destroy() after QEMU exited: how long libvirt's teardown may take before a destroy
RELEASE_RECHECK = 1.0  # ... and how often libvirt is asked meanwhile (its stopped event may be lost)


class Supervisor:
    """The supervised containers of one Isolator. Thread-safe.

    ``stop(container_id, reason)`` is how the Supervisor asks for a container to be stopped
    (its deadline passed, or a disk error paused its VM): the Isolator's kill with its grace.
    """

    def __init__(self, host, workdir: Workdir, agent_id: str, stop: Callable[[str, str], object]):
        self.host = host
        self.workdir = workdir
        self.agent_id = agent_id
        self._stop = stop
        self._lock = threading.RLock()
        self._containers: dict[str, Container] = {}
        self._ended: dict[str, Termination] = {}  # destroyed ones: wait() after destroy() answers
        self._ended_timelines: dict[str, dict] = {}  # the last ENDED_TIMELINES destroyed containers' timelines

    # --- look up ----------------------------------------------------------------------------
    def get(self, container_id: str) -> Container:
        """The container, supervised here (adopted from its checkpoint on first sight: recovery.py);
        another agent's is read afresh each time and never supervised. NotFound without a record."""
        validate_container_id(container_id)
        with self._lock:
            c = self._containers.get(container_id)
            if c is not None:
                return c
            from .recovery import adopt

            c = adopt(self, container_id)
            if c.foreign:
                return c
            self._containers[container_id] = c
        if c.termination is None:
            self.reconcile(c)
            self.arm_timer(c)
        return c

    def own(self, container_id: str) -> Container:
        """get(), for calls that change the container: NotOwned if another agent's."""
        c = self.get(container_id)
        if c.foreign:
            raise NotOwned(container_id, c.owner, self.agent_id)
        return c

    def supervises(self, container_id: str) -> bool:
        """Whether a container of that id is supervised here (launching, running or ended)."""
        with self._lock:
            return container_id in self._containers

    def ended(self, container_id: str) -> Optional[Termination]:
        """The Termination of a container destroyed here (its record is gone), else None."""
        with self._lock:
            if container_id in self._containers:
                return None
            return self._ended.get(container_id)

    def ended_timeline(self, container_id: str) -> Optional[dict]:
        """The timeline of a container destroyed here lately (the last ENDED_TIMELINES), or None."""
        with self._lock:
            if container_id in self._containers:
                return None
            timeline = self._ended_timelines.get(container_id)
            return None if timeline is None else dict(timeline)

    def running(self) -> list[Container]:
        """The supervised containers whose task has not ended."""
        with self._lock:
            return [c for c in self._containers.values() if c.termination is None]

    def disks_in_use(self) -> list[tuple[str, int]]:
        """(overlay path, virtual size) of each VM supervised here that still holds its disk."""
        with self._lock:
            return [(c.path(OVERLAY), c.checkpoint.extra.get("disk_bytes", 0))
                    for c in self._containers.values() if not c.released]

    # --- launch -----------------------------------------------------------------------------
    def add(self, c: Container, admit: Optional[Callable[[], None]] = None) -> None:
        """Supervise ``c`` from now on, its ``c.op`` held (a kill or destroy racing the launch
        waits for it). AlreadyExists if the id is taken; ``admit()`` runs under the table's lock
        first (raising leaves nothing): checks that must not race another launch here."""
        with self._lock:
            if c.id in self._containers:
                raise AlreadyExists("container", c.id)
            if admit is not None:
                admit()
            c.op.acquire()
            self._containers[c.id] = c

    def forget(self, c: Container) -> None:
        """A failed launch: stop supervising ``c`` (its files and VM are the caller's to undo)."""
        with self._lock:
            if self._containers.get(c.id) is c:
                del self._containers[c.id]

    def watch(self, c: Container) -> None:
        """Listen to the VM's lifecycle events and QEMU's exit (a running VM's)."""
        self.watch_lifecycle(c)
        self.watch_exit(c)

    def watch_lifecycle(self, c: Container) -> None:
        """Listen to libvirt's lifecycle events of the VM (its stop concludes it)."""
        self.host.watch(c.domain, lambda event, detail: self._on_lifecycle(c, event, detail))

    def watch_exit(self, c: Container) -> None:
        """Listen for QEMU's exit (it must run): an exit status is recorded before libvirt's teardown."""
        self.host.watch_exit(c.domain, lambda: self._on_exit(c))

    def unwatch(self, c: Container) -> None:
        self.host.unwatch(c.domain)
        self.host.unwatch_exit(c.domain)

    @staticmethod
    def step(c: Container, name: str) -> None:
        """A named launch step is done: note when (for `vmiso bench`), then the fault point."""
        c.timeline[name] = time.monotonic()
        faults.hit(name)

    def ownership(self, c: Container) -> dict[str, str]:
        """The domain metadata that makes ``c``'s VM provably this agent's and this work dir's
        (recovery.py reads it back)."""
        return {"agent": self.agent_id, "container": c.id, "boot-id": c.checkpoint.boot_id,
                "workdir": str(self.workdir.root)}

    def launched(self, c: Container, lock_fd: int) -> None:
        """A launch (cold or warm) succeeded: free its lock, let kill/destroy in, start the timeout."""
        os.unlink(c.path(LAUNCH_LOCK))
        os.close(lock_fd)
        c.op.release()
        self.arm_timer(c)

    def launch_failed(self, c: Container, lock_fd: Optional[int], step: str, err: BaseException) -> NoReturn:
        """A launch (cold or warm) failed at ``step`` and was undone: free its lock, let
        kill/destroy in, raise LaunchFailed (an interrupt stays an interrupt)."""
        if lock_fd is not None:
            os.close(lock_fd)
        c.op.release()
        if isinstance(err, (KeyboardInterrupt, SystemExit)):
            raise err
        raise LaunchFailed(c.id, step, err) from err

    def lease_network(self, c: Container, network: NetworkSpec) -> dict:
        """Lease the container's address, MAC and tap name; record them in the checkpoint (the
        tap before it exists, so a crash at any later point still finds it). Returns the
        network-config the guest's seed carries."""
        from .net import port

        lease = port.plan(self.workdir.root, c.id, network)
        c.checkpoint.extra.update(tap=lease["tap"], mac=lease["mac"], ip=lease["ip"], bridge=lease["bridge"])
        state.write(c.dir, c.checkpoint)
        return port.network_config(lease)

    def release_network(self, c: Container) -> None:
        """Remove the container's tap, filter rules and rate limits, and free its lease.
        Idempotent; a no-op for containers without a network."""
        from .net import port

        try:
            port.release(self.workdir.root, c.id, c.checkpoint.extra.get("tap"))
        except VmisoError as err:
            log.warning("releasing the network of %s: %s", c.id, err)

    def arm_timer(self, c: Container) -> None:
        """Stop the task at its deadline (TaskSpec.timeout), if it has one and has not ended."""
        deadline = c.checkpoint.deadline
        if deadline is None or c.termination is not None:
            return
        c.timer = threading.Timer(max(0.0, deadline - time.time()), self._stop_quietly, (c.id, R_TIMEOUT))
        c.timer.daemon = True
        c.timer.start()

    def _stop_quietly(self, container_id, reason):
        try:
            self._stop(container_id, reason)
        except VmisoError as err:
            log.warning("stopping %s (%s) failed: %s", container_id, reason, err)

    # --- events -----------------------------------------------------------------------------
    def _on_lifecycle(self, c, event, detail):
        if event == "stopped":
            with c.cond:
                c.stop_detail = detail
            # Conclude off the event thread: it must never block on file I/O or locks.
            threading.Thread(target=self.conclude, args=(c,), daemon=True).start()
        elif event == "suspended":
            c.paused = detail or "paused"
            if detail == "ioerror":
                # A disk error QEMU did not pass to the guest (an overlay's policy is "report",
                # so this is a base or a VM of an older vmiso): it would stay paused forever.
                log.warning("container %s: its VM was paused by a disk I/O error; stopping it", c.id)
                threading.Thread(target=self._stop_quietly, args=(c.id, R_IO_ERROR), daemon=True).start()
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

    # --- the end ----------------------------------------------------------------------------
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

    def conclude(self, c: Container) -> Optional[Termination]:
        """The domain is gone for libvirt: decide how the task ended (unless QEMU's exit told
        already), record it, then release() the VM. Idempotent; never for another agent's."""
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
            self.release(c)
            return c.termination

    def release(self, c: Container) -> None:
        """Second half of a conclusion (call with c.cond held, the domain gone): delete the
        overlay, seed and kernel copy, release the network, stop watching; checkpoint that."""
        for name in (OVERLAY, SEED, KERNEL, INITRD):
            try:
                os.unlink(c.path(name))
            except FileNotFoundError:
                pass
        self.release_network(c)
        if c.timer is not None:
            c.timer.cancel()
        self.unwatch(c)
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

    def await_release(self, c: Container) -> None:
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
            self.reconcile(c)  # events are hints: libvirt may have finished without telling
        dom = self.host.lookup(c.domain)
        log.warning("container %s: libvirt still has its domain %.0f s after QEMU exited; destroying it",
                    c.id, RELEASE_WAIT)
        if dom is not None:
            self.host.destroy(dom)
        with c.cond:
            if not c.released:
                self.release(c)

    def remove(self, c: Container, termination: Termination) -> None:
        """The last step of destroy (``c.op`` held): forget the container and delete its files."""
        self.release_network(c)
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

    def reconcile(self, c: Container) -> None:
        """Events are hints: if libvirt no longer has the domain, conclude now."""
        if not c.foreign and not c.released and not c.removed and self.host.lookup(c.domain) is None:
            self.conclude(c)

    def reconcile_all(self) -> None:
        """After a reconnect to libvirt: events may have been missed, ask libvirt again."""
        with self._lock:
            supervised = [c for c in self._containers.values() if not c.released]
        for c in supervised:
            try:
                self.reconcile(c)
            except VmisoError as err:
                log.warning("reconciling %s after reconnect: %s", c.id, err)
