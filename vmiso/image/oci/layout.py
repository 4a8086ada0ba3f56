"""Reading an OCI image layout (the layer cache): manifests, configs and layer blobs, each
verified against its digest, and the image config's checks (architecture, os, layer count).

Digests are checked here, while reading, not taken on trust from the tool that wrote the
layout: a blob's sha256 and size against its descriptor, and a layer's *uncompressed* stream
against the config's ``rootfs.diff_ids``. A layer is streamed once: compressed bytes are hashed
on their way into the decompressor, uncompressed bytes on their way into the tar reader, and
both are compared when the stream has been read to its end (``Layer.verify``).
"""
import gzip
import hashlib
import io
import json
import os
import re
import zlib
from dataclasses import dataclass

from ...errors import ImageError

DIGEST_RE = re.compile(r"sha256:([0-9a-f]{64})")
MANIFEST_TYPES = ("application/vnd.oci.image.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v2+json")
# media type -> compression
LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar": None,
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": None,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar": None,
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
}
ARCHITECTURE = "amd64"  # vmiso's guests are x86_64 (virt/domain.py)
OS = "linux"
MAX_JSON = 4 << 20      # manifests and configs are small; a larger one is not read into memory
CHUNK = 1 << 20


def hex_of(digest, what):
    """The hex part of a ``sha256:<hex>`` digest; ImageError for any other form."""
    match = DIGEST_RE.fullmatch(digest) if isinstance(digest, str) else None
    if match is None:
        raise ImageError(what, f"unsupported digest {digest!r} (only sha256 is)")
    return match.group(1)


def blob_path(layout, digest):
    return os.path.join(layout, "blobs", "sha256", hex_of(digest, layout))


def read_blob(layout, descriptor, what):
    """The bytes of a small blob (manifest, config), checked against its digest and size."""
    digest, size = descriptor.get("digest"), descriptor.get("size")
    path = blob_path(layout, digest)
    if not isinstance(size, int) or not 0 <= size <= MAX_JSON:
        raise ImageError(path, f"{what} has an unsupported size {size!r}")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as err:
        raise ImageError(path, f"cannot read the {what}: {err.strerror}") from err
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_JSON + 1)
    check_bytes(data, digest, size, f"{what} {path}")
    return data


def check_bytes(data, digest, size, what):
    if size is not None and len(data) != size:
        raise ImageError(what, f"is {len(data)} bytes, its descriptor says {size}")
    if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
        raise ImageError(what, f"does not match its digest {digest}")


def parse_json(data, what):
    try:
        value = json.loads(data)
    except ValueError as err:
        raise ImageError(what, f"is not valid JSON: {err}") from err
    if not isinstance(value, dict):
        raise ImageError(what, "is not a JSON object")
    return value


def read_manifest(layout, digest):
    """The image manifest ``digest`` of ``layout`` (a dict), checked against its digest."""
    path = blob_path(layout, digest)
    try:
        size = os.lstat(path).st_size
    except OSError as err:
        raise ImageError(path, f"cannot read the manifest: {err.strerror}") from err
    manifest = parse_json(read_blob(layout, {"digest": digest, "size": size}, "manifest"), path)
    if manifest.get("schemaVersion") != 2 or manifest.get("mediaType", MANIFEST_TYPES[0]) not in MANIFEST_TYPES:
        raise ImageError(path, f"is not an image manifest (mediaType {manifest.get('mediaType')!r})")
    layers = manifest.get("layers")
    if not isinstance(manifest.get("config"), dict) or not isinstance(layers, list):
        raise ImageError(path, "has no config or no layer list")
    for layer in layers:
        if not isinstance(layer, dict) or layer.get("mediaType") not in LAYER_TYPES:
            kind = layer.get("mediaType") if isinstance(layer, dict) else layer
            raise ImageError(path, f"has a layer of unsupported type {kind!r}")
        hex_of(layer.get("digest"), path)
        if not isinstance(layer.get("size"), int) or layer["size"] < 0:
            raise ImageError(path, f"layer {layer.get('digest')} has no valid size")
    return manifest


def check_config(config, what):
    """``config`` (the parsed image config) if vmiso can run it: linux/amd64, layered rootfs."""
    arch, system = config.get("architecture"), config.get("os")
    if arch != ARCHITECTURE or system != OS:
        raise ImageError(what, f"is built for {system}/{arch}; vmiso runs {OS}/{ARCHITECTURE} images only")
    rootfs = config.get("rootfs")
    if not isinstance(rootfs, dict) or rootfs.get("type") != "layers" or not isinstance(rootfs.get("diff_ids"), list):
        raise ImageError(what, "has no rootfs.diff_ids")
    for diff_id in rootfs["diff_ids"]:
        hex_of(diff_id, what)
    run = config.get("config")
    if run is not None and not isinstance(run, dict):
        raise ImageError(what, "has a 'config' that is not an object")
    return config


class _Hashing(io.RawIOBase):
    """Reads through to ``raw``, hashing and counting every byte that passes."""

    def __init__(self, raw):
        self.raw = raw
        self.hash = hashlib.sha256()
        self.count = 0

    def readable(self):
        return True

    def readinto(self, buffer):
        n = self.raw.readinto(buffer)
        if n:
            self.hash.update(memoryview(buffer)[:n])
            self.count += n
        return n

    def drain(self):
        buffer = bytearray(CHUNK)
        while self.readinto(buffer):
            pass


def _decompressor(kind, source, where):
    if kind is None:
        return source
    if kind == "gzip":
        return gzip.GzipFile(fileobj=source, mode="rb")
    try:
        import zstandard
    except ImportError as err:
        raise ImageError(where, "is zstd-compressed, and the Python package 'zstandard' is not installed "
                                "(pip install zstandard)") from err
    return zstandard.ZstdDecompressor().stream_reader(source, read_across_frames=True, closefd=False)


@dataclass
class Layer:
    """One layer's streams: ``tar`` (the uncompressed bytes, for the tar reader) and, after the
    tar reader is done, ``verify()``, which reads both streams to their ends and compares."""

    path: str
    descriptor: dict
    diff_id: str
    compressed: _Hashing
    tar: _Hashing
    file: object

    def verify(self):
        try:
            self.tar.drain()         # tar's end-of-archive blocks and any padding after them
            self.compressed.drain()  # what a decompressor left unread
        except (OSError, EOFError, zlib.error) as err:
            raise ImageError(self.path, f"cannot decompress the layer: {err}") from err
        got = "sha256:" + self.compressed.hash.hexdigest()
        if self.compressed.count != self.descriptor["size"] or got != self.descriptor["digest"]:
            raise ImageError(self.path, f"layer blob does not match its digest {self.descriptor['digest']} "
                                        f"(got {got}, {self.compressed.count} bytes)")
        got = "sha256:" + self.tar.hash.hexdigest()
        if got != self.diff_id:
            raise ImageError(self.path, f"uncompressed layer does not match the config's diff_id {self.diff_id} "
                                        f"(got {got})")

    def close(self):
        self.file.close()


def open_layer(layout, descriptor, diff_id):
    """A Layer for ``descriptor`` (from the manifest) and its ``diff_id`` (from the config)."""
    path = blob_path(layout, descriptor["digest"])
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as err:
        raise ImageError(path, f"cannot read the layer: {err.strerror}") from err
    file = os.fdopen(fd, "rb", buffering=0)
    compressed = _Hashing(file)
    try:
        stream = _decompressor(LAYER_TYPES[descriptor["mediaType"]], io.BufferedReader(compressed, CHUNK), path)
    except BaseException:
        file.close()
        raise
    return Layer(path, descriptor, diff_id, compressed, _Hashing(stream), file)
