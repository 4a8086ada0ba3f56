"""Shared pytest set-up: markers are declared in pytest.ini; system tests need root and libvirtd."""
import os

import pytest


def pytest_collection_modifyitems(config, items):
    if os.geteuid() == 0:
        return
    system = pytest.mark.skip(reason="needs root (system tests start VMs through qemu:///system)")
    netns = pytest.mark.skip(reason="needs root (makes network namespaces, bridges and nftables rules)")
    for item in items:
        if "system" in item.keywords:
            item.add_marker(system)
        elif "netns" in item.keywords:
            item.add_marker(netns)


@pytest.fixture
def work(tmp_path):
    """A fresh work directory with images/ and containers/ (made without root)."""
    root = tmp_path / "work"
    (root / "images").mkdir(parents=True)
    (root / "containers").mkdir()
    return root
