"""TaskSpec, Resources and container-id validation: every bad input gets InvalidSpec."""
import math
import signal

import pytest

from vmiso import InvalidSpec, Resources, TaskSpec
from vmiso.spec import validate_container_id

BAD_IDS = ["../x", "/abs", ".", "..", "a\0b", "a\nb", "x" * 65, "<>&'\"", "]]>", "-leading", "ü", "", "a/b",
           " a", None, 5]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_bad_container_ids_are_refused(bad):
    with pytest.raises(InvalidSpec) as info:
        validate_container_id(bad)
    assert info.value.field == "container_id"


@pytest.mark.parametrize("good", ["a", "task-1", "slurm-12_3.0", "A" * 64, "0.x"])
def test_good_container_ids_pass(good):
    assert validate_container_id(good) == good


@pytest.mark.parametrize("kwargs,field", [
    ({"cpus": 0}, "cpus"), ({"cpus": -1}, "cpus"), ({"cpus": math.nan}, "cpus"), ({"cpus": 1e9}, "cpus"),
    ({"cpus": True}, "cpus"), ({"mem_mib": 0}, "mem_mib"), ({"mem_mib": 10**12}, "mem_mib"),
    ({"mem_mib": 128.5}, "mem_mib"), ({"disk_gib": -1}, "disk_gib"), ({"disk_gib": math.inf}, "disk_gib"),
])
def test_bad_resources(kwargs, field):
    with pytest.raises(InvalidSpec) as info:
        Resources(**kwargs)
    assert info.value.field == field


def test_fractional_cpus_round_up_to_vcpus():
    assert Resources(cpus=0.5).vcpus == 1
    assert Resources(cpus=2.5).vcpus == 3
    assert Resources(cpus=2).vcpus == 2
    assert Resources(disk_gib=2).disk_bytes == 2 * 1024**3


@pytest.mark.parametrize("command", [[], (), "echo hi", b"echo", ["a", 5], ["a\0b"], [b"x\0"]])
def test_bad_commands(command):
    with pytest.raises(InvalidSpec):
        TaskSpec(command=command)


def test_huge_command_refused():
    with pytest.raises(InvalidSpec) as one:
        TaskSpec(command=["sh", "-c", "x" * (1024 * 1024)])  # 1 MiB of script in one argument
    assert one.value.field == "command[2]" and "file" in str(one.value)
    with pytest.raises(InvalidSpec) as total:
        TaskSpec(command=["x" * 100_000] * 30)
    assert total.value.field == "command"
    assert len(TaskSpec(command=["x" * 131071]).command[0]) == 131071  # the kernel's own limit


@pytest.mark.parametrize("env", [{"1A": "x"}, {"A-B": "x"}, {"": "x"}, {"A=B": "x"}, {"A": 5}, {"A": "x\0"}])
def test_bad_env(env):
    with pytest.raises(InvalidSpec) as info:
        TaskSpec(command=["true"], env=env)
    assert info.value.field == "env"


def test_env_values_may_hold_equals_and_newlines():
    spec = TaskSpec(command=["true"], env={"A": "x=y\nz"})
    assert spec.env == {"A": "x=y\nz"}


def test_shell_helper_and_bytes_argv():
    assert TaskSpec.shell("echo hi").command == ("/bin/sh", "-c", "echo hi")
    assert TaskSpec(command=[b"\xff\xfe", "ü"]).command == (b"\xff\xfe", "ü")


@pytest.mark.parametrize("kwargs", [{"timeout": 0}, {"timeout": -1}, {"image_format": "vmdk"},
                                    {"workdir": "relative"}])
def test_other_bad_fields(kwargs):
    with pytest.raises(InvalidSpec):
        TaskSpec(command=["true"], **kwargs)


def test_argv_and_env_share_one_size_budget():
    """The guest kernel's exec limits, checked before launch: one string at most MAX_ARG_BYTES,
    argv and env together (NULs counted) at most MAX_ARGV_BYTES."""
    from vmiso.spec import MAX_ARG_BYTES, MAX_ARGV_BYTES

    TaskSpec(["x" * MAX_ARG_BYTES])
    with pytest.raises(InvalidSpec, match=r"command\[0\]"):
        TaskSpec(["x" * (MAX_ARG_BYTES + 1)])
    with pytest.raises(InvalidSpec, match="one variable may hold at most"):
        TaskSpec(["true"], env={"BIG": "x" * MAX_ARG_BYTES})
    chunk = "x" * (MAX_ARG_BYTES - 10)
    count = MAX_ARGV_BYTES // (len(chunk) + 1 + 5)  # just under the budget, split over argv and env
    half = count // 2
    argv, env = ["x" * (MAX_ARG_BYTES - 10)] * half, {f"V{i}": chunk[:-3] for i in range(count - half)}
    TaskSpec(argv, env=env)
    with pytest.raises(InvalidSpec, match="together"):
        TaskSpec(argv + [chunk] * 2, env=env)


@pytest.mark.parametrize("given, number", [
    ("SIGQUIT", 3), ("QUIT", 3), ("sigquit", 3), ("Quit", 3), ("SIGKILL", 9), ("SIGUSR1", 10), ("SIGIOT", 6),
    ("SIGRTMIN", 34), ("SIGRTMIN+3", 37), ("rtmin+30", 64), ("SIGRTMAX", 64), ("SIGRTMAX-2", 62),
    ("3", 3), ("64", 64), (3, 3), (1, 1), (64, 64), (15, 15), (signal.SIGQUIT, 3),
])
def test_a_stop_signal_is_a_name_or_number_as_docker_takes_it_and_kept_as_its_number(given, number):
    assert TaskSpec(["true"], stop_signal=given).stop_signal == number
    assert type(TaskSpec(["true"], stop_signal=given).stop_signal) is int
    assert TaskSpec(["true"]).stop_signal is None  # the image's StopSignal, else SIGTERM (taskrun.plan)


@pytest.mark.parametrize("bad", [0, "0", 65, "65", -9, "-9", "+3", " 3", "SIGNOPE", "SIG", "", "SIGRTMIN+31",
                                 "SIGRTMAX-31", "RTMIN-1", "SIGRTMIN+", "SIGQUIT ", "3.0", 3.0, True, b"QUIT",
                                 "x" * 1000])
def test_a_bad_stop_signal_is_refused_naming_the_field(bad):
    with pytest.raises(InvalidSpec) as info:
        TaskSpec(["true"], stop_signal=bad)
    assert info.value.field == "stop_signal" and len(str(info.value)) < 200
