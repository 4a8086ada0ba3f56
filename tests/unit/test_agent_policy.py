"""The agent's policy file (vmiso/agent/policy.py): parsing, refusals, per-user rules and limits."""
import grp
import os

import pytest

from vmiso import Resources, TaskSpec, Volume
from vmiso.agent.auth import Peer
from vmiso.agent.policy import MICRO_IMAGES, Limits, Policy
from vmiso.errors import Forbidden, HostError
from vmiso.spec import NetworkSpec

ROOT = Peer(1, 0, 0)


def user(uid=4242):
    return Peer(100, uid, uid)


def running(*sizes):
    return [Resources(cpus=c, mem_mib=m) for c, m in sizes]


def test_no_file_means_the_documented_defaults(tmp_path):
    policy = Policy.load(str(tmp_path / "absent.toml"))
    assert policy.group == "vmiso"
    assert policy.defaults.images == MICRO_IMAGES
    assert policy.defaults.bridges == ()
    assert policy.defaults.limits == Limits(containers=4, cpus=4.0, mem_mib=4096, disk_gib=20.0)
    assert "absent" in policy.source
    with pytest.raises(HostError, match="does not exist"):
        Policy.load(str(tmp_path / "absent.toml"), missing_ok=False)


def test_a_full_file_with_a_user_override(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text('group = "hpc"\nimages = ["micro", "py:3"]\nbridges = ["vmbr0"]\nvolume_roots = ["/scratch"]\n'
                    "[limits]\ncontainers = 2\ncpus = 1.5\nmem_mib = 512\n"
                    '[users.alice]\ncontainers = 9\nimages = ["*"]\nvolumes = false\n')
    policy = Policy.load(str(path))
    assert policy.group == "hpc"
    assert policy.defaults.limits == Limits(containers=2, cpus=1.5, mem_mib=512, disk_gib=20.0)
    assert policy.defaults.images == ("micro", "py:3") and policy.defaults.volume_roots == ("/scratch",)
    alice = policy.rules("alice")
    assert alice.limits == Limits(containers=9, cpus=1.5, mem_mib=512, disk_gib=20.0)  # the rest inherited
    assert alice.images == ("*",) and alice.volumes is False and alice.bridges == ("vmbr0",)
    assert policy.rules("bob") is policy.defaults


@pytest.mark.parametrize("text, message", [
    ("grup = 'x'", "unknown key 'grup'"),
    ("[limits]\nvms = 3", "unknown key 'vms'"),
    ("[limits]\ncpus = -1", "cpus must be a non-negative number"),
    ("[limits]\ncontainers = true", "containers must be a non-negative number"),
    ("[limits]\nmem_mib = 1.5", "mem_mib must be a non-negative number"),
    ("images = 'micro'", "images must be a list"),
    ("images = ['']", "images must be a list of non-empty strings"),
    ("volume_roots = ['scratch']", "volume_roots must be absolute"),
    ("volumes = 'yes'", "volumes must be true or false"),
    ("group = ''", "group must be a group name"),
    ("cpus = 3", "unknown key 'cpus'"),   # limits belong in [limits] (or a user's table)
    ("[users]\nalice = 3", r"\[users.alice\]: must be a table"),
])
def test_malformed_files_are_refused_naming_the_key(tmp_path, text, message):
    path = tmp_path / "policy.toml"
    path.write_text(text)
    with pytest.raises(HostError, match=message):
        Policy.load(str(path))


def test_toml_syntax_errors_name_the_file(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text("group = \n")
    with pytest.raises(HostError, match=str(path)):
        Policy.load(str(path))


def test_admit_root_always_members_only():
    existing = grp.getgrgid(os.getgid()).gr_name  # root's group exists on every host
    policy = Policy.parse({"group": existing})
    policy.admit(ROOT, set())
    policy.admit(user(), {os.getgid()})
    with pytest.raises(Forbidden, match=f"not a member of group {existing}"):
        policy.admit(user(), {12345})


def test_admit_without_the_group_only_root():
    policy = Policy.parse({"group": "no-such-group-vmiso-test"})
    policy.admit(ROOT, set())
    with pytest.raises(Forbidden, match="does not exist"):
        policy.admit(user(), {0})


def test_images_names_only_from_the_list():
    policy = Policy.parse({"images": ["micro", "py:3"]})
    policy.check_launch(user(), TaskSpec(["true"]), [])
    policy.check_launch(user(), TaskSpec(image="py:3"), [])
    for image in ("micro:stock", "/var/lib/vmiso/images/store/x/disk.qcow2", "other:1"):
        with pytest.raises(Forbidden, match="not one you may use"):
            policy.check_launch(user(), TaskSpec(["true"], image=image), [])
    policy.check_launch(ROOT, TaskSpec(["true"], image="/any/path.qcow2"), [])  # root is not limited
    anything = Policy.parse({"images": ["*"]})
    anything.check_launch(user(), TaskSpec(image="other:1"), [])


def test_bridges_volumes_and_sandbox():
    policy = Policy.parse({"bridges": ["vmbr0"], "volume_roots": ["/srv/share"]})
    policy.check_launch(user(), TaskSpec(["true"], network=NetworkSpec("vmbr0")), [])
    with pytest.raises(Forbidden, match="bridge vmbr1 is not one you may use"):
        policy.check_launch(user(), TaskSpec(["true"], network=NetworkSpec("vmbr1")), [])
    policy.check_launch(user(), TaskSpec(["true"], volumes=[Volume("/srv/share/a", "/a")]), [])
    with pytest.raises(Forbidden, match="outside the directories you may share"):
        policy.check_launch(user(), TaskSpec(["true"], volumes=[Volume("/srv/shared", "/a")]), [])
    with pytest.raises(Forbidden, match="outside"):
        policy.check_launch(user(), TaskSpec(["true"], volumes=[Volume("/srv/share/../../etc", "/a")]), [])
    with pytest.raises(Forbidden, match="sandbox"):
        policy.check_launch(user(), TaskSpec(["true"], sandbox="/srv/share/s"), [])
    closed = Policy.parse({"volumes": False})
    with pytest.raises(Forbidden, match="volumes are not allowed"):
        closed.check_launch(user(), TaskSpec(["true"], volumes=[Volume("/tmp", "/a")]), [])


def test_limits_count_the_users_running_containers():
    policy = Policy.parse({"limits": {"containers": 3, "cpus": 2, "mem_mib": 1024, "disk_gib": 4}})
    small = TaskSpec(["true"], resources=Resources(cpus=0.5, mem_mib=256))
    policy.check_launch(user(), small, running((1, 256), (0.5, 512)))   # exactly at every limit
    with pytest.raises(Forbidden, match="your limit is 3"):
        policy.check_launch(user(), small, running((0.1, 64), (0.1, 64), (0.1, 64)))
    with pytest.raises(Forbidden, match="more CPUs would make 2.5: your limit is 2"):
        policy.check_launch(user(), small, running((2, 64)))
    with pytest.raises(Forbidden, match="would make 1088 MiB: your limit is 1024 MiB"):
        policy.check_launch(user(), small, running((0.5, 832)))
    with pytest.raises(Forbidden, match="5 GiB disk is more than your limit of 4 GiB"):
        policy.check_launch(user(), TaskSpec(["true"], resources=Resources(disk_gib=5)), [])
    policy.check_launch(ROOT, TaskSpec(["true"], resources=Resources(cpus=64, mem_mib=65536)), running((9, 9999)) * 9)
