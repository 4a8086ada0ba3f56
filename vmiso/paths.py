"""The work directory's layout, and safe creation and removal of per-container files.

<workdir>/                 0710 root:<qemu group>: QEMU (unprivileged) may pass, nobody else
  images/                  bases (micro/<key>/, store/<sha256>)
  containers/<id>/         overlay.qcow2, seed.iso, console.log, stdout, stderr, checkpoint.json,
                           control.sock (the task channel's host end: stop requests to the guest)

Paths come only from validated container ids; nothing here follows a symlink.
"""
import errno
import grp
import os
import pwd
import shutil
import stat
import time
from pathlib import Path

from .errors import HostError
from .spec import validate_container_id

DEFAULT_WORKDIR = "/var/lib/vmiso"
QEMU_USERS = ("libvirt-qemu", "qemu")  # Debian's, then Fedora's and upstream's default

OVERLAY = "overlay.qcow2"
SEED = "seed.iso"
CONSOLE_LOG = "console.log"
STDOUT = "stdout"
STDERR = "stderr"
CHECKPOINT = "checkpoint.json"
CONTROL_SOCKET = "control.sock"


def qemu_gid():
    """The primary group of the user libvirt runs QEMU as, or None when there is none."""
    for user in QEMU_USERS:
        try:
            return pwd.getpwnam(user).pw_gid
        except KeyError:
            continue
    return None


def _ensure_dir(path, gid):
    """Create ``path`` (not following a symlink at it) with mode 0710 and group ``gid``."""
    try:
        os.mkdir(path, 0o710)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise HostError(f"{path} exists and is not a directory")
    if gid is None:
        # No separate QEMU user: QEMU runs as root or as us; keep it owner-only.
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
            for path in (self.root, self.images, self.containers):
                _ensure_dir(path, gid)
        except PermissionError as err:
            raise HostError(f"cannot set up work directory {self.root}: {err} (run as root)") from err
        return self

    def container_dir(self, container_id):
        return self.containers / validate_container_id(container_id)

    def make_container_dir(self, container_id):
        """Create the container's directory; FileExistsError if it is there already."""
        path = self.container_dir(container_id)
        os.mkdir(path, 0o710)
        gid = qemu_gid()
        if gid is not None:
            os.chown(path, -1, gid)
        else:
            os.chmod(path, 0o700)
        return path

    def remove_container_dir(self, container_id):
        """Remove the container's directory and all in it; no error if it is gone."""
        path = self.container_dir(container_id)
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

    def container_ids(self):
        try:
            names = os.listdir(self.containers)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if not n.startswith(".") and _valid(n))


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
