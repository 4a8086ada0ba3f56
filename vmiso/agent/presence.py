"""Whether an agent serves a work dir: one work dir never has two writers.

The agent holds an exclusive flock on the work dir itself (its directory, opened read-only: a
command that only reads leaves no file behind) for as long as it serves, and writes the socket it
serves on into ``<workdir>/agent.json``. A root ``vmiso`` command that would work in-process
first takes a shared lock on the same directory, without waiting: if it gets it, no
agent serves the work dir and none can start until the command exits (the agent waits for the
lock); if it does not, the agent holds it and the command becomes the agent's client. A lock dies
with its process, so a killed agent never leaves the work dir "served".

Ordinary users cannot enter the work dir: they find the agent by its socket (the default path,
$VMISO_AGENT_SOCKET or --agent-socket), and the agent says which work dir it serves.
"""
import errno
import fcntl
import json
import os

from ..errors import HostError
from ..paths import Workdir


def _open_lock(workdir):
    return os.open(str(workdir), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


def hold_exclusive(workdir, socket_path, on_wait=None):
    """The agent's side: wait for in-process commands to finish, then hold the lock and record
    ``socket_path``; returns the lock's fd (keep it open while serving)."""
    fd = _open_lock(workdir)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        info = Workdir.of(workdir).agent_info
        tmp = info.with_name(f".{info.name}.{os.getpid()}")
        with open(tmp, "w") as f:
            json.dump({"socket": str(socket_path), "pid": os.getpid()}, f)
        os.chmod(tmp, 0o600)
        os.replace(tmp, info)
    except BaseException:
        os.close(fd)
        raise
    return fd


def served_by(workdir):
    """The root CLI's side: (socket path, None) when an agent serves ``workdir``; else
    (None, fd of a shared lock that keeps any agent from starting while this process works
    in-process; keep it open). (None, None) when the work dir does not exist yet."""
    try:
        fd = _open_lock(workdir)
    except FileNotFoundError:
        return None, None
    except OSError as err:
        raise HostError(f"cannot open the work dir {workdir}: {err.strerror}") from err
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None, fd
    except OSError as err:
        os.close(fd)
        if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise
    try:
        with open(Workdir.of(workdir).agent_info) as f:
            return json.load(f)["socket"], None
    except (OSError, ValueError, KeyError, TypeError) as err:
        info = Workdir.of(workdir).agent_info
        raise HostError(f"an agent holds {workdir} but its {info.name} is unreadable: {err}") from err
