"""Image references as docker spells them: ``[registry[:port]/]path[:tag][@sha256:hex]``.

Stored images are named ``repo:tag`` in their familiar form (docker's: ``docker.io/library/``
left out), and these names live in the store's names index beside plain names.
"""
import ipaddress
import re
from dataclasses import dataclass
from typing import Optional

from ...errors import InvalidSpec

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN_PART = r"(?:[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_PART}(?:\.{_DOMAIN_PART})*|\[[0-9A-Fa-f:]+\])(?::[0-9]+)?"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
REFERENCE_RE = re.compile(
    rf"(?:(?P<domain>{_DOMAIN})/)?(?P<path>{_COMPONENT}(?:/{_COMPONENT})*)"
    rf"(?::(?P<tag>{_TAG}))?(?:@(?P<digest>sha256:[0-9a-f]{{64}}))?")
MAX_LENGTH = 255
DEFAULT_DOMAIN = "docker.io"
DEFAULT_TAG = "latest"


@dataclass(frozen=True)
class Reference:
    domain: str
    path: str
    tag: Optional[str]
    digest: Optional[str]

    @property
    def name(self):
        """``repo:tag`` in docker's familiar form (None for a reference by digest only)."""
        if self.tag is None:
            return None
        repo = self.path
        if self.domain != DEFAULT_DOMAIN:
            repo = f"{self.domain}/{repo}"
        elif repo.startswith("library/") and repo.count("/") == 1:
            repo = repo[len("library/"):]
        return f"{repo}:{self.tag}"

    @property
    def loopback(self):
        """Whether the registry is this machine (plain HTTP is allowed there)."""
        host = self.domain.rsplit(":", 1)[0] if not self.domain.endswith("]") else self.domain
        host = host.strip("[]")
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    def __str__(self):
        return f"{self.domain}/{self.path}" + (f":{self.tag}" if self.tag else "") + (
            f"@{self.digest}" if self.digest else "")


def parse(ref):
    """The Reference ``ref`` names, normalised as docker does (docker.io, library/, latest)."""
    match = REFERENCE_RE.fullmatch(ref) if isinstance(ref, str) and len(ref) <= MAX_LENGTH else None
    if match is None:
        raise InvalidSpec("image", f"{ref!r} is not a valid image reference")
    domain, path, tag, digest = match.group("domain", "path", "tag", "digest")
    # docker: the first component names a registry only if it has a '.' or ':' or is localhost
    if domain is not None and not ("." in domain or ":" in domain or domain == "localhost"
                                   or domain.startswith("[")):
        if not re.fullmatch(_COMPONENT, domain):
            raise InvalidSpec("image", f"{ref!r} is not a valid image reference")
        domain, path = None, f"{domain}/{path}"
    if domain is None:
        domain = DEFAULT_DOMAIN
    if domain == DEFAULT_DOMAIN and "/" not in path:
        path = "library/" + path
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return Reference(domain, path, tag, digest)


def is_image_name(name):
    """Whether ``name`` is a ``repo:tag`` image name (with a tag, without a digest)."""
    if not isinstance(name, str) or len(name) > MAX_LENGTH:
        return False
    match = REFERENCE_RE.fullmatch(name)
    if not (match and match.group("tag") and not match.group("digest")):
        return False
    try:
        parse(name)  # docker's rule for the first component
    except InvalidSpec:
        return False
    return True


def familiar(name):
    """``name`` (a repo:tag, maybe fully qualified) in its familiar form; None if not one."""
    try:
        ref = parse(name)
    except InvalidSpec:
        return None
    return ref.name
