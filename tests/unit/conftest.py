"""Fixtures of the unit tests that run the Isolator on a FakeHost (vmiso.testing.fakehost)."""
import subprocess

import pytest

from vmiso import supervisor
from vmiso.testing.fakehost import FakeHost


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A small qcow2 base image, made by qemu-img."""
    path = tmp_path_factory.mktemp("base") / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M"], check=True)
    return str(path)


@pytest.fixture
def host():
    return FakeHost()


@pytest.fixture
def fast_conclusion(monkeypatch):
    """A VM that powers off without an exit line is given EXIT_LINE_GRACE for virtlogd's last
    bytes, and a pending release is re-checked every RELEASE_RECHECK: the fake has no virtlogd
    lagging behind and no teardown to wait for."""
    monkeypatch.setattr(supervisor, "EXIT_LINE_GRACE", 0.05)
    monkeypatch.setattr(supervisor, "RELEASE_RECHECK", 0.05)


@pytest.fixture(autouse=True)
def host_cache(tmp_path_factory, monkeypatch):
    """A host cache of the test's own ($VMISO_CACHE_DIR, also for the CLI it starts): gc must
    never see, let alone remove, the real host's kernels."""
    cache = tmp_path_factory.mktemp("host-cache")
    monkeypatch.setenv("VMISO_CACHE_DIR", str(cache))
    return cache
