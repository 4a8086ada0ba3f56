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
