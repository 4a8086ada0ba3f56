"""The one way vmiso runs an external command: a timeout, LC_ALL=C, and a CommandFailed error
that carries argv, exit code and stderr. The launch path runs none."""
import os
import subprocess

from .errors import CommandFailed, HostError


def run(argv, *, timeout=60, input=None, check=True, env=None, cwd=None):
    """Run ``argv``; return CompletedProcess with text stdout/stderr. Raise CommandFailed on failure."""
    full_env = dict(os.environ if env is None else env)
    full_env["LC_ALL"] = "C"
    try:
        proc = subprocess.run(
            [str(a) for a in argv], input=input, capture_output=True, text=True,
            timeout=timeout, env=full_env, cwd=cwd, check=False,
        )
    except FileNotFoundError as err:
        raise HostError(f"{argv[0]} is not installed (run 'make setup' or 'vmiso doctor')") from err
    except subprocess.TimeoutExpired as err:
        raise CommandFailed(argv, None, f"timed out after {timeout} s") from err
    if check and proc.returncode != 0:
        raise CommandFailed(argv, proc.returncode, proc.stderr)
    return proc
