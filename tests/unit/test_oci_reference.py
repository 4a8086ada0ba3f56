"""Image references and names (vmiso/image/oci/reference.py), the pull's TLS rule, and the
store accepting repo:tag names beside plain ones."""
import pytest

from vmiso.errors import InvalidSpec
from vmiso.image import store
from vmiso.image.oci import importer, reference


@pytest.mark.parametrize("ref, full, name", [
    ("busybox", "docker.io/library/busybox:latest", "busybox:latest"),
    ("busybox:1.36", "docker.io/library/busybox:1.36", "busybox:1.36"),
    ("user/app:2", "docker.io/user/app:2", "user/app:2"),
    ("docker.io/library/bb:1", "docker.io/library/bb:1", "bb:1"),
    ("127.0.0.1:5000/a/b:c", "127.0.0.1:5000/a/b:c", "127.0.0.1:5000/a/b:c"),
    ("localhost/x", "localhost/x:latest", "localhost/x:latest"),
    ("quay.io/x/y@sha256:" + "a" * 64, "quay.io/x/y@sha256:" + "a" * 64, None),
])
def test_parse_normalises_as_docker(ref, full, name):
    parsed = reference.parse(ref)
    assert (str(parsed), parsed.name) == (full, name)


@pytest.mark.parametrize("ref", ["UPPER/x", "a:b:c", "/x", "x/../y", "x:", "", "a" * 300])
def test_parse_refuses_malformed(ref):
    with pytest.raises(InvalidSpec):
        reference.parse(ref)


@pytest.mark.parametrize("ref, tls", [
    ("127.0.0.1:5000/x:1", False), ("localhost:5000/x:1", False), ("[::1]:5000/x:1", False),
    ("127.9.9.9/x", False), ("registry.example.com/x:1", True), ("10.0.0.1:5000/x", True), ("busybox", True),
])
def test_plain_http_only_for_loopback_unless_insecure(ref, tls):
    source, names = importer.pull_source(ref)
    assert source.tls_verify is tls and source.spec == f"docker://{reference.parse(ref)}"
    assert ("--src-tls-verify=false" in source.options("src-")) is (not tls)
    assert importer.pull_source(ref, insecure=True)[0].tls_verify is False


def test_authfile_passed_to_skopeo():
    source, _ = importer.pull_source("example.com/x:1", authfile="/root/auth.json")
    assert source.options("src-") == ["--src-authfile=/root/auth.json"]
    assert source.options("") == ["--authfile=/root/auth.json"]


def test_store_names_take_repo_tag_and_keep_reserved_ones_out():
    assert store.validate_name("127.0.0.1:5000/debian-python:12") == "127.0.0.1:5000/debian-python:12"
    assert store.validate_name("busybox:1") == "busybox:1"
    for bad in ("micro:lean", "micro", "x@sha256:" + "a" * 64, "UP/x:1"):
        with pytest.raises(InvalidSpec):
            store.validate_name(bad)
