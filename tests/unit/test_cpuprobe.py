"""When vmiso spares libvirt its per-feature CPU probe (virt/cpuprobe.py), and the XML it takes."""
import xml.etree.ElementTree as ET

import pytest

from vmiso import InvalidSpec
from vmiso.virt import cpuprobe, domain

from .test_domain import design

LIBVIRT_9, QEMU_7_2 = 9_000_000, 7_002_022


def test_quick_on_a_libvirt_and_qemu_that_probe_per_feature():
    probe = cpuprobe.choose(LIBVIRT_9, QEMU_7_2)
    assert probe.quick and "tainted" in probe.reason and cpuprobe.ENV in probe.reason


@pytest.mark.parametrize("libvirt_version, qemu_version, wanted, why", [
    (LIBVIRT_9, QEMU_7_2, "full", f"{cpuprobe.ENV}=full"),   # the operator said so
    (5_004_000, QEMU_7_2, "quick", "2 queries already"),      # libvirt cannot parse <qemu:capabilities>
    (LIBVIRT_9, 4_000_000, "quick", "2 queries already"),     # QEMU without unavailable-features
    (cpuprobe.MIN_LIBVIRT - 1, cpuprobe.MIN_QEMU, "quick", "2 queries already"),  # the boundaries
    (cpuprobe.MIN_LIBVIRT, cpuprobe.MIN_QEMU - 1, "quick", "2 queries already"),
])
def test_full_where_the_shortcut_does_not_apply(libvirt_version, qemu_version, wanted, why):
    probe = cpuprobe.choose(libvirt_version, qemu_version, wanted)
    assert not probe.quick and why in probe.reason
    assert cpuprobe.choose(cpuprobe.MIN_LIBVIRT, cpuprobe.MIN_QEMU).quick  # the lowest versions it applies to


def test_setting_from_argument_environment_and_default(monkeypatch):
    monkeypatch.delenv(cpuprobe.ENV, raising=False)
    assert cpuprobe.setting() == "quick"
    monkeypatch.setenv(cpuprobe.ENV, "full")
    assert cpuprobe.setting() == "full"
    assert cpuprobe.setting("quick") == "quick"  # an explicit argument wins
    monkeypatch.setenv(cpuprobe.ENV, "fast")
    with pytest.raises(InvalidSpec, match="quick, full"):
        cpuprobe.setting()


def test_isolator_refuses_an_unknown_setting_before_touching_anything(tmp_path):
    from vmiso import Isolator

    with pytest.raises(InvalidSpec):
        Isolator(workdir=str(tmp_path / "w"), accel="tcg", cpu_probe="sometimes")
    assert not (tmp_path / "w").exists()


def _qemu_dels(xml_text):
    root = ET.fromstring(xml_text)
    return [el.get("capability") for el in root.findall(f"{{{domain.QEMU_NS}}}capabilities/{{{domain.QEMU_NS}}}del")]


def test_quick_probe_drops_the_capability_in_libvirts_qemu_namespace():
    quick = design(quick_cpu_probe=True).to_xml()
    assert _qemu_dels(quick) == [cpuprobe.CAPABILITY]
    assert 'xmlns:qemu="http://libvirt.org/schemas/domain/qemu/1.0"' in quick
    assert _qemu_dels(design().to_xml()) == []  # off unless asked


def test_a_plain_domain_config_has_no_qemu_extension():
    """The prototype baseline builds DomainConfig itself: it never gets vmiso's shortcut."""
    config = domain.DomainConfig(name="p", uuid="5f0e6c2e-0000-4000-8000-000000000002", domain_type="qemu",
                                 vcpus=1, memory_mib=256, disks=(), serial_logs=())
    assert _qemu_dels(config.to_xml()) == [] and "libvirt.org/schemas/domain/qemu" not in config.to_xml()

