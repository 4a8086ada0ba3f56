"""The baseline vmiso replaces: the 2016 Mesos "Qemu/KVM containerizer" prototype's launch path
(MESOS-2717), on the same micro kernel (initrd, for the stock one) and kernel command line, for
the same task.

What the prototype did, step by step: a whole-disk copy of the base per task (here a 1 GiB raw
image made once from micro's root and cached in ``<workdir>/cache/bench/``); the seed ISO built
by an external tool (``genisoimage``); a persistent domain, ``defineXML`` + ``create``, with
libvirt's defaults (machine ``pc``, SeaBIOS); and, since it had no other signal, the task's end
is its completion line seen by polling the console log. Then destroy, undefine, delete the copy
(measured, but not counted in its end-to-end time: the prototype never cleaned up).
"""
import os
import shutil
import time
import uuid

from .._proc import run as run_command
from ..image import seed
from ..paths import CONSOLE_LOG, STDERR, STDOUT, Workdir, qemu_gid
from ..virt import domain
from .marks import EXIT_LINE, MarkWatcher

BASE_SIZE = 1 << 30
POLL_S = 0.1            # how often the prototype path looks at the console log for the end
TIMEOUT_S = 180.0
DOMAIN_PREFIX = "vmisobench-"  # not "vmiso-": recover() of any agent must never consider these
# The milestones of one prototype launch, in order (time.monotonic() each).
MARKS = ("copy", "seed", "define", "started", "console", "userspace", "task_start", "completion", "cleaned")


def base_image(workdir, micro, progress=lambda _line: None):
    """The cached 1 GiB raw base for ``micro`` (a MicroImage), fully allocated so that a copy
    really copies a gigabyte, as a whole-disk copy of a real image does."""
    cache = str(Workdir.of(workdir).bench_cache)
    os.makedirs(cache, exist_ok=True)
    path = os.path.join(cache, f"prototype-{micro.key[:16]}-1g.raw")
    if os.path.exists(path):
        return path
    progress(f"baseline: making the 1 GiB base {path}")
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        run_command(["qemu-img", "convert", "-q", "-f", "qcow2", "-O", "raw", "-S", "0",
                     str(micro.base), tmp], timeout=600)
        if os.path.getsize(tmp) < BASE_SIZE:  # micro's root is 1 GiB already
            run_command(["qemu-img", "resize", "-q", "-f", "raw", "--preallocation=full", tmp,
                         str(BASE_SIZE)], timeout=600)
        os.replace(tmp, path)
        for name in os.listdir(cache):  # one gigabyte a micro build is enough: drop older ones
            if name.startswith("prototype-") and name.endswith("-1g.raw") and name != os.path.basename(path):
                os.unlink(os.path.join(cache, name))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _task_dir(workdir, name):
    parent = str(Workdir.of(workdir).bench_tasks)
    gid = qemu_gid()
    os.makedirs(parent, mode=0o710, exist_ok=True)
    path = os.path.join(parent, name)
    os.mkdir(path, 0o710)
    for p in (parent, path):
        if gid is not None:
            os.chown(p, -1, gid)
    return parent, path


def _genisoimage(directory, files, out):
    src = os.path.join(directory, "seed")
    for name, data in files.items():
        path = os.path.join(src, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    run_command(["genisoimage", "-quiet", "-output", out, "-volid", "cidata", "-joliet", "-rock", src],
                timeout=60)
    shutil.rmtree(src)


def _completion(stdout_path):
    """True once the task's completion line is in the log (read whole: the prototype had no
    offsets either)."""
    try:
        with open(stdout_path, "rb") as f:
            return EXIT_LINE.search(f.read()) is not None
    except OSError:
        return False


def once(conn, workdir, base, boot, accel, command, mem_mib=256):
    """One task the prototype's way (``boot``: kernel, initrd, cmdline). Returns
    {mark: time.monotonic()} with "start" and MARKS (console, userspace, task_start only when
    seen), and "ok"."""
    name = uuid.uuid4().hex[:12]
    parent, directory = _task_dir(workdir, name)
    watcher = MarkWatcher(parent, name)
    marks = {"start": time.monotonic()}
    watcher.start()
    watcher.ready.wait()
    dom = None
    ok = False
    try:
        disk = os.path.join(directory, "disk.raw")
        run_command(["cp", base, disk], timeout=600)
        os.chown(disk, -1, qemu_gid() or -1)
        marks["copy"] = time.monotonic()
        iso = os.path.join(directory, "seed.iso")
        files = seed.seed_files(instance_id=name, hostname="prototype", argv=command, env={},
                                nonce=uuid.uuid4().hex)
        _genisoimage(directory, files, iso)
        marks["seed"] = time.monotonic()
        logs = tuple(os.path.join(directory, n) for n in (CONSOLE_LOG, STDOUT, STDERR))
        config = domain.DomainConfig(
            name=DOMAIN_PREFIX + name, uuid=str(uuid.uuid4()), domain_type=accel.domain_type, vcpus=1,
            memory_mib=mem_mib, serial_logs=logs, machine="pc",
            disks=(domain.Disk(disk, "vda", "raw"), domain.Disk(iso, "vdb", "raw", readonly=True)),
            kernel=str(boot.kernel), initrd=str(boot.initrd) if boot.initrd else None, cmdline=boot.cmdline,
        )
        dom = conn.defineXML(config.to_xml())
        marks["define"] = time.monotonic()
        dom.create()
        marks["started"] = time.monotonic()
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            if _completion(logs[1]):
                marks["completion"] = time.monotonic()
                ok = True
                break
            time.sleep(POLL_S)
    finally:
        if dom is not None:
            try:
                if dom.isActive():
                    dom.destroy()
            except Exception:  # noqa: BLE001 - it may have powered off meanwhile
                pass
            dom.undefine()
        shutil.rmtree(directory, ignore_errors=True)
        marks["cleaned"] = time.monotonic()
        watcher.stop()
    marks.update({k: v for k, v in watcher.marks.items() if k != "task_exit"})
    marks["ok"] = ok
    return marks


def remove_leftovers(conn):
    """Undefine prototype domains a killed benchmark left behind."""
    for dom in conn.listAllDomains():
        if dom.name().startswith(DOMAIN_PREFIX):
            try:
                if dom.isActive():
                    dom.destroy()
                dom.undefine()
            except Exception:  # noqa: BLE001 - best effort
                pass

