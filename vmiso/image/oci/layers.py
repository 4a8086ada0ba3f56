"""Applying OCI image layers (uncompressed tar streams) to a root tree on the host, safely.

OCI semantics (image-spec, "Applying changesets"): entries replace what lower layers put at
their path (a directory over a directory merges, anything else replaces); ``.wh.NAME`` removes
NAME of lower layers; ``.wh..wh..opq`` in a directory hides everything lower layers put there;
whiteouts never appear in the tree and never hide what their own layer wrote. Hard links name a
path already in the tree (this layer's or a lower one's). Owners are numeric, modes keep
setuid/setgid/sticky, PAX ``SCHILY.xattr.*`` records become extended attributes, device nodes
and FIFOs are made with mknod.

The layers are hostile. Every path is walked one component at a time from a directory fd with
O_NOFOLLOW, so no entry can write through a symlink an earlier entry or layer planted; names
that are absolute or hold ``..`` are refused, as are hard links to directories or to paths
outside the tree, and a tree larger than ``Limits``. A refused layer raises ImageError; the
caller removes the whole tree (nothing here is ever reused half-made). This runs as root: it
sets owners and makes device nodes, as the image's root file system needs.
"""
import errno
import os
import stat
import tarfile
from dataclasses import dataclass

from ...errors import ImageError

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
MAX_DEPTH = 128         # path components; deeper is refused (and bounds every recursion here)
CHUNK = 1 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class Limits:
    """The largest tree an image may unpack to: bytes of file content and names (paths)."""

    max_bytes: int = 32 << 30
    max_entries: int = 2_000_000


def split_path(name, what, where):
    """The components of a tar path, with "." and empty ones dropped; ImageError for an
    absolute path, a ``..`` component or more than MAX_DEPTH components."""
    if name.startswith("/"):
        raise ImageError(where, f"{what} {name!r} is an absolute path")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise ImageError(where, f"{what} {name!r} leaves the root ('..')")
    if len(parts) > MAX_DEPTH:
        raise ImageError(where, f"{what} {name[:80]!r}... is deeper than {MAX_DEPTH} directories")
    return parts


class Tree:
    """A root tree in the new directory ``path``, built by applying layers in order."""

    def __init__(self, path, limits=Limits()):
        self.path = os.fspath(path)
        self.limits = limits
        os.mkdir(self.path, 0o755)
        os.chmod(self.path, 0o755)
        self.bytes = 0      # content bytes of the regular files in the tree
        self.entries = 0    # names in the tree (a hard link is one more name)
        self._dir_times = {}  # parts -> mtime of directory entries, set once all layers are in
        self._where = self.path
        self._touched = set()   # paths this layer wrote
        self._prefixes = set()  # and every directory above them
        # The directory the last entry went into: tar entries come grouped by directory, and
        # walking every path from the root costs more than writing the files. Dropped when it or
        # a directory above it is removed (the only way one can go away or be replaced).
        self._cached = None  # (parts, fd)

    # -- walking ----------------------------------------------------------------------------

    def _open_dir(self, parts, create):
        """A directory fd for ``parts`` (never through a symlink); None if a component is
        missing and not ``create``. Missing directories are made 0755 root:root, as docker and
        umoci make them."""
        fd = os.open(self.path, _DIR_FLAGS)
        try:
            for i, part in enumerate(parts):
                try:
                    nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        os.close(fd)
                        return None
                    os.mkdir(part, 0o755, dir_fd=fd)
                    self._count(1, 0)
                    nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as err:
                    if err.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    st = os.stat(part, dir_fd=fd, follow_symlinks=False)
                    kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
                    raise ImageError(self._where, f"{'/'.join(parts)}: {'/'.join(parts[:i + 1])} is {kind} "
                                                  "(a layer may not write through it)") from err
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _parent(self, parts):
        """A directory fd for ``parts`` (made if missing), owned by the cache: never closed by
        the caller."""
        if self._cached is not None and self._cached[0] == parts:
            return self._cached[1]
        fd = self._open_dir(parts, create=True)
        self._invalidate()
        self._cached = (parts, fd)
        return fd

    def _invalidate(self, removed=()):
        """Drop the cached directory if it is ``removed`` or below it (``()``: always)."""
        if self._cached is not None and self._cached[0][:len(removed)] == removed:
            os.close(self._cached[1])
            self._cached = None

    @staticmethod
    def _lstat(dfd, name):
        try:
            return os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    # -- accounting -------------------------------------------------------------------------

    def _count(self, entries, nbytes):
        self.entries += entries
        self.bytes += nbytes
        if self.entries > self.limits.max_entries:
            raise ImageError(self._where, f"the image has more than {self.limits.max_entries} files "
                                          "(the configured limit)")
        if self.bytes > self.limits.max_bytes:
            raise ImageError(self._where, f"the image is larger than {self.limits.max_bytes} bytes "
                                          "(the configured limit)")

    def _uncount(self, st):
        self.entries -= 1
        if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
            self.bytes -= st.st_size

    def _remove(self, dfd, name, st, path):
        """Remove ``name`` (at ``path``; a directory with all it holds), never following a symlink."""
        if stat.S_ISDIR(st.st_mode):
            self._invalidate(path)
            fd = os.open(name, _DIR_FLAGS, dir_fd=dfd)
            try:
                self._clear(fd, path, keep=False)
            finally:
                os.close(fd)
            os.rmdir(name, dir_fd=dfd)
        else:
            os.unlink(name, dir_fd=dfd)
        self._uncount(st)

    def _clear(self, fd, parts, keep):
        """Remove what directory ``fd`` (at ``parts``) holds; with ``keep``, except what this
        layer wrote (and the directories above it, whose other contents go)."""
        for child in os.listdir(fd):
            path = (*parts, child)
            st = os.stat(child, dir_fd=fd, follow_symlinks=False)
            if keep and (path in self._touched or path in self._prefixes):
                if stat.S_ISDIR(st.st_mode):
                    sub = os.open(child, _DIR_FLAGS, dir_fd=fd)
                    try:
                        self._clear(sub, path, keep)
                    finally:
                        os.close(sub)
                continue
            self._remove(fd, child, st, path)

    # -- one layer --------------------------------------------------------------------------

    def apply(self, stream, where):
        """Apply the uncompressed tar layer read from ``stream``; ``where`` names it in errors."""
        self._where = where
        self._touched, self._prefixes = set(), set()
        try:
            with tarfile.open(fileobj=stream, mode="r|", bufsize=CHUNK, errors="surrogateescape") as tar:
                for member in tar:
                    self._entry(tar, member)
        except ImageError:
            raise
        except (tarfile.TarError, EOFError) as err:
            raise ImageError(where, f"not a valid tar layer: {err}") from err
        except OSError as err:
            raise ImageError(where, f"cannot apply the layer: {err}") from err
        finally:
            self._invalidate()

    def _mark(self, parts):
        self._touched.add(parts)
        self._prefixes.update(parts[:i] for i in range(len(parts)))

    def _entry(self, tar, member):
        parts = split_path(member.name, "entry", self._where)
        if not parts:  # the root directory itself: its owner and mode
            if not member.isdir():
                raise ImageError(self._where, f"entry {member.name!r} would replace the root directory")
            fd = os.open(self.path, _DIR_FLAGS)
            try:
                self._set_meta_fd(fd, member)
            finally:
                os.close(fd)
            self._dir_times[()] = member.mtime
            return
        *above, leaf = parts
        above = tuple(above)
        if leaf == OPAQUE:
            return self._opaque(above)
        if leaf.startswith(WHITEOUT + WHITEOUT):
            return  # other AUFS metadata (.wh..wh.plnk and the like): never part of the tree
        if leaf.startswith(WHITEOUT):
            return self._whiteout(above, leaf[len(WHITEOUT):], member.name)
        self._make(self._parent(above), leaf, parts, tar, member)
        self._mark(parts)

    def _whiteout(self, above, name, entry):
        if name in ("", ".", "..") or "/" in name:
            raise ImageError(self._where, f"whiteout {entry!r} names no file")
        path = (*above, name)
        if path in self._touched or path in self._prefixes:
            return  # a whiteout never hides what its own layer wrote
        dfd = self._open_dir(above, create=False)
        if dfd is None:
            return
        try:
            st = self._lstat(dfd, name)
            if st is not None:
                self._remove(dfd, name, st, path)
        finally:
            os.close(dfd)

    def _opaque(self, above):
        dfd = self._open_dir(above, create=False)
        if dfd is None:
            return
        try:
            self._clear(dfd, above, keep=True)
        finally:
            os.close(dfd)

    # -- making one entry -------------------------------------------------------------------

    def _make(self, dfd, leaf, parts, tar, member):
        existing = self._lstat(dfd, leaf)
        if member.isdir():
            if existing is not None and not stat.S_ISDIR(existing.st_mode):
                self._remove(dfd, leaf, existing, parts)
                existing = None
            if existing is None:
                os.mkdir(leaf, 0o700, dir_fd=dfd)
                self._count(1, 0)
            fd = os.open(leaf, _DIR_FLAGS, dir_fd=dfd)
            try:
                self._set_meta_fd(fd, member, times=False)
            finally:
                os.close(fd)
            self._dir_times[parts] = member.mtime
            return
        if member.islnk():
            return self._hardlink(dfd, leaf, parts, member, existing)
        if existing is not None:
            self._remove(dfd, leaf, existing, parts)
        if member.isreg():
            self._regular(dfd, leaf, tar, member)
        elif member.issym():
            os.symlink(member.linkname, leaf, dir_fd=dfd)
            self._count(1, 0)
            self._set_meta_path(dfd, leaf, member, chmod=False)
        elif member.ischr() or member.isblk() or member.isfifo():
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK if member.isblk() else stat.S_IFIFO
            device = os.makedev(member.devmajor, member.devminor) if not member.isfifo() else 0
            os.mknod(leaf, kind | 0o600, device, dir_fd=dfd)
            self._count(1, 0)
            self._set_meta_path(dfd, leaf, member, chmod=True)
        else:
            raise ImageError(self._where, f"entry {member.name!r} has an unsupported type {member.type!r}")

    def _regular(self, dfd, leaf, tar, member):
        self._count(1, member.size)  # refused before a byte is written
        fd = os.open(leaf, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
        try:
            source = tar.extractfile(member)
            while True:
                chunk = source.read(CHUNK)
                if not chunk:
                    break
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
            self._set_meta_fd(fd, member)
        finally:
            os.close(fd)

    def _hardlink(self, dfd, leaf, parts, member, existing):
        target = split_path(member.linkname, "hard link target", self._where)
        if not target:
            raise ImageError(self._where, f"hard link {member.name!r} points at the root directory")
        if target == parts:
            return  # a link to itself: the file is there already
        tfd = self._open_dir(target[:-1], create=False)
        st = self._lstat(tfd, target[-1]) if tfd is not None else None
        try:
            if st is None:
                raise ImageError(self._where, f"hard link {member.name!r} points at {member.linkname!r}, "
                                              "which is not in the tree")
            if stat.S_ISDIR(st.st_mode):
                raise ImageError(self._where, f"hard link {member.name!r} points at a directory")
            if existing is not None:
                self._remove(dfd, leaf, existing, parts)
            os.link(target[-1], leaf, src_dir_fd=tfd, dst_dir_fd=dfd, follow_symlinks=False)
            self._count(1, 0)
        finally:
            if tfd is not None:
                os.close(tfd)

    # -- metadata ---------------------------------------------------------------------------

    def _set_meta_fd(self, fd, member, times=True):
        os.fchown(fd, member.uid, member.gid)
        os.fchmod(fd, member.mode & 0o7777)  # after chown, which clears setuid/setgid
        for name, value in _xattrs(member):
            os.setxattr(fd, name, value)     # after chown and write, which clear capabilities
        if times:
            os.utime(fd, ns=(_ns(member.mtime),) * 2)

    def _set_meta_path(self, dfd, leaf, member, chmod):
        os.chown(leaf, member.uid, member.gid, dir_fd=dfd, follow_symlinks=False)
        if chmod:  # a node made just now, by us: not a symlink
            os.chmod(leaf, member.mode & 0o7777, dir_fd=dfd)
        xattrs = _xattrs(member)
        if xattrs:
            proc = f"/proc/self/fd/{dfd}/{leaf}"  # setxattr has no *at form; the leaf is not followed
            for name, value in xattrs:
                os.setxattr(proc, name, value, follow_symlinks=False)
        os.utime(leaf, ns=(_ns(member.mtime),) * 2, dir_fd=dfd, follow_symlinks=False)

    def read_file(self, path, limit):
        """The bytes of the regular file at ``path`` ("etc/passwd") in the tree, or None when it
        is missing, not a regular file, reached through a symlink, or larger than ``limit``."""
        parts = split_path(path, "path", self.path)
        try:
            dfd = self._open_dir(parts[:-1], create=False)
        except ImageError:
            return None
        if dfd is None:
            return None
        try:
            fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
        except OSError:
            return None
        finally:
            os.close(dfd)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return None
        with os.fdopen(fd, "rb") as f:
            data = f.read(limit + 1)
        return data if len(data) <= limit else None

    def finish(self):
        """Give directories their layers' mtimes (each entry written into one changed it)."""
        for parts in sorted(self._dir_times, key=len, reverse=True):
            try:
                fd = self._open_dir(parts, create=False)
            except ImageError:
                continue  # a later layer put a symlink or file above it: it is gone anyway
            if fd is not None:
                try:
                    os.utime(fd, ns=(_ns(self._dir_times[parts]),) * 2)
                finally:
                    os.close(fd)


def _ns(mtime):
    return int(mtime * 1_000_000_000)


def _xattrs(member):
    """(name, raw value) of the entry's PAX SCHILY.xattr records."""
    found = []
    for key, value in member.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            # tarfile decodes PAX values as UTF-8 with surrogateescape: this gives the bytes back.
            found.append((key[len("SCHILY.xattr."):], value.encode("utf-8", "surrogateescape")))
    return found
