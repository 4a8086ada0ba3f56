"""What ``vmiso image gc`` may remove, as each image component reports it: the store (store.py),
micro builds (micro.py) and lean kernels (lean.py) each say what of their own layout is garbage
(their ``collectable`` functions), and store.gc() removes what they return; the layer cache
(oci/cache.py) collects its own blobs under its lock, after the store's."""
import os
import re
import time
from dataclasses import dataclass

from .. import files

KEY_RE = re.compile(r"[0-9a-f]{64}")  # a content-addressed entry's name: a sha256, hex
STALE_SECONDS = 3600  # no add, build or removal takes that long: older leftovers are a killed one's


@dataclass(frozen=True)
class Collected:
    # "store", "micro", "kernel", "blob" (the layer cache's), "name" (dangling) or "partial" (what
    # a killed add or transfer left)
    kind: str
    id: str
    path: str
    bytes: int


def keyed(directory):
    """The content-addressed entries (directories named KEY_RE) of ``directory``: os.DirEntry
    objects; OSError when it cannot be read."""
    return [e for e in os.scandir(directory) if KEY_RE.fullmatch(e.name) and e.is_dir(follow_symlinks=False)]


def of_dir(kind, path):
    """The Collected of directory ``path`` (its name is the id)."""
    return Collected(kind, os.path.basename(path), str(path), files.disk_bytes(path))


def partials(directory):
    """What killed adds and removals left in ``directory`` (``.add-*``, ``.rm-*`` older than
    STALE_SECONDS)."""
    try:
        entries = [*os.scandir(directory)]
    except FileNotFoundError:
        return []
    return [Collected("partial", e.name, e.path, files.disk_bytes(e.path)) for e in entries
            if e.name.startswith((".add-", ".rm-")) and e.is_dir(follow_symlinks=False)
            and time.time() - files.newest_mtime(e.path) > STALE_SECONDS]
