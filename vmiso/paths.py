"""The work directory's and the host cache's layouts (every path into them is named here), and
safe creation and removal of per-container files.

<workdir>/                 0710 root:<qemu group>: QEMU (unprivileged) may pass, nobody else
  images/                  bases: micro/ (micro builds, image/micro.py), store/ and names.json
                           (stored bases and their names, image/store.py)
  cache/                   what the work dir's own tools keep: oci/ (the layer cache,
                           image/oci/cache.py), testimages/ (vmiso.testing.oci's layouts), bench/
                           (the benches' scratch)
  bench/                   the prototype baseline's task directories (bench/baseline.py)
  net/                     bridge plans, address leases and their lock (net/ipam.py)
  runs/<id>                a `vmiso run` process's record of its container, held locked (slurm.py)
  agent-bindings/<id>      which Slurm job an agent's container belongs to (agent/bindings.py)
  agent.json               the serving agent's socket and pid (agent/presence.py; the work dir
                           itself is its flock)
  pool.json                the warm pool's status, written by its owner (pool.py)
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

<cache>/                   the host cache (HostCache): what does not depend on the work dir, shared
                           by every work dir on the host; /var/cache/vmiso or $VMISO_CACHE_DIR
  kernel/<key>/            lean kernels (image/lean.py), content-addressed
  debs/                    downloaded and verified Debian packages (image/debs.py)
  workdirs/<id>            the work dirs that built micro from this cache (a file holding the
                           path): gc of one keeps the kernels another one's micro builds name

Paths come only from validated container ids; nothing here follows a symlink.
"""
import contextlib
import errno
import grp
import hashlib
import os
import pwd
import re
import shutil
import stat
import struct
import time
from pathlib import Path

from . import files
from .errors import HostError, InvalidSpec
from .spec import validate_container_id

DEFAULT_WORKDIR = "/var/lib/vmiso"
DEFAULT_CACHE_DIR = "/var/cache/vmiso"  # FHS: data kept to save time, that may be deleted
CACHE_DIR_ENV = "VMISO_CACHE_DIR"
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
UNIX_PATH_MAX = 107  # bytes in a unix socket's path (sun_path is 108 with its NUL)
SLOT_PREFIX = ".pool-"      # containers/.pool-<slot>: a warm VM before its claim (vmiso/pool.py)
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
        self.micro_images = self.images / "micro"  # image/micro.py's builds
        self.image_store = self.images / "store"   # image/store.py's bases
        self.image_names = self.images / "names.json"
        self.containers = self.root / "containers"
        self.net = self.root / "net"                        # net/ipam.py: bridge plans and leases
        self.runs = self.root / "runs"                      # slurm.py: run records of `vmiso run`
        self.agent_bindings = self.root / "agent-bindings"  # agent/bindings.py: containers bound to jobs
        self.agent_info = self.root / "agent.json"          # agent/presence.py: the serving agent's socket
        self.pool_status = self.root / "pool.json"          # pool.py: the pool's status, for ps and doctor
        self.cache = self.root / "cache"
        self.oci_cache = self.cache / "oci"
        self.test_images = self.cache / "testimages"
        self.bench_cache = self.cache / "bench"
        self.bench_tasks = self.root / "bench"
        # Where lean kernels and Debian packages were kept before the host cache: build_micro
        # moves what it finds there into the HostCache.
        self.old_kernel_cache = self.cache / "kernel"
        self.old_debs_cache = self.cache / "debs"

    @classmethod
    def of(cls, workdir):
        """``workdir`` itself if it is a Workdir, else the Workdir at path ``workdir``."""
        return workdir if isinstance(workdir, cls) else cls(workdir)

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

    def check_socket_path(self, directory, what):
        """InvalidSpec unless a socket in ``directory`` (control.sock, the longest name of a
        container's sockets) fits a unix socket's address: QEMU and vmiso could not bind it."""
        path = os.fsencode(os.path.join(directory, CONTROL_SOCKET))
        if len(path) > UNIX_PATH_MAX:
            raise InvalidSpec(what, f"its sockets would be {os.fsdecode(path)} ({len(path)} bytes), but a unix "
                                    f"socket's path holds at most {UNIX_PATH_MAX}: use a shorter work dir "
                                    f"(now {self.root}){' or container id' if what == 'container_id' else ''}")

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


class HostCache:
    """The host cache (see the module's docstring): by default ``$VMISO_CACHE_DIR`` or
    /var/cache/vmiso. Cheap to make; ``ensure()`` creates what is missing."""

    def __init__(self, root=None):
        self.root = Path(root or os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR).absolute()
        self.kernels = self.root / "kernel"
        self.debs = self.root / "debs"
        self.workdirs = self.root / "workdirs"

    @classmethod
    def of(cls, cache):
        """``cache`` itself if it is a HostCache, else the HostCache at path ``cache`` (None: the
        default one)."""
        return cache if isinstance(cache, cls) else cls(cache)

    def ensure(self):
        """Create the cache's directories: 0755 root's (nothing in it is secret, and QEMU reads
        none of it: micro builds copy their kernel), the work dir registry 0700."""
        try:
            for path, mode in ((self.root, 0o755), (self.kernels, 0o755), (self.debs, 0o755),
                               (self.workdirs, 0o700)):
                try:
                    path.mkdir(mode=mode, parents=True)
                    os.chmod(path, mode)  # whatever the umask
                except FileExistsError:
                    if not path.is_dir():
                        raise HostError(f"{path} exists and is not a directory") from None
        except PermissionError as err:
            raise HostError(f"cannot set up the host cache {self.root}: {err} "
                            f"(run as root, or set ${CACHE_DIR_ENV} to a directory of yours)") from err
        return self

    def _entry(self, workdir):
        return self.workdirs / hashlib.sha256(str(Workdir.of(workdir).root).encode()).hexdigest()[:32]

    def register(self, workdir):
        """Record that ``workdir`` builds from this cache (see ``users()``)."""
        entry, text = self._entry(workdir), f"{Workdir.of(workdir).root}\n"
        try:
            if entry.read_text() == text:
                return
        except OSError:
            pass
        files.write_atomic(entry, text.encode(), 0o600, durable=False)

    def users(self):
        """The registered work dirs (Workdir) that still exist; the entries of those that are
        gone are dropped."""
        try:
            entries = [e for e in os.scandir(self.workdirs) if not e.name.startswith(".")]
        except FileNotFoundError:
            return []
        found = []
        for entry in sorted(entries, key=lambda e: e.name):
            try:
                path = Path(Path(entry.path).read_text().strip())
            except OSError:
                continue
            if path.is_absolute() and path.is_dir():
                found.append(Workdir(path))
            elif path.is_absolute() and not path.exists():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
        return found


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
