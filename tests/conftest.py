"""Shared pytest set-up: markers are declared in pytest.ini; system tests need root and libvirtd."""
import os

import pytest


def pytest_collection_modifyitems(config, items):
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (system tests start VMs through qemu:///system)")
    for item in items:
        if "system" in item.keywords or "netns" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def work(tmp_path):
    """A fresh work directory with images/ and containers/ (made without root)."""
    root = tmp_path / "work"
    (root / "images").mkdir(parents=True)
    (root / "containers").mkdir()
    return root
