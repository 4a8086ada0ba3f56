"""The CLI without a VM: help that teaches, bad input exits 125 with one line, nothing made."""
import subprocess
import sys

import pytest

from vmiso import _fast


def cli(*args, workdir):
    return subprocess.run([sys.executable, "-m", "vmiso", "--workdir", str(workdir), *args],
                          capture_output=True, text=True, timeout=60)


def test_help_lists_the_commands(tmp_path):
    out = cli("--help", workdir=tmp_path).stdout
    for command in ("run", "ps", "wait", "kill", "rm", "logs", "image", "doctor"):
        assert command in out
    run_help = cli("run", "--help", workdir=tmp_path).stdout
    assert "--timeout" in run_help and "124" in run_help
    assert "--stop-signal" in run_help and "StopSignal" in run_help


@pytest.mark.parametrize("args,needle", [
    (["run", "--cpus", "0", "--", "true"], "cpus"),
    (["run", "--mem", "1", "--", "true"], "mem_mib"),
    (["run", "-e", "NO EQUALS", "--", "true"], "not a valid variable name"),
    (["run", "-e", "1BAD=x", "--", "true"], "env"),
    (["run", "--name", "../x", "--", "true"], "container_id"),
    (["run", "--"], "command"),
    (["run", "--bogus"], "unrecognized"),
    (["run", "--cpus", "many", "--", "true"], "invalid float"),
    (["run", "--stop-signal", "SIGNOPE", "--", "true"], "stop_signal"),
    (["run", "--stop-signal", "0", "--", "true"], "stop_signal"),
])
def test_bad_input_exits_125_with_one_line(tmp_path, args, needle):
    proc = cli(*args, workdir=tmp_path / "work")
    assert proc.returncode == 125
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("vmiso: error:") and needle in last
    assert not (tmp_path / "work" / "containers").exists() or not any((tmp_path / "work" / "containers").iterdir())


def test_options_after_the_command_belong_to_the_task():
    from vmiso.cli.main import build_parser
    from vmiso.cli.run import spec_from_args

    args = build_parser().parse_args(["run", "--cpus", "2", "sh", "-c", "x", "--cpus", "3"])
    spec = spec_from_args(args)
    assert spec.command == (b"sh", b"-c", b"x", b"--cpus", b"3")
    assert spec.resources.cpus == 2


def test_stop_signal_flag_becomes_the_specs_number():
    from vmiso.cli.main import build_parser
    from vmiso.cli.run import spec_from_args

    parse = build_parser().parse_args
    assert spec_from_args(parse(["run", "--stop-signal", "SIGQUIT", "--", "true"])).stop_signal == 3
    assert spec_from_args(parse(["run", "--stop-signal", "9", "--", "true"])).stop_signal == 9
    assert spec_from_args(parse(["run", "--", "true"])).stop_signal is None
    # after CMD it is the task's argument, as every option is
    assert spec_from_args(parse(["run", "true", "--stop-signal", "3"])).stop_signal is None


def test_exit_code_mapping():
    from vmiso.cli.common import exit_code_of
    from vmiso.spec import Termination

    assert exit_code_of(Termination("FAILED", "guest-exited", 7)) == 7
    assert exit_code_of(Termination("FAILED", "timeout")) == 124
    assert exit_code_of(Termination("KILLED", "destroyed")) == 137
    assert exit_code_of(Termination("LOST", "vm-crashed")) == 125


def test_bench_usage_prints_reads_refreshes_and_speedups(tmp_path):
    proc = cli("bench", "usage", "--vms", "5", workdir=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = dict(line.split(None, 1) for line in proc.stdout.splitlines()[1:] if "_us_per_vm" in line)
    assert float(rows["python_us_per_vm"]) > 0 and float(rows["python_refresh_us_per_vm"]) > 0
    assert float(rows["floor_us_per_vm"]) > 0  # the same system calls, nothing parsed
    if _fast.NO_EXTENSIONS:
        assert rows["cython_us_per_vm"] == "-" and "no Cython extension" in proc.stdout
    else:
        assert float(rows["cython_us_per_vm"]) > 0 and float(rows["cython_refresh_us_per_vm"]) > 0
        assert "x faster than python" in proc.stdout


def test_each_command_registers_only_its_own_module_and_the_table_is_complete():
    """`vmiso CMD` builds a parser with CMD's module only (main.COMMANDS): the table names every
    command each module registers, and the command word is found after the global options."""
    import argparse
    import importlib

    from vmiso.cli import main

    for name in dict.fromkeys(main.COMMANDS.values()):
        sub = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(f"vmiso.cli.{name}").register(sub)
        assert {c for c, m in main.COMMANDS.items() if m == name} == set(sub.choices), name
    assert list(main.build_parser()._subparsers._group_actions[0].choices) == list(main.COMMANDS)
    for argv, word in ((["--workdir", "ps", "-v", "run", "--", "true"], "run"), (["--uri=x", "ps"], "ps"),
                       (["--help"], None), (["runn", "x"], None), ([], None), (["--agent-id", "a", "gc"], "gc")):
        assert main._command_word(argv) == word, argv
    only = main.build_parser("ps")._subparsers._group_actions[0].choices
    assert set(only) == {"ps", "wait", "kill", "rm", "logs"}


def test_the_run_command_does_not_import_the_other_commands():
    """What `vmiso run` imports of the CLI: its own module and the shared one, nothing else."""
    code = ("import sys; from vmiso.cli import main; main.build_parser(main._command_word(['run', '--', 'true']));"
            "print(sorted(m for m in sys.modules if m.startswith('vmiso.cli.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    # run.py's own helpers (pulling, taskdata, terminal) besides main and common: no other command's module.
    assert out.strip() == str(["vmiso.cli.common", "vmiso.cli.main", "vmiso.cli.pulling", "vmiso.cli.run",
                               "vmiso.cli.taskdata", "vmiso.cli.terminal"])


@pytest.mark.parametrize("policy, image, stored, wanted", [
    ("missing", "reg.example:5000/app:1", False, True),
    ("missing", "python:3.12", False, True),
    ("missing", "python:3.12", True, False),       # stored: run it
    ("always", "python:3.12", True, True),         # a moved tag: pull again
    ("never", "python:3.12", False, False),        # the launch says "no such image"
    ("always", "micro", False, False),
    ("always", "micro:stock", False, False),
    ("always", "/srv/images/base.qcow2", False, False),  # host paths are never pulled
    ("always", "./base.qcow2", False, False),
    ("always", "Not_A_Reference", False, False),
])
def test_run_pulls_only_container_image_references(policy, image, stored, wanted):
    from vmiso.cli import pulling

    asked = []

    def is_stored():
        asked.append(image)
        return stored

    assert pulling.pull_wanted(policy, image, is_stored) is wanted
    assert not asked or policy == "missing"  # the store is asked only when it decides


def test_a_users_pull_always_through_the_agent_is_refused_and_missing_is_the_agents_to_report(monkeypatch):
    import os

    from vmiso.cli import pulling
    from vmiso.errors import InvalidSpec

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(InvalidSpec, match="pulling images is root's"):
        pulling.pull_for_run(None, "python:3.12", "always", remote=True)
    assert pulling.pull_for_run(None, "python:3.12", "missing", remote=True) is None
