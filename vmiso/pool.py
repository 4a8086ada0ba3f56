"""Warm VMs: a bounded pool of micro VMs booted ahead of demand, each used for exactly one task.

A pool VM boots micro with a seed that carries no task, only the name of its claim port (a
virtio-serial port, ``vmiso.claim``, whose host end connects to a socket the pool listens on).
micro's init says ``VMISO-WARM-READY`` on that port and blocks reading it. A launch that fits the
pool's image and size class claims a ready VM: the Isolator records the container in the VM's
directory, gives the domain its container id (live metadata), renames the directory into
``containers/<id>``, and writes the task's seed files to the claim port as a tar stream (the same
files as a cold launch's seed, plus fresh entropy and the host's clock). The guest runs them
exactly as a seed's (docs/guest-contract.md, "Warm VMs"). The task's identity (argv, env,
working directory, hostname, nonce) exists only from the claim on.

Isolation: every pool VM is booted on its own (its own kernel boot, RNG state, boot id, overlay)
and destroyed after its one task, so nothing of one task reaches another; entropy mixed in at
claim makes a VM's random bytes unknowable from the time it was booted.

Bounds and faults: at most ``PoolConfig.size`` VMs booting or ready, fewer if the memory cap
(``max_mem_mib``: the VMs' cgroup hard limits, QEMU's overhead included) allows fewer; one boot
at a time, in the background. A pool VM that stops before it is claimed (crash, destroy) is
removed and replaced. The claim port's far end is this process: if it dies, each waiting guest
reads EOF and powers itself off, and ``recover()`` destroys what is left (a pool VM is never
adopted: its claim connection died with its owner). ``close()`` destroys the pool's VMs.

A task with a network gets its NIC at claim: each pool VM has a PCIe root port to plug it into
(vmiso/warm.py). Not through the pool (they launch cold): tasks with stdin, volumes, a local
user's uid, a container image, another image or size class, or a disk size of their own.
"""
import io
import json
import logging
import os
import secrets
import shutil
import socket
import threading
import time
from dataclasses import asdict, dataclass
from typing import Optional

from . import files as files_mod
from . import state
from .accounting import live as accounting
from .container import new_uuid
from .errors import InvalidSpec, VmisoError
from .image import qcow2, seed
from .image.resolve import resolve
from .paths import CONTROL_SOCKET, LOGS, OVERLAY, SEED, SLOT_PREFIX, Workdir, restrict_to_qemu, warm_log_dir
from .spec import Resources
from .virt import domain
from .virt import stdin as sockets

log = logging.getLogger(__name__)

CLAIM_SOCKET = "claim.sock"
SLOT_RECORD = "pool-slot.json"  # whose pool VM a slot directory is (the agent id)
READY_LINE = b"VMISO-WARM-READY\n"
BOOT_TIMEOUT_S = 120.0       # QEMU's start plus the guest's boot under a loaded TCG host
FAILURE_BACKOFF_S = 2.0      # after a failed boot, before the next attempt


@dataclass(frozen=True)
class PoolConfig:
    """``size`` VMs of ``image`` with ``cpus`` and ``mem_mib`` kept booted; at most
    ``max_mem_mib`` of memory (their cgroup hard limits) held by the pool (None: no cap beyond
    ``size``)."""

    size: int = 1
    image: str = "micro"
    cpus: float = 1.0
    mem_mib: int = 256
    max_mem_mib: Optional[int] = None
    # After a claim, the replacement's boot waits this long: under TCG a boot takes a core for
    # half a second, which the claimed task's own start would otherwise share.
    refill_delay_s: float = 0.5

    def resources(self):
        return Resources(cpus=self.cpus, mem_mib=self.mem_mib)


class Slot:
    """One pool VM."""

    def __init__(self, workdir):
        self.id = secrets.token_hex(6)
        self.name = SLOT_PREFIX + self.id
        self.dir = str(workdir.containers / self.name)
        self.domain = "vmiso-pool-" + self.id
        # Its serial logs, for the VM's whole life: not in ``dir``, which the claim renames
        # (virtlogd rolls a log over by the path it opened it at: paths.log_dir).
        self.logs = warm_log_dir(workdir.containers, self.id)
        self.state = "booting"   # booting, ready, claimed, dead
        self.dom = None
        self.conn = None         # the claim port's host end (QEMU's connection)
        self.booted_at = None

    def path(self, name):
        return os.path.join(self.dir, name)


class Pool:
    """The Isolator's pool (``Isolator.pool``); idle until ``configure()``."""

    def __init__(self, iso):
        self.iso = iso
        self.config = None
        self.slots = {}          # id -> Slot, booting or ready
        self.cond = threading.Condition()
        self.thread = None
        self.closed = False
        self.last_claim = float("-inf")
        self.stats = {"claims": 0, "misses": 0, "boots": 0, "boot_failures": 0, "replaced": 0}

    # --- configuration ----------------------------------------------------------------------
    def configure(self, config):
        """Keep ``config.size`` VMs ready from now on (None or size 0: none; ready VMs beyond the
        new target are destroyed). InvalidSpec if the cap does not hold one VM."""
        if config is not None:
            if not isinstance(config, PoolConfig) or not isinstance(config.size, int) or config.size < 0:
                raise InvalidSpec("pool", "must be a vmiso.PoolConfig with size >= 0")
            config.resources()  # InvalidSpec for impossible cpus or memory
            if config.size and config.max_mem_mib is not None and self.vm_bytes(config) > config.max_mem_mib << 20:
                raise InvalidSpec("pool", f"max_mem_mib {config.max_mem_mib} does not hold one VM "
                                          f"({self.vm_bytes(config) >> 20} MiB with QEMU's overhead)")
            if config.size:
                # NotFound or InvalidSpec now, not later in the refill thread:
                self.iso.workdir.check_socket_path(self.iso.workdir.containers / (SLOT_PREFIX + "0" * 12), "pool")
                resolve(self.iso.workdir, config.image, allow_paths=self.iso.image_paths)
        with self.cond:
            self.config = config if config is not None and config.size else None
            self.closed = False
            if self.config is not None and self.thread is None:
                self.thread = threading.Thread(target=self._refill, name="vmiso-pool", daemon=True)
                self.thread.start()
            surplus = self._surplus()
            self.cond.notify_all()
        for slot in surplus:
            self._destroy(slot)
        self._write_status()

    def vm_bytes(self, config=None):
        config = config or self.config
        return accounting.hard_limit(config.resources(), self.iso.accel.name)

    def target(self):
        """How many VMs the pool keeps: its size, or fewer where the memory cap says so."""
        config = self.config
        if config is None:
            return 0
        if config.max_mem_mib is None:
            return config.size
        return min(config.size, (config.max_mem_mib << 20) // self.vm_bytes())

    def _surplus(self):
        """Ready VMs beyond the target (call with cond held); taken out of the pool."""
        extra = len(self.slots) - self.target()
        ready = [s for s in self.slots.values() if s.state == "ready"][:max(0, extra)]
        for slot in ready:
            del self.slots[slot.id]
        return ready

    # --- claiming ---------------------------------------------------------------------------
    def fits(self, spec, image, uid):
        """Whether ``spec`` may run in one of this pool's VMs (its identity all arrives at claim)."""
        config = self.config
        if config is None or uid is not None or spec.stdin is not None:
            return False
        if spec.volumes or spec.resources.disk_gib is not None or image.container is not None:
            return False
        if spec.resources.cpus != config.cpus or spec.resources.mem_mib != config.mem_mib:
            return False
        try:
            return resolve(self.iso.workdir, config.image, allow_paths=self.iso.image_paths).base == image.base
        except VmisoError:
            return False

    def take(self):
        """A ready VM, now out of the pool (the caller owns it), or None (counted as a miss)."""
        with self.cond:
            slot = next((s for s in self.slots.values() if s.state == "ready"), None)
            if slot is None:
                self.stats["misses"] += 1
                return None
            del self.slots[slot.id]
            slot.state = "claimed"
            self.stats["claims"] += 1
            self.last_claim = time.monotonic()
            self.cond.notify_all()  # the refill thread boots a replacement
        self._write_status()
        return slot

    def release(self, slot):
        """A claimed VM that will run no task after all (its claim failed): destroyed."""
        self._destroy(slot)

    @staticmethod
    def send(slot, files):
        """Write the task's seed files (name -> bytes) to the claimed VM's claim port as a tar
        stream, then our end of the stream: the guest's read ends there. A thread keeps the
        connection until QEMU has read it all and closes (a hang-up would drop unread bytes)."""
        import tarfile  # here: every Isolator has a pool, few send anything

        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for name in sorted(files):
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(files[name]), 0o600, int(time.time())
                tar.addfile(info, io.BytesIO(files[name]))
        conn = slot.conn
        conn.settimeout(10.0)
        conn.sendall(buf.getvalue())
        conn.shutdown(socket.SHUT_WR)
        threading.Thread(target=_drain_and_close, args=(conn,), name="vmiso-claim", daemon=True).start()

    def wait_ready(self, count=1, timeout=None):
        """Block until ``count`` VMs are ready (True), or ``timeout`` passes (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            while sum(s.state == "ready" for s in self.slots.values()) < count:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self.cond.wait(left)
            return True

    # --- the background refill --------------------------------------------------------------
    def _refill(self):
        while True:
            with self.cond:
                while not self.closed and (self.config is None or len(self.slots) >= self.target()
                                           or time.monotonic() < self.last_claim + self.config.refill_delay_s):
                    wait = None
                    if self.config is not None and len(self.slots) < self.target():
                        wait = self.last_claim + self.config.refill_delay_s - time.monotonic()
                    self.cond.wait(wait)
                if self.closed:
                    self.thread = None
                    return
                slot = Slot(self.iso.workdir)
                self.slots[slot.id] = slot
            self._write_status()
            try:
                self._boot(slot)
            except Exception as err:  # noqa: BLE001 - a failed boot is logged, undone and retried later
                if not self.closed:  # (close() ends a boot under way: no failure)
                    log.warning("pool: booting a warm VM failed: %s", err)
                    self.stats["boot_failures"] += 1
                with self.cond:
                    self.slots.pop(slot.id, None)
                self._destroy(slot)
                time.sleep(FAILURE_BACKOFF_S)
            self._write_status()

    def _boot(self, slot):
        iso, config = self.iso, self.config
        image = resolve(iso.workdir, config.image, allow_paths=iso.image_paths)
        resources = config.resources()
        iso.workdir.ensure()
        os.mkdir(slot.dir, 0o700)
        restrict_to_qemu(slot.dir)
        iso.workdir.make_log_dir(slot.id)  # after the slot's directory: recover() relies on the order
        files_mod.write_atomic(slot.path(SLOT_RECORD), json.dumps({"agent": iso.agent_id}).encode(), 0o600,
                               durable=False)
        qcow2.create_overlay_on_verified(slot.path(OVERLAY), image.base, image.base_format, image.virtual_size)
        # The boot seed: no task, only the claim port's name (the guest waits there).
        seed.write_seed(slot.path(SEED), {
            "meta-data": seed.meta_data(f"pool-{slot.id}", "vmiso-pool"),
            "vmiso/warm": domain.CLAIM_PORT_NAME.encode() + b"\n",
        })
        listener = sockets.listen(slot.path(CLAIM_SOCKET))
        try:
            config_xml = domain.design(
                name=slot.domain, uuid=new_uuid(), accel=iso.accel, resources=resources,
                overlay=slot.path(OVERLAY), base=image.base, base_format=image.base_format, seed=slot.path(SEED),
                logs=tuple(os.path.join(slot.logs, name) for name in LOGS),
                metadata={"agent": iso.agent_id, "pool": slot.id, "boot-id": state.boot_id(),
                          "workdir": str(iso.workdir.root)},
                boot=image if image.kernel else None, quick_cpu_probe=iso.cpu_probe().quick,
                control_socket=slot.path(CONTROL_SOCKET), system_disk=image.system_disk,
                claim_socket=slot.path(CLAIM_SOCKET), hotplug_port=True,
            ).to_xml()
            iso.host.watch(slot.domain, lambda event, detail: self._on_lifecycle(slot, event, detail))
            slot.dom = iso.host.create(config_xml)
            iso.host.set_memory_hard_limit(slot.dom, accounting.hard_limit(resources, iso.accel.name))
            listener.settimeout(BOOT_TIMEOUT_S)
            slot.conn, _ = listener.accept()  # QEMU connected while it started
        finally:
            listener.close()
        _read_ready(slot.conn, BOOT_TIMEOUT_S)
        with self.cond:
            if slot.state != "booting":
                raise VmisoError(f"pool VM {slot.domain} ended while it booted")
            slot.state, slot.booted_at = "ready", time.time()
            self.stats["boots"] += 1
            self.cond.notify_all()

    def _on_lifecycle(self, slot, event, detail):
        """A pool VM stopped before it was claimed: forget it; the refill replaces it."""
        if event != "stopped":
            return
        with self.cond:
            if self.slots.get(slot.id) is not slot:
                return  # claimed (its container watches it now), or already gone
            del self.slots[slot.id]
            was = slot.state
            slot.state = "dead"
            if was == "ready":
                self.stats["replaced"] += 1
            self.cond.notify_all()
        log.warning("pool: warm VM %s stopped (%s) before a task claimed it; replacing it", slot.domain, detail)
        threading.Thread(target=self._destroy, args=(slot,), daemon=True).start()

    def _destroy(self, slot):
        """Stop a pool VM and remove its directory. Idempotent."""
        self.iso.host.unwatch(slot.domain)
        if slot.conn is not None:
            slot.conn.close()
            slot.conn = None
        try:
            dom = self.iso.host.lookup(slot.domain)
            if dom is not None:
                self.iso.host.destroy(dom)
        except VmisoError as err:
            log.warning("pool: cannot destroy %s: %s", slot.domain, err)
        shutil.rmtree(slot.dir, ignore_errors=True)
        self.iso.workdir.remove_log_dir(slot.id)
        self.iso.host.remove_log(slot.domain)

    def close(self):
        """Stop refilling and destroy every VM of the pool (a claimed one is a container now)."""
        with self.cond:
            self.closed = True
            self.config = None
            slots = list(self.slots.values())
            self.slots.clear()
            self.cond.notify_all()
        for slot in slots:
            self._destroy(slot)
        self._write_status()

    # --- after a restart, and what ps and doctor show -----------------------------------------
    def recover(self):
        """Destroy every pool VM of this agent that this pool does not hold (its owner died: its
        claim connection is gone, it can never be claimed) and remove their directories.
        Returns the domain names destroyed."""
        iso = self.iso
        with self.cond:
            live = {s.domain for s in self.slots.values()}
            live_dirs = {s.name for s in self.slots.values()}
        destroyed = []
        for dom, metadata in iso.host.our_domains(domain.METADATA_NS):
            record = domain.parse_metadata(metadata)
            if not record or record.get("agent") != iso.agent_id or not record.get("pool") or \
                    record.get("workdir") != str(iso.workdir.root):
                continue  # not a pool VM of this agent and work dir: never touched
            name = dom.name()
            if name in live or name != "vmiso-pool-" + record["pool"]:
                continue
            iso.host.destroy(dom)
            iso.host.remove_log(name)
            destroyed.append(name)
        try:
            names = os.listdir(iso.workdir.containers)
        except FileNotFoundError:
            names = []
        for name in names:
            if name.startswith(SLOT_PREFIX) and name not in live_dirs and _dead_owner(iso, name):
                shutil.rmtree(os.path.join(iso.workdir.containers, name), ignore_errors=True)
        self._remove_stray_logs(live_dirs)
        if destroyed:
            log.warning("pool: destroyed %d warm VMs of a previous run: %s", len(destroyed), ", ".join(destroyed))
        self._write_status()
        return destroyed

    def _remove_stray_logs(self, live_dirs):
        """Remove the log directories (paths.log_dir) of warm VMs that are neither a pool VM nor
        a container any more: a crash between removing a VM's directory and its logs. A pool
        VM's logs are made after its directory and the claim renames that directory onto a
        checkpoint naming the slot, so the check below, in this order, never sees a live VM's
        logs as stray."""
        containers = self.iso.workdir.containers
        candidates = [s for s in self.iso.workdir.log_dir_slots()
                      if SLOT_PREFIX + s not in live_dirs and not os.path.lexists(containers / (SLOT_PREFIX + s))]
        if not candidates:
            return
        named = set()
        for container_id in self.iso.workdir.container_ids():
            try:
                named.add(state.read(str(containers / container_id)).extra.get("warm"))
            except state.CheckpointError:
                continue  # unreadable: its logs cannot be found through it either
        for slot_id in candidates:
            if slot_id not in named:
                self.iso.workdir.remove_log_dir(slot_id)

    def status(self):
        """What the pool holds now (for ps, doctor and the bench)."""
        with self.cond:
            slots = [{"id": s.id, "domain": s.domain, "state": s.state, "booted_at": s.booted_at}
                     for s in self.slots.values()]
            config = self.config
        held = len(slots) * (self.vm_bytes() if config else 0)
        return {"config": asdict(config) if config else None, "target": self.target(), "slots": slots,
                "ready": sum(s["state"] == "ready" for s in slots),
                "booting": sum(s["state"] == "booting" for s in slots),
                "mem_bytes": held, "cap_bytes": config.max_mem_mib << 20 if config and config.max_mem_mib else None,
                "owner_pid": os.getpid(), "agent": self.iso.agent_id, **self.stats}

    def _write_status(self):
        path = self.iso.workdir.pool_status
        try:
            if not os.path.isdir(self.iso.workdir.root):
                return
            files_mod.write_atomic(path, json.dumps(self.status()).encode() + b"\n", 0o644, durable=False)
        except OSError as err:
            log.debug("pool: cannot write %s: %s", path, err)


def read_status(workdir_root):
    """The pool status its owner last wrote (None: no pool, or its owner is gone)."""
    try:
        with open(Workdir.of(workdir_root).pool_status, "rb") as f:
            status = json.loads(f.read())
        os.kill(status["owner_pid"], 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return status if status.get("config") else None


def _dead_owner(iso, name):
    """A pool directory of this agent nobody boots into any more: this process holds no such
    slot (the caller checked), and no claim is under way in it (it holds the launch lock)."""
    from .container import launch_in_progress

    directory = os.path.join(iso.workdir.containers, name)
    try:
        with open(os.path.join(directory, SLOT_RECORD), "rb") as f:
            if json.loads(f.read()).get("agent") != iso.agent_id:
                return False  # another agent's pool
    except (OSError, ValueError, AttributeError):
        pass  # no record: a boot that died before writing it
    return not launch_in_progress(directory)


def _read_ready(conn, timeout):
    """Wait for the guest's ready line on the claim port (bounded: a hostile guest may write
    anything; only the line, at the start, counts)."""
    conn.settimeout(timeout)
    data = b""
    while len(data) < len(READY_LINE):
        chunk = conn.recv(len(READY_LINE) - len(data))
        if not chunk:
            raise VmisoError("the warm VM's claim port closed before it was ready")
        data += chunk
    if data != READY_LINE:
        raise VmisoError("the warm VM said something else than ready on its claim port")
    conn.settimeout(None)


def _drain_and_close(conn):
    try:
        conn.settimeout(None)
        while conn.recv(4096):
            pass
    except OSError:
        pass
    finally:
        conn.close()
