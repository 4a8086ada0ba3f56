"""The seed ISO and its cloud-config: the command travels as data, cloud-init's validator agrees."""
import base64
import json
import shutil
import subprocess

import pytest

from vmiso.image import seed

NASTY_ARGV = ["printf", "%s|", "a b", "$(id)", "it's", "ü", '"q"', "`x`", "line1\nline2\n", ": x", "#c",
              "|", "!!python/object:os.system", "#cloud-config", "#!/bin/sh", b"\xff\xfe", "x" * 10000]


def files_for(argv=NASTY_ARGV, env=None):
    return seed.seed_files(instance_id="i-123", hostname="h1", argv=argv, env=env or {"A": "x=y\nz"},
                           nonce="00ff")


def decode_lines(data):
    return [base64.b64decode(line) for line in data.splitlines()]


def test_argv_and_env_round_trip_byte_exact():
    files = files_for()
    expected = [a if isinstance(a, bytes) else a.encode() for a in NASTY_ARGV]
    assert decode_lines(files["vmiso/argv"]) == expected
    assert decode_lines(files["vmiso/env"]) == [b"A=x=y\nz"]
    assert files["vmiso/nonce"] == b"00ff\n"
    assert files["vmiso/task.sh"].startswith(b"#!/bin/sh\n")


def test_user_data_is_cloud_config_carrying_the_same_files():
    files = files_for()
    user_data = files["user-data"]
    assert user_data.startswith(b"#cloud-config\n")
    config = json.loads(user_data.split(b"\n", 1)[1])  # YAML reads JSON as is
    written = {entry["path"]: base64.b64decode(entry["content"]) for entry in config["write_files"]}
    for name in ("task.sh", "argv", "env", "nonce"):
        assert written[f"{seed.GUEST_DIR}/{name}"] == files[f"vmiso/{name}"]
    assert config["runcmd"] == [["sh", f"{seed.GUEST_DIR}/task.sh", seed.GUEST_DIR]]
    # Nothing the user typed appears as text: it is all inside base64.
    assert b"$(id)" not in user_data and b"!!python" not in user_data


@pytest.mark.skipif(shutil.which("cloud-init") is None, reason="cloud-init not installed (make setup)")
def test_cloud_init_schema_validator_accepts_user_data(tmp_path):
    path = tmp_path / "user-data"
    path.write_bytes(files_for()["user-data"])
    proc = subprocess.run(["cloud-init", "schema", "--config-file", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Valid cloud-config" in proc.stdout


@pytest.mark.skipif(shutil.which("cloud-init") is None, reason="cloud-init not installed (make setup)")
def test_cloud_init_schema_validator_can_fail(tmp_path):
    """The validator really validates: a broken config is refused (guards the test above)."""
    path = tmp_path / "user-data"
    path.write_bytes(b"#cloud-config\nruncmd: 5\n")
    assert subprocess.run(["cloud-init", "schema", "--config-file", str(path)], capture_output=True).returncode != 0


def test_meta_data_is_json_with_instance_id():
    assert json.loads(files_for()["meta-data"]) == {"instance-id": "i-123", "local-hostname": "h1"}


def test_iso_has_cidata_label_and_rock_ridge_names():
    pycdlib = pytest.importorskip("pycdlib")
    import io

    files = files_for()
    data = seed.build_iso(files)
    assert data[0x8000 + 40: 0x8000 + 46] == b"cidata"  # primary volume descriptor's volume id
    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(data))
    for path, content in files.items():
        out = io.BytesIO()
        iso.get_file_from_iso_fp(out, rr_path="/" + path)
        assert out.getvalue() == content, path
    iso.close()


def test_write_seed_is_exclusive_and_leaves_nothing_on_error(tmp_path):
    files = files_for(argv=["true"])
    target = tmp_path / "seed.iso"
    seed.write_seed(target, files)
    assert target.stat().st_mode & 0o777 == 0o600
    with pytest.raises(seed.ImageError):
        seed.write_seed(target, files)  # exists: refused, not overwritten
    link = tmp_path / "link.iso"
    link.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(seed.ImageError):
        seed.write_seed(link, files)
    assert not (tmp_path / "elsewhere").exists()
