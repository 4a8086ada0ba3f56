"""Fixtures for host-side network tests: each test runs inside a throwaway network namespace
(this thread and every process it starts), with a scratch work directory for the address store."""
import pytest

from . import nsutil


@pytest.fixture
def ns():
    """The name of a fresh namespace this test runs in; deleted (with all in it) afterwards."""
    with nsutil.netns() as name, nsutil.inside(name):
        yield name


@pytest.fixture
def wd(tmp_path):
    return tmp_path / "work"
