"""The image config read as ``docker run`` reads it (vmiso/image/oci/config.py): a pure function."""
import pytest

from vmiso.errors import InvalidSpec
from vmiso.image.oci.config import DEFAULT_PATH, run_config

PASSWD = """root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
app:x:1000:1000:App:/home/app:/bin/sh
"""
GROUP = """root:x:0:
daemon:x:1:
app:x:1000:
staff:x:50:app,other
video:x:44:other
"""


def image(**run):
    return {"architecture": "amd64", "os": "linux", "config": run}


def rc(config, **kw):
    return run_config(config, passwd=PASSWD, group=GROUP, **kw)


def test_entrypoint_and_cmd_and_their_overrides_as_docker():
    config = image(Entrypoint=["/bin/tini", "--"], Cmd=["python3", "app.py"])
    assert rc(config).argv == ("/bin/tini", "--", "python3", "app.py")
    assert rc(config, command=["sh"]).argv == ("/bin/tini", "--", "sh")           # run IMAGE ARGS replaces Cmd
    assert rc(config, entrypoint=["/bin/sh"]).argv == ("/bin/sh",)                # --entrypoint clears Cmd
    assert rc(config, entrypoint="/bin/sh", command=["-c", "x"]).argv == ("/bin/sh", "-c", "x")
    assert rc(config, entrypoint="", command=["ls"]).argv == ("ls",)              # --entrypoint "" clears it
    assert rc(image(Cmd=["sh"])).argv == ("sh",)


def test_no_command_at_all_is_refused():
    with pytest.raises(InvalidSpec, match="no Entrypoint or Cmd"):
        rc(image())
    with pytest.raises(InvalidSpec, match="no Entrypoint or Cmd"):
        rc(image(Cmd=["sh"]), entrypoint="")


def test_env_merged_run_wins_path_and_home_defaults():
    config = image(Cmd=["x"], Env=["A=1", "B=2=3", "EMPTY="])
    env = rc(config, env={"A": "9", "C": "4"}).env
    assert env == {"A": "9", "B": "2=3", "EMPTY": "", "C": "4", "PATH": DEFAULT_PATH, "HOME": "/root"}
    assert rc(image(Cmd=["x"], Env=["PATH=/bin", "HOME=/h"])).env == {"PATH": "/bin", "HOME": "/h"}


def test_workdir_default_relative_and_override():
    assert rc(image(Cmd=["x"])).workdir == "/"
    assert rc(image(Cmd=["x"], WorkingDir="/app")).workdir == "/app"
    assert rc(image(Cmd=["x"], WorkingDir="app")).workdir == "/app"
    assert rc(image(Cmd=["x"], WorkingDir="/app"), workdir="/tmp").workdir == "/tmp"
    with pytest.raises(InvalidSpec, match="absolute"):
        rc(image(Cmd=["x"]), workdir="tmp")


@pytest.mark.parametrize("user, expected", [
    (None, (0, 0, (), "/root")),
    ("", (0, 0, (), "/root")),
    ("app", (1000, 1000, (50,), "/home/app")),
    ("1000", (1000, 1000, (50,), "/home/app")),
    ("app:staff", (1000, 50, (), "/home/app")),
    ("app:44", (1000, 44, (50,), "/home/app")),
    ("4242", (4242, 0, (), "/")),            # unknown number: fine, group 0, home /
    ("4242:4343", (4242, 4343, (), "/")),
    ("daemon", (1, 1, (), "/usr/sbin")),
])
def test_user_forms(user, expected):
    got = rc(image(Cmd=["x"]), user=user)
    assert (got.uid, got.gid, got.groups, got.home) == expected
    assert got.env["HOME"] == expected[3]


def test_image_user_used_unless_overridden():
    config = image(Cmd=["x"], User="app")
    assert rc(config).uid == 1000
    assert rc(config, user="0").uid == 0


@pytest.mark.parametrize("user, match", [
    ("nobody", "unable to find user nobody"),
    ("app:wheel", "unable to find group wheel"),
    ("app:", "not user"),
    (":1", "not user"),
    ("99999999999", "out of range"),
])
def test_user_errors(user, match):
    with pytest.raises(InvalidSpec, match=match):
        rc(image(Cmd=["x"]), user=user)


def test_without_passwd_only_numbers_work():
    assert run_config(image(Cmd=["x"], User="5:6")).uid == 5
    with pytest.raises(InvalidSpec, match="unable to find user app"):
        run_config(image(Cmd=["x"], User="app"))


def test_malformed_config_fields_are_refused():
    with pytest.raises(InvalidSpec, match="Cmd"):
        rc(image(Cmd=[1, 2]))
