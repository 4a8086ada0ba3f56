"""Who is calling, and what their uid may reach.

The caller is whoever the kernel says holds the other end of the connection: SO_PEERCRED gives
the pid, uid and gid it had when it connected. Nothing the client sends (a header, a field, an
environment variable) ever names or changes the caller. Root (uid 0) is the operator; every other
uid is an ordinary user, subject to the policy (policy.py) and to ownership (a container belongs
to the uid that launched it).

The agent runs as root, so it never decides for a user whether they may use a path by asking
itself: ``check_path`` asks the kernel, running ``test`` as the caller's uid, gid and groups.
"""
import os
import pwd
import socket
import struct
import subprocess
from dataclasses import dataclass

from ..errors import Forbidden, InvalidSpec

CHECK_TIMEOUT_S = 10
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int

    @property
    def root(self):
        return self.uid == 0

    @property
    def name(self):
        return user_name(self.uid)


def peer_of(sock):
    """The Peer on the other end of connected unix socket ``sock`` (taken when it connected)."""
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return Peer(pid, uid, gid)


def user_name(uid):
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def groups_of(uid):
    """The gids the system's databases give user ``uid`` (primary and supplementary), as login
    would: what membership in the policy's group is judged by. A uid without a passwd entry has
    none (it cannot be a member of anything)."""
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return set()
    return set(os.getgrouplist(entry.pw_name, entry.pw_gid))


def check_path(uid, path, write):
    """InvalidSpec unless user ``uid`` can enter and list directory ``path`` (and create files in
    it, for ``write``), asked of the kernel as that user with their groups: modes, ACLs and every
    parent directory count as they would for the user's own shell."""
    try:
        entry = pwd.getpwuid(uid)
    except KeyError as err:
        raise Forbidden(f"uid {uid} has no passwd entry: it cannot be checked for {path}") from err
    argv = ["test", "-d", path, "-a", "-r", path, "-a", "-x", path] + (["-a", "-w", path] if write else [])
    try:
        proc = subprocess.run(argv, user=uid, group=entry.pw_gid, extra_groups=os.getgrouplist(entry.pw_name,
                              entry.pw_gid), capture_output=True, timeout=CHECK_TIMEOUT_S, cwd="/",
                              env={"LC_ALL": "C", "PATH": "/usr/bin:/bin"})
    except (OSError, subprocess.TimeoutExpired) as err:
        raise InvalidSpec("volumes", f"cannot check {entry.pw_name}'s access to {path}: {err}") from err
    if proc.returncode != 0:
        raise InvalidSpec("volumes", f"HOST {path}: {entry.pw_name} cannot {'write' if write else 'read'} it "
                                     "(a volume must be a directory you can use yourself)")
