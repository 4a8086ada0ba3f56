"""Host-side logs are bounded: a guest flooding its task channel makes virtlogd roll the file
over at max_size (keeping max_backups), and vmiso still streams every byte and finds the exit line."""
import hashlib
import os
import re

import pytest

from vmiso import TaskSpec

pytestmark = pytest.mark.system

FLOOD = 3 * 1024 * 1024  # more than virtlogd's default max_size (2 MiB)


def virtlogd_limits(conf="/etc/libvirt/virtlogd.conf"):
    limits = {"max_size": 2097152, "max_backups": 3}
    try:
        with open(conf) as f:
            for key, value in re.findall(r"^\s*(max_size|max_backups)\s*=\s*(\d+)", f.read(), re.M):
                limits[key] = int(value)
    except OSError:
        pass
    return limits


def test_flooding_guest_is_bounded_and_fully_streamed(iso, cid):
    script = f"head -c {FLOOD} /dev/urandom | base64 -w 0 | head -c {FLOOD}; exit 6"
    iso.launch(cid, TaskSpec.shell(script))
    digest, received = hashlib.sha256(), 0
    for name, data in iso.output(cid):
        if name == "stdout":
            digest.update(data)
            received += len(data)
    termination = iso.wait(cid, timeout=300)
    assert termination.exit_code == 6
    assert received == FLOOD  # every byte streamed, across roll-overs
    limits = virtlogd_limits()
    directory = os.path.join(iso.workdir.containers, cid)
    pieces = sorted(n for n in os.listdir(directory) if n.startswith("stdout"))
    assert "stdout.0" in pieces  # it rolled over
    sizes = [os.path.getsize(os.path.join(directory, n)) for n in pieces]
    assert max(sizes) <= limits["max_size"]
    assert len(pieces) <= limits["max_backups"] + 1
    iso.destroy(cid)
