"""Container images into the store (vmiso/image/oci/): import of OCI layouts, oci-archives and
docker-archives through the real skopeo, layers into a tree, a raw ext4 image by mke2fs;
the result loop-mounted and compared entry by entry, also with what ``umoci unpack`` makes of
the same image. Hostile images are refused with one clear line and leave nothing in the store
or the layer cache. No VM, no daemon: root for owners, device nodes and the loop mount."""
import hashlib
import io
import json
import os
import stat
import subprocess
import sys

import pytest

from vmiso import state
from vmiso._proc import run
from vmiso.errors import ImageError, InUse
from vmiso.image import qcow2, store
from vmiso.image.oci import cache, importer, layers
from vmiso.testing import oci
from vmiso.testing.oci import Entry, layer

pytestmark = [pytest.mark.system, pytest.mark.oci]

D = "dir"
CAPABILITY = bytes.fromhex("0100000200200000000000000000000000000000")


def everything():
    """Layers using every OCI semantic vmiso applies."""
    return [
        [Entry("bin", D), Entry("bin/tool", data=b"#!tool\n", mode=0o755), Entry("bin/su", data=b"su", mode=0o4755),
         Entry("bin/wall", data=b"w", mode=0o2755, gid=5), Entry("tmp", D, mode=0o1777),
         Entry("etc", D), Entry("etc/a", data=b"a"), Entry("etc/gone", data=b"g"), Entry("etc/keep", data=b"k"),
         Entry("var/lib/old", D), Entry("var/lib/old/x", data=b"x"), Entry("var/lib/old/y", data=b"y"),
         Entry("dev/null", "char", dev=(1, 3), mode=0o666), Entry("dev/sda", "block", dev=(8, 0), mode=0o660, gid=6),
         Entry("run/fifo", "fifo"), Entry("empty", D, mode=0o700, uid=1000, gid=1000),
         Entry("bin/ping", data=b"p", mode=0o755, xattrs={"security.capability": CAPABILITY, "user.x": b"1"}),
         Entry("home/u/file", data=b"u" * 5000, uid=1000, gid=1000, mode=0o600)],
        [Entry("usr/bin/tool2", "hardlink", target="bin/tool"), Entry("etc/.wh.gone"),
         Entry("var/lib/old/.wh..wh..opq"), Entry("var/lib/old/z", data=b"z"),
         Entry("lib", "symlink", target="usr/lib"), Entry("usr/lib/l1", "symlink", target="l2"),
         Entry("usr/lib/l2", "symlink", target="/etc/a"), Entry("etc/a2", "hardlink", target="etc/a")],
        [Entry("bin/.wh.tool"), Entry("etc/keep", data=b"new k", mode=0o640)],
    ]


def tree_of(tmp_path, layer_entries):
    tree = layers.Tree(tmp_path / "direct")
    for number, entries in enumerate(layer_entries):
        tree.apply(io.BytesIO(layer(entries)), str(number))
    tree.finish()
    return oci.snapshot(tree.path)


def ext4_snapshot(image, scratch):
    scratch.mkdir(exist_ok=True)
    with oci.mounted(image.path, scratch) as mnt:
        snap = oci.snapshot(mnt)
    assert "/lost+found" not in snap  # mke2fs's, removed: the root holds the image's files only
    return snap


def store_and_cache(work):
    """What the store and the layer cache hold (names, entries, blobs, index)."""
    directory = work / "images" / "store"
    entries = sorted(n for n in os.listdir(directory) if n != ".lock") if directory.is_dir() else []
    names = (work / "images" / "names.json").read_text() if (work / "images" / "names.json").exists() else None
    index = cache.cache_dir(work) / "layout" / "index.json"
    return entries, names, sorted(cache.blobs(work)), index.read_text() if index.exists() else None


def cli(work, *args):
    return subprocess.run([sys.executable, "-m", "vmiso", "--workdir", str(work), "image", *args],
                          capture_output=True, text=True, timeout=300)


# -- what lands in the store ---------------------------------------------------------------------

def test_import_of_an_oci_layout_gives_the_tree_in_ext4_qcow2(work, tmp_path):
    image_layers = everything()
    config = oci.write_layout(tmp_path / "layout", [layer(e) for e in image_layers], tag="7",
                              run_config={"Cmd": ["/bin/tool2"], "Env": ["A=1"], "WorkingDir": "/home/u",
                                          "User": "1000"})
    result = importer.import_path(work, f"{tmp_path / 'layout'}:7", names=["test/everything:7"])
    image = result.image
    assert "sha256:" + image.sha256 == config and result.created and image.boot == "oci"
    assert image.names == ("test/everything:7",) and result.layers == 3 and result.fetched_layers == 3
    assert image.format == "raw" and qcow2.verify_base(image.path, "raw").virtual_size == image.virtual_size
    with open(image.config_path, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == image.sha256
    assert image.oci["config"] == {"Cmd": ["/bin/tool2"], "Env": ["A=1"], "WorkingDir": "/home/u", "User": "1000"}
    assert stat.S_IMODE(os.lstat(image.path).st_mode) == 0o444
    snap = ext4_snapshot(image, tmp_path / "m")
    assert snap == tree_of(tmp_path, image_layers)
    # and the parts mke2fs could lose, one by one
    assert snap["/bin/su"][1] == 0o4755 and snap["/bin/wall"][1:4] == (0o2755, 0, 5)
    assert snap["/tmp"][1] == 0o1777
    assert snap["/usr/bin/tool2"][6] == snap["/usr/bin/tool2"][6] and not os.path.exists("/bin/tool-not-there")
    assert "/bin/tool" not in snap and snap["/usr/bin/tool2"][4] == hashlib.sha256(b"#!tool\n").hexdigest()
    assert snap["/etc/a"][6] == snap["/etc/a2"][6] == "/etc/a"  # one inode, two names
    assert snap["/dev/null"][:5] == (stat.S_IFCHR, 0o666, 0, 0, (1, 3))
    assert snap["/dev/sda"][:5] == (stat.S_IFBLK, 0o660, 0, 6, (8, 0))
    assert snap["/run/fifo"][0] == stat.S_IFIFO
    assert snap["/bin/ping"][5] == {"security.capability": CAPABILITY, "user.x": b"1"}
    assert snap["/home/u/file"][1:4] == (0o600, 1000, 1000)
    assert snap["/empty"][:4] == (stat.S_IFDIR, 0o700, 1000, 1000)
    assert "/etc/gone" not in snap and snap["/etc/keep"][1] == 0o640
    assert sorted(p for p in snap if p.startswith("/var/lib/old/")) == ["/var/lib/old/z"]
    assert snap["/usr/lib/l1"][4] == "l2" and snap["/usr/lib/l2"][4] == "/etc/a" and snap["/lib"][4] == "usr/lib"


def test_ext4_has_headroom_and_inodes_for_tasks(work, tmp_path):
    oci.write_layout(tmp_path / "layout", [layer([Entry(f"f{i}", data=b"x") for i in range(3000)])])
    image = importer.import_path(work, tmp_path / "layout", names=["many:1"]).image
    with oci.mounted(image.path, tmp_path) as mnt:
        fs = os.statvfs(mnt)
    assert fs.f_bavail * fs.f_frsize >= 512 << 20 and fs.f_favail >= 3000


def test_zstd_and_uncompressed_layers(work, tmp_path):
    pytest.importorskip("zstandard")
    entries = [[Entry("a", data=b"zstd layer")], [Entry("b", data=b"plain layer")]]
    oci.write_layout(tmp_path / "z", [layer(entries[0])], compression="zstd")
    first = importer.import_path(work, tmp_path / "z", names=["z:1"]).image
    oci.write_layout(tmp_path / "n", [layer(entries[1])], compression=None)
    second = importer.import_path(work, tmp_path / "n", names=["n:1"]).image
    assert ext4_snapshot(first, tmp_path / "m1")["/a"][4] == hashlib.sha256(b"zstd layer").hexdigest()
    assert ext4_snapshot(second, tmp_path / "m2")["/b"][4] == hashlib.sha256(b"plain layer").hexdigest()


def test_docker_archive_oci_archive_and_layout_import_to_the_same_address(work, tmp_path):
    layout = oci.busybox_image(tmp_path / "images")
    run(["skopeo", "copy", "--quiet", f"oci:{layout}:1", f"docker-archive:{tmp_path / 'saved.tar'}:busybox:1"])
    run(["skopeo", "copy", "--quiet", f"oci:{layout}:1", f"oci-archive:{tmp_path / 'oci.tar'}:1"])
    from_layout = importer.import_path(work, f"{layout}:1", names=["bb:layout"])
    from_docker = importer.import_path(work, tmp_path / "saved.tar")
    from_archive = importer.import_path(work, tmp_path / "oci.tar", names=["bb:archive"])
    assert from_layout.image.sha256 == from_docker.image.sha256 == from_archive.image.sha256
    assert from_layout.created and not from_docker.created and not from_archive.created
    assert from_docker.names == ("busybox:1",)  # docker save's RepoTags
    assert from_archive.image.names == ("bb:archive", "bb:layout", "busybox:1")
    assert len(store.list_images(work)) == 1
    beside = os.path.dirname(from_layout.image.path)  # the image's user database, for launches
    with open(os.path.join(beside, "passwd")) as f:
        assert "app:x:1000:1000:app:/home/app:/bin/sh" in f.read()
    with open(os.path.join(beside, "group")) as f:
        assert f.read() == "root:x:0:\napp:x:1000:\n"


def test_cli_import_list_json_rm_and_gc(work, tmp_path):
    layout = oci.busybox_image(tmp_path / "images")
    done = cli(work, "import", f"{layout}:1", "--name", "busybox:1", "--name", "localhost/bb:2", "--json")
    assert done.returncode == 0, done.stderr
    stored = json.loads(done.stdout)
    assert stored["boot"] == "oci" and stored["names"] == ["busybox:1", "localhost/bb:2"]
    assert done.stderr == ""  # no progress when nobody watches
    listed = json.loads(cli(work, "list", "--json").stdout)
    [row] = [r for r in listed if r["id"] == stored["sha256"]]
    assert row["digest"] == "sha256:" + stored["sha256"] and row["oci"]["architecture"] == "amd64"
    assert row["oci"]["config"]["Cmd"] == ["sh"]
    table = cli(work, "list").stdout
    assert "busybox:1" in table and "localhost/bb:2" in table and stored["sha256"][:12] in table
    assert cli(work, "rm", "busybox:1").returncode == 0
    assert store.lookup(work, "localhost/bb:2") is not None
    assert cli(work, "rm", "localhost/bb:2").stdout.splitlines()[-1] == f"deleted {stored['sha256']}"
    unnamed = importer.import_path(work, f"{layout}:1", names=[]).image
    gc = cli(work, "gc")
    assert f"removed store {unnamed.sha256[:12]}" in gc.stdout
    assert store.list_images(work) == []


def test_rm_refused_while_a_container_uses_the_image(work, tmp_path):
    image = importer.import_path(work, oci.busybox_image(tmp_path / "images"), names=["bb:1"]).image
    directory = work / "containers" / "c1"
    directory.mkdir()
    state.write(str(directory), state.Checkpoint(container_id="c1", agent_id="a", domain="d", nonce="n",
                                                 phase=state.RUNNING, base=image.path))
    with pytest.raises(InUse):
        store.rm(work, "bb:1")
    assert [c.id for c in store.gc(work, dry_run=True) if c.kind == "store"] == []


def test_second_import_builds_nothing_and_fetches_nothing(work, tmp_path):
    layout = oci.busybox_image(tmp_path / "images")
    first = importer.import_path(work, layout)
    blobs = cache.cache_dir(work) / "layout" / "blobs" / "sha256"
    layer_files = [blobs / d.partition(":")[2] for d in first.image.oci["layers"]]
    before = [os.lstat(f).st_mtime_ns for f in layer_files]
    again = importer.import_path(work, layout)
    assert (again.created, again.fetched_layers, again.image.path) == (False, 0, first.image.path)
    # skopeo rewrites the small config and manifest; the layers it skipped are untouched
    assert [os.lstat(f).st_mtime_ns for f in layer_files] == before
    assert sorted(cache.blobs(work)) == sorted(b.name for b in blobs.iterdir())


# -- refused -------------------------------------------------------------------------------------

HOSTILE = {
    "dotdot": ([[Entry("../escape", data=b"x")]], "leaves the root"),
    "absolute": ([[Entry("/etc/passwd", data=b"x")]], "absolute path"),
    "symlink-in-layer": ([[Entry("e", "symlink", target="/tmp"), Entry("e/x", data=b"x")]], "e is a symlink"),
    "symlink-across-layers": ([[Entry("etc", "symlink", target="/etc")], [Entry("etc/shadow", data=b"x")]],
                              "etc is a symlink"),
    "hardlink-outside": ([[Entry("h", "hardlink", target="../../etc/shadow")]], "leaves the root"),
    "hardlink-absolute": ([[Entry("h", "hardlink", target="/etc/shadow")]], "absolute path"),
    "too-large": ([[Entry("ok", data=b"x")], [Entry("big", size=3 << 20)]], "larger than"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_layers_are_refused_and_leave_nothing(work, tmp_path, case):
    importer.import_path(work, oci.busybox_image(tmp_path / "images"), names=["bb:1"])  # something held before
    before = store_and_cache(work)
    layer_entries, message = HOSTILE[case]
    oci.write_layout(tmp_path / "bad", [layer(e) for e in layer_entries])
    done = cli(work, "import", str(tmp_path / "bad"), "--name", "bad:1", "--max-size", "2M")
    assert done.returncode == 125
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith("vmiso: error: ")
    assert message in done.stderr
    assert store_and_cache(work) == before


def test_a_diff_id_mismatch_is_refused_and_leaves_nothing(work, tmp_path):
    oci.write_layout(tmp_path / "bad", [layer([Entry("a", data=b"x")])], diff_ids=["sha256:" + "0" * 64])
    before = store_and_cache(work)
    with pytest.raises(ImageError, match="does not match the config's diff_id"):
        importer.import_path(work, tmp_path / "bad", names=["bad:1"])
    assert store_and_cache(work) == before


def test_a_corrupt_cached_layer_is_caught_and_dropped(work, tmp_path):
    layout = oci.busybox_image(tmp_path / "images")
    image = importer.import_path(work, f"{layout}:1").image
    store.rm(work, image.sha256)
    blob = cache.cache_dir(work) / "layout" / "blobs" / "sha256" / image.oci["layers"][1].partition(":")[2]
    data = bytearray(blob.read_bytes())
    data[-9] ^= 0xFF  # inside the gzip trailer's CRC: skopeo reuses the blob, only our check sees it
    blob.write_bytes(bytes(data))
    with pytest.raises(ImageError, match="cached layer was corrupt and has been removed"):
        importer.import_path(work, f"{layout}:1")
    assert not blob.exists() and store.list_images(work) == []
    again = importer.import_path(work, f"{layout}:1")  # fetched anew
    assert again.created and again.fetched_layers == 1


def test_another_architecture_is_refused_before_anything_is_copied(work, tmp_path):
    oci.write_layout(tmp_path / "arm", [layer([Entry("a", data=b"x")])], architecture="arm64")
    done = cli(work, "import", str(tmp_path / "arm"))
    assert done.returncode == 125 and "is built for linux/arm64; vmiso runs linux/amd64 images only" in done.stderr
    assert store_and_cache(work) == ([], None, [], None)


def test_a_directory_that_is_no_image_and_a_missing_path(work, tmp_path):
    with pytest.raises(ImageError, match="no OCI image layout"):
        importer.import_path(work, tmp_path)
    done = cli(work, "import", str(tmp_path / "nothing"))
    assert done.returncode == 125 and "no such image" in done.stderr


# -- the same tree as umoci ----------------------------------------------------------------------

def test_same_tree_as_umoci_unpack(work, tmp_path):
    """An image built with umoci (its own repack with deletions, and layers added verbatim with
    an opaque directory, hard links across layers, setuid, a symlink chain, a device node)."""
    image, bundle = oci.umoci_image(tmp_path / "umoci"), tmp_path / "bundle"
    run(["umoci", "unpack", "--image", f"{image}:t", bundle])

    stored = importer.import_path(work, f"{image}:t", names=["umoci:t"]).image
    ours = ext4_snapshot(stored, tmp_path / "m")
    theirs = oci.snapshot(bundle / "rootfs")
    assert set(ours) == set(theirs)
    assert {p: v for p, v in ours.items() if v != theirs[p]} == {}
    assert ours["/usr/lib/link-to-target"][6] == ours["/etc/target"][6]   # across layers, still one inode
    assert ours["/opt/x"][6] == ours["/opt/y"][6]
    assert ours["/usr/bin/passwd"][1] == 0o4755 and ours["/dev/null"][4] == (1, 3)
    assert sorted(p for p in ours if p.startswith("/srv/data/")) == ["/srv/data/d"]
    assert ours["/usr/lib/link-to-target"][1] == 0o600
