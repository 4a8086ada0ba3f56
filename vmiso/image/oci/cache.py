"""The layer cache: one OCI image layout shared by every pull and import, blobs by digest.

``<workdir>/cache/oci/layout`` (``cache_dir``) is written by skopeo (transfer.py), which skips a blob the layout
holds already, so a second pull of the same or an overlapping image fetches only what is new.
Each transfer runs in a ``session``: it holds the cache's lock (one transfer at a time, and no
other process removes a blob while an import reads it), and when the import fails, whatever
it added (blobs, the index entry) is removed again, so a refused image leaves nothing here.

Blobs outlive ``vmiso image rm`` (pulling the image again then fetches nothing); ``collect``
(``vmiso image gc``) removes those that no stored container image names.
"""
import contextlib
import json
import os
import shutil
from pathlib import Path

from ... import files
from ...errors import ImageError
from ...paths import Workdir
from ..garbage import Collected

TAG = "vmiso-import"  # the one index entry skopeo rewrites on every transfer
_TEMP_PREFIX = "oci-put-blob"  # what skopeo writes a blob to before renaming it into blobs/


def cache_dir(root):
    return Workdir.of(root).oci_cache


class Session:
    """The layout while the lock is held; what it held when the session began."""

    def __init__(self, directory):
        self.layout = str(directory / "layout")
        self.blobs = Path(self.layout) / "blobs" / "sha256"
        self.created = not (Path(self.layout) / "oci-layout").exists()
        _ensure_layout(Path(self.layout))
        self.index = (Path(self.layout) / "index.json").read_bytes()
        self.before = set(os.listdir(self.blobs))

    def held(self, digest):
        """Whether blob ``digest`` was in the cache before this session."""
        return digest.partition(":")[2] in self.before

    def new_blobs(self):
        return sorted(set(os.listdir(self.blobs)) - self.before)

    def in_flight(self):
        """Bytes of the blobs the current transfer is writing (for a progress display)."""
        total = 0
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.layout):
                if entry.name.startswith(_TEMP_PREFIX):
                    with contextlib.suppress(OSError):
                        total += entry.stat(follow_symlinks=False).st_size
        return total

    def discard(self, digest):
        """Remove blob ``digest`` (found corrupt), so that the next transfer fetches it again."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.blobs / digest.partition(":")[2])

    def rollback(self):
        if self.created:  # the first transfer into this cache: remove the layout it made
            shutil.rmtree(self.layout)
            return
        for name in self.new_blobs():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.blobs / name)
        files.write_atomic(Path(self.layout) / "index.json", self.index, 0o644)
        _sweep(self.layout)


def _ensure_layout(layout):
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    if not (layout / "oci-layout").exists():
        files.write_atomic(layout / "oci-layout", b'{"imageLayoutVersion":"1.0.0"}', 0o644)
    if not (layout / "index.json").exists():
        files.write_atomic(layout / "index.json", json.dumps({"schemaVersion": 2, "manifests": []}).encode(),
                           0o644)


def _temp_entries(layout):
    """What transfers are writing, or a killed one left (with the lock held: only the latter)."""
    return [entry for entry in os.scandir(layout) if entry.name.startswith(_TEMP_PREFIX)]


def _sweep(layout):
    """Temp files of a transfer that was killed (none runs now: the lock is held)."""
    for entry in _temp_entries(layout):
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)


@contextlib.contextmanager
def session(root, on_wait=None):
    """Hold the layer cache of work directory ``root``; roll back what it gained on an error.
    ``on_wait()``: called before waiting for another transfer or gc that holds it."""
    directory = cache_dir(root)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o700)  # layers may hold secrets of their owners: root only
    except OSError as err:
        raise ImageError(directory, f"cannot create the layer cache: {err.strerror}") from err
    with files.locked(directory, on_wait):
        _sweep(directory / "layout") if (directory / "layout").is_dir() else None
        current = Session(directory)
        try:
            yield current
        except BaseException:
            current.rollback()
            raise


def blobs(root):
    """{hex digest: bytes} of every blob in the cache."""
    directory = cache_dir(root) / "layout" / "blobs" / "sha256"
    try:
        return {e.name: e.stat(follow_symlinks=False).st_size for e in os.scandir(directory)}
    except FileNotFoundError:
        return {}


def referenced(images):
    """The hex digests of the blobs stored ``images`` (store.StoredImage) came from: each
    container image's manifest, config and layers (a disk or micro image has none)."""
    keep = set()
    for image in images:
        oci = image.oci or {}
        for digest in [oci.get("manifest_digest"), oci.get("config_digest"), *oci.get("layers", ())]:
            if isinstance(digest, str) and digest.startswith("sha256:"):
                keep.add(digest.partition(":")[2])
    return keep


def collect(root, referenced_now, dry_run=False, on_wait=None):
    """gc of the layer cache of work directory ``root``: the blobs not in ``referenced_now()``
    (hex digests; called with the cache's lock held, so an import, which holds the lock until its
    image is stored, is either stored and counted or not begun), the index entries naming them,
    and what a killed transfer left. Returns the Collected; removes them unless ``dry_run``.
    ``on_wait()``: called before waiting for a transfer in progress."""
    directory = cache_dir(root)
    layout = directory / "layout"
    if not (layout / "oci-layout").is_file():
        return []
    with files.locked(directory, on_wait):
        keep = referenced_now()
        _ensure_layout(layout)
        found = [Collected("blob", e.name, e.path, files.disk_bytes(e.path))
                 for e in sorted(os.scandir(layout / "blobs" / "sha256"), key=lambda e: e.name)
                 if e.name not in keep and e.is_file(follow_symlinks=False)]
        found += [Collected("partial", e.name, e.path, files.disk_bytes(e.path)) for e in _temp_entries(layout)]
        if not dry_run and found:
            _drop_index_entries(layout, keep)
            for c in found:
                if c.kind == "blob":
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(c.path)
            _sweep(layout)
    return found


def _drop_index_entries(layout, keep):
    """Keep only the index entries whose manifest stays (the last transfer's tag, typically)."""
    path = layout / "index.json"
    try:
        index = json.loads(path.read_bytes())
        entries = index["manifests"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # skopeo rewrites a damaged index on the next transfer
    kept = [m for m in entries if isinstance(m, dict) and str(m.get("digest", "")).partition(":")[2] in keep]
    if len(kept) != len(entries):
        index["manifests"] = kept
        files.write_atomic(path, json.dumps(index).encode(), 0o644)

