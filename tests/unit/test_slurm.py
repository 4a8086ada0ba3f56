"""Slurm awareness without Slurm: VM size and container name from a job's environment, run
records, the gc selection and the operator's Epilog script."""
import os
import subprocess

import pytest

from vmiso import slurm
from vmiso.cli import gc
from vmiso.cli.main import build_parser
from vmiso.cli.run import spec_from_args
from vmiso.errors import AlreadyExists
from vmiso.spec import CONTAINER_ID_RE

BATCH = {"SLURM_JOB_ID": "42", "SLURM_CPUS_ON_NODE": "4", "SLURM_MEM_PER_CPU": "300"}


@pytest.mark.parametrize("env, flags, expected", [
    ({}, (None, None), (1.0, 256)),                                          # not in Slurm: defaults
    ({"SLURM_CPUS_ON_NODE": "4"}, (None, None), (1.0, 256)),                  # no SLURM_JOB_ID: ignored
    (BATCH, (None, None), (4, 1200)),                                         # per CPU x CPUs
    (dict(BATCH, SLURM_CPUS_PER_TASK="2"), (None, None), (2, 600)),           # per task wins over node
    (dict(BATCH, SLURM_MEM_PER_NODE="512"), (None, None), (4, 512)),          # per node wins
    (dict(BATCH, SLURM_CPUS_PER_TASK="2", SLURM_MEM_PER_NODE="512"), (None, None), (2, 512)),
    (BATCH, (1.5, None), (1.5, 1200)),                                        # --cpus: per CPU stays Slurm's
    (BATCH, (None, 128), (4, 128)),                                           # --mem wins
    ({"SLURM_JOB_ID": "1"}, (None, None), (1.0, 256)),                        # no sizes in the job
    ({"SLURM_JOB_ID": "1", "SLURM_CPUS_ON_NODE": "2(x3)"}, (None, None), (1.0, 256)),  # not a number
])
def test_size(env, flags, expected):
    assert slurm.size(*flags, env) == expected


@pytest.mark.parametrize("env, name", [
    ({}, None),
    ({"SLURM_JOB_ID": "42"}, "slurm-42.batch"),
    ({"SLURM_JOB_ID": "42", "SLURM_STEP_ID": "0"}, "slurm-42.0"),
    ({"SLURM_JOB_ID": "42", "SLURM_STEP_ID": "4294967294"}, "slurm-42.batch"),
    ({"SLURM_JOB_ID": "42", "SLURM_STEP_ID": "4294967295"}, "slurm-42.extern"),
    ({"SLURM_JOB_ID": "43", "SLURM_ARRAY_JOB_ID": "40", "SLURM_ARRAY_TASK_ID": "3"}, "slurm-40_3.batch"),
    ({"SLURM_JOB_ID": "43", "SLURM_ARRAY_JOB_ID": "40", "SLURM_ARRAY_TASK_ID": "3", "SLURM_STEP_ID": "1"},
     "slurm-40_3.1"),
    ({"SLURM_JOB_ID": "4 2/..", "SLURM_STEP_ID": "x"}, "slurm-4-2-...x"),   # odd input stays a valid id
])
def test_container_name(env, name):
    assert slurm.container_id(env) == name
    assert name is None or CONTAINER_ID_RE.fullmatch(name)


def test_container_name_is_never_too_long_and_skips_taken_names():
    env = {"SLURM_JOB_ID": "9" * 80}
    assert len(slurm.container_id(env)) == 64 and CONTAINER_ID_RE.fullmatch(slurm.container_id(env))
    taken = {"slurm-7.batch", "slurm-7.batch.2"}
    assert slurm.container_id({"SLURM_JOB_ID": "7"}, taken.__contains__) == "slurm-7.batch.3"
    long_taken = {slurm.container_id(env)}
    second = slurm.container_id(env, long_taken.__contains__)
    assert second.endswith(".2") and len(second) == 64


def test_run_flags_default_to_the_allocation(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "5")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "2")
    monkeypatch.setenv("SLURM_MEM_PER_NODE", "512")
    args = build_parser().parse_args(["run", "--", "true"])
    assert (args.cpus, args.mem) == (None, None)
    resources = spec_from_args(args).resources
    assert (resources.vcpus, resources.mem_mib) == (2, 512)
    resources = spec_from_args(build_parser().parse_args(["run", "--mem", "300", "--", "true"])).resources
    assert (resources.vcpus, resources.mem_mib) == (2, 300)


def test_job_prefixes_and_selection():
    epilog_env = {"SLURM_JOB_ID": "43", "SLURM_ARRAY_JOB_ID": "40", "SLURM_ARRAY_TASK_ID": "3"}
    assert slurm.job_prefixes("43", epilog_env) == ["slurm-43.", "slurm-40_3."]
    assert slurm.job_prefixes("43", {"SLURM_JOB_ID": "44"}) == ["slurm-43."]
    ids = ["slurm-43.batch", "slurm-43.0.2", "slurm-430.batch", "slurm-40_3.batch", "slurm-40_30.batch",
           "slurm-40_2.batch", "mine", "other"]
    records = {"mine": ("43", False), "other": ("44", False)}
    assert gc.job_containers(ids, records, "43", epilog_env) == \
        ["mine", "slurm-40_3.batch", "slurm-43.0.2", "slurm-43.batch"]
    assert slurm.valid_job_id("123") and not slurm.valid_job_id("1;rm") and not slurm.valid_job_id("")


def test_run_records(tmp_path):
    record = slurm.hold_record(tmp_path, "slurm-1.batch", {"SLURM_JOB_ID": "1"})
    assert slurm.read_records(tmp_path) == {"slurm-1.batch": ("1", True)}
    with pytest.raises(AlreadyExists):
        slurm.hold_record(tmp_path, "slurm-1.batch", {})  # a live run owns that name
    assert not slurm.remove_record(tmp_path, "slurm-1.batch")  # held: kept
    record.release(remove=False)  # as a SIGKILL would leave it
    assert slurm.read_records(tmp_path) == {"slurm-1.batch": ("1", False)}
    assert slurm.remove_record(tmp_path, "slurm-1.batch")
    assert slurm.read_records(tmp_path) == {}


def test_record_of_a_killed_process_is_unheld(tmp_path):
    code = ("import os, sys; from vmiso import slurm; slurm.hold_record(sys.argv[1], 'r1', {}); "
            "print('ok', flush=True); os.kill(os.getpid(), 9)")
    proc = subprocess.run([os.sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert proc.stdout == "ok\n" and proc.returncode == -9
    assert slurm.read_records(tmp_path) == {"r1": (None, False)}


class _Report:
    def __init__(self, running, terminated):
        self.terminated = dict.fromkeys(terminated)
        self.ids = sorted(set(running) | set(terminated))


def test_gc_without_job_spares_live_runs_and_detached_tasks():
    report = _Report(running=["detached", "abandoned", "streaming"], terminated=["ended", "ended-live"])
    records = {"abandoned": ("7", False), "streaming": ("8", True), "ended-live": (None, True)}
    assert gc.unneeded_containers(None, report, records) == ["abandoned", "ended"]


def test_epilog_script_runs_gc_for_the_job(tmp_path):
    script = tmp_path / "epilog"
    log = tmp_path / "log"
    script.write_text(slurm.epilog_script(["echo", "vmiso"], workdir="/w d", log=log))
    script.chmod(0o755)
    assert subprocess.run([script], env={"SLURM_JOB_ID": "12"}).returncode == 0
    assert log.read_text() == "vmiso --workdir /w d gc --job 12\n"
    assert subprocess.run([script], env={}).returncode == 0  # no job: nothing to do


def test_slurm_cli_prints_config_and_installs_the_epilog(tmp_path, capsys):
    from vmiso.cli.main import main

    assert main(["--workdir", str(tmp_path), "slurm", "config"]) == 0
    out = capsys.readouterr().out
    assert "Epilog=/etc/slurm/vmiso-epilog.sh" in out and "KillWait=30" in out and "gc --job" in out
    path = tmp_path / "etc" / "epilog.sh"
    assert main(["--workdir", str(tmp_path), "slurm", "install-epilog", str(path)]) == 0
    assert os.stat(path).st_mode & 0o777 == 0o755
    assert f"--workdir {tmp_path} gc --job" in path.read_text()
    assert main(["gc", "--job", "1;x"]) == 125


def test_gc_for_a_job_without_containers_needs_no_libvirt(tmp_path, monkeypatch):
    from vmiso.cli import gc as cli_gc
    from vmiso.cli import main as cli_main

    def no_libvirt(args):
        raise AssertionError("gc --job connected to libvirt for a job that never used vmiso")
    monkeypatch.setattr(cli_gc, "isolator", no_libvirt)
    (tmp_path / "containers" / "slurm-6.batch").mkdir(parents=True)  # another job's
    assert cli_main.main(["--workdir", str(tmp_path), "gc", "--job", "5"]) == 0
