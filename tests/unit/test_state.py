"""Checkpoints are atomic, versioned, and refuse what they cannot trust."""
import os

import pytest

from vmiso import state


def make(**kw):
    return state.Checkpoint(container_id="c1", agent_id="a", domain="vmiso-c1", nonce="ab", **kw)


def test_round_trip(tmp_path):
    cp = make(phase=state.RUNNING, deadline=12.5, termination={"state": "FINISHED"})
    state.write(tmp_path, cp)
    assert state.read(tmp_path) == cp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.json"]  # no temp file left
    assert (tmp_path / "checkpoint.json").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("content", [b"", b"{", b"[]", b'{"version": 99}', b'{"version": 1}'])
def test_corrupt_checkpoints_raise_checkpoint_error(tmp_path, content):
    (tmp_path / "checkpoint.json").write_bytes(content)
    with pytest.raises(state.CheckpointError):
        state.read(tmp_path)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(state.CheckpointError):
        state.read(tmp_path)


def test_failed_write_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    state.write(tmp_path, make(phase=state.RUNNING))

    def full_disk(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(OSError):
        state.write(tmp_path, make(phase=state.TERMINATED))
    monkeypatch.undo()
    assert state.read(tmp_path).phase == state.RUNNING
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.json"]


def test_symlinked_checkpoint_is_not_followed(tmp_path):
    (tmp_path / "target").write_bytes(make().to_json())
    (tmp_path / "checkpoint.json").symlink_to(tmp_path / "target")
    with pytest.raises(state.CheckpointError):
        state.read(tmp_path)


def test_boot_id_is_this_boots():
    with open("/proc/sys/kernel/random/boot_id") as f:
        assert state.boot_id() == f.read().strip()
