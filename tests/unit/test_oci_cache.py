"""The layer cache's gc (vmiso/image/oci/cache.py collect): blobs no stored container image came
from go, with the index entries naming them and a killed transfer's temp files; what a stored
image names stays; a dry run removes nothing. Through the registry: tests/system/test_oci_registry.py."""
import json
import os
from types import SimpleNamespace

from vmiso.image.oci import cache
from vmiso.testing.oci import Entry, layer, write_layout


def two_images(root):
    """The cache holding two images that share their first layer; their store-side oci dicts."""
    layout = cache.cache_dir(root) / "layout"
    shared = layer([Entry("shared", data=b"s" * 4096)])
    write_layout(layout, [shared, layer([Entry("one", data=b"1")])], tag="one")
    write_layout(layout, [shared, layer([Entry("two", data=b"2")])], tag="two")
    index = json.loads((layout / "index.json").read_text())
    images = []
    for entry in index["manifests"]:
        manifest = json.loads((layout / "blobs" / "sha256" / entry["digest"][7:]).read_text())
        images.append(SimpleNamespace(oci={"manifest_digest": entry["digest"],
                                           "config_digest": manifest["config"]["digest"],
                                           "layers": [d["digest"] for d in manifest["layers"]]}))
    return layout, images


def blob_names(image):
    return {d[7:] for d in [image.oci["manifest_digest"], image.oci["config_digest"], *image.oci["layers"]]}


def test_what_a_stored_image_came_from_stays_and_the_rest_goes(tmp_path):
    layout, (one, two) = two_images(tmp_path)
    before = set(os.listdir(layout / "blobs" / "sha256"))
    assert before == blob_names(one) | blob_names(two)
    found = cache.collect(tmp_path, lambda: cache.referenced([one]))
    assert {c.id for c in found} == blob_names(two) - blob_names(one)  # its manifest, config, own layer
    assert all(c.kind == "blob" and c.bytes > 0 for c in found)
    assert set(os.listdir(layout / "blobs" / "sha256")) == blob_names(one)
    index = json.loads((layout / "index.json").read_text())
    assert [m["digest"] for m in index["manifests"]] == [one.oci["manifest_digest"]]


def test_a_dry_run_removes_nothing(tmp_path):
    layout, (one, two) = two_images(tmp_path)
    index = (layout / "index.json").read_bytes()
    found = cache.collect(tmp_path, lambda: cache.referenced([]), dry_run=True)
    assert {c.id for c in found} == blob_names(one) | blob_names(two)
    assert set(os.listdir(layout / "blobs" / "sha256")) == blob_names(one) | blob_names(two)
    assert (layout / "index.json").read_bytes() == index


def test_a_killed_transfers_temp_files_go_too(tmp_path):
    layout, (one, two) = two_images(tmp_path)
    (layout / "oci-put-blob123").write_bytes(b"x" * 10000)
    found = cache.collect(tmp_path, lambda: cache.referenced([one, two]))
    assert [(c.kind, c.id) for c in found] == [("partial", "oci-put-blob123")]
    assert not (layout / "oci-put-blob123").exists()
    assert set(os.listdir(layout / "blobs" / "sha256")) == blob_names(one) | blob_names(two)


def test_the_store_is_asked_with_the_caches_lock_held(tmp_path):
    """An import holds the lock from its transfer until its image is stored: gc asks the store
    only once it holds the lock, so a blob is never taken from an import in progress."""
    import fcntl

    layout, (one, _two) = two_images(tmp_path)
    seen = []

    def referenced_now():
        fd = os.open(cache.cache_dir(tmp_path) / ".lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            seen.append("free")
        except BlockingIOError:
            seen.append("held")
        finally:
            os.close(fd)
        return cache.referenced([one])

    cache.collect(tmp_path, referenced_now)
    assert seen == ["held"]


def test_no_cache_is_nothing_to_collect(tmp_path):
    assert cache.collect(tmp_path, lambda: set()) == []
    assert not cache.cache_dir(tmp_path).exists()


def test_only_sha256_digests_of_container_images_count():
    images = [SimpleNamespace(oci=None), SimpleNamespace(oci={"manifest_digest": "sha256:aa", "layers": ["md5:bb"]})]
    assert cache.referenced(images) == {"aa"}


def test_gc_says_it_waits_for_a_transfer_in_progress_then_collects(tmp_path):
    import fcntl
    import threading

    layout, (one, _two) = two_images(tmp_path)
    fd = os.open(cache.cache_dir(tmp_path) / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a pull in progress holds the cache
    said = []
    threading.Timer(0.3, os.close, args=(fd,)).start()  # ...and ends
    found = cache.collect(tmp_path, lambda: cache.referenced([one]), on_wait=lambda: said.append("waiting"))
    assert said == ["waiting"] and len(found) == 3
    assert cache.collect(tmp_path, lambda: cache.referenced([one]), on_wait=lambda: said.append("again")) == []
    assert said == ["waiting"]  # a free cache: no word
