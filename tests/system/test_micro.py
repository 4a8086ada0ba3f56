"""The micro guest: built once per session (reused across runs by its key), booted with plain
qemu-system-x86_64 under TCG, checked against the task contract (docs/guest-contract.md).

No libvirt here on purpose: this proves the image itself; the domain XML is tested elsewhere.
"""
import dataclasses
import json
import os
import secrets
import stat
import subprocess
from pathlib import Path

import pytest

from vmiso._proc import run
from vmiso.image import lean, micro, seed
from vmiso.paths import HostCache

pytestmark = pytest.mark.system

# Outside /tmp so a second session finds the build (and the downloaded packages) again.
WORKDIR = Path(os.environ.get("VMISO_MICRO_TEST_WORKDIR", "/var/tmp/vmiso-test-micro"))
# The lean kernel takes minutes to compile: every work dir shares the host cache's.
CACHE = HostCache()
QBOOT = Path("/usr/share/qemu/qboot.rom")
BOOT_TIMEOUT = 60


@dataclasses.dataclass
class Boot:
    returncode: int
    console: bytes
    stdout: bytes  # the task channel, exit line included
    stderr: bytes
    nonce: str

    def exit_code(self):
        """The code from the trailing exit line, which must be the channel's last bytes."""
        head, sep, tail = self.stdout.rpartition(f"VMISO-{self.nonce} EXIT ".encode())
        assert sep, f"no exit line in {self.stdout!r}; console: {self.console[-2000:]!r}"
        assert tail.endswith(b"\n") and tail[:-1].isdigit(), tail
        return int(tail[:-1])

    def task_stdout(self):
        """The task's own stdout: the channel without the exit line."""
        self.exit_code()
        return self.stdout.rpartition(f"VMISO-{self.nonce} EXIT ".encode())[0]


def build(kernel, progress=lambda message: None):
    return micro.build_micro(WORKDIR, progress=progress, kernel=kernel)


@pytest.fixture(scope="module", params=micro.KERNELS)
def image(request):
    """Every test below runs on each kernel: the lean one (default) and Debian's stock one."""
    return build(request.param)


@pytest.fixture(scope="module")
def stock():
    return build("stock")


def new_overlay(image, path):
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", image.base, "-F", image.base_format, path])
    return path


def qemu_argv(image, overlay, seed_iso, logs):
    argv = [
        "qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-m", "512",
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-kernel", image.kernel, "-append", image.cmdline,
        "-drive", f"file={overlay},if=virtio,format=qcow2",
        "-drive", f"file={seed_iso},if=virtio,format=raw,readonly=on",
    ]
    if image.initrd is not None:
        argv += ["-initrd", image.initrd]
    if QBOOT.exists():
        argv += ["-bios", QBOOT]
    for n, log in enumerate(logs):  # ttyS0 console, ttyS1 task stdout, ttyS2 task stderr
        argv += ["-chardev", f"file,id=serial{n},path={log}", "-serial", f"chardev:serial{n}"]
    return argv


def boot(image, workdir, argv, *, overlay=None, env=None, hostname="micro-test"):
    """Boot once with a task; returns what the three serial ports received."""
    workdir.mkdir(parents=True, exist_ok=True)
    nonce = secrets.token_hex(8)
    files = seed.seed_files(instance_id=f"i-{nonce}", hostname=hostname, argv=argv,
                            env=env or {}, nonce=nonce)
    seed_iso = workdir / f"seed-{nonce}.iso"
    seed_iso.write_bytes(seed.build_iso(files))
    overlay = overlay or new_overlay(image, workdir / f"overlay-{nonce}.qcow2")
    logs = [workdir / f"{name}-{nonce}.log" for name in ("console", "stdout", "stderr")]
    proc = run(qemu_argv(image, overlay, seed_iso, logs), timeout=BOOT_TIMEOUT, check=False)
    console, stdout, stderr = (log.read_bytes() for log in logs)
    assert proc.returncode == 0, (proc.stderr, console[-2000:])
    return Boot(proc.returncode, console, stdout, stderr, nonce)


def test_stdout_stderr_and_exit_code_are_kept_apart(image, tmp_path):
    result = boot(image, tmp_path, ["sh", "-c", "echo out; echo err >&2; exit 7"])
    assert result.exit_code() == 7
    assert result.task_stdout() == b"out\n"
    assert result.stderr == b"err\n"
    assert b"VMISO-USERSPACE" in result.console


def test_argv_is_byte_exact(image, tmp_path):
    args = ["a b", "$(id)", "it's", "ü", '"q"']
    result = boot(image, tmp_path, ["printf", "%s|", *args])
    assert result.exit_code() == 0
    assert result.task_stdout() == "a b|$(id)|it's|ü|\"q\"|".encode()


def test_env_hostname_and_root(image, tmp_path):
    script = 'printf "%s\\n" "$GREETING" "$(hostname)" "$(id -u)" "$(pwd)"'
    result = boot(image, tmp_path, ["sh", "-c", script], env={"GREETING": "hello world"},
                  hostname="task-42")
    assert result.exit_code() == 0
    assert result.task_stdout() == b"hello world\ntask-42\n0\n/\n"


def test_disk_is_isolated_per_overlay(image, tmp_path):
    touch = ["sh", "-c", "ls /root/marker 2>/dev/null; touch /root/marker"]
    probe = ["sh", "-c", "ls /root/marker"]
    overlay = new_overlay(image, tmp_path / "kept.qcow2")
    first = boot(image, tmp_path, touch, overlay=overlay)
    assert (first.exit_code(), first.task_stdout()) == (0, b"")
    fresh = boot(image, tmp_path, probe)
    assert fresh.exit_code() != 0, "a fresh overlay saw another boot's file"
    again = boot(image, tmp_path, probe, overlay=overlay)
    assert (again.exit_code(), again.task_stdout()) == (0, b"/root/marker\n")


def test_build_is_content_addressed_and_cached(image):
    cache = CACHE.debs

    def snapshot():
        return sorted((e.name, e.stat().st_ino, e.stat().st_mtime_ns) for e in os.scandir(cache))

    before, image_dir = snapshot(), image.kernel.parent
    dir_mtime = image_dir.stat().st_mtime_ns
    messages = []
    again = build(image.kernel_flavour, progress=messages.append)
    assert again == image
    assert messages == [], "a second build downloaded or rebuilt something"
    assert snapshot() == before
    assert image_dir.stat().st_mtime_ns == dir_mtime
    assert micro.find_micro(WORKDIR, image.kernel_flavour) == image
    assert micro.find_micro(WORKDIR) == image, "the newest build is what 'micro' boots"
    assert image.key == image_dir.name and len(image.key) == 64


def test_image_files_are_read_only_and_reachable_for_qemu(image):
    for path in (image.kernel, image.base, *([image.initrd] if image.initrd else [])):
        assert stat.S_IMODE(path.stat().st_mode) == 0o444
    for directory in (WORKDIR / "images", WORKDIR / "images" / "micro", image.kernel.parent):
        assert stat.S_IMODE(directory.stat().st_mode) & 0o005 == 0o005
    info = run(["qemu-img", "info", "--output=json", image.base]).stdout
    assert '"format": "qcow2"' in info and f'"virtual-size": {image.virtual_size}' in info


# -- the initramfs, without a VM -----------------------------------------------------------

def read_newc(data):
    """name -> (mode, rdev, data) of a newc cpio, plus the names in archive order."""
    entries, order, pos = {}, [], 0
    while True:
        assert data[pos:pos + 6] == b"070701", f"bad cpio magic at {pos}"
        fields = [int(data[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rmajor, rminor, namesize = fields[1], fields[6], fields[9], fields[10], fields[11]
        name = data[pos + 110:pos + 110 + namesize - 1].decode()
        start = pos + 110 + namesize
        start += -start % 4
        if name == "TRAILER!!!":
            return entries, order
        entries[name] = (mode, (rmajor, rminor), data[start:start + size])
        order.append(name)
        pos = start + size + (-size % 4)


def test_initramfs_holds_init_and_modules_in_load_order(stock, tmp_path):
    entries, order = read_newc(stock.initrd.read_bytes())
    mode, _, init = entries["init"]
    assert stat.S_ISREG(mode) and mode & 0o111 and init.startswith(b"#!/bin/busybox sh")
    assert stat.S_ISREG(entries["bin/busybox"][0])
    mode, rdev, _ = entries["dev/console"]
    assert stat.S_ISCHR(mode) and rdev == (5, 1)
    listed = entries["lib/modules/order"][2].decode().split()
    assert listed == list(micro.MODULES)
    archived = [n[len("lib/modules/"):-3] for n in order if n.endswith(".ko")]
    assert archived == listed
    loaded = set()
    for name in listed:  # every module after the ones it depends on
        ko = tmp_path / f"{name}.ko"
        ko.write_bytes(entries[f"lib/modules/{name}.ko"][2])
        depends = run(["modinfo", "-F", "depends", ko]).stdout.strip()
        assert set(filter(None, depends.split(","))) <= loaded, (name, depends)
        loaded.add(name)


def test_broken_seed_powers_off_with_a_reason(image, tmp_path):
    """No wrapper on the seed: /sbin/init says why on the console and QEMU exits by itself."""
    seed_iso = tmp_path / "empty-seed.iso"
    seed_iso.write_bytes(seed.build_iso({"meta-data": seed.meta_data("i-x", "x")}))
    logs = [tmp_path / name for name in ("console", "stdout", "stderr")]
    proc = run(qemu_argv(image, new_overlay(image, tmp_path / "o.qcow2"), seed_iso, logs),
               timeout=BOOT_TIMEOUT, check=False)
    assert proc.returncode == 0
    assert b"vmiso-init: the seed has no vmiso/task.sh" in logs[0].read_bytes()
    assert logs[1].read_bytes() == b""


def test_lean_kernel_boots_the_root_itself_and_is_cached(tmp_path):
    """The lean kernel: no initramfs, vmiso's release name, its full config kept beside it with
    every option of the fragment in force, and a second build compiles nothing."""
    image = build("lean")
    assert image.initrd is None and image.kernel_flavour == "lean"
    assert image.kernel_version.endswith("-vmiso-lean")
    result = boot(image, tmp_path, ["sh", "-c", "uname -r; cat /proc/cmdline"])
    assert result.exit_code() == 0
    release, cmdline = result.task_stdout().decode().splitlines()
    assert release == image.kernel_version
    assert "root=/dev/vda" in cmdline and "rdinit" not in cmdline
    manifest = json.loads((image.kernel.parent / "manifest.json").read_text())
    kept = CACHE.kernels / manifest["lean_kernel"]
    assert lean.missing_options((kept / "config").read_text(), lean.fragment().decode()) == []
    # The image boots the cached kernel without its symbol table (QEMU would sort it at each start).
    def elf(option, path):
        return subprocess.run(["readelf", "-W", option, path], capture_output=True, text=True, check=True).stdout
    assert elf("-l", kept / "vmlinux") == elf("-l", image.kernel)  # the same segments, loaded the same
    assert ".symtab" in elf("-S", kept / "vmlinux") and ".symtab" not in elf("-S", image.kernel)
    messages = []
    assert build("lean", progress=messages.append) == image
    assert not [m for m in messages if m.startswith("kernel:")], messages
