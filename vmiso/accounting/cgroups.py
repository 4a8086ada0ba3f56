"""Find a VM's cgroups from its QEMU process (cgroup v1, v2 or both) and list the files its
usage is read from. Paths are derived from /proc, never constructed from the domain's name.

The VM's cgroup per hierarchy is the deepest common ancestor of the cgroups of all of QEMU's
threads: libvirt puts the emulator threads in ``…/emulator`` and each vCPU in ``…/vcpuN``
below the VM's own group (``/machine/qemu-<id>-<name>.libvirt-qemu`` here,
``/machine.slice/machine-qemu….scope/libvirt`` under systemd), and reading ``emulator`` alone
would miss the vCPUs' time. A hierarchy in which the VM sits at the root is not the VM's own
(here: v1 cpuacct) and is never read: its numbers would be the whole host's.
"""
import os

from .. import _fast
from ..errors import StatsError

_LIBVIRT_THREAD_GROUPS = ("emulator",)  # a lone emulator group: its parent is the VM's


def mounts(mountinfo="/proc/self/mountinfo"):
    """{controller: mount point} of the cgroup file systems; key "" is the cgroup2 mount."""
    found = {}
    with open(mountinfo, "rb") as f:
        for line in f:
            left, _, right = line.partition(b" - ")
            fields, tail = left.split(), right.split()
            if len(fields) < 5 or len(tail) < 3:
                continue
            point = _unescape(fields[4])
            if tail[0] == b"cgroup2":
                found.setdefault("", point)
            elif tail[0] == b"cgroup":
                for option in tail[2].split(b","):  # super options: rw, then the controllers
                    if option not in (b"rw", b"ro"):
                        found.setdefault(option.decode(), point)
    return found


def _unescape(raw):
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    out, i = bytearray(), 0
    while i < len(raw):
        if raw[i] == 0x5C and i + 4 <= len(raw) and raw[i + 1:i + 4].isdigit():
            out.append(int(raw[i + 1:i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return os.fsdecode(bytes(out))


def _parse(data):
    """{controller: path} from a /proc/<pid>/cgroup file; "" is the cgroup2 hierarchy."""
    found = {}
    for line in data.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        for name in controllers.split(",") if controllers else [""]:
            found[name] = path
    return found


def _common(a, b):
    parts = []
    for x, y in zip(a.strip("/").split("/"), b.strip("/").split("/")):
        if x != y:
            break
        parts.append(x)
    return "/" + "/".join(p for p in parts if p)


def process_cgroups(pid, proc="/proc"):
    """{controller: the VM's cgroup path} for QEMU process ``pid`` (see the module's docstring)."""
    base = f"{proc}/{pid}"
    try:
        with open(f"{base}/cgroup") as f:
            found = _parse(f.read())
    except OSError as err:
        raise StatsError.from_errno(f"{base}/cgroup", err.errno) from err
    try:
        tids = os.listdir(f"{base}/task")
    except OSError:
        tids = []
    for tid in tids:
        try:
            with open(f"{base}/task/{tid}/cgroup") as f:
                theirs = _parse(f.read())
        except OSError:
            continue  # a thread that ended meanwhile
        for name, path in theirs.items():
            if name in found:
                found[name] = _common(found[name], path)
    for name, path in found.items():
        leaf = path.rstrip("/").rsplit("/", 1)[-1]
        if leaf in _LIBVIRT_THREAD_GROUPS:
            found[name] = path.rstrip("/").rsplit("/", 1)[0] or "/"
    return found


def vm_files(pid, mount_points, proc="/proc", overlay=None):
    """(path, kind, slot) of every file the VM's usage is read from (see _fast/stats_py.py)."""
    s = _fast.twin("stats")  # the constants (identical in both implementations)
    groups = process_cgroups(pid, proc)

    def own(controller):
        """The directory of the VM's cgroup in ``controller``'s hierarchy, or None."""
        path, point = groups.get(controller), mount_points.get(controller)
        if not path or path == "/" or point is None:
            return None
        directory = point + path
        return directory if os.path.isdir(directory) else None

    files = [(f"{proc}/{pid}/stat", s.K_PROC_STAT, 0)]
    v2 = own("")
    if v2 and os.path.exists(f"{v2}/cpu.stat"):
        files.append((f"{v2}/cpu.stat", s.K_CPU_KV, 0))
    elif own("cpuacct"):
        files.append((f"{own('cpuacct')}/cpuacct.stat", s.K_CPU_KV, 0))
    limit = s.K_LIMIT  # read at open and on refresh only (see the Collector: update() and LIMITS_TTL)
    cpu = own("cpu")
    if cpu:
        files += [(f"{cpu}/cpu.stat", s.K_CPU_KV, 0),
                  (f"{cpu}/cpu.cfs_quota_us", s.K_INT | limit, s.F_CFS_QUOTA_US),
                  (f"{cpu}/cpu.cfs_period_us", s.K_INT | limit, s.F_CFS_PERIOD_US)]
    elif v2 and os.path.exists(f"{v2}/cpu.max"):
        files.append((f"{v2}/cpu.max", s.K_CPU_MAX | limit, 0))
    memory = own("memory")
    if memory:
        # v1: memory.stat alone has the exact usage (total_rss + total_cache, as the kernel's
        # documentation advises over usage_in_bytes) and the effective hierarchical limit.
        files.append((f"{memory}/memory.stat", s.K_MEM_KV, 0))
    elif v2 and os.path.exists(f"{v2}/memory.current"):
        files += [(f"{v2}/memory.stat", s.K_MEM_KV, 0), (f"{v2}/memory.current", s.K_INT, s.F_MEM_CURRENT),
                  (f"{v2}/memory.max", s.K_INT | limit, s.F_MEM_LIMIT)]
        if os.path.exists(f"{v2}/memory.swap.current"):
            files.append((f"{v2}/memory.swap.current", s.K_INT, s.F_MEM_SWAP_CURRENT))
    if overlay is not None:
        files.append((str(overlay), s.K_FSTAT, s.F_DISK_USED))
    return files
