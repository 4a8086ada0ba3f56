"""Issue 14's acceptance path end to end, as a user does it: the Debian python image pushed to a
real registry on 127.0.0.1 (Debian's docker-registry in a temp dir), ``vmiso image pull`` into
the test work dir, then ``vmiso run --image REF`` on real VMs: python3 runs, the image's Cmd,
Env and WorkingDir are what the task sees, the run's -e and -w override them, and exit codes
pass through. The image is built once (``<workdir>/cache/testimages``); the pull's name is
removed afterwards (the base stays while another name holds it)."""
import json
import re

import pytest

from vmiso.paths import Workdir
from vmiso.testing import oci

from .conftest import WORKDIR, vmiso_cli

pytestmark = [pytest.mark.system, pytest.mark.oci, pytest.mark.slow]

IMAGE_CACHE = Workdir(WORKDIR).test_images


@pytest.fixture(scope="module")
def pulled(workdir, tmp_path_factory):
    """The image's reference in the registry, pulled into the test work dir with the CLI."""
    layout = oci.debian_python_image(IMAGE_CACHE, progress=lambda *a: None)
    with oci.Registry(tmp_path_factory.mktemp("registry")) as registry:
        ref = registry.push(layout, "12", "debian-python:12")
        done = vmiso_cli("image", "pull", ref, "--json", timeout=600)
    try:
        assert done.returncode == 0, done.stderr
        assert ref in json.loads(done.stdout)["names"]  # with any other name the image has here
        yield ref
    finally:
        vmiso_cli("image", "rm", ref)


def test_python_runs_in_the_pulled_image(pulled, cid):
    proc = vmiso_cli("run", "--name", cid, "--image", pulled, "--",
                     "python3", "-c", "import sys; print(sys.version_info[:2])")
    assert proc.returncode == 0, proc.stderr
    assert re.fullmatch(rb"\(3, \d+\)\n", proc.stdout), proc.stdout


def test_the_images_cmd_env_and_workdir(pulled, cid):
    # Cmd: python3 /app/job.py, printing the version, the working directory and $APP_MODE.
    proc = vmiso_cli("run", "--name", cid, pulled)
    assert proc.returncode == 0, proc.stderr
    assert re.fullmatch(rb"\(3, \d+\) /app test\n", proc.stdout), proc.stdout


def test_overrides_and_the_exit_code_pass_through(pulled, cid):
    script = "import os, sys; print(os.getcwd(), os.environ['APP_MODE'], os.environ['PATH']); sys.exit(42)"
    proc = vmiso_cli("run", "--name", cid, "-e", "APP_MODE=mine", "-w", "/tmp", pulled, "python3", "-c", script)
    assert proc.returncode == 42, proc.stderr
    assert proc.stdout == b"/tmp mine /usr/local/bin:/usr/bin:/bin\n"
