"""A libvirt host in memory, with Host's interface, for unit tests of the Isolator's own logic:
launch rollback, every way a task ends, conclusion and recovery, in seconds, without root or
libvirtd. ``Isolator(host=FakeHost())``.

It fails the way Host does, with libvirt's real error codes (a VirtError whose ``code`` is the
libvirt module's constant), and delivers lifecycle events the way Host does (``watch``: events as
words). Tests drive the guest from outside: ``guest_exits(name, code)`` writes the exit line
where QEMU's serial log would be and powers the domain off; ``stop(name, detail)`` ends it
otherwise ("crashed", "destroyed", "failed", or silently with ``detail=None``).
"""
import os
import threading
import xml.etree.ElementTree as ET

import libvirt

from ..errors import VirtError
from ..paths import Workdir
from ..virt import channel
from ..virt import domain as domain_xml

LIBVIRT_9_0 = 9_000_000
QEMU_7_2 = 7_002_000


class FakeDomain:
    def __init__(self, name, xml):
        self._name = name
        self.xml = xml
        root = ET.fromstring(xml)
        meta = root.find(f"metadata/{{{domain_xml.METADATA_NS}}}instance")
        self.metadata = ET.tostring(meta, encoding="unicode") if meta is not None else None
        self.stdout = next((s.find("log").get("file") for s in root.findall("devices/serial")
                            if s.find("target").get("port") == "1"), None)
        self.destroyed = False
        self.claimed = None  # a warm VM's: the bytes its claim port received (FakeHost plays the guest)
        self.claim_done = threading.Event()
        self.attached = []   # XML of the devices plugged in while it runs (attach_device)
        self.claim_socket = next((c.find("source").get("path") for c in root.findall("devices/channel")
                                  if c.find("target").get("name") == domain_xml.CLAIM_PORT_NAME), None)

    def play_warm_guest(self):
        """What micro's init does in a warm VM: say ready on the claim port, read the task."""
        import socket

        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            try:
                conn.connect(self.claim_socket)
                conn.sendall(b"VMISO-WARM-READY\n")
                data = b""
                while chunk := conn.recv(65536):
                    data += chunk
                self.claimed = data
            except OSError:
                pass
        self.claim_done.set()

    def name(self):
        return self._name


class FakeHost:
    """In-memory libvirt: running domains by name, watchers, and what was asked of it."""

    def __init__(self):
        self.domains = {}          # name -> FakeDomain, running
        self.calls = []            # (method, name) in order
        self.fail_next = {}        # method -> libvirt error code raised at its next call
        self.stop_reasons = {}     # name -> what libvirt's log says about the last stop
        self.hard_limits = {}      # name -> bytes
        self.on_reconnect = None
        self._watchers = {}
        self._exit_watchers = {}  # name -> fn: Host.watch_exit (QEMU's pidfd)
        self._lock = threading.Lock()

    # --- faults ------------------------------------------------------------------------------
    def _maybe_fail(self, method, what):
        code = self.fail_next.pop(method, None)
        if code is not None:
            raise VirtError(f"{what}: injected libvirt error {code}", code=code)

    # --- Host's interface --------------------------------------------------------------------
    def watch(self, name, fn):
        with self._lock:
            self._watchers[name] = fn

    def unwatch(self, name):
        with self._lock:
            self._watchers.pop(name, None)

    def watch_exit(self, name, fn):
        with self._lock:
            if name not in self.domains:
                return False
            self._exit_watchers[name] = fn
        return True

    def unwatch_exit(self, name):
        with self._lock:
            self._exit_watchers.pop(name, None)

    def versions(self):
        return LIBVIRT_9_0, QEMU_7_2

    def create(self, xml):
        name = ET.fromstring(xml).findtext("name")
        self.calls.append(("create", name))
        self._maybe_fail("create", "libvirt could not start the VM")
        with self._lock:
            if name in self.domains:
                raise VirtError(f"libvirt could not start the VM: operation failed: domain '{name}' already exists",
                                code=libvirt.VIR_ERR_OPERATION_FAILED)
            dom = self.domains[name] = FakeDomain(name, xml)
        self._emit(name, "started", None)
        if dom.claim_socket is not None:
            threading.Thread(target=dom.play_warm_guest, daemon=True).start()
        return dom

    def our_domains(self, namespace):
        with self._lock:
            return [(d, d.metadata) for n, d in self.domains.items() if n.startswith("vmiso-")]

    def lookup(self, name):
        self._maybe_fail("lookup", f"cannot look up domain {name}")
        with self._lock:
            return self.domains.get(name)

    @staticmethod
    def pid(name, run_dir=None):
        return None

    def stop_reason(self, name, since, log_dir=None):
        return self.stop_reasons.get(name)

    def remove_log(self, name, log_dir=None):
        self.calls.append(("remove_log", name))

    def shutdown(self, dom):
        """The ACPI power button: this fake guest powers off at once, without an exit line."""
        self.calls.append(("shutdown", dom.name()))
        self.stop(dom.name(), "shutdown")

    def destroy(self, dom):
        self.calls.append(("destroy", dom.name()))
        self._maybe_fail("destroy", f"cannot destroy {dom.name()}")
        self.stop(dom.name(), "destroyed")

    def metadata(self, dom, namespace):
        return dom.metadata

    def set_metadata(self, dom, namespace, prefix, xml):
        self.calls.append(("set_metadata", dom.name()))
        self._maybe_fail("set_metadata", f"cannot set the metadata of {dom.name()}")
        dom.metadata = xml

    def attach_device(self, dom, xml):
        self.calls.append(("attach_device", dom.name()))
        self._maybe_fail("attach_device", f"cannot attach a device to {dom.name()}")
        dom.attached.append(xml)

    def set_memory_hard_limit(self, dom, limit_bytes):
        self._maybe_fail("set_memory_hard_limit", f"cannot set the memory limit of {dom.name()}")
        self.hard_limits[dom.name()] = limit_bytes

    def close(self):
        with self._lock:
            self._watchers.clear()
            self._exit_watchers.clear()

    # --- the tests' side -----------------------------------------------------------------------
    def add_foreign(self, name, metadata=None):
        """A domain vmiso did not make (``virsh create``), optionally with ownership metadata."""
        dom = FakeDomain(name, f"<domain><name>{name}</name></domain>")
        dom.metadata = metadata
        with self._lock:
            self.domains[name] = dom
        return dom

    def guest_exits(self, name, code, teardown=True):
        """The guest wrapper reports ``code`` on the task channel, then powers off: QEMU exits
        (exit watchers hear it) and, unless ``teardown`` is False, libvirt reports the domain
        stopped. With ``teardown=False`` the domain stays, as during libvirt's teardown, until
        ``stop(name, "shutdown")``."""
        dom = self.domains[name]
        nonce = _nonce_of(dom)
        with open(_stdout_of(dom), "ab") as f:
            f.write(channel.exit_line(nonce, code))
        self.qemu_exits(name)
        if teardown:
            self.stop(name, "shutdown")

    def qemu_exits(self, name):
        """QEMU's process of ``name`` ends (its pidfd fires); libvirt has not noticed yet."""
        with self._lock:
            fn = self._exit_watchers.pop(name, None)
        if fn is not None:
            fn()

    def stop(self, name, detail, notify=True):
        """The domain ends (``detail``: how libvirt says it stopped); its watcher hears of it
        unless ``notify`` is False (an event lost while nobody listened)."""
        with self._lock:
            dom = self.domains.pop(name, None)
            self._exit_watchers.pop(name, None)
        if dom is None:
            return
        dom.destroyed = detail == "destroyed"
        if notify:
            self._emit(name, "stopped", detail)

    def suspend(self, name, detail):
        """libvirt pauses the domain (``detail``: "paused" by someone, "ioerror" by a disk error)."""
        self._emit(name, "suspended", detail)

    def resume(self, name):
        self._emit(name, "resumed", None)

    def _emit(self, name, event, detail):
        with self._lock:
            fn = self._watchers.get(name)
        if fn is not None:
            fn(event, detail)


def _stdout_of(dom):
    """Where the domain's task channel is logged now. QEMU keeps its log open across a rename of
    its directory (a warm VM claimed: vmiso/warm.py); the fake follows the metadata instead."""
    if os.path.isdir(os.path.dirname(dom.stdout)):
        return dom.stdout
    record = domain_xml.parse_metadata(dom.metadata) or {}
    if not (record.get("workdir") and record.get("container")):
        return dom.stdout
    return os.path.join(Workdir(record["workdir"]).container_dir(record["container"]), os.path.basename(dom.stdout))


def _nonce_of(dom):
    """The launch's nonce, from the checkpoint of the container its metadata names (or, without
    one, the checkpoint beside its stdout log)."""
    from .. import state

    record = domain_xml.parse_metadata(dom.metadata) or {}
    if record.get("container") and record.get("workdir"):
        return state.read(str(Workdir(record["workdir"]).container_dir(record["container"]))).nonce
    return state.read(os.path.dirname(_stdout_of(dom))).nonce
