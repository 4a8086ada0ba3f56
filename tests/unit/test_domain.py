"""Domain XML is built as objects: user data can never change its shape."""
import xml.etree.ElementTree as ET
from types import SimpleNamespace

from vmiso.spec import Resources
from vmiso.virt import domain
from vmiso.virt.accel import Accel

BOOT = SimpleNamespace(kernel="/img/vmlinuz", initrd="/img/initrd.img", cmdline="console=ttyS0 quiet")


def design(resources=None, boot=BOOT, container="c1", **extra):
    return domain.design(**extra,
        name="vmiso-" + container, uuid="5f0e6c2e-0000-4000-8000-000000000001", accel=Accel("tcg", "test"),
        resources=resources or Resources(), overlay="/w/c/overlay.qcow2", base="/w/images/base.qcow2",
        base_format="qcow2",
        seed="/w/c/seed.iso", logs=("/w/c/console.log", "/w/c/stdout", "/w/c/stderr"),
        metadata={"agent": "a1", "container": container, "boot-id": "b"}, boot=boot)


def test_direct_kernel_boot_domain():
    root = ET.fromstring(design().to_xml())
    assert root.get("type") == "qemu"
    assert root.findtext("name") == "vmiso-c1"
    assert root.findtext("vcpu") == "1"
    assert root.find("memory").get("unit") == "MiB" and root.findtext("memory") == "256"
    assert root.findtext("os/kernel") == "/img/vmlinuz"
    assert root.findtext("os/cmdline") == "console=ttyS0 quiet"
    assert root.find("features/acpi") is not None
    assert [root.findtext(e) for e in ("on_poweroff", "on_reboot", "on_crash")] == ["destroy"] * 3
    disks = root.findall("devices/disk")
    assert disks[0].find("source").get("file") == "/w/c/overlay.qcow2"
    assert disks[0].find("backingStore/format").get("type") == "qcow2"  # never probed
    assert disks[0].find("backingStore/source/seclabel").get("relabel") == "no"  # the base stays root's
    assert disks[1].find("readonly") is not None and disks[1].find("driver").get("type") == "raw"
    # A full host file system is an I/O error in the guest, never a VM paused forever.
    assert {(d.find("driver").get("error_policy"), d.find("driver").get("rerror_policy")) for d in disks} == {
        ("report", "report")}
    assert {s.get("type") for s in root.findall("devices/serial")} == {"null"}  # logged by virtlogd
    assert [s.find("log").get("file") for s in root.findall("devices/serial")] == [
        "/w/c/console.log", "/w/c/stdout", "/w/c/stderr"]
    assert root.find("cputune") is None


def test_disk_boot_has_no_kernel_and_no_qboot():
    root = ET.fromstring(design(boot=None).to_xml())
    assert root.find("os/kernel") is None and root.find("os/loader") is None
    assert root.find("os/boot").get("dev") == "hd"


def test_fractional_cpus_become_a_global_quota():
    root = ET.fromstring(design(Resources(cpus=1.5)).to_xml())
    assert root.findtext("vcpu") == "2"
    assert root.findtext("cputune/global_quota") == "150000"
    assert root.findtext("cputune/global_period") == "100000"


def test_metadata_round_trip_and_escaping():
    nasty = "a]]><x/>&'\""
    xml = design(container=nasty).to_xml()
    root = ET.fromstring(xml)  # still well-formed
    inst = root.find(f"metadata/{{{domain.METADATA_NS}}}instance")
    record = domain.parse_metadata(ET.tostring(inst, encoding="unicode"))
    assert record == {"agent": "a1", "container": nasty, "boot-id": "b"}


def test_parse_metadata_rejects_foreign_xml():
    assert domain.parse_metadata(None) is None
    assert domain.parse_metadata("<not xml") is None
    assert domain.parse_metadata("<other><agent>a1</agent></other>") is None


def test_lean_platform_and_devices_on_the_root_bus():
    """The boot-path policy: no PCIe root port per device (explicit root-bus slots, unique), no
    HPET, no PMU, no VMware port."""
    root = ET.fromstring(design().to_xml())
    pci = [el.find("address") for el in root.find("devices") if el.find("address") is not None]
    assert len(pci) == len(root.findall("devices/disk")) + (root.find("devices/memballoon").get("model") != "none")
    assert {a.get("bus") for a in pci} == {"0x00"}
    assert len({a.get("slot") for a in pci}) == len(pci)
    assert root.find("clock/timer[@name='hpet']").get("present") == "no"
    assert root.find("features/pmu").get("state") == "off" and root.find("features/vmport").get("state") == "off"
    assert root.find("devices/controller[@model='pcie-root-port']") is None


def test_task_channel_takes_input_through_a_unix_socket_and_keeps_its_log():
    root = ET.fromstring(design(control_socket="/w/c/control.sock").to_xml())
    serials = root.findall("devices/serial")
    assert [s.get("type") for s in serials] == ["null", "unix", "null"]
    assert serials[1].find("source").attrib == {"mode": "bind", "path": "/w/c/control.sock"}
    assert serials[1].find("log").get("file") == "/w/c/stdout" and serials[1].find("target").get("port") == "1"
    assert [s.get("type") for s in ET.fromstring(design().to_xml()).findall("devices/serial")] == ["null"] * 3
