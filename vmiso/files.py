"""Small crash-safe file operations (state, seed, image store): atomic replace, locks, removal.

Each leaves either the old state or the new one after a crash, never half of one.
"""
import contextlib
import errno
import fcntl
import os
import shutil
import stat
from pathlib import Path


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def temp_name(path):
    """The temp file beside ``path`` a writer uses: ``.<name>.<pid>.<random>`` (the pid tells a
    crashed writer's leftover from a live writer's file, see ``dead_writers_temp_files``)."""
    path = Path(path)
    return path.parent / f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}"


def dead_writers_temp_files(directory, name):
    """Temp files of ``name`` in ``directory`` whose writer process no longer exists."""
    prefix = f".{name}."
    try:
        entries = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for entry in entries:
        pid, _, rand = entry[len(prefix):].partition(".")
        if entry.startswith(prefix) and pid.isdigit() and rand and not _alive(int(pid)):
            found.append(os.path.join(directory, entry))
    return found


def _alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def write_atomic(path, data, mode, durable=True):
    """Replace ``path`` with ``data``: temp file in the same directory, fsync, rename, dir fsync.
    ``durable=False`` skips both fsyncs: still atomic against a crash of the process (the page
    cache survives it), not against power loss."""
    path = Path(path)
    tmp = temp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        write_all(fd, data)
        if durable:
            os.fsync(fd)
        os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.rename(tmp, path)
    if durable:
        fsync_dir(path.parent)


def stamp(st):
    """What changes when a file's content is changed (or the file replaced) by normal means.

    Not ctime: libvirt's DAC driver chowns a disk's whole backing chain to QEMU's user at every
    start and back at every stop, so ctime changes on each launch without the content changing.
    """
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}


@contextlib.contextmanager
def flocked(lock_path, shared=False, on_wait=None):
    """Hold an flock on the file ``lock_path`` (made if missing, never through a symlink).
    ``on_wait()`` is called once before blocking, when another process holds it (to say why
    nothing happens)."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        try:
            fcntl.flock(fd, mode | (fcntl.LOCK_NB if on_wait is not None else 0))
        except BlockingIOError:
            on_wait()
            fcntl.flock(fd, mode)
        yield
    finally:
        os.close(fd)


def locked(directory, on_wait=None):
    """Hold the exclusive lock of ``directory`` (its file ``.lock``); ``on_wait`` as flocked's."""
    return flocked(Path(directory) / ".lock", on_wait=on_wait)


def _files(path):
    for top, _dirs, names in os.walk(path):
        for name in names:
            with contextlib.suppress(OSError):
                yield os.lstat(os.path.join(top, name))


def disk_bytes(path):
    """Bytes a directory tree, or a single file, takes on disk (allocated blocks)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:  # gone meanwhile: takes nothing
        return 0
    if not stat.S_ISDIR(st.st_mode):
        return st.st_blocks * 512
    return sum(st.st_blocks * 512 for st in _files(path))


def newest_mtime(path):
    """The latest mtime in a tree: a copy still being written keeps its directory young."""
    return max([os.lstat(path).st_mtime, *(st.st_mtime for st in _files(path))])


def remove_tree(path):
    """Rename directory ``path`` out of sight first (readers see all of it or nothing), then
    delete it; a crash leaves a ``.rm-*`` sibling for the garbage collector."""
    path = Path(path)
    hidden = path.parent / f".rm-{path.name}-{os.urandom(4).hex()}"
    os.rename(path, hidden)
    fsync_dir(path.parent)
    shutil.rmtree(hidden, ignore_errors=True)


def move_into(old, new, temp_prefix=".rm-"):
    """Move each entry of directory ``old`` (but hidden ones) that ``new`` lacks into ``new``: by
    rename, or across file systems by a copy renamed into place (a crash leaves a hidden
    ``temp_prefix`` entry in ``new``). Then remove ``old`` and what is left in it. Returns the
    names moved; none when ``old`` is not there."""
    old, new = Path(old), Path(new)
    try:
        names = sorted(n for n in os.listdir(old) if not n.startswith("."))
    except FileNotFoundError:
        return []
    moved = []
    for name in names:
        source, target = old / name, new / name
        if os.path.lexists(target) or os.path.islink(source):
            continue
        try:
            os.rename(source, target)
        except OSError as err:
            if err.errno != errno.EXDEV:
                raise
            temp = new / f"{temp_prefix}{name}-{os.urandom(4).hex()}"
            if os.path.isdir(source):
                shutil.copytree(source, temp, symlinks=True)
            else:
                shutil.copy2(source, temp)
            os.rename(temp, target)
        moved.append(name)
    remove_tree(old)
    return moved
