"""The libvirt connection: open, heal, create and look up domains, and deliver lifecycle events.

This module and virt/domain.py are the only places that touch libvirt; libvirt errors become
vmiso.errors.VirtError here (with libvirt's error code), always ``raise ... from err``.
"""
import calendar
import logging
import os
import re
import threading
import time

import libvirt

from ..errors import VirtError

log = logging.getLogger(__name__)

DEFAULT_URI = "qemu:///system"
QEMU_LOG_DIR = "/var/log/libvirt/qemu"
# libvirtd appends "<time>: shutting down, reason=<why>" to a domain's log when it stops.
_STOP_LINE = re.compile(rb"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\.\d+\+0000: shutting down, reason=(\w+)", re.M)

_loop_lock = threading.Lock()
_loop_started = False


def _silence_default_handler(_ctx, _err):
    """libvirt prints every error to stderr by default; we raise them instead."""


def start_event_loop():
    """Run libvirt's default event loop in a daemon thread (once per process).

    It must be registered before the first connection opens, or that connection gets no events.
    """
    global _loop_started
    with _loop_lock:
        if _loop_started:
            return
        libvirt.registerErrorHandler(_silence_default_handler, None)
        libvirt.virEventRegisterDefaultImpl()

        def run():
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="vmiso-libvirt-events", daemon=True).start()
        _loop_started = True


def translate(err, what):
    """A VirtError for libvirt error ``err`` raised while doing ``what``."""
    return VirtError(f"{what}: {err.get_error_message()}", code=err.get_error_code())


# libvirt's lifecycle event numbers, as words (so nothing outside virt/ needs libvirt's constants).
_EVENTS = {
    libvirt.VIR_DOMAIN_EVENT_STARTED: "started",
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED: "suspended",
    libvirt.VIR_DOMAIN_EVENT_RESUMED: "resumed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED: "stopped",
    libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: "shutdown",
}
_STOPPED_DETAILS = {
    libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN: "shutdown",    # the guest powered off
    libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED: "destroyed",  # someone called destroy
    libvirt.VIR_DOMAIN_EVENT_STOPPED_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_FAILED: "failed",        # QEMU died (e.g. SIGKILL)
    libvirt.VIR_DOMAIN_EVENT_STOPPED_MIGRATED: "migrated",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_SAVED: "saved",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_FROM_SNAPSHOT: "snapshot",
}
_SUSPENDED_DETAILS = {
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED_PAUSED: "paused",    # someone paused it
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED_IOERROR: "ioerror",  # a disk error with policy "stop"
}


class Host:
    """One libvirt connection with reconnect, and lifecycle events dispatched per domain name.

    ``watch(name, fn)`` calls ``fn(event, detail)`` from the event thread for every lifecycle
    event of domain ``name``, as words: ("stopped", "shutdown"|"destroyed"|"crashed"|"failed"|...),
    ("started", None), ...
    """

    RECONNECT_DELAYS = (0.2, 0.5, 1.0, 2.0)  # then every 2 s, for as long as domains are watched

    def __init__(self, uri=DEFAULT_URI):
        self.uri = uri
        self._conn = None
        self._lock = threading.RLock()
        self._watchers = {}
        self._callback_id = None
        self._healing = False
        self.on_reconnect = None  # called (from a helper thread) after a lost connection is back
        self._exits = None        # virt/exits.ExitWatcher, made on first use

    # --- connection -------------------------------------------------------------------------
    def conn(self):
        with self._lock:
            if self._conn is not None:
                try:
                    if self._conn.isAlive():
                        return self._conn
                except libvirt.libvirtError:
                    pass
                log.warning("libvirt connection to %s lost; reconnecting", self.uri)
                self._conn = None
            start_event_loop()
            try:
                conn = libvirt.open(self.uri)
            except libvirt.libvirtError as err:
                raise translate(err, f"cannot connect to libvirt at {self.uri} "
                                     "(is libvirtd running? 'vmiso doctor' tells)") from err
            try:
                conn.setKeepAlive(5, 3)
            except libvirt.libvirtError:
                pass
            self._callback_id = conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None)
            try:
                conn.registerCloseCallback(self._on_close, None)
            except libvirt.libvirtError:
                pass
            self._conn = conn
            return conn

    def _on_close(self, conn, reason, _opaque):
        """libvirtd went away (restart, crash, keepalive timeout): heal in the background."""
        log.warning("libvirt connection to %s closed (reason %s); reconnecting", self.uri, reason)
        with self._lock:
            if self._conn is conn:
                self._conn = None
            if self._healing:
                return
            self._healing = True
        threading.Thread(target=self._heal, name="vmiso-libvirt-heal", daemon=True).start()

    def _heal(self):
        """Reconnect with backoff while anything is watched, then let the owner reconcile:
        events sent while we were away are lost, so libvirt is asked again."""
        attempt = 0
        try:
            while True:
                with self._lock:
                    if not self._watchers or self._conn is not None:
                        break
                try:
                    self.conn()
                    break
                except VirtError:
                    delay = self.RECONNECT_DELAYS[min(attempt, len(self.RECONNECT_DELAYS) - 1)]
                    attempt += 1
                    threading.Event().wait(delay)
        finally:
            with self._lock:
                self._healing = False
        if self.on_reconnect is not None and self._conn is not None:
            self.on_reconnect()

    def close(self):
        with self._lock:
            self._watchers.clear()
            if self._conn is not None:
                try:
                    try:
                        self._conn.unregisterCloseCallback()
                    except libvirt.libvirtError:
                        pass
                    if self._callback_id is not None:
                        self._conn.domainEventDeregisterAny(self._callback_id)
                    self._conn.close()
                except libvirt.libvirtError:
                    pass
                self._conn = None

    # --- events -----------------------------------------------------------------------------
    def watch(self, name, fn):
        with self._lock:
            self._watchers[name] = fn
        self.conn()

    def unwatch(self, name):
        with self._lock:
            self._watchers.pop(name, None)

    def watch_exit(self, name, fn):
        """Call ``fn()`` (from the exit watcher's thread; return quickly) when the QEMU process of
        running domain ``name`` exits, before libvirt's teardown reports the domain stopped.
        False if that cannot be watched (no pid file, no pidfd): libvirt's events still tell."""
        pid = self.pid(name)
        if pid is None:
            return False
        with self._lock:
            if self._exits is None:
                from .exits import ExitWatcher

                self._exits = ExitWatcher()
        return self._exits.watch(name, pid, fn)

    def unwatch_exit(self, name):
        if self._exits is not None:
            self._exits.unwatch(name)

    def _on_lifecycle(self, _conn, dom, event, detail, _opaque):
        fn = self._watchers.get(dom.name())
        if fn is not None:
            try:
                name = _EVENTS.get(event, str(event))
                details = {"stopped": _STOPPED_DETAILS, "suspended": _SUSPENDED_DETAILS}.get(name)
                fn(name, details.get(detail, str(detail)) if details else None)
            except Exception:  # an exception must never kill libvirt's event thread
                log.exception("lifecycle handler for %s failed", dom.name())

    # --- domains ----------------------------------------------------------------------------
    def versions(self):
        """(libvirt's version, the hypervisor's version), as libvirt's integers."""
        try:
            conn = self.conn()
            return conn.getLibVersion(), conn.getVersion()
        except libvirt.libvirtError as err:
            raise translate(err, "cannot read libvirt's and QEMU's versions") from err

    def create(self, xml):
        """Start a transient domain (not AUTODESTROY: VMs outlive the agent)."""
        try:
            return self.conn().createXML(xml, 0)
        except libvirt.libvirtError as err:
            raise translate(err, "libvirt could not start the VM") from err

    def our_domains(self, namespace):
        """(name, metadata XML text) of every running domain named vmiso-* (metadata may be None)."""
        try:
            domains = self.conn().listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        except libvirt.libvirtError as err:
            raise translate(err, "cannot list domains") from err
        found = []
        for dom in domains:
            try:
                name = dom.name()
            except libvirt.libvirtError:
                continue  # gone while we looked
            if name.startswith("vmiso-"):
                found.append((dom, self.metadata(dom, namespace)))
        return found

    def lookup(self, name):
        """The running domain called ``name``, or None."""
        try:
            return self.conn().lookupByName(name)
        except libvirt.libvirtError as err:
            if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise translate(err, f"cannot look up domain {name}") from err

    @staticmethod
    def pid(name, run_dir="/run/libvirt/qemu"):
        """QEMU's process id for running domain ``name`` (libvirt's pid file), or None."""
        try:
            with open(f"{run_dir}/{name}.pid") as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    @staticmethod
    def stop_reason(name, since, log_dir=QEMU_LOG_DIR):
        """Why domain ``name`` last stopped, from libvirt's own log ("shutdown", "destroyed",
        "crashed", ...), if that happened after ``since`` (epoch seconds); else None. This is
        how a VM that stopped while nobody listened for events is still told apart."""
        try:
            with open(os.path.join(log_dir, name + ".log"), "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 65536))
                tail = f.read()
        except OSError:
            return None
        matches = _STOP_LINE.findall(tail)
        if not matches:
            return None
        stamp, reason = matches[-1]
        when = calendar.timegm(time.strptime(stamp.decode(), "%Y-%m-%d %H:%M:%S"))
        return reason.decode() if when >= int(since) else None

    @staticmethod
    def remove_log(name, log_dir=QEMU_LOG_DIR):
        """Delete libvirt's log of a transient domain that is gone for good (one per task would
        pile up forever)."""
        for suffix in ("", ".0", ".1", ".2"):
            try:
                os.unlink(os.path.join(log_dir, f"{name}.log{suffix}"))
            except OSError:
                pass

    def shutdown(self, dom):
        """Ask the guest to power off (ACPI power button). No error if it is already gone."""
        try:
            dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
        except libvirt.libvirtError as err:
            if err.get_error_code() not in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID):
                raise translate(err, f"cannot shut down {dom.name()}") from err

    def destroy(self, dom):
        """Stop the domain now. A domain that is already gone counts as destroyed."""
        try:
            dom.destroy()
        except libvirt.libvirtError as err:
            if err.get_error_code() not in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID):
                raise translate(err, f"cannot destroy {dom.name()}") from err

    def set_metadata(self, dom, namespace, prefix, xml):
        """Replace the running domain's metadata element in ``namespace`` (live only: vmiso's
        domains are transient). A warm VM gets its task's container id this way at claim."""
        try:
            dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, xml, prefix, namespace,
                            libvirt.VIR_DOMAIN_AFFECT_LIVE)
        except libvirt.libvirtError as err:
            raise translate(err, f"cannot set the metadata of {dom.name()}") from err

    def attach_device(self, dom, xml):
        """Plug the device ``xml`` describes into the running domain (live only): a warm VM's
        NIC, at claim. Returns once QEMU has added it."""
        try:
            dom.attachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        except libvirt.libvirtError as err:
            raise translate(err, f"cannot attach a device to {dom.name()}") from err

    def metadata(self, dom, namespace):
        """The domain's metadata element in ``namespace`` as XML text, or None."""
        try:
            return dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, namespace, 0)
        except libvirt.libvirtError:
            return None

    # --- live limits (Isolator.update) and stats (the usage benchmark's baseline) ------------
    def _live(self, dom, what, call, *args):
        try:
            return call(*args, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        except libvirt.libvirtError as err:
            raise translate(err, f"cannot set {what} of {dom.name()}") from err

    def set_cpu(self, dom, shares=None, quota_us=None, period_us=None):
        """CPU weight and whole-VM CFS quota (``virsh schedinfo``: cpu_shares, global_*).
        ``quota_us`` -1 removes the quota."""
        params = {k: v for k, v in (("cpu_shares", shares), ("global_period", period_us),
                                    ("global_quota", quota_us)) if v is not None}
        self._live(dom, "CPU limits", dom.setSchedulerParametersFlags, params)

    def set_memory_hard_limit(self, dom, limit_bytes):
        """The memory cgroup's hard limit (``virsh memtune``: hard_limit)."""
        self._live(dom, "the memory hard limit", dom.setMemoryParameters, {"hard_limit": limit_bytes // 1024})

    def set_balloon(self, dom, memory_bytes):
        """The balloon target: guest memory the guest may use (``virsh dommemstat``: actual)."""
        self._live(dom, "the balloon target", dom.setMemoryFlags, memory_bytes // 1024)

    def set_block_iotune(self, dom, disk, params):
        """QEMU's I/O throttling of ``disk`` (vda...): libvirt's total/read/write bytes/iops_sec."""
        self._live(dom, f"I/O limits of {disk}", dom.setBlockIoTune, disk, dict(params))

    def all_stats(self, doms=None):
        """libvirt's getAllDomainStats (state, cpu, balloon, vcpu, net, block) of the running
        domains (only ``doms``, from lookup(), if given): [(name, {key: value})]."""
        wanted = (libvirt.VIR_DOMAIN_STATS_STATE | libvirt.VIR_DOMAIN_STATS_CPU_TOTAL | libvirt.VIR_DOMAIN_STATS_BALLOON
                  | libvirt.VIR_DOMAIN_STATS_VCPU | libvirt.VIR_DOMAIN_STATS_INTERFACE | libvirt.VIR_DOMAIN_STATS_BLOCK)
        try:
            conn = self.conn()
            if doms is None:
                records = conn.getAllDomainStats(wanted, libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE)
            else:
                records = conn.domainListGetStats(list(doms), wanted, 0) if doms else []
        except libvirt.libvirtError as err:
            raise translate(err, "cannot read domain statistics") from err
        return [(dom.name(), stats) for dom, stats in records]
