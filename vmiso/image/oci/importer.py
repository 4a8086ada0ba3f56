"""``vmiso image import`` and ``vmiso image pull``: a container image, from wherever it is, to a
verified root file system in the image store, named by its config digest.

In order: skopeo reads the image's config (refused at once if it is not linux/amd64) and copies
the image into the layer cache (only blobs it lacks); its manifest and config are read back and
checked against their digests; the layers are applied to a root tree in a staging directory
of the store, each verified against its blob digest and its diff_id as it streams; the tree
becomes a raw ext4 image (rootfs.py); the store takes it, named by the sha256 of the config (the image id, as
``docker images`` shows it). A failure at any point removes the staging directory and whatever
the layer cache gained, so nothing half-made stays. An image already stored is not built again.
"""
import hashlib
import json
import os
import shutil
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ...errors import ImageError, InvalidSpec, NotFound
from .. import store
from . import cache, layers, layout, reference, rootfs, transfer

REF_NAME = "org.opencontainers.image.ref.name"
# The image's own user database, kept beside the base (store.OCI_FILES) so a launch resolves
# user names without opening the file system; larger ones are not kept.
USER_FILES = {"passwd": "etc/passwd", "group": "etc/group"}
USER_FILE_LIMIT = 1 << 20
CONTAINERD_NAME = "io.containerd.image.name"


@dataclass(frozen=True)
class Imported:
    image: store.StoredImage
    created: bool              # False: the store had this image already
    names: tuple
    layers: int                # layers of the image
    fetched_layers: int        # of them, fetched into the layer cache now (others were held)
    fetched_bytes: int
    previous: Optional[str] = None
    tree: dict = field(default_factory=dict)  # bytes and entries of the root tree built


def _decompress_errors():
    errors = [zlib.error, EOFError]
    try:
        import zstandard
        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errors)


# -- sources -----------------------------------------------------------------------------------

def pull_source(ref, insecure=False, authfile=None):
    """A transfer.Source for a registry reference; plain HTTP only for loopback or ``insecure``."""
    parsed = reference.parse(ref)
    return transfer.Source("docker", f"docker://{parsed}", ref, tls_verify=not (parsed.loopback or insecure),
                           authfile=authfile), ([parsed.name] if parsed.name else [])


def local_source(path):
    """(transfer.Source, names it carries) for a docker-archive, an oci-archive or an OCI
    layout directory at ``path``, optionally ``path:TAG`` (a layout's or archive's tag)."""
    spec, selector = path, None
    if not os.path.lexists(path):
        head, sep, tail = path.rpartition(":")
        if sep and head and os.path.lexists(head):
            spec, selector = head, tail
        else:
            raise NotFound("image", path)
    spec = os.path.abspath(spec)
    if os.path.isdir(spec):
        if not os.path.isfile(os.path.join(spec, "oci-layout")):
            raise ImageError(spec, "is a directory but no OCI image layout (it has no oci-layout file)")
        with open(os.path.join(spec, "index.json"), "rb") as f:
            index = layout.parse_json(f.read(), os.path.join(spec, "index.json"))
        return _oci_source("oci", spec, selector, index)
    try:
        with tarfile.open(spec, "r:") as tar:
            names = set(tar.getnames())
            if "manifest.json" in names:
                manifest = json.load(tar.extractfile("manifest.json"))
                return _docker_archive_source(spec, selector, manifest)
            if "index.json" in names and "oci-layout" in names:
                return _oci_source("oci-archive", spec, selector, json.load(tar.extractfile("index.json")))
    except (tarfile.TarError, ValueError, KeyError, AttributeError, OSError) as err:
        raise ImageError(spec, f"is not an image archive (docker save or oci-archive): {err}") from err
    raise ImageError(spec, "is a tar archive without manifest.json (docker save) or index.json (oci-archive)")


def _docker_archive_source(path, selector, manifest):
    if not isinstance(manifest, list) or not manifest:
        raise ImageError(path, "manifest.json lists no image")
    if selector is not None:
        name = reference.familiar(selector)
        if name is None:
            raise InvalidSpec("image", f"{selector!r} is not a repo:tag")
        return transfer.Source("docker-archive", f"docker-archive:{path}:{selector}", path), [name]
    if len(manifest) > 1:
        raise ImageError(path, f"holds {len(manifest)} images: choose one with {path}:REPO:TAG")
    tags = manifest[0].get("RepoTags") or []
    names = [n for n in (reference.familiar(t) for t in tags if isinstance(t, str)) if n]
    return transfer.Source("docker-archive", f"docker-archive:{path}", path), names


def _oci_source(transport, path, selector, index):
    manifests = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(manifests, list) or not manifests:
        raise ImageError(path, "index.json lists no image")
    if selector is None:
        if len(manifests) > 1:
            tags = [m.get("annotations", {}).get(REF_NAME) for m in manifests]
            raise ImageError(path, f"holds {len(manifests)} images: choose one with {path}:TAG "
                                   f"(tags: {', '.join(t for t in tags if t) or 'none'})")
        chosen = manifests[0]
    else:
        chosen = next((m for m in manifests if m.get("annotations", {}).get(REF_NAME) == selector), None)
        if chosen is None:
            raise NotFound("image", f"{path}:{selector} (no such tag in its index.json)")
    annotations = chosen.get("annotations") or {}
    tag = annotations.get(REF_NAME)
    spec = f"{transport}:{path}" + (f":{tag}" if tag else "")
    # A full reference (docker >= 25 and podman write one) names the image; a bare tag does not.
    full = annotations.get(CONTAINERD_NAME) or (tag if tag and ("/" in tag or ":" in tag) else None)
    name = reference.familiar(full) if full else None
    return transfer.Source(transport, spec, path), [name] if name else []


# -- importing ---------------------------------------------------------------------------------

def pull(workdir, ref, *, insecure=False, authfile=None, names=None, limits=None, progress=None):
    """Pull ``ref`` from its registry into the store. Returns Imported."""
    source, carried = pull_source(ref, insecure, authfile)
    return run_import(workdir, source, carried if names is None else names, limits, progress)


def import_path(workdir, path, *, names=None, limits=None, progress=None):
    """Import the docker-archive, oci-archive or OCI layout at ``path[:TAG]``. Returns Imported."""
    source, carried = local_source(os.fspath(path))
    return run_import(workdir, source, carried if names is None else names, limits, progress)


def _config_of(source):
    """(raw config bytes, parsed config, image id): checked before anything is copied."""
    raw_manifest = transfer.inspect_manifest(source)
    config_bytes = transfer.inspect_config(source)
    manifest = layout.parse_json(raw_manifest, source.label)
    if isinstance(manifest.get("config"), dict):  # an image manifest (not a list): link them
        layout.check_bytes(config_bytes, manifest["config"].get("digest"), None, f"{source.label}: the config")
    config = layout.check_config(layout.parse_json(config_bytes, f"{source.label}: the config"), source.label)
    return config_bytes, config, hashlib.sha256(config_bytes).hexdigest()


def run_import(workdir, source, names, limits=None, progress=None):
    root = store._root(workdir)
    limits = limits or layers.Limits()
    names = tuple(store.validate_name(n) for n in names)
    config_bytes, config, image_id = _config_of(source)
    diff_ids = config["rootfs"]["diff_ids"]
    staged = store.staging(root)
    try:
        waiting = None if progress is None else (lambda: progress("wait", 0, 0, len(diff_ids)))
        with cache.session(root, waiting) as session:
            report = None if progress is None else (lambda n, b, total: progress("fetch", n, b, total))
            digest = transfer.copy(source, session, str(staged / "digest"), report, len(diff_ids))
            manifest = layout.read_manifest(session.layout, digest)
            descriptors = manifest["layers"]
            _check_copy(session, manifest, diff_ids, source)
            fetched = [d for d in descriptors if not session.held(d["digest"])]
            stored = store.lookup(root, image_id)
            tree_stats = {}
            if stored is None or not store._unchanged(stored):
                tree_stats = _build(session, descriptors, diff_ids, staged, image_id, limits, progress)
            oci = _summary(config, image_id, digest, descriptors, source, tree_stats)
            added = store.add_oci(root, staged, image_id, config_bytes, source.label, oci, names,
                                  fmt=rootfs.FORMAT)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return Imported(added.image, added.created, names, len(descriptors), len(fetched),
                    sum(d["size"] for d in fetched), added.previous, tree_stats)


def _check_copy(session, manifest, diff_ids, source):
    """The cached manifest must describe the layers the source's config names."""
    if len(manifest["layers"]) != len(diff_ids):
        raise ImageError(source.label, f"the manifest has {len(manifest['layers'])} layers, "
                                       f"the config {len(diff_ids)} diff_ids")
    cached = layout.parse_json(layout.read_blob(session.layout, manifest["config"], "config"), source.label)
    if cached.get("rootfs", {}).get("diff_ids") != diff_ids:
        raise ImageError(source.label, "the transferred image's layers are not the ones its config names "
                                       "(did the tag move during the transfer?)")


def _build(session, descriptors, diff_ids, staged, image_id, limits, progress):
    """Apply the layers into staged/tree, then the file system staged/base.raw; the tree's size."""
    tree = layers.Tree(staged / "tree", limits)
    for number, (descriptor, diff_id) in enumerate(zip(descriptors, diff_ids), start=1):
        if progress is not None:
            progress("apply", number, tree.bytes, len(descriptors))
        _apply(session, tree, descriptor, diff_id)
    tree.finish()
    for name, path in USER_FILES.items():
        data = tree.read_file(path, USER_FILE_LIMIT)
        if data is not None:
            (staged / name).write_bytes(data)
    if progress is not None:
        progress("mkfs", len(descriptors), tree.bytes, len(descriptors))
    rootfs.build(tree.path, str(staged / f"base.{rootfs.FORMAT}"), image_id)
    stats = {"bytes": tree.bytes, "entries": tree.entries}
    shutil.rmtree(tree.path)
    return stats


def _apply(session, tree, descriptor, diff_id):
    layer = layout.open_layer(session.layout, descriptor, diff_id)
    try:
        tree.apply(layer.tar, f"layer {descriptor['digest']}")
        layer.verify()
    except (ImageError, *_decompress_errors()) as err:
        if session.held(descriptor["digest"]) and _corrupt(layer, descriptor, diff_id):
            session.discard(descriptor["digest"])
            raise ImageError(layer.path, "the cached layer was corrupt and has been removed; "
                                         "import or pull the image again") from err
        if isinstance(err, ImageError):
            raise
        raise ImageError(layer.path, f"cannot decompress the layer: {err}") from err
    finally:
        layer.close()


def _corrupt(layer, descriptor, diff_id):
    """Whether the blob in the cache no longer has its digest (checked in full, apart from the
    failed application, which may have stopped reading early)."""
    digest = hashlib.sha256()
    with open(layer.path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest() != descriptor["digest"]


def _summary(config, image_id, manifest_digest, descriptors, source, tree_stats):
    run = config.get("config") or {}
    keep = ("Entrypoint", "Cmd", "Env", "WorkingDir", "User", "StopSignal", "Labels", "ExposedPorts", "Volumes")
    return {
        "config_digest": "sha256:" + image_id, "manifest_digest": manifest_digest,
        "architecture": config.get("architecture"), "os": config.get("os"),
        "layers": [d["digest"] for d in descriptors], "diff_ids": config["rootfs"]["diff_ids"],
        "transport": source.transport, "tree": tree_stats or None,
        "config": {k: run[k] for k in keep if k in run},
    }


def stored_config(image):
    """The image config (parsed) of a stored container image, checked against its id."""
    if image.boot != "oci":
        raise InvalidSpec("image", f"{image.sha256[:12]} is not a container image")
    data = Path(image.config_path).read_bytes()
    layout.check_bytes(data, "sha256:" + image.sha256, None, image.config_path)
    return layout.parse_json(data, image.config_path)
