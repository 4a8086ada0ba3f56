"""Host directories shared into a task's VM (TaskSpec.volumes, ``vmiso run -v``): the host-side
checks made before a launch creates anything, and the domain's ``<filesystem>`` devices.

Mechanism: QEMU's built-in virtio-9p (virtiofsd is not packaged for Debian 12), one PCI device per
volume, found in the guest by its mount tag ``vmiso<N>``; the guest wrapper mounts it
(image/guest/task.sh). Security model ``mapped`` (libvirt ``accessmode='mapped'``, QEMU
``security_model=mapped-xattr``): QEMU creates every file as its own unprivileged user with a
plain mode (0600 files, 0700 directories), and keeps what the guest asked for (owner, mode,
setuid bits, device nodes, symlinks) in ``user.virtfs.*`` xattrs. So a guest's ``chmod u+s``,
``mknod`` or ``ln -s /etc`` leaves an ordinary file on the host, never a setuid binary, a device
or a symlink a host process could follow. 'passthrough' would need QEMU to run as root;
'none'/'squash' would pass the guest's mode bits through, letting it plant setuid files owned by
QEMU's user on the host. QEMU's 9p server opens every path component with O_NOFOLLOW below the
share's root and refuses ``..`` at it, so the guest cannot name anything outside the share.
``readonly`` becomes ``<readonly/>``: QEMU refuses every change with EROFS, so a guest root
remounting the share read-write gains nothing.

Permissions: vmiso changes none. QEMU runs as its own user (libvirt-qemu) and must be able to
reach and read the directory (and write it, without ``readonly``); that is the operator's grant
(e.g. ``setfacl -m u:libvirt-qemu:rwx DIR``), checked here as that user before the launch. Files
the task creates belong to QEMU's user on the host (mode 0600; root reads them).
"""
import os
import subprocess
from dataclasses import dataclass

from ..errors import InvalidSpec
from ..paths import QEMU_USERS
from .domain import Filesystem

TAG_PREFIX = "vmiso"
CHECK_TIMEOUT_S = 10


@dataclass(frozen=True)
class Share:
    """A checked volume: ``host`` resolved (no symlink left in it), ``tag`` what the guest mounts."""

    host: str
    guest: str
    readonly: bool
    tag: str

    def record(self):
        return [self.host, self.guest, self.readonly, self.tag]

    @classmethod
    def from_record(cls, record):
        host, guest, readonly, tag = record
        return cls(host, guest, bool(readonly), tag)


def _inside(path, parent):
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def prepare(volumes, workdir, roots=None, uid=None):
    """Check each Volume against the host and return Shares (InvalidSpec, one line, otherwise):
    HOST exists and is a directory, lies neither inside vmiso's work dir nor above it (a guest
    would reach other VMs' disks through it), lies inside one of ``roots`` when the Isolator has
    such a policy, and QEMU's user can use it as the volume needs (``uid``: the local user a
    container's QEMU runs as instead, with QEMU's group)."""
    if not volumes:
        return ()
    work = os.path.realpath(str(workdir))
    allowed = [os.path.realpath(r) for r in roots] if roots is not None else None
    shares = []
    for index, volume in enumerate(volumes):
        host = os.path.realpath(volume.host)  # the XML names the directory itself, never a link to it
        if not os.path.exists(host):
            raise InvalidSpec("volumes", f"HOST {volume.host} does not exist")
        if not os.path.isdir(host):
            raise InvalidSpec("volumes", f"HOST {volume.host} is not a directory")
        if _inside(host, work) or _inside(work, host):
            raise InvalidSpec("volumes", f"HOST {volume.host} is inside vmiso's work directory {work} or holds it")
        if allowed is not None and not any(_inside(host, root) for root in allowed):
            raise InvalidSpec("volumes", f"HOST {volume.host} is outside the directories this agent may share "
                                         f"({', '.join(allowed) or 'none'})")
        check_qemu_access(host, write=not volume.readonly, identity=_user_identity(uid) if uid is not None else None)
        shares.append(Share(host, volume.guest, volume.readonly, f"{TAG_PREFIX}{index}"))
    return tuple(shares)


def _qemu_identity():
    """(name, uid, gid, supplementary gids) of the user libvirt runs QEMU as, or None."""
    import pwd

    for name in QEMU_USERS:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return name, entry.pw_uid, entry.pw_gid, os.getgrouplist(name, entry.pw_gid)
    return None


def _user_identity(uid):
    """(name, uid, gid, groups) QEMU has when it runs as local user ``uid`` with QEMU's group:
    libvirt gives it that group and the groups /etc/group lists the user in (getgrouplist)."""
    import pwd

    from ..paths import qemu_gid

    gid = qemu_gid()
    try:
        name = pwd.getpwuid(uid).pw_name
        groups = os.getgrouplist(name, gid)
    except KeyError:
        name, groups = str(uid), [gid]
    return name, uid, gid, groups


def check_qemu_access(path, write, identity=None):
    """InvalidSpec unless QEMU's user (``identity``: (name, uid, gid, groups) of the one a
    container's QEMU runs as instead) can enter and list ``path`` (and create files in it, for
    ``write``). Asked of the kernel itself: ``test`` run as that user (with its groups, as libvirt
    starts QEMU), so modes, ACLs and every parent directory count exactly as they will for QEMU."""
    identity = identity or _qemu_identity()
    if identity is None or os.geteuid() != 0:
        return  # QEMU runs as we do (a session libvirt): our own access is QEMU's
    name, uid, gid, groups = identity
    argv = ["test", "-r", path, "-a", "-x", path] + (["-a", "-w", path] if write else [])
    try:
        proc = subprocess.run(argv, user=uid, group=gid, extra_groups=groups, capture_output=True,
                              timeout=CHECK_TIMEOUT_S, env={"LC_ALL": "C", "PATH": "/usr/bin:/bin"}, cwd="/")
    except (OSError, subprocess.TimeoutExpired) as err:
        raise InvalidSpec("volumes", f"cannot check {name}'s access to {path}: {err}") from err
    if proc.returncode != 0:
        need = "rwx" if write else "r-x"
        raise InvalidSpec("volumes", f"QEMU's user {name} cannot {'write' if write else 'read'} {path}: grant it "
                                     f"(e.g. setfacl -m u:{name}:{need} {path}, and x on its parents)")


def filesystems(shares):
    """The domain's <filesystem> devices for ``shares``."""
    return tuple(Filesystem(s.host, s.tag, readonly=s.readonly) for s in shares)


def seed_lines(shares):
    """The seed's ``vmiso/volumes`` file: ``TAG ro|rw BASE64(GUEST)`` per share, parents first
    (sorted by guest path), so a volume inside another is mounted on top of it."""
    import base64

    lines = []
    for s in sorted(shares, key=lambda s: s.guest):
        path = base64.b64encode(s.guest.encode("utf-8", "surrogateescape")).decode("ascii")
        lines.append(f"{s.tag} {'ro' if s.readonly else 'rw'} {path}\n")
    return "".join(lines).encode("ascii")
