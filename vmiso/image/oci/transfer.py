"""Image transfer with skopeo: from a registry, a docker-archive, an oci-archive or an OCI
layout into the layer cache (cache.py).

skopeo (containers/image) speaks the distribution protocol (token auth, redirects, retries,
manifest lists, schema conversion) and reads the usual auth files (``$XDG_RUNTIME_DIR/
containers/auth.json``, ``~/.config/containers/auth.json``, ``~/.docker/config.json``) and
``/etc/containers/registries.conf``; vmiso does not speak the protocol itself. skopeo verifies
what it downloads, and layout.py verifies it again as it is read. TLS is always verified except
for a registry on a loopback address or with ``insecure``.
"""
import os
import threading
from dataclasses import dataclass
from typing import Optional

from ..._proc import run
from ...errors import CommandFailed, ImageError
from . import cache

TIMEOUT = 3600     # a large image over a slow link; skopeo has its own network timeouts
POLL = 0.25        # seconds between progress updates


@dataclass(frozen=True)
class Source:
    """Where an image comes from: ``transport`` is skopeo's name (docker, docker-archive,
    oci-archive, oci), ``spec`` skopeo's full source argument, ``label`` what errors name."""

    transport: str
    spec: str
    label: str
    tls_verify: bool = True
    authfile: Optional[str] = None

    def options(self, prefix):
        """skopeo's options for this source (``prefix``: "src-" for copy, "" for inspect)."""
        if self.transport != "docker":
            return []
        options = [] if self.tls_verify else [f"--{prefix}tls-verify=false"]
        if self.authfile:
            options.append(f"--{prefix}authfile={self.authfile}")
        return options


def _skopeo(argv, source, timeout):
    try:
        return run(["skopeo", *argv], timeout=timeout)
    except CommandFailed as err:
        detail = (err.stderr or "").strip().splitlines()
        message = detail[-1] if detail else f"skopeo exited {err.returncode}"
        raise ImageError(source.label, message.removeprefix("time=").strip()) from err


def _inspect(source, *options):
    proc = run(["skopeo", "inspect", *options, *source.options(""), source.spec], timeout=600, check=False)
    if proc.returncode != 0:
        detail = proc.stderr.strip().splitlines()
        raise ImageError(source.label, detail[-1] if detail else f"skopeo inspect exited {proc.returncode}")
    # run() decodes as text; JSON is UTF-8, so this gives its bytes back (newlines aside:
    # the caller checks the config's digest against the manifest's where it has one)
    return proc.stdout.encode("utf-8", "surrogateescape")


def inspect_manifest(source):
    """The source's raw manifest (an image manifest, or a list of them) as bytes."""
    return _inspect(source, "--raw")


def inspect_config(source):
    """The raw image config (bytes) of ``source``; for a manifest list, of its linux/amd64
    image (skopeo picks the host's platform)."""
    return _inspect(source, "--config", "--raw")


def copy(source, session, digestfile, progress=None, layers=0):
    """Copy ``source`` into the cache layout of ``session``; the manifest digest skopeo wrote.

    ``progress(fetched_layers, fetched_bytes, layers)`` is called every POLL seconds while it
    runs and once at the end: blobs new to the cache so far and their bytes."""
    argv = ["copy", "--quiet", "--digestfile", digestfile, *source.options("src-"), source.spec,
            f"oci:{session.layout}:{cache.TAG}"]
    if progress is None:
        _skopeo(argv, source, TIMEOUT)
    else:
        _watched(argv, source, session, progress, layers)
    try:
        with open(digestfile) as f:
            return f.read().strip()
    finally:
        os.unlink(digestfile)


def _watched(argv, source, session, progress, layers):
    """Run skopeo in a thread; report what arrives in the cache meanwhile."""
    outcome = {}

    def work():
        try:
            outcome["proc"] = _skopeo(argv, source, TIMEOUT)
        except BaseException as err:  # handed to the caller's thread below
            outcome["error"] = err

    thread = threading.Thread(target=work, name="skopeo-copy", daemon=True)
    thread.start()
    while thread.is_alive():
        _report(session, progress, layers)
        thread.join(POLL)
    _report(session, progress, layers)
    if "error" in outcome:
        raise outcome["error"]


def _report(session, progress, layers):
    new = session.new_blobs()
    done = sum((session.blobs / name).stat().st_size for name in new if (session.blobs / name).exists())
    progress(min(len(new), layers), done + session.in_flight(), layers)
