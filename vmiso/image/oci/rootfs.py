"""A root tree as the image's root file system: a raw ext4 image made by ``mke2fs -d``.

``mke2fs -d`` (run as root) copies owners, modes (setuid, setgid and sticky included), extended
attributes, device nodes, FIFOs, symlinks, mtimes and hard links (one inode, several names)
from the tree, so the file system holds exactly what the layers made; tests check each with
debugfs. The size is the tree's plus headroom for what a task writes into its own overlay
(free blocks are holes in the sparse file, so they take no disk). Inode tables and the journal
are initialised now, so no guest starts an ext4lazyinit thread (time under TCG, and it would grow
every overlay).

Raw, not qcow2: a guest started no slower from a qcow2 overlay on the raw base than on a qcow2
one, and read the whole tree as fast (docs/performance.md, "Container images"); raw also spares the
conversion. Its cost is at import: the store hashes the whole virtual size, holes included.
"""
import os
import stat
import uuid

from ..._proc import run

BLOCK = 4096
MIN_HEADROOM = 512 << 20    # free space for tasks, at least...
HEADROOM_FRACTION = 4       # ...or a quarter of the tree
JOURNAL_AND_METADATA = 96 << 20
BYTES_PER_INODE = 16384     # mke2fs's default ratio, kept as the floor of the inode count
LABEL = "vmiso-oci"
FORMAT = "raw"


def _round(n, unit=BLOCK):
    return -(-n // unit) * unit


def measure(tree):
    """(bytes the tree's files take in ext4 blocks, inodes) of the tree at ``tree``."""
    used, inodes, seen = 0, 1, set()
    for top, dirs, names in os.walk(tree):
        for name in dirs + names:
            st = os.lstat(os.path.join(top, name))
            if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                if st.st_ino in seen:
                    continue  # another name of an inode counted already
                seen.add(st.st_ino)
            inodes += 1
            if stat.S_ISREG(st.st_mode):
                used += _round(st.st_size)
            elif stat.S_ISDIR(st.st_mode) or (stat.S_ISLNK(st.st_mode) and st.st_size >= 60):
                used += BLOCK  # a directory's first block; a symlink too long to live in its inode
    return used, inodes


def plan(used, inodes):
    """(file system bytes, inode count) for a tree of ``used`` bytes and ``inodes`` inodes."""
    size = _round(used + max(MIN_HEADROOM, used // HEADROOM_FRACTION) + JOURNAL_AND_METADATA, 1 << 20)
    return size, max(size // BYTES_PER_INODE, inodes + inodes // 4 + 4096)


def build(tree, out, ident):
    """ext4 of ``tree`` as the new raw image ``out``; ``ident`` (hex) gives the file system its
    UUID. Returns the virtual size."""
    used, inodes = measure(tree)
    size, inode_count = plan(used, inodes)
    fs_uuid = str(uuid.UUID(ident[:32]))
    run(["mke2fs", "-q", "-t", "ext4", "-m", "0", "-L", LABEL, "-U", fs_uuid, "-N", inode_count,
         "-E", f"lazy_itable_init=0,lazy_journal_init=0,hash_seed={fs_uuid}",
         "-d", tree, "-F", out, f"{size // 1024}k"], timeout=1800)
    if not os.path.lexists(os.path.join(tree, "lost+found")):
        # mke2fs always makes one; the task's root holds the image's files and nothing else
        run(["debugfs", "-w", "-R", "rmdir lost+found", out], timeout=300)
    return size
