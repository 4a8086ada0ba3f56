"""The base image store on temporary work directories: add, names, lookup, rm, gc, resolve.

Images are made by qemu-img; no VM and no daemon. Every refused input must leave nothing behind.
"""
import errno
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import time

import pytest

from vmiso import files, state
from vmiso._proc import run
from vmiso.errors import ImageError, InUse, InvalidSpec, NotFound, UnsafeImage
from vmiso.image import inuse, qcow2, store
from vmiso.image.resolve import resolve
from vmiso.paths import OVERLAY, HostCache, Workdir

MIB = 1 << 20


def make_qcow2(path, size="16M", backing=None, data=None):
    args = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing:
        args += ["-b", backing, "-F", "qcow2" if str(backing).endswith("qcow2") else "raw"]
    run([*args, path, size])
    if data:
        run(["qemu-io", "-f", "qcow2", "-c", data, path])
    return str(path)


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture
def base(tmp_path):
    return make_qcow2(tmp_path / "base.qcow2", data="write -P 0x5a 0 64k")


def leftovers(work):
    """Everything in the store but its lock, and the names index if there is one."""
    found = []
    if (work / "images" / "store").is_dir():
        found += [n for n in os.listdir(work / "images" / "store") if n != ".lock"]
    if (work / "images" / "names.json").exists():
        found.append("names.json")
    return found


def checkpoint(work, container_id, base, phase=state.RUNNING):
    directory = work / "containers" / container_id
    directory.mkdir()
    state.write(str(directory), state.Checkpoint(container_id=container_id, agent_id="a", domain="d",
                                                 nonce="n", phase=phase, base=str(base)))
    return directory


# -- add -----------------------------------------------------------------------------------------

def test_add_stores_read_only_by_content_with_metadata(work, base):
    added = store.add(work, base, name="deb12")
    digest = sha256(base)
    entry = work / "images" / "store" / digest
    assert added.created and added.previous is None
    assert added.image.sha256 == digest and added.image.names == ("deb12",)
    assert added.image.path == str(entry / "base.qcow2")
    assert sha256(entry / "base.qcow2") == digest
    assert stat.S_IMODE(os.stat(entry / "base.qcow2").st_mode) == 0o444
    assert stat.S_IMODE(os.stat(entry / "meta.json").st_mode) == 0o444
    for d in (entry, entry.parent):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o755  # QEMU's user passes through
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["format"] == "qcow2" and meta["virtual_size"] == 16 * MIB
    assert meta["source"] == base and meta["added_as"] == "deb12" and meta["added_at"] <= time.time()
    assert json.loads((work / "images" / "names.json").read_text())["names"] == {"deb12": digest}
    assert sorted(os.listdir(entry.parent)) == [".lock", digest]  # no staging left


def test_same_content_twice_is_stored_once_and_gains_a_name(work, base, tmp_path):
    first = store.add(work, base, name="one")
    copy = tmp_path / "copy.qcow2"
    shutil.copyfile(base, copy)
    second = store.add(Workdir(work), copy, name="two")
    assert not second.created
    assert second.image.path == first.image.path
    assert second.image.names == ("one", "two")
    assert [i.sha256 for i in store.list_images(work)] == [first.image.sha256]


def test_a_name_moves_to_new_content(work, base, tmp_path):
    old = store.add(work, base, name="deb")
    other = make_qcow2(tmp_path / "other.qcow2", data="write -P 0x11 0 64k")
    new = store.add(work, other, name="deb")
    assert new.previous == old.image.sha256
    assert store.lookup(work, "deb").sha256 == new.image.sha256
    assert store.lookup(work, old.image.sha256).names == ()


def test_raw_base_needs_to_be_declared_and_keeps_holes(work, tmp_path):
    raw = tmp_path / "disk.raw"
    with open(raw, "wb") as f:
        f.write(b"boot" * 1000)
        f.seek(8 * MIB)
        f.write(b"end")
    with pytest.raises(UnsafeImage, match="declared qcow2 but the file is raw"):
        store.add(work, raw)
    added = store.add(work, raw, format="raw")
    path = added.image.path
    assert path.endswith("/base.raw") and sha256(path) == sha256(raw)
    assert added.image.virtual_size == os.path.getsize(raw)
    assert os.stat(path).st_blocks * 512 < 2 * MIB  # the zero megabytes stayed holes


def test_progress_is_reported_for_large_files(work, base, monkeypatch):
    monkeypatch.setattr(store, "PROGRESS_EVERY", 64 * 1024)
    calls = []
    store.add(work, base, progress=lambda done, total: calls.append((done, total)))
    total = os.path.getsize(base)
    assert calls and calls[-1] == (total, total)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


# -- refused inputs: a clear error and nothing left behind ----------------------------------------

def _bad_inputs(tmp_path, base):
    link = tmp_path / "link.qcow2"
    link.symlink_to(base)
    backed = make_qcow2(tmp_path / "backed.qcow2", backing=base)
    shadow = tmp_path / "shadow.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "/etc/shadow", "-F", "raw", "-u", shadow, "16M"])
    magic = tmp_path / "magic.raw"
    shutil.copyfile(base, magic)  # a raw file that starts with the qcow2 magic
    directory = tmp_path / "dir.qcow2"
    directory.mkdir()
    return [
        (link, "qcow2", UnsafeImage, "symbolic link"),
        (backed, "qcow2", UnsafeImage, "has a backing file"),
        (shadow, "qcow2", UnsafeImage, "/etc/shadow"),
        (magic, "raw", UnsafeImage, "declared raw but the file is qcow2"),
        (directory, "qcow2", UnsafeImage, "not a regular file"),
        (tmp_path / "missing.qcow2", "qcow2", NotFound, "no such image"),
        (base, "vmdk", UnsafeImage, "declared format 'vmdk'"),
    ]


def test_unsafe_or_missing_sources_are_refused_leaving_nothing(work, base, tmp_path):
    for path, fmt, error, message in _bad_inputs(tmp_path, base):
        with pytest.raises(error, match=message):
            store.add(work, path, format=fmt, name="x")
        assert leftovers(work) == [], path


@pytest.mark.parametrize("name", ["a/b", "..", "a..b", "../etc", "micro", "", "-x", ".hidden", "x" * 65,
                                  "a b", "deadbeefcafe", "DEADBEEFCAFE0123", "ü"])
def test_bad_names_are_refused_before_anything_is_made(work, base, name):
    with pytest.raises(InvalidSpec, match="name"):
        store.add(work, base, name=name)
    assert leftovers(work) == []


def test_good_names(work, base):
    for name in ("deb12", "debian-12.5_cloud", "Ubuntu+22.04", "a", "x" * 64, "deadbeef"):
        store.add(work, base, name=name)
    assert len(store.lookup(work, "deb12").names) == 6


def test_disk_full_during_the_copy_leaves_nothing(work, base, monkeypatch):
    real = os.write

    def full(fd, data):
        if len(data) > 4096:  # the image's chunks; small writes (pytest's own) pass
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(ImageError, match="cannot copy into the store: No space left on device"):
        store.add(work, base, name="full")
    monkeypatch.undo()
    assert leftovers(work) == []


@pytest.fixture
def small_fs(tmp_path):
    """A 1 MiB tmpfs (root only), unmounted afterwards."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", mount], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", mount], check=True)


def test_a_really_full_disk_leaves_nothing(small_fs, tmp_path):
    big = make_qcow2(tmp_path / "big.qcow2", size="64M", data="write -P 0x77 0 4M")
    work = small_fs / "work"
    (work / "images").mkdir(parents=True)
    with pytest.raises(ImageError, match="No space left on device"):
        store.add(work, big, name="big")
    assert leftovers(work) == []
    assert store.list_images(work) == []


def test_an_interrupted_add_removes_its_staging(work, base, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(store, "_install", interrupted)
    with pytest.raises(KeyboardInterrupt):
        store.add(work, base, name="x")
    assert leftovers(work) == []


# -- lookup and the check before use ---------------------------------------------------------------

def test_lookup_by_name_id_and_unique_prefix(work, base):
    digest = store.add(work, base, name="deb").image.sha256
    for ref in ("deb", digest, digest[:12], digest[:20], digest[:12].upper()):
        assert store.lookup(work, ref).sha256 == digest, ref
    for ref in (digest[:11], "nope", "a/b", "0" * 12, digest + "0"):
        assert store.lookup(work, ref) is None, ref


def _fake_entry(work, sha):
    entry = work / "images" / "store" / sha
    entry.mkdir(parents=True)
    meta = {"sha256": sha, "format": "qcow2", "virtual_size": 1, "file_size": 1, "added_at": 0,
            "source": "/x", "stamp": {}}
    (entry / "meta.json").write_text(json.dumps(meta))


def test_an_ambiguous_prefix_is_an_error(work):
    _fake_entry(work, "ab" * 6 + "0" * 52)
    _fake_entry(work, "ab" * 6 + "1" * 52)
    with pytest.raises(InvalidSpec, match="ambiguous"):
        store.lookup(work, "ab" * 6)
    assert store.lookup(work, "ab" * 6 + "0").sha256.endswith("0" * 52)


def test_verified_is_cheap_and_catches_a_changed_base(work, base):
    digest = store.add(work, base, name="deb").image.sha256
    image, info = store.verified(work, "deb")
    assert info.virtual_size == 16 * MIB and info.backing_file is None
    path = image.path
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:  # same size, one byte different
        f.seek(70000)
        f.write(b"\x01")
    os.chmod(path, 0o444)
    with pytest.raises(UnsafeImage, match=f"{digest[:12]} was modified after it was added"):
        store.verified(work, "deb")


def test_a_replaced_base_with_the_old_size_and_mtime_is_caught(work, base, tmp_path):
    image = store.add(work, base, name="deb").image
    other = make_qcow2(tmp_path / "other.qcow2", data="write -P 0x66 0 64k")
    assert os.path.getsize(other) == image.file_size
    os.replace(other, tmp_path / "swap")
    os.chmod(tmp_path / "swap", 0o444)
    os.utime(tmp_path / "swap", ns=(image.stamp["mtime_ns"],) * 2)
    os.replace(tmp_path / "swap", image.path)  # another inode
    with pytest.raises(UnsafeImage, match="was modified"):
        store.verified(work, "deb")


def test_a_changed_stamp_with_the_same_content_is_accepted_and_recorded(work, base):
    image = store.add(work, base, name="deb").image
    os.utime(image.path, (1, 1))
    again, _ = store.verified(work, "deb")
    assert again.sha256 == image.sha256
    assert store.lookup(work, "deb").stamp["mtime_ns"] == 1_000_000_000  # next time: cheap again


def test_a_writable_base_is_refused(work, base):
    image = store.add(work, base, name="deb").image
    os.chmod(image.path, 0o644)
    with pytest.raises(UnsafeImage, match="modified"):
        store.verified(work, "deb")


def test_a_name_whose_base_vanished_says_so(work, base):
    image = store.add(work, base, name="deb").image
    files.remove_tree(os.path.dirname(image.path))
    with pytest.raises(NotFound, match="missing from the store"):
        store.lookup(work, "deb")


def test_damaged_names_index_is_a_clear_error(work, base):
    (work / "images" / "names.json").write_text("{")
    with pytest.raises(ImageError, match="names index is damaged"):
        store.lookup(work, "deb")


# -- resolve (vmiso run --image) ----------------------------------------------------------------

def test_resolve_order_name_then_id_then_path(work, base, tmp_path, monkeypatch):
    digest = store.add(work, base, name="deb").image.sha256
    wd = Workdir(work)
    for ref in ("deb", digest, digest[:12]):
        boot = resolve(wd, ref)
        assert boot.base == str(work / "images" / "store" / digest / "base.qcow2")
        assert (boot.name, boot.base_format, boot.virtual_size, boot.kernel) == (ref, "qcow2", 16 * MIB, None)
    monkeypatch.chdir(tmp_path)
    make_qcow2(tmp_path / "deb", size="32M")  # a file named like the image: the name wins
    assert resolve(wd, "deb").virtual_size == 16 * MIB
    assert resolve(wd, "./deb").virtual_size == 32 * MIB
    assert resolve(wd, str(tmp_path / "deb")).base == str(tmp_path / "deb")


def test_resolve_refuses_a_wrong_declared_format_and_unknown_refs(work, base):
    store.add(work, base, name="deb")
    with pytest.raises(InvalidSpec, match="stored as qcow2, not raw"):
        resolve(Workdir(work), "deb", "raw")
    assert resolve(Workdir(work), "deb", "qcow2").base_format == "qcow2"
    with pytest.raises(NotFound, match="neither a stored image"):
        resolve(Workdir(work), "nosuch")


def test_resolve_still_verifies_a_path(work, base, tmp_path):
    backed = make_qcow2(tmp_path / "backed.qcow2", backing=base)
    with pytest.raises(UnsafeImage, match="backing file"):
        resolve(Workdir(work), backed)


# -- users, rm, gc -------------------------------------------------------------------------------

def test_users_from_checkpoints_and_left_overlays(work, base):
    path = store.add(work, base, name="deb").image.path
    checkpoint(work, "live", path)
    checkpoint(work, "done", path, phase=state.TERMINATED)
    orphan = work / "containers" / "orphan"  # no readable checkpoint, but an overlay on the base
    orphan.mkdir()
    qcow2.create_overlay(orphan / OVERLAY, path)
    assert inuse.users_of(path, inuse.users(work)) == {"live", "orphan"}
    link = work.parent / "link"  # the same work directory, spelled another way
    link.symlink_to(work)
    assert inuse.users_of(path, inuse.users(link)) == {"live", "orphan"}


def test_rm_a_name_then_the_last_name_removes_the_base(work, base):
    image = store.add(work, base, name="one").image
    store.add(work, base, name="two")
    assert store.rm(work, "one") == (["one"], image.sha256, False)
    assert os.path.exists(image.path)
    assert store.rm(work, "two") == (["two"], image.sha256, True)
    assert not os.path.exists(os.path.dirname(image.path))
    assert leftovers(work) == ["names.json"]
    assert json.loads((work / "images" / "names.json").read_text())["names"] == {}
    with pytest.raises(NotFound):
        store.rm(work, "two")


def test_rm_by_id_removes_all_names(work, base):
    image = store.add(work, base, name="one").image
    store.add(work, base, name="two")
    assert store.rm(work, image.sha256[:12]) == (["one", "two"], image.sha256, True)
    assert store.list_images(work) == []


def test_rm_refuses_a_base_in_use_and_changes_nothing(work, base):
    image = store.add(work, base, name="deb").image
    checkpoint(work, "job1", image.path)
    with pytest.raises(InUse, match="image deb is in use by job1") as caught:
        store.rm(work, "deb")
    assert caught.value.users == ["job1"]
    assert store.lookup(work, "deb").path == image.path
    state.write(str(work / "containers" / "job1"),
                state.Checkpoint("job1", "a", "d", "n", phase=state.TERMINATED, base=image.path))
    store.rm(work, "deb")
    assert store.list_images(work) == []


def test_a_micro_root_boots_with_the_micro_kernel(work, tmp_path):
    micro = _micro(work, ["d" * 64], current="d" * 64)
    manifest = {"key": "d" * 64, "kernel_file": "vmlinux", "kernel_version": "6.1", "virtual_size": MIB}
    (micro / ("d" * 64) / "manifest.json").write_text(json.dumps(manifest))
    for name in ("vmlinux", "initrd.img"):
        (micro / ("d" * 64) / name).write_bytes(b"x")
    added = store.add(work, micro / ("d" * 64) / "root.qcow2", name="myroot")
    assert added.image.boot == "micro"
    boot = resolve(Workdir(work), "myroot")
    assert boot.base == added.image.path and boot.kernel == str(micro / ("d" * 64) / "vmlinux")
    assert boot.name == "myroot" and boot.cmdline
    disk = make_qcow2(tmp_path / "disk.qcow2", data="write -P 3 0 4k")
    assert store.add(work, disk, name="d").image.boot == "disk"
    assert resolve(Workdir(work), "d").kernel is None
    assert store.add(work, disk, boot="micro").image.boot == "micro"  # declared again: it holds
    assert resolve(Workdir(work), "d").kernel is not None
    with pytest.raises(InvalidSpec, match="boot"):
        store.add(work, disk, boot="pxe")


def _micro(work, keys, current):
    micro = work / "images" / "micro"
    for key in keys:
        (micro / key).mkdir(parents=True)
        make_qcow2(micro / key / "root.qcow2", size="1M")
    (micro / "current").write_text(current + "\n")
    return micro


def test_gc_collects_what_nothing_names_or_uses(work, base, tmp_path):
    named = store.add(work, base, name="deb").image
    other = make_qcow2(tmp_path / "other.qcow2", data="write -P 1 0 4k")
    unnamed = store.add(work, other).image
    third = make_qcow2(tmp_path / "third.qcow2", data="write -P 2 0 4k")
    used = store.add(work, third).image
    checkpoint(work, "job1", used.path)
    old, cur, busy = "a" * 64, "b" * 64, "c" * 64
    micro = _micro(work, (old, cur, busy), current=cur)
    checkpoint(work, "job2", micro / busy / "root.qcow2")
    stale = work / "images" / "store" / ".add-killed"
    stale.mkdir()
    (stale / "base.qcow2").write_bytes(b"x")
    for p in (stale / "base.qcow2", stale):
        os.utime(p, (time.time() - 7200,) * 2)
    (work / "images" / "store" / ".add-running").mkdir()
    names = json.loads((work / "images" / "names.json").read_text())
    names["names"]["gone"] = "f" * 64
    (work / "images" / "names.json").write_text(json.dumps(names))

    dry = store.gc(work, dry_run=True)
    expected = {("name", "gone"), ("store", unnamed.sha256), ("micro", old), ("partial", ".add-killed")}
    assert {(c.kind, c.id) for c in dry} == expected
    assert os.path.exists(unnamed.path) and (micro / old).exists() and stale.exists()

    assert {(c.kind, c.id) for c in store.gc(work)} == expected
    assert not os.path.exists(unnamed.path) and not (micro / old).exists() and not stale.exists()
    assert os.path.exists(named.path) and os.path.exists(used.path)
    assert (micro / cur).exists() and (micro / busy).exists()
    assert (work / "images" / "store" / ".add-running").exists()
    assert "gone" not in json.loads((work / "images" / "names.json").read_text())["names"]
    assert store.gc(work) == []


def _builds(work, current, kernels):
    """Micro builds {key: lean kernel key or None (stock)} in ``work``; ``current`` the default."""
    micro = _micro(work, kernels, current=current)
    for key, kernel in kernels.items():
        manifest = {"key": key, "kernel_file": "vmlinux", "kernel_version": "6.1", "virtual_size": MIB}
        if kernel:
            manifest["lean_kernel"] = kernel
        (micro / key / "manifest.json").write_text(json.dumps(manifest))
    return micro


def _kernels(*keys, young=()):
    """Lean kernels in the (test's own) host cache, an hour old but ``young``."""
    cache = HostCache().kernels
    for kernel in (*keys, *young):
        (cache / kernel).mkdir(parents=True)
        (cache / kernel / "vmlinux").write_bytes(b"x" * 4096)
        if kernel not in young:  # a build in progress uses its kernel an instant before its image
            os.utime(cache / kernel, (time.time() - 7200,) * 2)
    return cache


def test_gc_collects_lean_kernels_no_remaining_micro_build_was_made_from(work):
    cur, old, stock = "b" * 64, "a" * 64, "e" * 64
    k_cur, k_old, k_orphan, k_young = ("1" * 64, "2" * 64, "3" * 64, "4" * 64)
    micro = _builds(work, cur, {cur: k_cur, old: k_old, stock: None})
    (micro / "current-stock").write_text(stock + "\n")
    cache = _kernels(k_cur, k_old, k_orphan, young=(k_young,))

    found = {(c.kind, c.id) for c in store.gc(work)}
    assert found == {("micro", old), ("kernel", k_old), ("kernel", k_orphan)}
    assert sorted(p.name for p in cache.iterdir()) == sorted((k_cur, k_young))
    assert (micro / cur).exists() and (micro / stock).exists()


def test_gc_keeps_the_kernels_another_work_dirs_micro_builds_name(work, tmp_path):
    """The host cache serves every work dir: gc of one keeps what the builds of any other work
    dir that built from it name; a registered work dir that is gone no longer counts."""
    mine, theirs, gone = "1" * 64, "2" * 64, "3" * 64
    _builds(work, "a" * 64, {"a" * 64: mine})
    other, removed = tmp_path / "other", tmp_path / "removed"
    _builds(other, "b" * 64, {"b" * 64: theirs})
    _builds(removed, "c" * 64, {"c" * 64: gone})
    host = HostCache().ensure()
    for workdir in (work, other, removed):
        host.register(workdir)
    shutil.rmtree(removed)
    cache = _kernels(mine, theirs, gone)

    assert {(c.kind, c.id) for c in store.gc(work)} == {("kernel", gone)}
    assert sorted(p.name for p in cache.iterdir()) == sorted((mine, theirs))
    assert sorted(w.root for w in host.users()) == sorted((work, other))
    # A build of the other work dir that cannot be read: every kernel stays.
    (other / "images" / "micro" / ("b" * 64) / "manifest.json").write_text("{")
    host.register(removed)  # and a registration of a work dir that is gone is forgotten
    assert store.gc(work, dry_run=True) == [] and sorted(w.root for w in host.users()) == sorted((work, other))


def test_gc_on_an_empty_work_directory(tmp_path):
    assert store.gc(tmp_path / "nothing") == []
    assert not (tmp_path / "nothing").exists()


# -- the command line ----------------------------------------------------------------------------

def cli(work, *args):
    return subprocess.run([sys.executable, "-m", "vmiso", "--workdir", str(work), "image", *args],
                          capture_output=True, text=True, timeout=60)


def test_cli_add_list_rm_gc(work, base):
    proc = cli(work, "add", base, "--name", "deb")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("stored: ")
    rows = json.loads(cli(work, "list", "--json").stdout)
    assert [(r["name"], r["format"], r["virtual_size"], r["used_by"]) for r in rows] == [("deb", "qcow2", 16 * MIB, [])]
    assert "deb " in cli(work, "list").stdout
    assert cli(work, "add", base, "--json").stdout.count('"created": false') == 1
    assert cli(work, "gc", "--dry-run").stdout.strip() == "would remove 0 item(s), 0B on disk"
    proc = cli(work, "rm", "deb")
    assert proc.returncode == 0 and "deleted" in proc.stdout
    assert json.loads(cli(work, "list", "--json").stdout) == []
    unnamed = json.loads(cli(work, "add", base, "--json").stdout)["sha256"]
    dry = json.loads(cli(work, "gc", "--dry-run", "--json").stdout)
    assert dry["dry_run"] and [(c["kind"], c["id"]) for c in dry["removed"]] == [("store", unnamed)]
    assert dry["bytes"] == dry["removed"][0]["bytes"] > 0 and len(json.loads(cli(work, "list", "--json").stdout)) == 1
    done = json.loads(cli(work, "gc", "--json").stdout)
    assert not done["dry_run"] and [c["id"] for c in done["removed"]] == [unnamed]
    assert json.loads(cli(work, "list", "--json").stdout) == []


@pytest.mark.parametrize("args,needle", [
    (["add", "/nonexistent.qcow2"], "no such image"),
    (["add", "/etc/hostname"], "declared qcow2 but the file is raw"),
    (["add", "/etc/hostname", "--format", "raw", "--name", "../x"], "not a valid image name"),
    (["add", "/etc/hostname", "--format", "vmdk"], "invalid choice"),
    (["rm", "nosuch"], "no such image"),
])
def test_cli_errors_exit_125_with_one_line(work, args, needle):
    proc = cli(work, *args)
    assert proc.returncode == 125
    assert proc.stderr.strip().splitlines()[-1].startswith("vmiso: error:") and needle in proc.stderr
    assert leftovers(work) == []
