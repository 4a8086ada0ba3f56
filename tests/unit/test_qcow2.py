"""qcow2 overlay writer, header parser and base-image safety, for both implementations.

qemu-img and qemu-io are the judges: overlays must match qemu-img's own bytes, pass
`qemu-img check`, and carry guest writes; the parser is fuzzed and must agree with its twin.
"""
import hashlib
import json
import os
import random
import struct
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vmiso._fast
from vmiso._proc import run
from vmiso.errors import ImageError, UnsafeImage
from vmiso.image import qcow2 as api

NO_EXTENSIONS = os.environ.get("VMISO_NO_EXTENSIONS") == "1"
KIB, MIB, GIB, TIB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _compiled():
    if NO_EXTENSIONS:
        pytest.skip("VMISO_NO_EXTENSIONS=1: only the pure-Python twin is under test")
    try:
        import vmiso._fast.qcow2 as module
    except ImportError as err:
        pytest.fail(f"Cython extension not built (python setup.py build_ext --inplace): {err}")
    return module


@pytest.fixture(params=["cython", "python"])
def impl(request):
    """Each implementation of vmiso._fast's qcow2 module in turn."""
    return _compiled() if request.param == "cython" else vmiso._fast.twin("qcow2")


@pytest.fixture
def both():
    """(compiled, twin), for differential tests."""
    return _compiled(), vmiso._fast.twin("qcow2")


@pytest.fixture
def use_impl(impl, monkeypatch):
    """Make vmiso.image.qcow2 use ``impl``."""
    monkeypatch.setattr(vmiso._fast, "load", lambda name: impl)
    return impl


def qemu_img(*args):
    return run(["qemu-img", *args], timeout=60)


def check(path):
    """qemu-img check's verdict as JSON; the check must pass."""
    proc = run(["qemu-img", "check", "--output=json", path], check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


def info(path):
    return json.loads(qemu_img("info", "--output=json", path).stdout)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Real images made by qemu-img, shared by the module (the LUKS one takes a second or two)."""
    d = tmp_path_factory.mktemp("images")
    paths = {name: str(d / name) for name in (
        "base.qcow2", "v2.qcow2", "lazy.qcow2", "datafile.qcow2", "luks.qcow2", "backed.qcow2",
        "huge.qcow2", "base.raw", "small-clusters.qcow2")}
    qemu_img("create", "-q", "-f", "qcow2", paths["base.qcow2"], "64M")
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xab 0 1M", paths["base.qcow2"]])
    qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", paths["v2.qcow2"], "16M")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", paths["lazy.qcow2"], "16M")
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={d / 'data.raw'}",
             paths["datafile.qcow2"], "16M")
    _make_luks(paths["luks.qcow2"])
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "/etc/shadow", "-F", "raw",
             paths["backed.qcow2"], "16M")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=2M", paths["huge.qcow2"], "4P")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", paths["small-clusters.qcow2"],
             "1G")
    with open(paths["base.raw"], "wb") as f:
        f.truncate(32 * MIB)  # sparse
    return paths


def _make_luks(path):
    """A LUKS-encrypted qcow2. qemu's PBKDF calibration sometimes fails on a fast CPU
    ("Unable to get accurate CPU usage": it measured 0 ms), so try again. On these machines half
    the tries fail, each at once (~10 ms; a success takes ~2 s): 5 tries failed one run in 30."""
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", "--object", "secret,id=sec0,data=x", "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10", path, "16M"]
    for _ in range(40):
        proc = run(argv, check=False)
        if proc.returncode == 0:
            return
        if os.path.lexists(path):
            os.unlink(path)
    pytest.fail(f"qemu-img could not make a LUKS image: {proc.stderr}")


# ---------------------------------------------------------------- the writer


def test_extension_is_loaded_unless_disabled():
    """Guard: the compiled module must be what load() returns unless VMISO_NO_EXTENSIONS=1."""
    if NO_EXTENSIONS:
        assert vmiso._fast.implementation("qcow2") == "python"
    else:
        assert vmiso._fast.implementation("qcow2") == "cython", "Cython qcow2 extension not built"


def test_both_implementations_have_the_same_public_names(both):
    def public(module):
        return {name: getattr(module, name) for name in dir(module)
                if not name.startswith("_") and name not in ("os", "struct", "ImageError")}

    compiled, twin = both
    assert set(public(compiled)) == set(public(twin))
    assert {k: v for k, v in public(compiled).items() if not callable(v)} == \
        {k: v for k, v in public(twin).items() if not callable(v)}


SIZES_64K = [1, 511, 512, 513, 1000003, 512 * MIB - 1, 512 * MIB, 512 * MIB + 1, 10 * GIB + 7,
             4 * TIB, 4 * TIB + 64 * KIB, 8 * TIB]


@pytest.mark.parametrize("size", SIZES_64K)
def test_overlay_bytes_match_qemu_img_and_pass_check(impl, images, tmp_path, size):
    ours, theirs = str(tmp_path / "ours.qcow2"), str(tmp_path / "theirs.qcow2")
    impl.write_overlay(ours, size, images["base.qcow2"].encode(), b"qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", images["base.qcow2"], "-F", "qcow2",
             theirs, str(size))
    with open(ours, "rb") as a, open(theirs, "rb") as b:
        assert a.read() == b.read()
    result = check(ours)
    assert result.get("corruptions", 0) == 0 and result.get("leaks", 0) == 0
    assert result.get("check-errors", 0) == 0
    assert info(ours)["virtual-size"] == (size + 511) // 512 * 512  # qemu rounds up to sectors


@pytest.mark.parametrize(("cluster_bits", "size", "backing_format"), [
    (9, MIB, b"raw"), (12, GIB, b"qcow2"), (13, 3 * GIB + 5, b"qcow2"), (21, 8 * TIB, b"raw"),
])
def test_other_cluster_sizes_match_qemu_img(impl, images, tmp_path, cluster_bits, size, backing_format):
    ours, theirs = str(tmp_path / "ours.qcow2"), str(tmp_path / "theirs.qcow2")
    base = images["base.raw"] if backing_format == b"raw" else images["base.qcow2"]
    impl.write_overlay(ours, size, base.encode(), backing_format, cluster_bits)
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-o", f"cluster_size={1 << cluster_bits}",
             "-b", base, "-F", backing_format.decode(), theirs, str(size))
    with open(ours, "rb") as a, open(theirs, "rb") as b:
        assert a.read() == b.read()
    check(ours)


@pytest.mark.parametrize(("cluster_bits", "size"), [(9, GIB), (9, 16 * GIB), (10, 16 * GIB), (9, 128 * GIB)])
def test_several_refcount_blocks_are_consistent(both, images, tmp_path, cluster_bits, size):
    """Small clusters need more than one refcount block (128 GiB at 512 bytes: the largest, with a
    5-cluster refcount table): qemu lays them out differently, but ours must pass qemu-img check,
    and both implementations must agree byte for byte."""
    outputs = []
    for n, module in enumerate(both):
        path = str(tmp_path / f"o{n}.qcow2")
        module.write_overlay(path, size, images["base.qcow2"].encode(), b"qcow2", cluster_bits)
        result = check(path)
        assert result.get("corruptions", 0) == 0 and result.get("leaks", 0) == 0
        with open(path, "rb") as f:
            outputs.append(f.read())
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize(("size", "name", "fmt", "bits"), [
    (10 * GIB, b"base.qcow2", b"qcow2", 16), (1, b"/" + b"n" * 1022, b"raw", 16),
    (4 * TIB + 1, b"x", b"qcow2", 16), (GIB + 1, b"rel/base", b"raw", 9), (8 * TIB, b"b", b"raw", 21),
    (1 << 51, b"largest", b"qcow2", 16),
])
def test_implementations_write_identical_files(both, tmp_path, size, name, fmt, bits):
    outputs = []
    for n, module in enumerate(both):
        path = str(tmp_path / f"o{n}")
        module.write_overlay(path, size, name, fmt, bits)
        assert os.stat(path).st_mode & 0o777 == 0o600 & ~_umask()
        with open(path, "rb") as f:
            outputs.append(f.read())
    assert outputs[0] == outputs[1]


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _long_path(root, total):
    """An existing file path of exactly ``total`` bytes under ``root`` (components <= 200)."""
    path = str(root)
    os.makedirs(path, exist_ok=True)
    while total - len(path) > 201:
        path = os.path.join(path, "d" * 199)
        os.mkdir(path)
    path = os.path.join(path, "f" * (total - len(path) - 1))
    assert len(path) == total
    return path


@pytest.mark.parametrize("relative", [False, True])
def test_longest_backing_names_work_and_1024_is_refused(impl, images, tmp_path, relative):
    overlay_dir = tmp_path / "o"
    overlay_dir.mkdir()
    root = overlay_dir if relative else tmp_path
    target = _long_path(root / "deep", 1023 + (len(str(overlay_dir)) + 1 if relative else 0))
    qemu_img("create", "-q", "-f", "qcow2", target, "32M")
    name = os.path.relpath(target, overlay_dir) if relative else target
    assert len(name) == 1023
    overlay = str(overlay_dir / "ov.qcow2")
    impl.write_overlay(overlay, 32 * MIB, name.encode(), b"qcow2")
    got = info(overlay)
    assert got["backing-filename"] == name
    assert got["backing-filename-format"] == "qcow2"
    check(overlay)
    refused = str(overlay_dir / "refused.qcow2")
    with pytest.raises(ImageError, match="1 to 1023 bytes"):
        impl.write_overlay(refused, 32 * MIB, name.encode() + b"x", b"qcow2")
    assert not os.path.lexists(refused)


@pytest.mark.parametrize("relative", [False, True])
def test_qemu_img_info_reports_size_and_backing(impl, images, tmp_path, relative):
    base = images["base.qcow2"]
    name = os.path.relpath(base, tmp_path) if relative else base
    overlay = str(tmp_path / "ov.qcow2")
    impl.write_overlay(overlay, 10 * GIB + 3, name.encode(), b"qcow2")
    got = info(overlay)
    assert got["virtual-size"] == 10 * GIB + 512
    assert got["backing-filename"] == name
    assert got["backing-filename-format"] == "qcow2"
    assert os.path.realpath(got["full-backing-filename"]) == os.path.realpath(base)


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_guest_writes_land_in_the_overlay_and_base_is_unchanged(impl, images, tmp_path):
    base = images["base.qcow2"]
    before = _sha256(base)
    overlay = str(tmp_path / "ov.qcow2")
    impl.write_overlay(overlay, 64 * MIB, base.encode(), b"qcow2")
    io = ["qemu-io", "-f", "qcow2"]
    out = run(io + ["-c", "read -P 0xab 0 1M", "-c", "write -P 0xcd 64k 128k",
                    "-c", "read -P 0xcd 64k 128k", "-c", "read -P 0xab 192k 64k",
                    "-c", "write -P 0xee 60M 1M", "-c", "read -P 0 1M 1M", overlay]).stdout
    assert "Pattern verification failed" not in out
    out = run(io + ["-c", "read -P 0xcd 64k 128k", "-c", "read -P 0xee 60M 1M", overlay]).stdout
    assert "Pattern verification failed" not in out
    check(overlay)
    assert _sha256(base) == before
    out = run(io + ["-r", "-c", "read -P 0xab 64k 128k", "-c", "read -P 0 60M 1M", base]).stdout
    assert "Pattern verification failed" not in out


def test_existing_file_is_left_alone(impl, tmp_path):
    path = tmp_path / "ov.qcow2"
    path.write_bytes(b"precious")
    with pytest.raises(ImageError, match="cannot create overlay") as caught:
        impl.write_overlay(str(path), GIB, b"base", b"qcow2")
    assert isinstance(caught.value.__cause__, FileExistsError)
    assert path.read_bytes() == b"precious"


@pytest.mark.parametrize("dangling", [False, True])
def test_symlink_at_path_is_refused(impl, tmp_path, dangling):
    target = tmp_path / "target"
    if not dangling:
        target.write_bytes(b"precious")
    link = tmp_path / "ov.qcow2"
    link.symlink_to(target)
    with pytest.raises(ImageError, match="cannot create overlay"):
        impl.write_overlay(str(link), GIB, b"base", b"qcow2")
    assert os.path.islink(link)
    if dangling:
        assert not target.exists()
    else:
        assert target.read_bytes() == b"precious"


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"size": 0}, "positive integer"),
    ({"size": -1}, "positive integer"),
    ({"size": 1.5}, "positive integer"),
    ({"size": (1 << 51) + 1}, "too large"),
    ({"size": 1 << 64}, "too large"),
    ({"cluster_bits": 8}, "cluster_bits"),
    ({"cluster_bits": 22}, "cluster_bits"),
    ({"backing": b""}, "1 to 1023"),
    ({"backing": b"a\0b"}, "NUL"),
    ({"backing": "base"}, "must be bytes"),
    ({"backing_format": b""}, "1 to 15"),
    ({"backing_format": b"q" * 16}, "1 to 15"),
    ({"backing": b"b" * 400, "cluster_bits": 9}, "do not fit"),
])
def test_bad_arguments_leave_nothing_behind(impl, tmp_path, kwargs, match):
    args = {"size": GIB, "backing": b"base", "backing_format": b"qcow2", "cluster_bits": 16, **kwargs}
    path = str(tmp_path / "ov.qcow2")
    with pytest.raises(ImageError, match=match):
        impl.write_overlay(path, args["size"], args["backing"], args["backing_format"],
                           args["cluster_bits"])
    assert os.listdir(tmp_path) == []


_FAILING_WRITE = """
import resource, signal, sys
from vmiso.errors import ImageError
import {module} as impl
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (100000, 100000))
try:
    impl.write_overlay(sys.argv[1], 1 << 30, b"base", b"qcow2")
except ImageError as err:
    print(type(err.__cause__).__name__, err)
"""


def test_failed_write_removes_the_partial_file(impl, tmp_path):
    path = str(tmp_path / "ov.qcow2")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(vmiso.__path__[0]))
    proc = subprocess.run([sys.executable, "-c", _FAILING_WRITE.format(module=impl.__name__), path],
                          capture_output=True, text=True, timeout=60, check=False, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "cannot write overlay" in proc.stdout and "OSError" in proc.stdout
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- the header parser


def outcome(module, data, file_size):
    """('ok', dict) or ('error', message); anything else fails the test."""
    try:
        return "ok", module.parse_header(data, file_size)
    except ImageError as err:
        assert type(err) is ImageError
        return "error", str(err)


def test_parser_reads_real_images(impl, images):
    for name, path in images.items():
        if name.endswith(".raw"):
            continue
        with open(path, "rb") as f:
            head = f.read(65536)
        got = impl.parse_header(head, os.path.getsize(path))
        assert got["version"] == (2 if name == "v2.qcow2" else 3)
        assert got["virtual_size"] == info(path)["virtual-size"]
    with open(images["datafile.qcow2"], "rb") as f:
        got = impl.parse_header(f.read(65536), os.path.getsize(images["datafile.qcow2"]))
    assert got["data_file"].endswith("data.raw") and got["incompatible_features"] & 4
    with open(images["luks.qcow2"], "rb") as f:
        got = impl.parse_header(f.read(65536), os.path.getsize(images["luks.qcow2"]))
    assert got["crypt_method"] == 2 and got["has_encryption_header"]
    with open(images["backed.qcow2"], "rb") as f:
        got = impl.parse_header(f.read(65536), os.path.getsize(images["backed.qcow2"]))
    assert (got["backing_file"], got["backing_format"]) == ("/etc/shadow", "raw")
    assert got["extensions"] == [0xE2792ACA, 0x6803F857]


def test_parser_reads_what_the_writer_wrote(impl, tmp_path):
    path = str(tmp_path / "ov")
    impl.write_overlay(path, 5 * TIB + 1, "ünï/base".encode(), b"raw", 16)
    with open(path, "rb") as f:
        got = impl.parse_header(f.read(), os.path.getsize(path))
    assert got["backing_file"] == "ünï/base" and got["backing_format"] == "raw"
    assert got["virtual_size"] == 5 * TIB + 512 and got["l1_size"] == 10241
    assert got["l1_table_offset"] == 0x30000 and got["refcount_table_offset"] == 0x10000


@pytest.mark.parametrize(("data", "file_size"), [
    ("not bytes", 100), (None, 0), (b"QFI\xfb" + b"\0" * 100, 10), (b"QFI\xfb", True),
    (b"QFI\xfb", 1 << 64), (b"", 0), (b"QFI", 3), (b"QFI\xfb" + b"\0" * 60, 64),
])
def test_parser_rejects_nonsense_arguments_with_image_error(impl, data, file_size):
    with pytest.raises(ImageError):
        impl.parse_header(data, file_size)


@pytest.fixture(scope="module")
def corpus(images, tmp_path_factory):
    """First bytes and sizes of real images: qemu-img's and the writers'."""
    d = tmp_path_factory.mktemp("corpus")
    samples = []
    for name, path in images.items():
        if not name.endswith(".raw"):
            with open(path, "rb") as f:
                samples.append((f.read(4096), os.path.getsize(path)))
    for bits, size in ((16, 10 * GIB), (9, GIB), (21, 1)):
        path = str(d / f"overlay-{bits}")
        vmiso._fast.twin("qcow2").write_overlay(path, size, b"../base.img", b"qcow2", bits)
        with open(path, "rb") as f:
            samples.append((f.read(4096), os.path.getsize(path)))
    return samples


def _same_outcome(modules, data, file_size):
    results = [outcome(m, data, file_size) for m in modules]
    assert results[0] == results[-1], (data[:128], file_size)
    return results[0]


def _parsers():
    """Every parser that can run here (the twin alone under VMISO_NO_EXTENSIONS=1)."""
    modules = [vmiso._fast.twin("qcow2")]
    if not NO_EXTENSIONS:
        modules.insert(0, _compiled())
    return modules


def test_random_mutations_of_real_images(corpus):
    """Flip bytes (mostly in the header) and truncate: both parsers agree, and only ImageError."""
    rng = random.Random(1234)
    modules = _parsers()
    kinds = {"ok": 0, "error": 0}
    for data, file_size in corpus:
        for _ in range(800):
            buf = bytearray(data)
            for _ in range(rng.randint(1, 6)):
                at = rng.randrange(128) if rng.random() < 0.7 else rng.randrange(len(buf))
                buf[at] = rng.choice([0, 0xFF, 0x80, 1, rng.randrange(256)])
            if rng.random() < 0.2:
                del buf[rng.randrange(len(buf)):]
            size = file_size if rng.random() < 0.8 else rng.choice([len(buf), rng.randrange(1 << 40)])
            kinds[_same_outcome(modules, bytes(buf), max(size, len(buf)))[0]] += 1
    assert kinds["ok"] and kinds["error"]  # the mutations reached both ends


# Header fields as (offset, size) for targeted overwrites.
FIELDS = [(4, 4), (8, 8), (16, 4), (20, 4), (24, 8), (32, 4), (36, 4), (40, 8), (48, 8), (56, 4),
          (60, 4), (64, 8), (72, 8), (96, 4), (100, 4), (112, 4), (116, 4), (120, 4), (124, 4)]


def _interesting(size):
    top = (1 << (8 * size)) - 1
    return st.one_of(st.integers(0, top), st.sampled_from(
        [0, 1, 2, 3, 8, 9, 16, 21, 22, 72, 104, 112, 0x10000, 0x30000, top, top >> 1, top - 7]))


@st.composite
def mutated_headers(draw, corpus):
    data, file_size = draw(st.sampled_from(corpus))
    buf = bytearray(data)
    for offset, size in draw(st.lists(st.sampled_from(FIELDS), max_size=4)):
        value = draw(_interesting(size))
        buf[offset:offset + size] = value.to_bytes(size, "big")
    cut = draw(st.one_of(st.none(), st.integers(0, len(buf))))
    if cut is not None:
        del buf[cut:]
    return bytes(buf), draw(st.sampled_from([file_size, len(buf), len(buf) + 1, 1 << 62]))


def test_hypothesis_structured_headers(corpus):
    modules = _parsers()

    @FUZZ
    @given(mutated_headers(corpus))
    def run_one(case):
        _same_outcome(modules, *case)

    run_one()


@FUZZ
@given(st.binary(max_size=700), st.integers(-2, 1 << 65), st.booleans())
def test_hypothesis_arbitrary_bytes(tail, extra, with_magic):
    data = (b"QFI\xfb" if with_magic else b"") + tail
    _same_outcome(_parsers(), data, len(data) + extra if extra >= 0 else extra)


# ---------------------------------------------------------------- inspect / verify_base / create


def _patched(images, tmp_path, name, offset, fmt, value):
    """A copy of an image with one big-endian header field replaced."""
    path = str(tmp_path / f"patched-{offset}-{value:x}-{name}")
    with open(images[name], "rb") as src, open(path, "wb") as dst:
        dst.write(src.read())
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))
    return path


def test_verify_base_accepts_safe_bases(use_impl, images):
    for name, fmt in (("base.qcow2", "qcow2"), ("v2.qcow2", "qcow2"), ("lazy.qcow2", "qcow2"),
                      ("small-clusters.qcow2", "qcow2"), ("base.raw", "raw")):
        got = api.verify_base(images[name], fmt)
        assert got.format == fmt and got.virtual_size == info(images[name])["virtual-size"]
        assert not (got.dirty or got.corrupt or got.encrypted or got.backing_file)


def _unsafe_bases(images, tmp_path):
    """(path, declared format, words the refusal must contain)."""
    link = tmp_path / "link.qcow2"
    link.symlink_to(images["base.qcow2"])
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    magic_raw = tmp_path / "magic.raw"
    magic_raw.write_bytes(b"QFI\xfb" + b"\xff" * 4096)
    empty = tmp_path / "empty.raw"
    empty.write_bytes(b"")
    truncated = []
    for n, length in enumerate((50, 100, 0x30004)):
        path = tmp_path / f"truncated{n}.qcow2"
        with open(images["base.qcow2"], "rb") as f:
            path.write_bytes(f.read(length))
        truncated.append((str(path), "qcow2", "unreadable or damaged"))
    return truncated + [
        (images["backed.qcow2"], "qcow2", "backing file"),
        (images["datafile.qcow2"], "qcow2", "external data file"),
        (images["luks.qcow2"], "qcow2", "encrypted"),
        (_patched(images, tmp_path, "base.qcow2", 32, ">I", 1), "qcow2", "encrypted"),
        (_patched(images, tmp_path, "base.qcow2", 72, ">Q", 1), "qcow2", "dirty"),
        (_patched(images, tmp_path, "lazy.qcow2", 72, ">Q", 2), "qcow2", "corrupt"),
        (_patched(images, tmp_path, "base.qcow2", 72, ">Q", 1 << 5), "qcow2", "unknown incompatible"),
        (_patched(images, tmp_path, "small-clusters.qcow2", 72, ">Q", 1 << 63), "qcow2", "unknown"),
        (_patched(images, tmp_path, "base.qcow2", 20, ">I", 22), "qcow2", "cluster_bits"),
        (_patched(images, tmp_path, "lazy.qcow2", 20, ">I", 8), "qcow2", "cluster_bits"),
        (_patched(images, tmp_path, "base.qcow2", 60, ">I", 1), "qcow2", "snapshot table"),
        (_patched(images, tmp_path, "base.qcow2", 40, ">Q", 1 << 40), "qcow2", "L1 table"),
        (_patched(images, tmp_path, "base.qcow2", 48, ">Q", 0x10008), "qcow2", "refcount table"),
        (images["huge.qcow2"], "qcow2", "virtual size"),
        (images["base.qcow2"], "raw", "declared raw but the file is qcow2"),
        (images["base.raw"], "qcow2", "declared qcow2 but the file is raw"),
        (str(magic_raw), "raw", "unreadable or damaged"),
        (str(empty), "raw", "virtual size"),
        (str(link), "qcow2", "symbolic link"),
        (fifo, "raw", "not a regular file"),
        (str(tmp_path), "raw", "not a regular file"),
        (str(tmp_path / "missing"), "qcow2", "cannot open"),
        (images["base.qcow2"], "vmdk", "declared format"),
    ]


def test_verify_base_refuses_every_unsafe_base(use_impl, images, tmp_path):
    for path, declared, words in _unsafe_bases(images, tmp_path):
        with pytest.raises(UnsafeImage) as caught:
            api.verify_base(path, declared)
        assert words in str(caught.value), (path, str(caught.value))


def test_inspect_reports_header_facts(use_impl, images, tmp_path):
    raw = api.inspect(images["base.raw"])
    assert (raw.format, raw.virtual_size, raw.version) == ("raw", 32 * MIB, None)
    lazy = api.inspect(images["lazy.qcow2"])
    assert (lazy.format, lazy.version, lazy.cluster_size) == ("qcow2", 3, 64 * KIB)
    assert lazy.compatible_features == 1 and not lazy.dirty
    backed = api.inspect(images["backed.qcow2"])
    assert (backed.backing_file, backed.backing_format) == ("/etc/shadow", "raw")
    huge = api.inspect(images["huge.qcow2"])  # cluster 0 is 2 MiB: read in full
    assert huge.virtual_size == 4 << 50 and huge.cluster_size == 2 * MIB


def test_inspect_reads_all_of_cluster_0_when_the_header_needs_it(use_impl, images, tmp_path):
    """A 6000-byte unknown extension pushes the backing name past the first 4 KiB read."""
    path = str(tmp_path / "long-header.qcow2")
    use_impl.write_overlay(path, GIB, images["base.qcow2"].encode(), b"qcow2")
    with open(path, "rb") as f:
        image = bytearray(f.read())
    name = images["base.qcow2"].encode()
    exts = struct.pack(">II", 0xE2792ACA, 5) + b"qcow2\0\0\0"
    exts += struct.pack(">II", 0x0BADF00D, 6000) + b"\0" * 6000 + b"\0" * 8
    cluster0 = image[:112] + exts + name
    cluster0[8:16] = struct.pack(">Q", 112 + len(exts))
    image[:65536] = cluster0 + b"\0" * (65536 - len(cluster0))
    with open(path, "wb") as f:
        f.write(image)
    got = api.inspect(path)
    assert (got.backing_file, got.backing_format) == (images["base.qcow2"], "qcow2")
    assert info(path)["backing-filename"] == images["base.qcow2"]
    check(path)


def test_create_overlay_takes_the_base_size(use_impl, images, tmp_path):
    for name, fmt in (("base.qcow2", "qcow2"), ("base.raw", "raw")):
        overlay = str(tmp_path / f"{name}.ov")
        api.create_overlay(overlay, images[name], backing_format=fmt)
        got = api.inspect(overlay)
        assert got.virtual_size == info(images[name])["virtual-size"]
        assert (got.backing_file, got.backing_format) == (images[name], fmt)
        check(overlay)


def test_create_overlay_resolves_relative_names_against_its_directory(use_impl, images, tmp_path,
                                                                      monkeypatch):
    (tmp_path / "c").mkdir()
    os.link(images["base.qcow2"], tmp_path / "base.qcow2")
    monkeypatch.chdir("/")
    overlay = str(tmp_path / "c" / "ov.qcow2")
    api.create_overlay(overlay, "../base.qcow2", size=128 * MIB)
    assert info(overlay)["backing-filename"] == "../base.qcow2"
    assert api.inspect(overlay).virtual_size == 128 * MIB
    check(overlay)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"size": 64 * MIB - 512}, "smaller than the base"),
    ({"size": "64M"}, "integer"),
    ({"backing_format": "raw"}, "is qcow2, not raw"),
    ({"backing_format": "vmdk"}, "backing format"),
])
def test_create_overlay_refuses_bad_requests(use_impl, images, tmp_path, kwargs, match):
    overlay = str(tmp_path / "ov.qcow2")
    with pytest.raises(ImageError, match=match):
        api.create_overlay(overlay, images["base.qcow2"], **kwargs)
    assert not os.path.lexists(overlay)
