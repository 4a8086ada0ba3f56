"""The data options of ``vmiso run``, as docker spells them: ``-e NAME[=VALUE]``, ``--env-file``,
the Slurm job's environment, ``-v HOST:GUEST[:ro]``.

Pure functions over the arguments and an environment mapping; the TaskSpec validates what they
produce (names, sizes, paths), and the Isolator checks the host side of a volume before it makes
anything.
"""
import os

from .. import slurm
from ..errors import InvalidSpec
from ..spec import ENV_NAME_RE, Volume


def _name(name, where):
    if not ENV_NAME_RE.fullmatch(name):
        raise InvalidSpec("env", f"{name!r} ({where}) is not a valid variable name")
    return name


def parse_env(pairs, environ):
    """``-e`` values: ``NAME=VALUE``, or ``NAME`` alone for the caller's value (left out when the
    caller has none, as docker does)."""
    env = {}
    for pair in pairs:
        _add(env, pair, f"-e {pair}", environ)
    return env


def _add(env, entry, where, environ):
    """One ``NAME=VALUE`` (or ``NAME``: the caller's value, left out when unset) into ``env``."""
    name, sep, value = entry.partition("=")
    _name(name, where)
    if sep:
        env[name] = value
    elif name in environ:
        env[name] = environ[name]


def read_env_file(path, environ):
    """docker's ``--env-file`` format: one ``NAME=VALUE`` a line, taken as is (no quotes, no
    expansion); ``NAME`` alone is the caller's value (left out when unset); blank lines and lines
    starting with ``#`` are skipped; leading whitespace is ignored."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise InvalidSpec("env-file", f"cannot read {path}: {err.strerror}") from err
    env = {}
    for number, raw in enumerate(data.split(b"\n"), start=1):
        line = os.fsdecode(raw).rstrip("\r").lstrip()
        if not line or line.startswith("#"):
            continue
        _add(env, line, f"{path}:{number}", environ)
    return env


def slurm_env(environ):
    """Inside a Slurm job, its ``SLURM_*`` variables (what Apptainer and pyxis hand to a
    container); nothing outside one."""
    if not slurm.in_job(environ):
        return {}
    return {k: v for k, v in environ.items() if k.startswith("SLURM_") and ENV_NAME_RE.fullmatch(k)}


def task_env(args, environ):
    """The task's environment: the Slurm job's (unless ``--no-slurm-env``), then each
    ``--env-file`` in order, then ``-e``: what is set later wins, so a variable the task sets
    explicitly overrides the job's."""
    env = {} if args.no_slurm_env else slurm_env(environ)
    for path in args.env_file:
        env.update(read_env_file(path, environ))
    env.update(parse_env(args.env, environ))
    return env


def parse_volume(text):
    """``HOST:GUEST[:ro|:rw]`` as docker's ``-v`` (a host path holding ':' cannot be given)."""
    parts = text.split(":")
    if len(parts) == 3 and parts[2] in ("ro", "rw"):
        return Volume(parts[0], parts[1], readonly=parts[2] == "ro")
    if len(parts) == 2:
        return Volume(parts[0], parts[1])
    raise InvalidSpec("volumes", f"{text!r} is not HOST:GUEST[:ro]")


def parse_mount(text):
    """docker's ``--mount type=bind,source=HOST,target=GUEST[,readonly]`` (``src``, ``dst``,
    ``destination``, ``ro`` also)."""
    fields = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        fields[key] = value if sep else None
    unknown = set(fields) - {"type", "source", "src", "target", "dst", "destination", "readonly", "ro"}
    if unknown or fields.get("type", "bind") != "bind":
        raise InvalidSpec("volumes", f"--mount {text!r}: only type=bind with source, target and readonly")
    source = fields.get("source") or fields.get("src")
    target = fields.get("target") or fields.get("dst") or fields.get("destination")
    readonly = next((fields[k] for k in ("readonly", "ro") if k in fields), "false")
    if not source or not target or readonly not in (None, "true", "1", "false", "0"):
        raise InvalidSpec("volumes", f"--mount {text!r} needs source= and target= (readonly[=true|false])")
    return Volume(source, target, readonly=readonly in (None, "true", "1"))


def volumes(args):
    return tuple(parse_volume(v) for v in args.volume) + tuple(parse_mount(m) for m in args.mount)
