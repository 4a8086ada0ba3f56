"""`vmiso bench image -n 1 --json` end to end: the result object's documented keys, each value
of the kind it claims (cold import fetched every layer, warm none; every launch reported its
exit and went through its marks in order), and the operator's store untouched. No timing
asserts."""
import json
import os

import pytest

from vmiso.image import store

from .conftest import WORKDIR, vmiso_cli

pytestmark = [pytest.mark.system, pytest.mark.oci, pytest.mark.slow]

MARKS = ("launch:create", "userspace", "task_start", "task_exit", "vm:stopped", "cleaned")


def test_bench_image_json(workdir):
    before = [(i.sha256, i.names) for i in store.list_images(workdir)]
    bench = os.path.join(WORKDIR, "cache", "bench")
    scratch_before = set(os.listdir(bench)) if os.path.isdir(bench) else set()
    proc = vmiso_cli("bench", "image", "-n", "1", "--json", timeout=1200)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    image = result["image"]
    assert image["name"] == "debian-python:12" and len(image["id"]) == 64 and image["layers"] == 2
    assert image["tree_bytes"] > 50e6 and image["tree_entries"] > 1000 and image["layer_bytes"] > 10e6
    assert result["imports"] == 1 and len(result["import_cold_all_s"]) == len(result["import_warm_all_s"]) == 1
    assert result["import_cold_s"] > 0 and result["import_warm_s"] > 0
    assert result["n"] == 1 and result["accel"] in ("kvm", "tcg")
    for key in ("micro_true", "oci_true", "oci_python"):
        run = result["runs"][key]
        assert run["failures"] == 0 and len(run["launches"]) == 1
        launch = run["launches"][0]
        stamps = [launch[mark] for mark in MARKS]
        assert all(t > 0 for t in stamps) and stamps == sorted(stamps), (key, launch)
        assert result[f"{key}_s"] == run["run_s"] == round(launch["cleaned"] / 1000, 3)
        assert run["task_ms"] == round(launch["task_exit"] - launch["task_start"], 3)
        assert run["guest_ms"] == round(launch["task_exit"] - launch["userspace"], 3) > run["task_ms"]
    assert result["oci_minus_micro_s"] == round(result["oci_true_s"] - result["micro_true_s"], 3)
    runs = result["runs"]
    assert result["oci_minus_micro_guest_ms"] == round(runs["oci_true"]["guest_ms"] - runs["micro_true"]["guest_ms"], 3)
    assert result["oci_python_task_ms"] == result["runs"]["oci_python"]["task_ms"]
    # Everything happened in a temporary work dir, removed after.
    assert [(i.sha256, i.names) for i in store.list_images(workdir)] == before
    assert set(os.listdir(bench)) == scratch_before
