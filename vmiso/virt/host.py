"""The libvirt connection: open, heal, create and look up domains, and deliver lifecycle events.

This module and virt/domain.py are the only places that touch libvirt; libvirt errors become
vmiso.errors.VirtError here (with libvirt's error code), always ``raise ... from err``.
"""
import logging
import threading

import libvirt

from ..errors import VirtError

log = logging.getLogger(__name__)

DEFAULT_URI = "qemu:///system"

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


class Host:
    """One libvirt connection with reconnect, and lifecycle events dispatched per domain name.

    ``watch(name, fn)`` calls ``fn(event, detail)`` from the event thread for every lifecycle
    event of domain ``name``, as words: ("stopped", "shutdown"|"destroyed"|"crashed"|"failed"|...),
    ("started", None), ...
    """

    def __init__(self, uri=DEFAULT_URI):
        self.uri = uri
        self._conn = None
        self._lock = threading.RLock()
        self._watchers = {}
        self._callback_id = None

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
            self._conn = conn
            return conn

    def close(self):
        with self._lock:
            if self._conn is not None:
                try:
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

    def _on_lifecycle(self, _conn, dom, event, detail, _opaque):
        fn = self._watchers.get(dom.name())
        if fn is not None:
            try:
                name = _EVENTS.get(event, str(event))
                fn(name, _STOPPED_DETAILS.get(detail, str(detail)) if name == "stopped" else None)
            except Exception:  # an exception must never kill libvirt's event thread
                log.exception("lifecycle handler for %s failed", dom.name())

    # --- domains ----------------------------------------------------------------------------
    def create(self, xml):
        """Start a transient domain (not AUTODESTROY: VMs outlive the agent)."""
        try:
            return self.conn().createXML(xml, 0)
        except libvirt.libvirtError as err:
            raise translate(err, "libvirt could not start the VM") from err

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

    def metadata(self, dom, namespace):
        """The domain's metadata element in ``namespace`` as XML text, or None."""
        try:
            return dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, namespace, 0)
        except libvirt.libvirtError:
            return None
