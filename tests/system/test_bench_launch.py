"""`vmiso bench launch -n 2 --json` end to end, on micro and in a container image: the result
object's keys, and every launch's marks positive and in the order a launch goes through them
(no timing asserts)."""
import json

import pytest

from vmiso.paths import Workdir

from .conftest import vmiso_cli

pytestmark = pytest.mark.system

ORDER = ("launch:image", "launch:overlay", "launch:seed", "launch:xml", "launch:create", "userspace",
         "task_start", "task_exit", "vm:stopped", "cleaned")


def test_bench_launch_json(workdir, tmp_path):
    plot = tmp_path / "launch.svg"
    proc = vmiso_cli("bench", "launch", "-n", "2", "--json", "--plot", str(plot), timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    for key in ("n", "phases_ms", "host_prep_ms", "to_userspace_s", "run_true_s", "launches"):
        assert key in result, key
    assert result["n"] == 2 and result["failures"] == 0
    assert result["host_prep_ms"] > 0 and result["to_userspace_s"] > 0 and result["run_true_s"] > 0
    assert result["to_userspace_s"] < result["run_true_s"]
    # The whole `vmiso run` process for the same task, timed between the in-process launches.
    assert result["cli_failures"] == 0 and len(result["cli_launches"]) == 2
    assert result["cli_run_true_s"] > 0 and "cli_overhead_s" in result
    assert all(ms >= 0 for phase, ms in result["phases_ms"].items() if phase not in ("console",))
    for launch in result["launches"]:
        assert launch["ok"]
        stamps = [launch[mark] for mark in ORDER]
        assert all(t > 0 for t in stamps)
        assert stamps == sorted(stamps), launch  # userspace after createXML, and so on
        assert launch["console"] <= launch["userspace"]
    svg = plot.read_text()
    assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>")
    assert svg.count(">vmiso 1</text>") == 1 and svg.count(">vmiso 2</text>") == 1  # one bar a launch


@pytest.mark.oci
def test_bench_launch_in_a_container_image(workdir):
    """The same marks for a task in a container image: micro's init and wrapper print them there
    too (VMISO-TASK-START once the image's root is mounted); no prototype path for it."""
    from vmiso.image.oci import importer
    from vmiso.testing import oci

    image = "vmiso-test/busybox:1"
    importer.import_path(workdir, f"{oci.busybox_image(Workdir(workdir).test_images)}:1",
                         names=[image])
    proc = vmiso_cli("bench", "launch", "-n", "2", "--json", "--image", image, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["n"] == 2 and result["failures"] == 0 and result["image"] == image
    assert result["kernel"].startswith("lean ")
    for launch in result["launches"]:
        stamps = [launch[mark] for mark in ORDER]
        assert all(t > 0 for t in stamps) and stamps == sorted(stamps), launch
    proc = vmiso_cli("bench", "launch", "-n", "1", "--baseline", "--image", image)
    assert proc.returncode == 125 and proc.stderr.count(b"\n") == 1 and b"micro only" in proc.stderr, proc.stderr
