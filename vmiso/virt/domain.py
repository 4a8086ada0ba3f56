"""Domain XML, built as objects and serialised with ElementTree (never string templates).

``DomainConfig`` and its parts hold no policy: they say what the domain is. ``design()`` holds
the policy: which machine, firmware, devices and limits a vmiso task gets. ``parse_metadata``
reads back the ownership record that recover() uses to tell our domains from anyone else's.
"""
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Optional

from . import cpuprobe

METADATA_NS = "https://vmiso.dev/xmlns/instance/1"
METADATA_PREFIX = "vmiso"
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"  # libvirt's QEMU-specific extensions
QBOOT_ROM = "/usr/share/qemu/qboot.rom"
CPU_PERIOD_US = 100_000
TASK_CHANNEL_PORT = 1  # serial ports: 0 the boot console, 1 the task's stdout (and stop requests), 2 stderr
STDIN_PORT_NAME = "vmiso.stdin"  # the virtio-serial port the guest wrapper gives the task as stdin
CLAIM_PORT_NAME = "vmiso.claim"  # a warm VM's: its task's seed files arrive there (vmiso/pool.py)
# A warm VM's PCIe root port (controller index 1, so bus 1): its task's NIC is plugged in there at
# claim. The root bus takes no hot-plugged device; a root port does.
HOTPLUG_BUS = 1
# A virtio balloon lets update() change guest memory live (a guest without the driver ignores it).
# Its boot cost was within the noise when measured (docs/performance.md, "Numbers behind code
# comments"); re-measure with `vmiso bench launch` before removing it to save time.
BALLOON = True


@dataclass(frozen=True)
class Disk:
    path: str
    target: str                 # vda, vdb, ...
    format: str = "qcow2"
    readonly: bool = False
    backing: Optional[str] = None         # backing file, stated so libvirt never probes
    backing_format: Optional[str] = None
    shared: bool = False        # a read-only base used as it is (by many VMs): never relabelled


@dataclass(frozen=True)
class Interface:
    """A NIC on a tap vmiso made and wired itself (net/): libvirt must neither create, rename
    nor reconfigure it (``managed='no'``)."""

    tap: str
    mac: str
    model: str = "virtio"
    rom: bool = False           # the NIC's option ROM only slows a direct kernel boot
    # Plugged into a running domain's hot-plug port (HOTPLUG_BUS): QEMU refuses a hot-plugged NIC
    # with its ROM file but no ROM BAR, so it gets no ROM at all.
    hotplug: bool = False


@dataclass(frozen=True)
class Filesystem:
    """A host directory shared with the guest over virtio-9p, found there by ``tag``.
    ``accessmode`` 'mapped': QEMU creates files as its own user with plain modes, and keeps the
    guest's owner, mode, device nodes and symlinks in xattrs (virt/volumes.py says why)."""

    source: str
    tag: str
    readonly: bool = False
    accessmode: str = "mapped"


@dataclass(frozen=True)
class DomainConfig:
    name: str
    uuid: str
    domain_type: str            # "kvm" or "qemu" (TCG)
    vcpus: int
    memory_mib: int
    disks: tuple
    serial_logs: tuple          # file per serial port: console, task stdout, task stderr
    metadata: dict = field(default_factory=dict)
    machine: str = "q35"
    firmware_rom: Optional[str] = None
    kernel: Optional[str] = None
    initrd: Optional[str] = None
    cmdline: Optional[str] = None
    cpu_quota_us: Optional[int] = None  # whole-VM CFS quota per CPU_PERIOD_US, for fractional cpus
    interfaces: tuple = ()
    balloon: bool = False                    # a virtio balloon, so update() can change guest memory live
    # PCI devices as integrated endpoints on the root bus (slots from 2): no PCIe root port per
    # device for the guest kernel to probe and set up (they hot-plug nothing a task VM needs).
    root_bus_devices: bool = False
    lean_platform: bool = False  # no HPET, no VMware I/O port, no PMU: nothing a task VM uses
    # One PCIe root port (bus HOTPLUG_BUS) for a device plugged in while the VM runs: a warm VM's
    # NIC, attached when a task with a network claims it (vmiso/warm.py).
    hotplug_port: bool = False
    # QEMU capabilities libvirt must act as if this QEMU lacked (virt/cpuprobe.py says why).
    dropped_qemu_caps: tuple = ()
    # The task channel's (serial port 1's) input: a unix socket libvirt listens on, through which
    # vmiso writes to the guest (a stop request). Its output is logged either way.
    task_channel_socket: Optional[str] = None
    filesystems: tuple = ()                  # Filesystem: host directories shared with the guest
    # The task's stdin: a virtio-serial port (STDIN_PORT_NAME) whose host end connects to a unix
    # socket vmiso listens on (virt/stdin.py); None: no such port.
    stdin_socket: Optional[str] = None
    # A warm (pool) VM's claim port: a virtio-serial port (CLAIM_PORT_NAME) whose host end
    # connects to a unix socket the pool listens on; the task's seed files arrive there.
    claim_socket: Optional[str] = None
    # (uid, gid) QEMU runs as instead of libvirt's configured user (a local user's container).
    # libvirt then chowns the container's files to it while the VM runs (its own private files
    # too: relabel='no' leaves QEMU unable to read libvirt's master key), so nothing shared may
    # be named but the bases, which keep relabel='no' (a kernel is the container's own copy).
    dac_label: Optional[tuple] = None

    def to_xml(self):
        return ET.tostring(self.to_element(), encoding="unicode")

    def to_element(self):
        root = ET.Element("domain", type=self.domain_type)
        _text(root, "name", self.name)
        _text(root, "uuid", self.uuid)
        root.append(self._metadata_element())
        _text(root, "memory", str(self.memory_mib), unit="MiB")
        _text(root, "currentMemory", str(self.memory_mib), unit="MiB")  # the balloon may lower it
        _text(root, "vcpu", str(self.vcpus))
        if self.cpu_quota_us is not None:
            tune = ET.SubElement(root, "cputune")
            _text(tune, "global_period", str(CPU_PERIOD_US))
            _text(tune, "global_quota", str(self.cpu_quota_us))
        root.append(self._os_element())
        features = ET.SubElement(root, "features")
        ET.SubElement(features, "acpi")  # without ACPI, poweroff only halts
        if self.lean_platform:
            ET.SubElement(features, "pmu", state="off")
            ET.SubElement(features, "vmport", state="off")
        if self.domain_type == "kvm":
            ET.SubElement(root, "cpu", mode="host-passthrough")
        clock = ET.SubElement(root, "clock", offset="utc")
        if self.lean_platform:
            ET.SubElement(clock, "timer", name="hpet", present="no")
        for event in ("on_poweroff", "on_reboot", "on_crash"):
            _text(root, event, "destroy")  # a task VM never reboots: any of these ends it
        root.append(self._devices_element())
        if self.dac_label is not None:
            label = ET.SubElement(root, "seclabel", type="static", model="dac", relabel="yes")
            _text(label, "label", "+{}:+{}".format(*self.dac_label))
        if self.dropped_qemu_caps:
            ET.register_namespace("qemu", QEMU_NS)
            caps = ET.SubElement(root, f"{{{QEMU_NS}}}capabilities")
            for cap in self.dropped_qemu_caps:
                ET.SubElement(caps, f"{{{QEMU_NS}}}del", capability=cap)
        return root

    def _metadata_element(self):
        meta = ET.Element("metadata")
        ET.register_namespace(METADATA_PREFIX, METADATA_NS)
        inst = ET.SubElement(meta, f"{{{METADATA_NS}}}instance")
        for key, value in self.metadata.items():
            _text(inst, f"{{{METADATA_NS}}}{key}", str(value))
        return meta

    def _os_element(self):
        os_el = ET.Element("os")
        _text(os_el, "type", "hvm", arch="x86_64", machine=self.machine)
        if self.firmware_rom:
            _text(os_el, "loader", self.firmware_rom, type="rom", readonly="yes")
        if self.kernel:
            _text(os_el, "kernel", self.kernel)
            if self.initrd:
                _text(os_el, "initrd", self.initrd)
            if self.cmdline:
                _text(os_el, "cmdline", self.cmdline)
        else:
            ET.SubElement(os_el, "boot", dev="hd")
        return os_el

    def _devices_element(self):
        devices = ET.Element("devices")
        for disk in self.disks:
            devices.append(_disk_element(disk))
        for nic in self.interfaces:
            devices.append(_interface_element(nic))
        for fs in self.filesystems:
            devices.append(_filesystem_element(fs))
        for port, path in enumerate(self.serial_logs):
            # Each port's output is logged through virtlogd: it rolls the file over at its max_size
            # and keeps max_backups, so a flooding guest cannot fill the disk. Only the task
            # channel takes input (from vmiso, through a unix socket); the others' backend is null.
            if port == TASK_CHANNEL_PORT and self.task_channel_socket:
                serial = ET.SubElement(devices, "serial", type="unix")
                ET.SubElement(serial, "source", mode="bind", path=self.task_channel_socket)
            else:
                serial = ET.SubElement(devices, "serial", type="null")
            ET.SubElement(serial, "log", file=path, append="off")
            ET.SubElement(serial, "target", port=str(port))
        channels = [(path, name) for path, name in ((self.stdin_socket, STDIN_PORT_NAME),
                                                    (self.claim_socket, CLAIM_PORT_NAME)) if path]
        if channels:
            # Port 0 is a console's: libvirt numbers channels from 1, and with ports=len(channels)
            # the last one did not fit and libvirt added a second controller where it found a
            # free PCI slot (a warm VM's hot-plug port).
            ET.SubElement(devices, "controller", type="virtio-serial", index="0", ports=str(len(channels) + 1))
        for path, name in channels:
            chan = ET.SubElement(devices, "channel", type="unix")
            # mode connect: QEMU connects while it starts, before the guest runs, so the port is
            # open (host_connected) when the guest first reads, and our hang-up becomes its EOF.
            ET.SubElement(chan, "source", mode="connect", path=path)
            ET.SubElement(chan, "target", type="virtio", name=name)
        if self.hotplug_port:
            ET.SubElement(devices, "controller", type="pci", index=str(HOTPLUG_BUS), model="pcie-root-port")
        ET.SubElement(devices, "controller", type="usb", model="none")
        ET.SubElement(devices, "memballoon", model="virtio" if self.balloon else "none")
        if self.root_bus_devices:
            pci = [el for el in devices if el.tag in ("disk", "interface", "filesystem")
                   or (el.tag == "memballoon" and el.get("model") != "none")
                   or (el.tag == "controller" and el.get("type") == "virtio-serial")
                   or (el.tag == "controller" and el.get("model") == "pcie-root-port")]
            for slot, el in enumerate(pci, start=2):
                ET.SubElement(el, "address", type="pci", domain="0x0000", bus="0x00", slot=f"0x{slot:02x}",
                              function="0x0")
        return devices


def _text(parent, tag, text, **attrs):
    el = ET.SubElement(parent, tag, **attrs)
    el.text = text
    return el


def _disk_element(disk):
    el = ET.Element("disk", type="file", device="disk")
    # error_policy "report": an overlay that cannot grow (host file system full) is an I/O
    # error inside the guest, which ends its task; QEMU's default pauses the VM forever.
    ET.SubElement(el, "driver", name="qemu", type=disk.format, discard="unmap",
                  error_policy="report", rerror_policy="report")
    source = ET.SubElement(el, "source", file=disk.path)
    if disk.shared:
        ET.SubElement(source, "seclabel", model="dac", relabel="no")  # root's, 0444, as a backing base
        ET.SubElement(el, "backingStore")  # it has no backing file: nothing to probe
    if disk.backing:
        store = ET.SubElement(el, "backingStore", type="file")
        ET.SubElement(store, "format", type=disk.backing_format or "qcow2")
        source = ET.SubElement(store, "source", file=disk.backing)
        # Never chown the shared base to QEMU's user (libvirt would, and never give it back):
        # it stays root's and read-only, readable by QEMU through its 0444 mode.
        ET.SubElement(source, "seclabel", model="dac", relabel="no")
        ET.SubElement(store, "backingStore")  # the base has no backing file of its own
    ET.SubElement(el, "target", dev=disk.target, bus="virtio")
    if disk.readonly:
        ET.SubElement(el, "readonly")
    return el


def _filesystem_element(fs):
    el = ET.Element("filesystem", type="mount", accessmode=fs.accessmode)
    ET.SubElement(el, "driver", type="path")
    ET.SubElement(el, "source", dir=fs.source)
    ET.SubElement(el, "target", dir=fs.tag)
    if fs.readonly:
        ET.SubElement(el, "readonly")  # QEMU refuses every change (EROFS), whatever the guest mounts
    return el


def _interface_element(nic):
    el = ET.Element("interface", type="ethernet")
    ET.SubElement(el, "mac", address=nic.mac)
    ET.SubElement(el, "target", dev=nic.tap, managed="no")
    ET.SubElement(el, "model", type=nic.model)
    if nic.hotplug:
        ET.SubElement(el, "rom", enabled="no")
        ET.SubElement(el, "address", type="pci", domain="0x0000", bus=f"0x{HOTPLUG_BUS:02x}", slot="0x00",
                      function="0x0")
    elif not nic.rom:
        ET.SubElement(el, "rom", bar="off")
    return el


def interface_xml(nic):
    """The <interface> element of Interface ``nic`` as XML text (for Host.attach_device)."""
    return ET.tostring(_interface_element(nic), encoding="unicode")


def metadata_xml(record):
    """Our metadata element for ``record`` (key -> value) as XML text, for Host.set_metadata:
    without a namespace of its own (libvirt puts it in the namespace and prefix it is given)."""
    inst = ET.Element("instance")
    for key, value in record.items():
        _text(inst, key, str(value))
    return ET.tostring(inst, encoding="unicode")


def parse_metadata(xml_text):
    """The key -> value record inside our metadata element (None if it is not ours)."""
    if not xml_text:
        return None
    try:
        root = ET.fromstring(xml_text)
    except ET.ParseError:
        return None
    if root.tag not in (f"{{{METADATA_NS}}}instance", "instance"):
        return None
    return {child.tag.rsplit("}", 1)[-1]: (child.text or "") for child in root}


def design(*, name, uuid, accel, resources, overlay, base, base_format, seed, logs, metadata, boot,
           interfaces=(), quick_cpu_probe=False, control_socket=None,
           filesystems=(), stdin_socket=None, system_disk=None, dac_label=None, claim_socket=None,
           hotplug_port=False):
    """The DomainConfig for one task: ``boot`` is a MicroImage-like object with kernel, initrd
    and cmdline for direct kernel boot, or None to boot the disk (a cloud image).
    ``system_disk``: micro's root as a shared read-only vdc (a container image's task: the
    overlay is the image's root, micro's root only runs vmiso's init and wrapper).
    ``quick_cpu_probe``: the host's cpuprobe.choose() said yes. ``control_socket``: where libvirt
    listens for what vmiso writes to the task channel. ``filesystems``: Filesystem objects (the
    task's volumes). ``stdin_socket``: where vmiso listens for the task's stdin port.
    ``dac_label``: (uid, gid) to run QEMU as (None: libvirt's configured QEMU user).
    ``hotplug_port``: a PCIe root port for a NIC plugged in later (a warm VM's)."""
    quota = None
    if resources.cpus != resources.vcpus:
        quota = int(round(resources.cpus * CPU_PERIOD_US))
    disks = (
        Disk(str(overlay), "vda", "qcow2", backing=str(base), backing_format=base_format),
        Disk(str(seed), "vdb", "raw", readonly=True),
    )
    if system_disk is not None:
        disks += (Disk(str(system_disk), "vdc", "qcow2", readonly=True, shared=True),)
    return DomainConfig(
        name=name, uuid=uuid, domain_type=accel.domain_type, vcpus=resources.vcpus,
        memory_mib=resources.mem_mib, disks=disks, serial_logs=tuple(str(p) for p in logs),
        metadata=metadata, cpu_quota_us=quota, interfaces=tuple(interfaces),
        balloon=BALLOON,
        # Devices on the root bus and no HPET, vmport or PMU: less for the guest kernel to probe,
        # a faster boot under TCG (docs/performance.md; the balloon stays for update() although
        # it costs some of that).
        root_bus_devices=True, lean_platform=True,
        # qboot starts a direct-boot kernel faster than SeaBIOS; disks need a real BIOS.
        firmware_rom=QBOOT_ROM if boot is not None and os.path.exists(QBOOT_ROM) else None,
        kernel=str(boot.kernel) if boot is not None else None,
        initrd=str(boot.initrd) if boot is not None and boot.initrd else None,
        cmdline=boot.cmdline if boot is not None else None,
        dropped_qemu_caps=(cpuprobe.CAPABILITY,) if quick_cpu_probe else (),
        task_channel_socket=str(control_socket) if control_socket else None,
        filesystems=tuple(filesystems), stdin_socket=str(stdin_socket) if stdin_socket else None,
        claim_socket=str(claim_socket) if claim_socket else None, hotplug_port=hotplug_port,
        dac_label=tuple(dac_label) if dac_label is not None else None,
    )
