"""The work directory's layout, and safe creation and removal of per-container files.

<workdir>/                 0710 root:<qemu group>: QEMU (unprivileged) may pass, nobody else
  images/                  bases (micro/<key>/, store/<sha256>)
  containers/              0700 root:root plus an ACL entry: QEMU's user may pass (x), and no
  containers/<id>/         group: other members of QEMU's group (kvm) may not. Inside: overlay.qcow2,
                           seed.iso, console.log, stdout, stderr, checkpoint.json, control.sock
                           (the task channel's host end: stop requests to the guest), stdin.sock
                           (vmiso listens there, QEMU connects: the task's stdin; only with one)
                           vmlinux, initrd.img (a local user's container: its own copy of
                           micro's kernel, see Isolator.launch(uid=))
  containers/.pool-<slot>/ a warm VM before its claim (vmiso/pool.py), renamed to <id> at claim
  containers/.logs-<slot>/ a warm VM's console.log, stdout, stderr for its whole life (claimed
                           or not): virtlogd rolls a log over by its path, so the logs of a VM
                           whose directory is renamed live under a name that never changes; the
                           container's checkpoint names the slot (``warm``), see log_dir()

Paths come only from validated container ids; nothing here follows a symlink.
"""
import errno
import grp
import os
import pwd
import re
import shutil
import stat
import struct
import time
from pathlib import Path

from .errors import HostError
from .spec import validate_container_id

DEFAULT_WORKDIR = "/var/lib/vmiso"
QEMU_USERS = ("libvirt-qemu", "qemu")  # Debian's, then Fedora's and upstream's default
_SLOT_ID = re.compile(r"[0-9a-f]{12}")  # a pool slot's id (vmiso/pool.py: secrets.token_hex(6))

OVERLAY = "overlay.qcow2"
SEED = "seed.iso"
CONSOLE_LOG = "console.log"
STDOUT = "stdout"
STDERR = "stderr"
CHECKPOINT = "checkpoint.json"
CONTROL_SOCKET = "control.sock"
STDIN_SOCKET = "stdin.sock"
LOGS = (CONSOLE_LOG, STDOUT, STDERR)  # the serial ports' logs, written by virtlogd
LOGS_PREFIX = ".logs-"      # containers/.logs-<slot>: a warm VM's logs (see log_dir)
KERNEL = "vmlinux"          # a local user's container: its own copy of the kernel (and initrd)
INITRD = "initrd.img"


def log_dir(container_dir, warm_slot=None):
    """The directory holding the serial logs (LOGS) of the VM whose directory is
    ``container_dir``: that directory itself, or for a warm VM (``warm_slot``: its pool slot's
    id, from the checkpoint) containers/.logs-<slot>, which keeps its name when the VM's
    directory is renamed at claim (virtlogd reopens a rolled-over log by its first path)."""
    if warm_slot is None:
        return str(container_dir)
    return warm_log_dir(os.path.dirname(str(container_dir)), warm_slot)


def warm_log_dir(containers, warm_slot):
    """containers/.logs-<slot>; HostError for anything but a pool slot's id."""
    if not isinstance(warm_slot, str) or not _SLOT_ID.fullmatch(warm_slot):
        raise HostError(f"{warm_slot!r} is not a pool VM's id")
    return os.path.join(str(containers), LOGS_PREFIX + warm_slot)


def _qemu_user():
    """The passwd entry of the user libvirt runs QEMU as, or None when there is none."""
    for user in QEMU_USERS:
        try:
            return pwd.getpwnam(user)
        except KeyError:
            continue
    return None


def qemu_gid():
    """The primary group of the user libvirt runs QEMU as, or None when there is none."""
    entry = _qemu_user()
    return entry.pw_gid if entry else None


def qemu_uid():
    """The user libvirt runs QEMU as, or None when there is none."""
    entry = _qemu_user()
    return entry.pw_uid if entry else None


# POSIX ACL as the kernel stores it in "system.posix_acl_access": a version, then (tag, perm,
# id) entries sorted by tag. Written directly: no setfacl (package acl) on a bare host.
_ACL_VERSION = 2
_ACL_USER_OBJ, _ACL_USER, _ACL_GROUP_OBJ, _ACL_MASK, _ACL_OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
_ACL_UNDEFINED_ID = 0xFFFFFFFF


def _traverse_acl(*uids):
    """Owner rwx, each of ``uids`` may only pass (x), group and others nothing."""
    entries = [(_ACL_USER_OBJ, 7, _ACL_UNDEFINED_ID)] + [(_ACL_USER, 1, u) for u in sorted(set(uids))] + \
        [(_ACL_GROUP_OBJ, 0, _ACL_UNDEFINED_ID), (_ACL_MASK, 1, _ACL_UNDEFINED_ID), (_ACL_OTHER, 0, _ACL_UNDEFINED_ID)]
    return struct.pack("<I", _ACL_VERSION) + b"".join(struct.pack("<HHI", *e) for e in entries)


def _acl_users(path):
    """The uids with a user entry in ``path``'s access ACL (none without an ACL)."""
    try:
        raw = os.getxattr(path, "system.posix_acl_access", follow_symlinks=False)
    except OSError as err:
        if err.errno in (errno.ENODATA, errno.EOPNOTSUPP, errno.ENOTSUP):
            return set()
        raise
    return {i for tag, _perm, i in struct.iter_unpack("<HHI", raw[4:]) if tag == _ACL_USER}


def admit(path, uid):
    """Let ``uid`` pass directory ``path`` (x) besides the users its ACL admits already: for
    ``containers/``, which a local user's QEMU (running as that user) must pass to reach its own
    container's directory. Idempotent; a no-op where the file system has no ACLs (the fallback
    mode lets QEMU's group pass, and every QEMU runs with that group)."""
    users = _acl_users(path)
    if uid in users or not users:
        return
    os.setxattr(path, "system.posix_acl_access", _traverse_acl(*users, uid), follow_symlinks=False)


def restrict_to_qemu(path, uid=None):
    """Make directory ``path`` passable by root and QEMU's user only (``uid``: that user instead,
    for a container whose QEMU runs as a local user), not by its group's other members. Where
    the file system has no ACLs, falls back to 0710 with QEMU's group."""
    uid, gid = (qemu_uid() if uid is None else uid), qemu_gid()
    if uid is None or gid is None or os.geteuid() != 0:
        os.chmod(path, 0o700)  # QEMU runs as we do (no QEMU user, or a session of our own)
        return
    st = os.lstat(path)
    if st.st_gid != 0:
        os.chown(path, -1, 0)
    try:
        os.setxattr(path, "system.posix_acl_access", _traverse_acl(uid), follow_symlinks=False)
    except OSError as err:
        if err.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP):
            raise
        os.chown(path, -1, gid)  # no ACLs here: the group (kvm on Debian) may pass, as before
        os.chmod(path, 0o710)


def _ensure_dir(path, gid, private=False):
    """Create ``path`` (not following a symlink at it) with mode 0710 and group ``gid``
    (``private``: restrict_to_qemu)."""
    try:
        os.mkdir(path, 0o710)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise HostError(f"{path} exists and is not a directory")
    if private:
        # Set up once: a later launch must neither rewrite it (a syscall per launch) nor drop
        # the local users' QEMUs admit() let in meanwhile (their VMs may be starting).
        uid = qemu_uid()
        if not (uid is not None and st.st_gid == 0 and uid in _acl_users(path)):
            restrict_to_qemu(path)
        return
    if gid is None or os.geteuid() != 0:
        # No separate QEMU user, or not root: QEMU runs as we do; keep it owner-only.
        os.chmod(path, 0o700)
        return
    if st.st_gid != gid:
        os.chown(path, -1, gid)
    if stat.S_IMODE(st.st_mode) != 0o710:
        os.chmod(path, 0o710)


class Workdir:
    """One work directory. Cheap to make; ``ensure()`` creates what is missing."""

    def __init__(self, root=DEFAULT_WORKDIR):
        self.root = Path(root).absolute()
        self.images = self.root / "images"
        self.containers = self.root / "containers"

    def ensure(self):
        gid = qemu_gid()
        try:
            self.root.parent.mkdir(parents=True, exist_ok=True)
            for path in (self.root, self.images):
                _ensure_dir(path, gid)
            _ensure_dir(self.containers, gid, private=True)
        except PermissionError as err:
            raise HostError(f"cannot set up work directory {self.root}: {err} (run as root)") from err
        return self

    def container_dir(self, container_id):
        return self.containers / validate_container_id(container_id)

    def make_container_dir(self, container_id, qemu_uid=None):
        """Create the container's directory; FileExistsError if it is there already.
        ``qemu_uid``: the uid its QEMU runs as when not QEMU's own user (a local user's)."""
        path = self.container_dir(container_id)
        if qemu_uid is not None:
            admit(self.containers, qemu_uid)
        os.mkdir(path, 0o700)
        restrict_to_qemu(path, qemu_uid)
        return path

    def remove_container_dir(self, container_id):
        """Remove the container's directory and all in it; no error if it is gone."""
        _remove_tree(self.container_dir(container_id))

    def make_log_dir(self, warm_slot):
        """Create a warm VM's log directory (log_dir); FileExistsError if it is there already."""
        path = warm_log_dir(self.containers, warm_slot)
        os.mkdir(path, 0o700)
        restrict_to_qemu(path)
        return path

    def remove_log_dir(self, warm_slot):
        """Remove a warm VM's log directory; no error if it is gone (or ``warm_slot`` is None:
        a cold VM's logs are in its own directory)."""
        if warm_slot is not None:
            _remove_tree(warm_log_dir(self.containers, warm_slot))

    def log_dir_slots(self):
        """The slot ids of the warm VM log directories there are."""
        try:
            names = os.listdir(self.containers)
        except FileNotFoundError:
            return []
        return sorted(n[len(LOGS_PREFIX):] for n in names
                      if n.startswith(LOGS_PREFIX) and _SLOT_ID.fullmatch(n[len(LOGS_PREFIX):]))

    def container_ids(self):
        try:
            names = os.listdir(self.containers)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if not n.startswith(".") and _valid(n))


def _remove_tree(path):
    """Remove directory ``path`` and all in it; no error if it is gone; a symlink there is
    unlinked, never followed."""
    try:
        if stat.S_ISLNK(os.lstat(path).st_mode):
            os.unlink(path)  # a planted symlink: remove the link, never its target
            return
    except FileNotFoundError:
        return
    for attempt in range(5):
        try:
            shutil.rmtree(path, ignore_errors=False, onerror=_ignore_missing)
            return
        except OSError as err:
            # virtlogd may still be flushing a stopped VM's last output into a new file.
            if err.errno != errno.ENOTEMPTY or attempt == 4:
                raise
            time.sleep(0.05)


def _valid(name):
    try:
        validate_container_id(name)
        return True
    except ValueError:
        return False


def _ignore_missing(func, path, exc_info):
    if not isinstance(exc_info[1], FileNotFoundError):
        raise exc_info[1]


def group_name(gid):
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)
