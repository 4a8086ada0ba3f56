"""Applying OCI layers (vmiso/image/oci/layers.py) to a root tree: every semantic, and every
hostile layer refused with ImageError. Layers are crafted with vmiso.testing.oci; the tree is
checked on the host file system. Root is needed (owners, device nodes), as for the real thing."""
import io
import os
import stat

import pytest

from vmiso.errors import ImageError
from vmiso.image.oci import layers
from vmiso.testing.oci import Entry, layer, snapshot

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="applying layers sets owners and makes device nodes")


def build(tmp_path, *layer_entries, limits=None):
    tree = layers.Tree(tmp_path / "tree", limits or layers.Limits())
    for number, entries in enumerate(layer_entries):
        tree.apply(io.BytesIO(layer(entries)), f"layer {number}")
    tree.finish()
    return tree


def refused(tmp_path, *layer_entries, match, limits=None):
    with pytest.raises(ImageError, match=match):
        build(tmp_path, *layer_entries, limits=limits)


def fresh(tmp_path, name):
    """Another directory for a second tree in the same test."""
    (tmp_path / name).mkdir()
    return tmp_path / name


D = "dir"


# -- semantics ---------------------------------------------------------------------------------

def test_files_dirs_symlinks_owners_modes_and_empty_dirs(tmp_path):
    build(tmp_path, [
        Entry("etc", D, mode=0o755), Entry("etc/hosts", data=b"127.0.0.1 localhost\n", uid=0, gid=0),
        Entry("usr/bin/su", data=b"#!su", mode=0o4755), Entry("srv", D, mode=0o2775, uid=7, gid=8),
        Entry("tmp", D, mode=0o1777), Entry("empty", D, mode=0o700, uid=1000, gid=1000),
        Entry("home/u/f", data=b"x", uid=123456, gid=654321, mode=0o640),
        Entry("bin/sh", "symlink", target="/usr/bin/busybox"), Entry("lnk", "symlink", target="../../outside"),
    ])
    snap = snapshot(tmp_path / "tree")
    assert snap["/etc/hosts"][:5] == (stat.S_IFREG, 0o644, 0, 0, snap["/etc/hosts"][4])
    assert snap["/usr/bin/su"][1] == 0o4755
    assert snap["/srv"][:4] == (stat.S_IFDIR, 0o2775, 7, 8)
    assert snap["/tmp"][1] == 0o1777
    assert snap["/empty"][:4] == (stat.S_IFDIR, 0o700, 1000, 1000) and os.listdir(tmp_path / "tree" / "empty") == []
    assert snap["/home/u/f"][1:4] == (0o640, 123456, 654321)
    assert snap["/bin/sh"][0] == stat.S_IFLNK and snap["/bin/sh"][4] == "/usr/bin/busybox"
    assert snap["/lnk"][4] == "../../outside"  # a symlink's target is data: never followed
    # implicit parents are made 0755 root:root
    assert snap["/usr"][:4] == (stat.S_IFDIR, 0o755, 0, 0)


def test_mtimes_kept_for_files_and_directories(tmp_path):
    build(tmp_path, [Entry("d", D), Entry("d/f", data=b"1")], [Entry("d/g", data=b"2")])
    assert os.lstat(tmp_path / "tree" / "d" / "f").st_mtime == 1_700_000_000
    assert os.lstat(tmp_path / "tree" / "d").st_mtime == 1_700_000_000  # not the time g was written


def test_device_nodes_and_fifo(tmp_path):
    build(tmp_path, [Entry("dev/null", "char", dev=(1, 3), mode=0o666), Entry("dev/loop9", "block", dev=(7, 9)),
                     Entry("run/fifo", "fifo", mode=0o620, uid=5, gid=6)])
    snap = snapshot(tmp_path / "tree")
    assert snap["/dev/null"][:5] == (stat.S_IFCHR, 0o666, 0, 0, (1, 3))
    assert snap["/dev/loop9"][0] == stat.S_IFBLK and snap["/dev/loop9"][4] == (7, 9)
    assert snap["/run/fifo"][:4] == (stat.S_IFIFO, 0o620, 5, 6)


def test_xattrs_from_pax_records(tmp_path):
    capability = bytes.fromhex("0100000200200000000000000000000000000000")  # binary, not UTF-8
    build(tmp_path, [Entry("bin/ping", data=b"p", mode=0o755,
                           xattrs={"security.capability": capability, "user.note": "é".encode()})])
    path = tmp_path / "tree" / "bin" / "ping"
    assert os.getxattr(path, "security.capability") == capability
    assert os.getxattr(path, "user.note") == "é".encode()


def test_whiteout_removes_lower_file_and_directory_and_never_appears(tmp_path):
    build(tmp_path,
          [Entry("a", data=b"1"), Entry("d/x", data=b"2"), Entry("d/sub/y", data=b"3"), Entry("keep", data=b"k")],
          [Entry(".wh.a"), Entry("d/.wh.sub"), Entry(".wh.missing")])
    assert sorted(snapshot(tmp_path / "tree")) == ["/", "/d", "/d/x", "/keep"]


def test_whiteout_never_hides_what_its_own_layer_wrote(tmp_path):
    build(tmp_path, [Entry("a", data=b"old")], [Entry("a", data=b"new"), Entry(".wh.a")])
    assert (tmp_path / "tree" / "a").read_bytes() == b"new"


def test_whiteout_then_same_layer_directory_hides_lower_contents(tmp_path):
    build(tmp_path, [Entry("d/old", data=b"1")], [Entry(".wh.d"), Entry("d", D), Entry("d/new", data=b"2")])
    assert sorted(os.listdir(tmp_path / "tree" / "d")) == ["new"]


def test_opaque_directory_hides_lower_contents_keeps_this_layers_in_any_order(tmp_path):
    build(tmp_path,
          [Entry("d/a", data=b"1"), Entry("d/sub/b", data=b"2"), Entry("d/sub/c", data=b"3"),
           Entry("other", data=b"o")],
          [Entry("d/sub/c", data=b"new c"), Entry("d", D, mode=0o700), Entry("d/.wh..wh..opq"),
           Entry("d/z", data=b"z")])
    snap = snapshot(tmp_path / "tree")
    assert sorted(snap) == ["/", "/d", "/d/sub", "/d/sub/c", "/d/z", "/other"]
    assert (tmp_path / "tree" / "d" / "sub" / "c").read_bytes() == b"new c"
    assert snap["/d"][1] == 0o700


def test_hard_links_within_and_across_layers_survive_target_removal(tmp_path):
    build(tmp_path,
          [Entry("bin/a", data=b"same", mode=0o755), Entry("bin/b", "hardlink", target="bin/a")],
          [Entry("usr/c", "hardlink", target="bin/a"), Entry("bin/.wh.a")])
    tree = tmp_path / "tree"
    b, c = os.lstat(tree / "bin" / "b"), os.lstat(tree / "usr" / "c")
    assert b.st_ino == c.st_ino and b.st_nlink == 2 and not (tree / "bin" / "a").exists()
    assert (tree / "usr" / "c").read_bytes() == b"same"


def test_replacing_a_hard_linked_file_does_not_change_its_other_names(tmp_path):
    build(tmp_path, [Entry("a", data=b"1"), Entry("b", "hardlink", target="a")], [Entry("a", data=b"2")])
    assert (tmp_path / "tree" / "b").read_bytes() == b"1" and (tmp_path / "tree" / "a").read_bytes() == b"2"


def test_later_layer_replaces_symlink_by_directory_and_directory_by_symlink(tmp_path):
    build(tmp_path,
          [Entry("lib", "symlink", target="usr/lib"), Entry("opt/x", data=b"1")],
          [Entry("lib", D), Entry("lib/f", data=b"2"), Entry("opt", "symlink", target="/srv")])
    tree = tmp_path / "tree"
    assert (tree / "lib").is_dir() and not (tree / "lib").is_symlink() and (tree / "lib" / "f").read_bytes() == b"2"
    assert os.readlink(tree / "opt") == "/srv"


def test_entry_for_the_root_sets_its_mode_and_owner(tmp_path):
    build(tmp_path, [Entry("./", D, mode=0o750, uid=0, gid=10)])
    st = os.lstat(tmp_path / "tree")
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o750, 10)


def test_tree_counts_bytes_and_names_and_frees_on_removal(tmp_path):
    tree = build(tmp_path, [Entry("a", data=b"x" * 100), Entry("b", "hardlink", target="a"), Entry("c", data=b"y")],
                 [Entry(".wh.c"), Entry(".wh.a")])
    assert (tree.bytes, tree.entries) == (100, 1)  # b still holds a's inode


# -- hostile layers ----------------------------------------------------------------------------

def test_refuses_dotdot(tmp_path):
    refused(tmp_path, [Entry("a/../../etc/passwd", data=b"x")], match="leaves the root")


def test_refuses_absolute_paths(tmp_path):
    refused(tmp_path, [Entry("/etc/passwd", data=b"x")], match="absolute path")


def test_refuses_writing_through_a_symlink_of_the_same_layer(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    refused(tmp_path, [Entry("evil", "symlink", target=str(outside)), Entry("evil/pwned", data=b"x")],
            match="evil is a symlink")
    assert os.listdir(outside) == []


def test_refuses_writing_through_a_symlink_of_a_lower_layer(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    refused(tmp_path, [Entry("etc", "symlink", target=str(outside))], [Entry("etc/passwd", data=b"x")],
            match="etc is a symlink")
    assert os.listdir(outside) == []


def test_refuses_whiteout_and_opaque_through_a_symlink(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep")
    refused(tmp_path, [Entry("d", "symlink", target=str(outside))], [Entry("d/.wh.precious")], match="symlink")
    refused(fresh(tmp_path, "x"),
            [Entry("d", "symlink", target=str(outside))], [Entry("d/.wh..wh..opq")], match="symlink")
    assert (outside / "precious").read_text() == "keep"


def test_refuses_a_hard_link_to_outside_the_tree(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("s")
    refused(tmp_path, [Entry("a", "hardlink", target=str(secret))], match="absolute path")
    refused(fresh(tmp_path, "2"),
            [Entry("a", "hardlink", target="../secret")], match="leaves the root")
    assert os.lstat(secret).st_nlink == 1


def test_refuses_a_hard_link_through_a_symlink(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "f").write_text("s")
    refused(tmp_path, [Entry("o", "symlink", target=str(outside)), Entry("a", "hardlink", target="o/f")],
            match="o is a symlink")
    assert os.lstat(outside / "f").st_nlink == 1


def test_refuses_a_hard_link_to_a_missing_file_or_a_directory(tmp_path):
    refused(tmp_path, [Entry("a", "hardlink", target="nowhere")], match="not in the tree")
    refused(fresh(tmp_path, "2"),
            [Entry("d", D), Entry("a", "hardlink", target="d")], match="directory")


def test_refuses_a_tree_over_the_byte_limit_before_writing_it(tmp_path):
    refused(tmp_path, [Entry("big", size=10 << 20)], match="larger than", limits=layers.Limits(max_bytes=1 << 20))
    assert not (tmp_path / "tree" / "big").exists()


def test_byte_limit_counts_across_layers(tmp_path):
    refused(tmp_path, [Entry("a", size=600 << 10)], [Entry("b", size=600 << 10)], match="larger than",
            limits=layers.Limits(max_bytes=1 << 20))


def test_refuses_a_tree_over_the_file_count_limit(tmp_path):
    refused(tmp_path, [Entry(f"f{i}") for i in range(20)], match="more than 10 files",
            limits=layers.Limits(max_entries=10))


def test_refuses_a_tree_too_deep(tmp_path):
    refused(tmp_path, [Entry("/".join(["d"] * (layers.MAX_DEPTH + 1)), data=b"x")], match="deeper")


def test_refuses_garbage_and_whiteouts_naming_nothing(tmp_path):
    tree = layers.Tree(tmp_path / "tree")
    with pytest.raises(ImageError, match="not a valid tar"):
        tree.apply(io.BytesIO(b"\x01" * 2048), "junk")
    refused(fresh(tmp_path, "2"), [Entry("d/.wh...")], match="names no file")


def test_refuses_replacing_the_root_by_a_file(tmp_path):
    refused(tmp_path, [Entry(".", "symlink", target="/")], match="replace the root")


def test_read_file_gives_regular_files_only_never_through_symlinks(tmp_path):
    tree = build(tmp_path, [Entry("etc/passwd", data=b"root:x:0:0::/root:/bin/sh\n"),
                            Entry("etc/group", "symlink", target="/etc/passwd"), Entry("big", size=100),
                            Entry("link", "symlink", target="etc"), Entry("dev", D)])
    assert tree.read_file("etc/passwd", 1024) == b"root:x:0:0::/root:/bin/sh\n"
    assert tree.read_file("etc/group", 1024) is None
    assert tree.read_file("link/passwd", 1024) is None
    assert tree.read_file("big", 99) is None and tree.read_file("missing/x", 10) is None
    assert tree.read_file("dev", 10) is None


def test_a_directory_replaced_mid_layer_is_never_written_through_an_old_handle(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    refused(tmp_path, [Entry("a/b/f1", data=b"1")],
            [Entry("a/b/f2", data=b"2"), Entry("a", "symlink", target=str(outside)), Entry("a/b/f3", data=b"3")],
            match="a is a symlink")
    assert os.listdir(outside) == []
    tree = build(fresh(tmp_path, "2"), [Entry("d/x/f1", data=b"1"), Entry("d", "file", data=b"now a file"),
                                        Entry("e/f", data=b"e")])
    assert (tmp_path / "2" / "tree" / "d").read_bytes() == b"now a file" and tree.entries == 3
