"""The lean kernel's recipe without compiling: the fragment, how a dropped option is caught, and
what the cache key depends on."""
import pytest

from vmiso.errors import InvalidSpec
from vmiso.image import debs, lean, micro


def test_fragment_asks_for_what_a_vmiso_domain_needs():
    wanted = lean.wanted_options(lean.fragment().decode())
    for option in ("CONFIG_VIRTIO_BLK", "CONFIG_VIRTIO_NET", "CONFIG_VIRTIO_BALLOON", "CONFIG_EXT4_FS",
                   "CONFIG_ISO9660_FS", "CONFIG_SERIAL_8250_CONSOLE", "CONFIG_PVH", "CONFIG_X86_MPPARSE",
                   "CONFIG_DEVTMPFS_MOUNT", "CONFIG_IPV6", "CONFIG_SMP"):
        assert wanted[option] == "y", option
    # No ACPI (its interpreter cost ~70 ms a boot): the MP table gives the CPUs, a reset ends the VM.
    for option in ("CONFIG_MODULES", "CONFIG_ACPI", "CONFIG_LEGACY_PTYS"):
        assert wanted[option] == "n", option
    assert wanted["CONFIG_LOCALVERSION"] == '"-vmiso-lean"'


def test_missing_options_names_what_kconfig_dropped():
    fragment = 'CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C="x"\n# a comment\n'
    assert lean.missing_options('CONFIG_A=y\nCONFIG_C="x"\n', fragment) == []
    assert lean.missing_options('CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C="x"\n', fragment) == []
    assert lean.missing_options("CONFIG_B=y\n", fragment) == [
        "CONFIG_A=y (got n)", "CONFIG_B=n (got y)", 'CONFIG_C="x" (got n)']


def test_key_changes_with_every_input():
    base = lean.kernel_key("a" * 64, b"CONFIG_X=y\n", "gcc 12")
    assert len(base) == 64
    assert lean.kernel_key("a" * 64, b"CONFIG_X=y\n", "gcc 12") == base
    others = {lean.kernel_key("b" * 64, b"CONFIG_X=y\n", "gcc 12"),
              lean.kernel_key("a" * 64, b"CONFIG_X=n\n", "gcc 12"),
              lean.kernel_key("a" * 64, b"CONFIG_X=y\n", "gcc 13")}
    assert base not in others and len(others) == 3


def test_patches_are_unified_diffs_of_the_source_tree():
    for name in lean.PATCHES:
        text = lean._guest_file(name).decode()
        assert text.startswith("--- a/") and "\n+++ b/" in text and "\n@@ " in text, name


def test_dependency_finds_the_real_package_behind_a_metapackage():
    record = {"Depends": "linux-source-6.1 (= 6.1.192-2), other | linux-source-6.12"}
    assert debs.dependency("linux-source", record, "linux-source-") == "linux-source-6.1"
    with pytest.raises(Exception, match="depends on no"):
        debs.dependency("linux-source", {"Depends": "gcc"}, "linux-source-")


def test_micro_kernel_choice_is_validated():
    assert micro.check_kernel("lean") == "lean"
    with pytest.raises(InvalidSpec, match="not one of lean, stock"):
        micro.check_kernel("tiny")
    assert micro.DEFAULT_KERNEL in micro.KERNELS
    # lean mounts the root itself; stock goes through the initramfs
    assert "root=/dev/vda" in micro.LEAN_CMDLINE and "rdinit=" not in micro.LEAN_CMDLINE
    assert "rdinit=/init" in micro.STOCK_CMDLINE
