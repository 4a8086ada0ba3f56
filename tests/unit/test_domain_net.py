"""A task's NIC in the domain XML: an unmanaged tap that vmiso made, virtio, no option ROM."""
import xml.etree.ElementTree as ET

from vmiso.spec import Resources
from vmiso.virt import domain
from vmiso.virt.accel import Accel

from .test_domain import BOOT, design


def test_no_interface_without_network():
    root = ET.fromstring(design().to_xml())
    assert root.find("devices/interface") is None


def test_interface_is_an_unmanaged_tap():
    nics = (domain.Interface("vmi0123456789ab", "02:aa:bb:cc:dd:ee"),)
    config = domain.DomainConfig(**{**design().__dict__, "interfaces": nics})
    nic = ET.fromstring(config.to_xml()).find("devices/interface")
    assert nic.get("type") == "ethernet"
    assert nic.find("target").attrib == {"dev": "vmi0123456789ab", "managed": "no"}
    assert nic.find("mac").get("address") == "02:aa:bb:cc:dd:ee"
    assert nic.find("model").get("type") == "virtio"
    assert nic.find("rom").get("bar") == "off"
    assert nic.find("bandwidth") is None  # limits are vmiso's (tc), never libvirt's police


def test_design_passes_interfaces_through():
    nic = domain.Interface("vmiabc", "02:00:00:00:00:01")
    config = domain.design(
        name="vmiso-c", uuid="5f0e6c2e-0000-4000-8000-000000000001", accel=Accel("tcg", "test"),
        resources=Resources(), overlay="/o", base="/b", base_format="qcow2", seed="/s",
        logs=("/l1", "/l2", "/l3"), metadata={}, boot=BOOT, interfaces=[nic])
    assert config.interfaces == (nic,)
    assert ET.fromstring(config.to_xml()).find("devices/interface/target").get("dev") == "vmiabc"


def test_a_warm_vm_has_one_hot_plug_port_and_its_nic_goes_there():
    """A warm VM's NIC arrives at claim (vmiso/warm.py): the VM boots with a PCIe root port on
    the root bus (the root bus takes no hot-plugged device), and the NIC is plugged into that
    port's bus, without an option ROM (QEMU refuses a hot-plugged NIC with a ROM file and no BAR)."""
    root = ET.fromstring(design(claim_socket="/w/p/claim.sock", hotplug_port=True).to_xml())
    (port,) = [c for c in root.findall("devices/controller") if c.get("model") == "pcie-root-port"]
    assert port.get("type") == "pci" and port.get("index") == str(domain.HOTPLUG_BUS)
    assert port.find("address").get("bus") == "0x00"
    slots = [el.find("address").get("slot") for el in root.iter() if el.find("address") is not None]
    assert len(slots) == len(set(slots))
    # One virtio-serial controller holds the claim port (port 0 is a console's): libvirt adds no
    # second one, which it would put on the hot-plug port's bus.
    (serial,) = [c for c in root.findall("devices/controller") if c.get("type") == "virtio-serial"]
    assert int(serial.get("ports")) == len(root.findall("devices/channel")) + 1
    nic = ET.fromstring(domain.interface_xml(domain.Interface("vmiabc", "02:00:00:00:00:01", hotplug=True)))
    assert nic.find("target").attrib == {"dev": "vmiabc", "managed": "no"}
    assert nic.find("address").get("bus") == f"0x{domain.HOTPLUG_BUS:02x}"
    assert nic.find("rom").attrib == {"enabled": "no"}
    assert ET.fromstring(design().to_xml()).find("devices/controller[@model='pcie-root-port']") is None
