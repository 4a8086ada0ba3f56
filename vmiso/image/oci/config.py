"""The image config as ``docker run`` reads it: a pure function from the config and the run's
overrides to the task's argv, environment, working directory and user.

Docker's rules: ``Entrypoint`` + ``Cmd``; a command given to the run replaces ``Cmd``; an
entrypoint given to the run replaces ``Entrypoint`` and clears ``Cmd`` (``""`` clears it);
``Env`` is merged with the run's (the run's wins; PATH defaults to docker's when neither sets
it; HOME is the user's home from /etc/passwd, else "/"); ``WorkingDir`` (relative: under "/")
unless the run gives an absolute one, default "/"; ``User`` as ``user[:group]``, each a name or
a number, names resolved in the image's /etc/passwd and /etc/group (an unknown name is an
error, an unknown number is not: it runs with group 0 unless one is given), plus the groups
that list the user as a member (runc's rule). No I/O here: the caller hands the image's passwd
and group files as text.
"""
from dataclasses import dataclass
from typing import Optional

from ...errors import InvalidSpec

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MAX_ID = (1 << 31) - 1


@dataclass(frozen=True)
class RunConfig:
    argv: tuple
    env: dict
    workdir: str
    uid: int
    gid: int
    groups: tuple   # supplementary groups
    home: str
    stop_signal: Optional[str] = None


def _strings(value, what):
    if value is None:
        return []
    if isinstance(value, str):  # docker accepts a string in a config for a one-element list
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidSpec(what, "must be a list of strings")
    return list(value)


def _argv(run, command, entrypoint):
    if entrypoint is not None:
        entry = _strings(entrypoint, "entrypoint")
        entry = [] if entry == [""] else entry
        cmd = []
    else:
        entry = _strings(run.get("Entrypoint"), "Entrypoint")
        cmd = _strings(run.get("Cmd"), "Cmd")
    if command is not None:
        cmd = _strings(command, "command")
    argv = entry + cmd
    if not argv:
        raise InvalidSpec("command", "the image has no Entrypoint or Cmd and the run gives no command")
    return tuple(argv)


def _table(text):
    """Lines of a colon-separated file (passwd, group) as lists of fields; comments skipped."""
    rows = []
    for line in (text or "").splitlines():
        if line and not line.startswith("#"):
            rows.append(line.split(":"))
    return rows


def _number(text, what):
    if not text.isdigit():
        return None
    value = int(text)
    if value > MAX_ID:
        raise InvalidSpec("user", f"{what} {text} is out of range")
    return value


def _user(spec, passwd, group):
    """(uid, gid, supplementary gids, home) for ``spec`` (user[:group])."""
    spec = spec or "0"
    user_part, sep, group_part = spec.partition(":")
    if not user_part or (sep and not group_part):
        raise InvalidSpec("user", f"{spec!r} is not user[:group]")
    users = [r for r in _table(passwd) if len(r) >= 7]
    uid = _number(user_part, "uid")
    entry = next((r for r in users if (r[0] == user_part if uid is None else r[2] == str(uid))), None)
    if uid is None:
        if entry is None:
            raise InvalidSpec("user", f"unable to find user {user_part}: no matching entries in the image's "
                                      "/etc/passwd")
        uid = _number(entry[2], "uid")
    name = entry[0] if entry else None
    gid = _number(entry[3], "gid") if entry and entry[3].isdigit() else 0
    home = entry[5] if entry and entry[5] else "/"
    groups = [r for r in _table(group) if len(r) >= 4]
    if sep:
        gid = _number(group_part, "gid")
        if gid is None:
            found = next((r for r in groups if r[0] == group_part), None)
            if found is None or not found[2].isdigit():
                raise InvalidSpec("user", f"unable to find group {group_part}: no matching entries in the "
                                          "image's /etc/group")
            gid = _number(found[2], "gid")
    extra = sorted({int(r[2]) for r in groups if name and r[2].isdigit() and name in r[3].split(",")} - {gid})
    return uid, gid, tuple(extra), home


def _env(run_env, overrides, home):
    env = {}
    for item in _strings(run_env, "Env"):
        key, sep, value = item.partition("=")
        if key:
            env[key] = value if sep else ""
    for key, value in (overrides or {}).items():
        env[key] = value
    env.setdefault("PATH", DEFAULT_PATH)
    env.setdefault("HOME", home)
    return env


def _workdir(config_dir, override):
    if override is not None:
        if not override.startswith("/"):
            raise InvalidSpec("workdir", f"the working directory {override!r} is invalid, it needs to be an "
                                         "absolute path")
        return override
    if not config_dir:
        return "/"
    return config_dir if config_dir.startswith("/") else "/" + config_dir


def run_config(config, command=None, entrypoint=None, env=None, workdir=None, user=None, passwd="", group=""):
    """The task ``config`` (a parsed image config) gives, with the run's overrides: ``command``
    (a list: replaces Cmd), ``entrypoint`` (a list or a string: replaces Entrypoint and clears
    Cmd), ``env`` (a dict: merged over Env), ``workdir``, ``user``. ``passwd`` and ``group``:
    the text of the image's /etc/passwd and /etc/group."""
    run = config.get("config") or {}
    argv = _argv(run, command, entrypoint)
    uid, gid, groups, home = _user(user if user is not None else run.get("User"), passwd, group)
    return RunConfig(argv=argv, env=_env(run.get("Env"), env, home), workdir=_workdir(run.get("WorkingDir"), workdir),
                     uid=uid, gid=gid, groups=groups, home=home, stop_signal=run.get("StopSignal"))
