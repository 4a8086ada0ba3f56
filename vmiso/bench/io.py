"""``vmiso bench io``: data in and out of a task VM, in one run: sequential write and read of one
file through a volume (virtio-9p, virt/volumes.py) beside the same through the VM's own disk
(virtio-blk on its qcow2 overlay), and the task's stdin (virt/stdin.py).

Everything is timed inside the guest, by the guest's clock (busybox ``adjtimex``: microseconds),
around each ``dd`` (1 MiB blocks; writes end with an fsync, so the data has reached the host).
The volume's file to read is written by the host just before; the own disk's is written by the
guest, whose page cache is then dropped: both reads come from the host's page cache, so the two
paths are compared, not the host's disk. stdin: a second VM whose task reads it to the end
(``cat >/dev/null``), fed zeros by the host as fast as the guest takes them.
"""
import os
import shutil
import tempfile

from ..errors import VmisoError

SCRIPT = r"""
t() { adjtimex | sed -n "s/^ *time.tv_sec: *\([0-9]*\)$/$1 \1/p; s/^ *time.tv_usec: *\([0-9]*\)$/$1-us \1/p"; }
t vol_write_0; dd if=/dev/zero of=/vol/written bs=1M count=$1 conv=fsync 2>/dev/null || exit 11; t vol_write_1
t vol_read_0; dd if=/vol/to-read of=/dev/null bs=1M 2>/dev/null || exit 12; t vol_read_1
t disk_write_0; dd if=/dev/zero of=/bench-file bs=1M count=$1 conv=fsync 2>/dev/null || exit 13; t disk_write_1
sync; echo 3 >/proc/sys/vm/drop_caches
t disk_read_0; dd if=/bench-file of=/dev/null bs=1M 2>/dev/null || exit 14; t disk_read_1
"""
STDIN_SCRIPT = "t() { adjtimex | sed -n \"s/^ *time.tv_sec: *\\([0-9]*\\)$/$1 \\1/p; " \
               "s/^ *time.tv_usec: *\\([0-9]*\\)$/$1-us \\1/p\"; }; t stdin_0; cat >/dev/null; t stdin_1"


class Zeros:
    """A file object of ``size`` zero bytes, made as they are read (nothing held whole)."""

    def __init__(self, size, chunk=1 << 20):
        self.left = size
        self.block = bytes(chunk)

    def read(self, n=-1):
        n = self.left if n is None or n < 0 else min(n, self.left)
        n = min(n, len(self.block))
        self.left -= n
        return self.block[:n]


def _stamps(text):
    """{name: seconds} from the guest's "NAME SEC" and "NAME-us USEC" lines."""
    seconds, micros = {}, {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name.endswith("-us"):
            micros[name[:-3]] = int(value)
        elif value.isdigit():
            seconds[name] = int(value)
    return {name: seconds[name] + micros.get(name, 0) / 1e6 for name in seconds}


def _run(iso, container_id, spec):
    """Launch, wait, collect stdout; always destroy. VmisoError unless the task exited 0."""
    iso.launch(container_id, spec)
    try:
        termination = iso.wait(container_id, timeout=900)
        out = b"".join(data for stream, data in iso.output(container_id, follow=False) if stream == "stdout")
        err = b"".join(data for stream, data in iso.output(container_id, follow=False) if stream == "stderr")
    finally:
        iso.destroy(container_id, grace=0)
    if termination.exit_code != 0:
        raise VmisoError(f"bench io: the task ended {termination.state} ({termination.reason}, exit "
                         f"{termination.exit_code}): {err.decode(errors='replace').strip()[-200:]}")
    return _stamps(out.decode(errors="replace"))


def _rate(size, stamps, name):
    seconds = stamps[name + "_1"] - stamps[name + "_0"]
    return seconds, round(size / 1e6 / seconds, 1) if seconds > 0 else None


def run(iso, size_mib=256, mem_mib=512, share_parent="/var/tmp"):
    """Both VMs, one after the other; returns the result object (MB/s = 10^6 bytes a second)."""
    from ..paths import qemu_gid, qemu_uid
    from ..spec import Resources, TaskSpec, Volume
    from ..virt import volumes

    size = size_mib << 20
    share = tempfile.mkdtemp(prefix="vmiso-bench-io-", dir=share_parent)
    try:
        if qemu_uid() is not None and os.geteuid() == 0:
            os.chown(share, qemu_uid(), qemu_gid())  # the operator's grant, for this run's share
        with open(os.path.join(share, "to-read"), "wb") as f:
            for _ in range(size_mib):
                f.write(os.urandom(1 << 20))
        resources = Resources(cpus=1, mem_mib=mem_mib, disk_gib=max(1, 2 * size_mib / 1024))
        suffix = os.urandom(4).hex()
        stamps = _run(iso, f"bench-io-{suffix}", TaskSpec(["sh", "-c", SCRIPT, "bench", str(size_mib)],
                                                           volumes=[Volume(share, "/vol")], resources=resources))
        stamps.update(_run(iso, f"bench-io-stdin-{suffix}", TaskSpec(["sh", "-c", STDIN_SCRIPT], stdin=Zeros(size),
                                                                     resources=resources)))
    finally:
        shutil.rmtree(share, ignore_errors=True)
    result = {"size_mib": size_mib, "accel": iso.accel.name, "mem_mib": mem_mib,
              "volume": {"mechanism": "virtio-9p", "accessmode": "mapped",
                         "mount": "trans=virtio,version=9p2000.L,msize=512000,cache=mmap",
                         "tag_prefix": volumes.TAG_PREFIX}}
    for name in ("vol_write", "vol_read", "disk_write", "disk_read", "stdin"):
        seconds, rate = _rate(size, stamps, name)
        result[name + "_s"] = round(seconds, 4)
        result[name + "_mbps"] = rate
    result["vol_read_vs_disk_read"] = round(result["vol_read_mbps"] / result["disk_read_mbps"], 2)
    result["vol_write_vs_disk_write"] = round(result["vol_write_mbps"] / result["disk_write_mbps"], 2)
    return result


def report(result):
    lines = [f"data in and out, {result['size_mib']} MiB each, one run ({result['accel']}), MB/s (seconds)"]
    for label, name in (("volume write (9p)", "vol_write"), ("volume read (9p)", "vol_read"),
                        ("own disk write", "disk_write"), ("own disk read", "disk_read"),
                        ("stdin (virtio-serial)", "stdin")):
        lines.append(f"  {label:<22} {result[name + '_mbps']:>9} MB/s  ({result[name + '_s']:.3f} s)")
    lines.append(f"  volume read / own disk read:   {result['vol_read_vs_disk_read']}x")
    lines.append(f"  volume write / own disk write: {result['vol_write_vs_disk_write']}x")
    return "\n".join(lines)
