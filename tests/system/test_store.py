"""The image store with the real libvirtd and QEMU: a stored base booted by name and by id, kept
while a VM uses it, and never written to."""
import hashlib
import json
import os

import pytest

from .conftest import vmiso_cli

pytestmark = pytest.mark.system


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@pytest.fixture
def stored(workdir, cid):
    """The current micro root added to the store under a fresh name (JSON of the stored image);
    the name (and the base, if this was its last name) removed afterwards."""
    from vmiso.image import micro

    name = "img-" + cid
    proc = vmiso_cli("image", "add", str(micro.find_micro(workdir).base), "--name", name, "--json")
    assert proc.returncode == 0, proc.stderr
    yield json.loads(proc.stdout)
    vmiso_cli("rm", cid)  # a failed test may leave its container, which would keep the base
    removed = vmiso_cli("image", "rm", name)
    assert removed.returncode == 0, removed.stderr


def test_run_boots_a_stored_image_by_name(workdir, cid, stored):
    name = "img-" + cid
    assert name in stored["names"] and stored["boot"] == "micro" and stored["format"] == "qcow2"
    proc = vmiso_cli("run", "--name", cid, "--image", name, "--",
                     "sh", "-c", "echo from-the-store > /written; cat /written")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"from-the-store\n"
    assert sha256(stored["path"]) == stored["sha256"]  # the guest wrote to its overlay only


def test_a_base_in_use_is_kept_until_its_container_is_gone(workdir, cid, stored):
    started = vmiso_cli("run", "-d", "--name", cid, "--image", stored["sha256"][:12], "--", "sleep", "600")
    assert started.returncode == 0, started.stderr
    with open(os.path.join(workdir, "containers", cid, "checkpoint.json")) as f:
        assert json.load(f)["base"] == stored["path"]
    rows = json.loads(vmiso_cli("image", "list", "--json").stdout)
    assert [r["used_by"] for r in rows if r["id"] == stored["sha256"]] == [[cid]]

    refused = vmiso_cli("image", "rm", stored["sha256"])
    assert refused.returncode == 125
    assert f"is in use by {cid}".encode() in refused.stderr
    assert stored["sha256"][:12] not in vmiso_cli("image", "gc", "--dry-run").stdout.decode()
    assert os.path.exists(stored["path"])

    assert vmiso_cli("rm", "--grace", "0", cid).returncode == 0
    rows = json.loads(vmiso_cli("image", "list", "--json").stdout)
    assert [r["used_by"] for r in rows if r["id"] == stored["sha256"]] == [[]]
    assert sha256(stored["path"]) == stored["sha256"]  # the fixture's image rm now succeeds
