"""What the guest runs for a spec on an image: the spec's command on micro and disk images, the
image config merged as docker run does on a container image, and refusals before anything is made."""
import pytest

from vmiso import InvalidSpec, TaskSpec
from vmiso.image.resolve import BootImage, ContainerImage
from vmiso.spec import Volume
from vmiso.taskrun import plan

MICRO = BootImage("micro", "/b", "qcow2", 1 << 30, "/k", None, "root=/dev/vda", kernel_flavour="lean")
STOCK = BootImage("micro:stock", "/b", "qcow2", 1 << 30, "/k", "/i", "rdinit=/init", kernel_flavour="stock")
PASSWD = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001:app:/home/app:/bin/sh\n"
GROUP = "root:x:0:\napp:x:1001:\nextra:x:2000:app\n"
CONFIG = {"architecture": "amd64", "os": "linux",
          "config": {"Entrypoint": ["/entry"], "Cmd": ["default"], "Env": ["PATH=/usr/bin", "IMAGE=1", "bad-name=x"],
                     "WorkingDir": "/srv", "User": "app"}}
IMAGE = BootImage("img:1", "/b", "raw", 1 << 30, "/k", None, "root=/dev/vdc", system_disk="/m",
                  container=ContainerImage(CONFIG, PASSWD, GROUP), kernel_flavour="lean")


def test_micro_runs_the_spec_as_it_is():
    task = plan(TaskSpec(["echo", b"\xff"], env={"A": "1"}, workdir="/tmp"), MICRO)
    assert (task.argv, task.env, task.workdir, task.user) == ((b"echo", b"\xff"), {"A": "1"}, "/tmp", None)


@pytest.mark.parametrize("spec, field", [
    (TaskSpec(), "command"),
    (TaskSpec(["true"], entrypoint=["/x"]), "entrypoint"),
    (TaskSpec(["true"], user="1000"), "user"),
])
def test_micro_refuses_what_only_an_image_config_gives(spec, field):
    with pytest.raises(InvalidSpec) as info:
        plan(spec, MICRO)
    assert info.value.field == field


def test_volumes_need_the_lean_kernel(tmp_path):
    spec = TaskSpec(["true"], volumes=[Volume(str(tmp_path), "/data")])
    with pytest.raises(InvalidSpec, match="no 9p"):
        plan(spec, STOCK)
    assert plan(spec, MICRO).argv == (b"true",)


def test_image_config_as_docker_run():
    task = plan(TaskSpec(), IMAGE)
    assert task.argv == (b"/entry", b"default") and task.workdir == "/srv"
    assert task.env == {"PATH": "/usr/bin", "IMAGE": "1", "HOME": "/home/app"}  # "bad-name" cannot be exported
    assert task.user == (1000, 1001, (2000,))
    task = plan(TaskSpec(["other", "arg"], env={"IMAGE": "2"}, workdir="/", user="0"), IMAGE)
    assert task.argv == (b"/entry", b"other", b"arg") and task.env["IMAGE"] == "2" and task.workdir == "/"
    assert task.user[:2] == (0, 0)
    assert plan(TaskSpec(["x"], entrypoint=[]), IMAGE).argv == (b"x",)


def test_unknown_user_and_oversized_merge_are_refused():
    with pytest.raises(InvalidSpec, match="nobody"):
        plan(TaskSpec(user="nobody"), IMAGE)
    big = dict(CONFIG, config=dict(CONFIG["config"], Env=[f"V{i}={'x' * 100000}" for i in range(30)]))
    image = BootImage("big:1", "/b", "raw", 1, "/k", None, "", container=ContainerImage(big, PASSWD, GROUP))
    with pytest.raises(InvalidSpec, match="together"):
        plan(TaskSpec(), image)


def _with_stop_signal(value):
    config = dict(CONFIG, config=dict(CONFIG["config"], StopSignal=value))
    return BootImage("stop:1", "/b", "raw", 1 << 30, "/k", None, "", container=ContainerImage(config, PASSWD, GROUP))


def test_the_stop_signal_is_the_specs_else_the_images_else_sigterm():
    assert plan(TaskSpec(["true"]), MICRO).stop_signal == 15
    assert plan(TaskSpec(["true"], stop_signal="SIGQUIT"), MICRO).stop_signal == 3
    assert plan(TaskSpec(), IMAGE).stop_signal == 15  # the image has no StopSignal
    assert plan(TaskSpec(), _with_stop_signal("SIGUSR1")).stop_signal == 10
    assert plan(TaskSpec(), _with_stop_signal("SIGRTMIN+2")).stop_signal == 36
    assert plan(TaskSpec(stop_signal=9), _with_stop_signal("SIGUSR1")).stop_signal == 9  # the run's wins
    assert plan(TaskSpec(), _with_stop_signal("")).stop_signal == 15  # docker's "not set"


@pytest.mark.parametrize("bad", ["SIGNOPE", "0", 99, ["SIGQUIT"], {"x": 1}, True])
def test_an_images_bad_stop_signal_is_logged_and_sigterm_used(bad, caplog):
    """The image's config is its author's claim: a StopSignal that names no signal never
    refuses the task."""
    with caplog.at_level("WARNING", logger="vmiso.taskrun"):
        assert plan(TaskSpec(), _with_stop_signal(bad)).stop_signal == 15
    assert "StopSignal" in caplog.text and "SIGTERM" in caplog.text
