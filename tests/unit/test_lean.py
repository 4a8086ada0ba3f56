"""The lean kernel's recipe without compiling: the fragment, how a dropped option is caught, and
what the cache key depends on; the host cache's kernels moved in from a work dir."""
import errno
import json
import os
import time

import pytest

from vmiso.errors import InvalidSpec
from vmiso.image import debs, lean, micro
from vmiso.paths import HostCache, Workdir


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


def _kernel(directory, key):
    (directory / key).mkdir(parents=True)
    (directory / key / "vmlinux").write_bytes(b"x" * 4096)
    (directory / key / "manifest.json").write_text(json.dumps({"key": key, "release": "6.1-vmiso-lean"}))


def test_a_work_dirs_old_kernel_cache_moves_into_the_host_cache(tmp_path):
    """A work dir from before the host cache: its kernels are adopted (not compiled again), one the
    host cache holds already stays there, and the old directory goes."""
    old, host = Workdir(tmp_path / "work").old_kernel_cache, HostCache(tmp_path / "cache").ensure().kernels
    mine, shared = "1" * 64, "2" * 64
    for key in (mine, shared):
        _kernel(old, key)
    (old / ".build.lock").touch()
    _kernel(host, shared)
    inode = (old / mine / "vmlinux").stat().st_ino
    assert lean.adopt(old, host) == [mine]
    assert not old.exists()
    assert (host / mine / "vmlinux").stat().st_ino == inode  # moved, not copied
    assert lean._use(host / mine).key == mine
    assert lean.adopt(old, host) == []  # nothing left to adopt


def test_a_used_kernel_is_young_again(tmp_path):
    _kernel(tmp_path, "3" * 64)
    os.utime(tmp_path / ("3" * 64), (0, 0))
    assert lean._use(tmp_path / ("3" * 64)) is not None
    assert time.time() - (tmp_path / ("3" * 64)).stat().st_mtime < 60
    assert lean._use(tmp_path / ("4" * 64)) is None


def test_an_old_kernel_cache_on_another_file_system_is_copied(tmp_path, monkeypatch):
    old, host = Workdir(tmp_path / "work").old_kernel_cache, HostCache(tmp_path / "cache").ensure().kernels
    _kernel(old, "5" * 64)
    rename = os.rename

    def cross_device(src, dst):
        if str(dst).startswith(str(host)) and str(src).startswith(str(old)):  # another file system
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        rename(src, dst)

    monkeypatch.setattr(os, "rename", cross_device)
    assert lean.adopt(old, host) == ["5" * 64]
    assert lean._use(host / ("5" * 64)).key == "5" * 64
    assert sorted(p.name for p in host.iterdir()) == [".build.lock", "5" * 64]  # no temp copy left
    assert not old.exists()
