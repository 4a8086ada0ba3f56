"""``vmiso image pull`` from a real registry: Debian's docker-registry on 127.0.0.1 (started in a
temp dir, stopped after), images pushed with skopeo, pulled through the layer cache. What was
transferred is counted from the registry's own access log."""
import json
import os
import pty
import subprocess
import sys
import time

import pytest

from vmiso.image import store
from vmiso.image.oci import cache, importer
from vmiso.paths import Workdir
from vmiso.testing import oci
from vmiso.testing.oci import Entry, layer

pytestmark = [pytest.mark.system, pytest.mark.oci]

IMAGE_CACHE = Workdir(os.environ.get("VMISO_TEST_WORKDIR", "/var/lib/vmiso")).test_images


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    with oci.Registry(tmp_path_factory.mktemp("registry")) as reg:
        yield reg
        assert reg.process.poll() is None, "the registry died during the tests"


@pytest.fixture(scope="module")
def busybox():
    return oci.busybox_image(IMAGE_CACHE)


def cli(work, *args, **kw):
    return subprocess.run([sys.executable, "-m", "vmiso", "--workdir", str(work), "image", *args],
                          capture_output=True, text=True, timeout=600, **kw)


def layer_gets(registry, repo, image):
    """How often each layer of ``image`` was served from ``repo``."""
    gets = registry.blob_gets(repo)
    return [gets.count(d) for d in image.oci["layers"]]


def test_pull_and_a_second_pull_transfers_no_layer(registry, busybox, work):
    ref = registry.push(busybox, "1", "pull1/busybox:1")
    first = importer.pull(work, ref)
    assert first.created and first.fetched_layers == 3 and first.names == (ref,)
    assert layer_gets(registry, "pull1/busybox", first.image) == [1, 1, 1]
    again = importer.pull(work, ref)
    assert (again.created, again.fetched_layers, again.fetched_bytes) == (False, 0, 0)
    assert layer_gets(registry, "pull1/busybox", first.image) == [1, 1, 1]  # nothing served again
    other_tag = registry.push(busybox, "1", "pull1/busybox:stable")
    tagged = importer.pull(work, other_tag)
    assert tagged.image.sha256 == first.image.sha256 and tagged.fetched_layers == 0
    assert layer_gets(registry, "pull1/busybox", first.image) == [1, 1, 1]
    assert store.lookup(work, other_tag).names == (ref, other_tag)


def test_an_overlapping_image_fetches_only_its_new_layer(registry, work, tmp_path):
    base = [layer([Entry("a", data=os.urandom(4096))]), layer([Entry("b", data=os.urandom(4096))])]
    oci.write_layout(tmp_path / "one", base + [layer([Entry("one", data=b"1")])], tag="1")
    oci.write_layout(tmp_path / "two", base + [layer([Entry("two", data=b"2")])], tag="1")
    one = importer.pull(work, registry.push(tmp_path / "one", "1", "overlap/one:1")).image
    two = importer.pull(work, registry.push(tmp_path / "two", "1", "overlap/two:1"))
    assert one.oci["layers"][:2] == two.image.oci["layers"][:2]
    assert two.fetched_layers == 1 and layer_gets(registry, "overlap/two", two.image) == [0, 0, 1]


def test_layer_cache_survives_rm_and_a_pull_builds_again_without_fetching(registry, busybox, work):
    ref = registry.push(busybox, "1", "rebuild/busybox:1")
    image = importer.pull(work, ref).image
    store.rm(work, ref)
    again = importer.pull(work, ref)
    assert again.created and again.fetched_layers == 0 and again.image.sha256 == image.sha256
    assert layer_gets(registry, "rebuild/busybox", image) == [1, 1, 1]


def test_image_gc_removes_the_blobs_only_a_removed_image_came_from(registry, work, tmp_path):
    base = [layer([Entry("a", data=os.urandom(4096))])]
    oci.write_layout(tmp_path / "one", base + [layer([Entry("one", data=b"1")])], tag="1")
    oci.write_layout(tmp_path / "two", base + [layer([Entry("two", data=b"2")])], tag="1")
    one_ref = registry.push(tmp_path / "one", "1", "gc/one:1")
    two_ref = registry.push(tmp_path / "two", "1", "gc/two:1")
    one, two = importer.pull(work, one_ref).image, importer.pull(work, two_ref).image
    store.rm(work, two_ref)
    assert set(cache.blobs(work)) == cache.referenced([one]) | cache.referenced([two])  # rm keeps them
    dry = cli(work, "gc", "--dry-run")
    assert dry.returncode == 0 and dry.stdout.count("would remove blob ") == 3, dry.stdout
    done = cli(work, "gc")
    assert done.returncode == 0 and done.stdout.count("removed blob ") == 3, done.stdout
    assert set(cache.blobs(work)) == cache.referenced([one])  # the shared layer stays with one
    assert importer.pull(work, one_ref).fetched_layers == 0
    again = importer.pull(work, two_ref)  # fetches its own layer again, not the shared one
    assert again.fetched_layers == 1 and layer_gets(registry, "gc/two", again.image) == [0, 2]


def test_cli_pull_names_lists_and_is_quiet_without_a_terminal(registry, busybox, work):
    ref = registry.push(busybox, "1", "cli/busybox:1")
    done = cli(work, "pull", ref, "--json")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    stored = json.loads(done.stdout)
    assert stored["names"] == [ref] and stored["fetched_layers"] == 3 and stored["oci"]["transport"] == "docker"
    assert ref in cli(work, "list").stdout


def test_cli_pull_shows_layers_and_bytes_on_a_terminal(registry, busybox, work):
    ref = registry.push(busybox, "1", "tty/busybox:1")
    controller, terminal = pty.openpty()
    try:
        done = subprocess.run([sys.executable, "-m", "vmiso", "--workdir", str(work), "image", "pull", ref],
                              stdout=subprocess.PIPE, stderr=terminal, timeout=300)
        os.close(terminal)
        shown = b""
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the terminal's other end is closed and drained
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(controller)
    assert done.returncode == 0
    text = shown.decode()
    assert "fetching: " in text and " of 3" in text and "MiB" in text and "applying layer 3 of 3" in text


def test_unknown_tag_and_plain_http_elsewhere_are_refused_leaving_nothing(registry, work):
    done = cli(work, "pull", f"{registry.address}/nothing/here:1")
    assert done.returncode == 125 and len(done.stderr.splitlines()) == 1
    assert done.stderr.startswith("vmiso: error: ") and "nothing/here" in done.stderr
    assert store.list_images(work) == [] and cache.blobs(work) == {}


@pytest.mark.slow
def test_debian_python_image_pulled_cold_and_warm(registry, work, tmp_path):
    """The Debian root with python3 (about 100 MB): pulled, its python3 runs in a chroot of the
    stored file system; timings of a cold pull and a warm one (layers cached, rebuilt) printed."""
    layout = oci.debian_python_image(IMAGE_CACHE, progress=lambda *a: None)
    ref = registry.push(layout, "12", "debian-python:12")
    start = time.monotonic()
    cold = importer.pull(work, ref)
    cold_s = time.monotonic() - start
    store.rm(work, ref)
    start = time.monotonic()
    warm = importer.pull(work, ref)
    warm_s = time.monotonic() - start
    assert cold.fetched_layers == 2 and warm.fetched_layers == 0 and warm.created
    assert cold.image.oci["config"]["WorkingDir"] == "/app"
    with oci.mounted(warm.image.path, tmp_path) as root:
        ran = subprocess.run(["chroot", str(root), "python3", "-c", "import sys; print(sys.version_info[:2])"],
                             capture_output=True, text=True, timeout=60)
        ids = (root / "etc" / "passwd").read_text()
    assert ran.returncode == 0 and ran.stdout.strip() == "(3, 11)", ran.stderr
    assert "app:x:1000:1000" in ids
    print(f"\ndebian-python: {warm.tree['bytes'] / 1e6:.0f} MB in {warm.tree['entries']} files, "
          f"{cold.fetched_bytes / 1e6:.0f} MB of layers; pull cold {cold_s:.1f} s, warm {warm_s:.1f} s")
