"""recover()'s file hygiene: temp files of dead writers go, a live writer's stay."""
import os
import subprocess

from vmiso import recovery


def test_only_dead_writers_temp_files_are_removed(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / f".checkpoint.json.{dead.pid}.1a2b").write_bytes(b"{")
    (tmp_path / f".checkpoint.json.{os.getpid()}.3c4d").write_bytes(b"{")  # a live writer
    (tmp_path / "checkpoint.json").write_bytes(b"{}")
    (tmp_path / "stdout.tmp").write_bytes(b"task output")  # not ours to judge
    recovery._remove_temp_files(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [".checkpoint.json." + f"{os.getpid()}.3c4d", "checkpoint.json", "stdout.tmp"])


def test_missing_directory_is_fine(tmp_path):
    """A container directory removed meanwhile: nothing to clean, no error, nothing created."""
    from vmiso import files

    assert files.dead_writers_temp_files(str(tmp_path / "gone"), "checkpoint.json") == []
    assert recovery._remove_temp_files(str(tmp_path / "gone")) is None
    assert not (tmp_path / "gone").exists()
