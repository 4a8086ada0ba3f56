"""Usage collection benchmark: the Cython batch reader, its pure-Python twin, a psutil-based
collector and (for live VMs) libvirt's getAllDomainStats, in one run. Medians, µs per VM.

Thousands of VMs do not fit on a test machine, so ``make_tree`` writes what the kernel would
show for N VMs, in its formats (cgroup v1 + v2 hybrid as on these hosts, or pure v2): /proc
(stat, cgroup of each thread, mountinfo, net/dev) and the cgroup files, on tmpfs. Every reader
reads the same files; the psutil collector is pointed at the same /proc (psutil.PROCFS_PATH).

``cython_us_per_vm``/``python_us_per_vm`` are one read_batch, which reads the counters; the
limits (CFS quota, memory.max) are read when a VM is opened and re-read by the Collector once
per LIMITS_TTL (accounting/usage.py), which ``*_refresh_us_per_vm`` measures: polled every
second, a VM costs the read plus refresh / LIMITS_TTL. The psutil collector reads every file on
every poll, limits included, as such a collector would.
"""
import collections
import os
import shutil
import statistics
import tempfile
import time

from .. import _fast
from ..accounting import cgroups
from ..accounting.usage import Collector, Target, ensure_fd_room

STAT = ("{pid} (qemu-system-x86) S 1 {pid} {pid} 0 -1 138412352 52011 0 0 0 {utime} {stime} 0 0 20 0 "
        "{threads} 0 123456 2612129792 {rss} 18446744073709551615 1 1 0 0 0 0 268444224 4096 25155 0 0 0 "
        "17 1 0 0 0 0 0 0 0 0 0 0 0 0 0\n")
STATM = "{size} {rss} 18729 3124 0 60412 0\n"
STATUS = """Name:\tqemu-system-x86
Umask:\t0077
State:\tS (sleeping)
Tgid:\t{pid}
Ngid:\t0
Pid:\t{pid}
PPid:\t1
TracerPid:\t0
Uid:\t64055\t64055\t64055\t64055
Gid:\t993\t993\t993\t993
FDSize:\t64
Groups:\t993
VmPeak:\t 2612128 kB
VmSize:\t 2612128 kB
VmLck:\t       0 kB
VmRSS:\t  238696 kB
RssAnon:\t  163840 kB
RssFile:\t   74856 kB
RssShmem:\t       0 kB
VmSwap:\t       0 kB
Threads:\t{threads}
voluntary_ctxt_switches:\t1153
nonvoluntary_ctxt_switches:\t35
"""
MEM_STAT_V1 = """cache {cache}
rss {rss}
rss_huge 142606336
shmem 0
mapped_file 0
dirty 0
writeback 0
swap 0
pgpgin 10682
pgpgout 5016
pgfault 11194
pgmajfault 0
inactive_anon {anon}
active_anon 4096
inactive_file {file}
active_file 4096
unevictable 0
hierarchical_memory_limit {limit}
hierarchical_memsw_limit 9223372036854771712
total_cache {cache}
total_rss {rss}
total_rss_huge 142606336
total_shmem 0
total_mapped_file 0
total_dirty 0
total_writeback 0
total_swap 0
total_pgpgin 10682
total_pgpgout 5016
total_pgfault 11194
total_pgmajfault 0
total_inactive_anon {anon}
total_active_anon 4096
total_inactive_file {file}
total_active_file 4096
total_unevictable 0
"""
MEM_STAT_V2 = """anon {anon}
file {file}
kernel 4210688
kernel_stack 98304
pagetables 819200
sec_pagetables 0
percpu 720
sock 0
vmalloc 0
shmem 0
zswap 0
zswapped 0
file_mapped 0
file_dirty 0
file_writeback 0
swapcached 0
anon_thp 142606336
file_thp 0
shmem_thp 0
inactive_anon {anon}
active_anon 4096
inactive_file {file}
active_file 4096
unevictable 0
slab_reclaimable 376832
slab_unreclaimable 592720
slab 969552
workingset_refault_anon 0
workingset_refault_file 0
pgfault 11194
pgmajfault 0
thp_fault_alloc 68
"""
CPU_STAT_V1 = ("nr_periods {periods}\nnr_throttled {throttled}\nthrottled_time {throttled_ns}\n"
               "nr_bursts 0\nburst_time 0\n")
CPU_STAT_V2 = "usage_usec {usage}\nuser_usec {user}\nsystem_usec {system}\nnice_usec 0\n"
CPU_STAT_V2_CPU = ("nr_periods {periods}\nnr_throttled {throttled}\nthrottled_usec {throttled_us}\n"
                   "nr_bursts 0\nburst_usec 0\n")
NET_HEAD = ("Inter-|   Receive                                                |  Transmit\n"
            " face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo "
            "colls carrier compressed\n")
NET_LINE = ("{name:>6}: {rb:>8} {rp:>7} {re:>4} {rd:>4}    0     0          0         0 "
            "{tb:>8} {tp:>7} {te:>4} {td:>4}    0     0       0          0\n")
BASE_PID = 40000


def _write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def values(i):
    """Distinct, recognisable counters of generated VM ``i`` (tests check them)."""
    return {"utime": 1000 + i, "stime": 200 + i, "threads": 5 + i % 3, "rss": 40000 + i,
            "usage": 12_000_000 + i, "user": 10_000_000 + i, "system": 2_000_000 + i,
            "periods": 50 + i, "throttled": 7 + i, "throttled_ns": 3_000_000 + i, "throttled_us": 3000 + i,
            "quota": 50000, "period": 100000, "cache": 258048 + 4096 * i, "anon": 165396480 + 4096 * i,
            "file": 253952 + 4096 * i, "limit": 515899392 + 4096 * i, "rb": 1000 + i, "rp": 10 + i,
            "re": i % 2, "rd": i % 5, "tb": 5000 + i, "tp": 50 + i, "te": 0, "td": 1,
            "rss_cg": 165400576 + 4096 * i, "current": 170741760 + 4096 * i}


def make_tree(root, n, layout="hybrid"):
    """Write N VMs' /proc and cgroup files under ``root`` in the kernel's formats; return their
    Targets. ``layout``: "hybrid" (v1 controllers + cgroup2 at unified/, as here) or "v2"."""
    proc, cg = f"{root}/proc", f"{root}/sys/fs/cgroup"
    if layout == "hybrid":
        mounts = [(f"{cg}/{c}", "cgroup", f"rw,{c}") for c in ("cpu", "cpuacct", "memory", "blkio")]
        mounts.append((f"{cg}/unified", "cgroup2", "rw"))
    else:
        mounts = [(cg, "cgroup2", "rw,nsdelegate")]
    _write(f"{proc}/self/mountinfo", "".join(
        f"{30 + k} 23 0:{28 + k} / {point.replace(' ', chr(92) + '040')} rw,relatime - {fs} {fs} {opts}\n"
        for k, (point, fs, opts) in enumerate(mounts)))
    net = [NET_LINE.format(name="lo", rb=1, rp=1, re=0, rd=0, tb=1, tp=1, te=0, td=0)]
    targets = []
    for i in range(n):
        pid, v = BASE_PID + i, values(i)
        group = f"/machine/qemu-{i + 1}-vmiso-vm{i}.libvirt-qemu"
        _write(f"{proc}/{pid}/stat", STAT.format(pid=pid, **v))
        _write(f"{proc}/{pid}/statm", STATM.format(size=637726, **v))  # psutil reads these two
        _write(f"{proc}/{pid}/status", STATUS.format(pid=pid, **v))
        if layout == "hybrid":
            lines = "0::{g}/{t}\n4:memory:{g}\n3:cpuacct:/\n1:cpu:{g}/{t}\n"
            cpu, mem, v2 = f"{cg}/cpu{group}", f"{cg}/memory{group}", f"{cg}/unified{group}"
            _write(f"{cpu}/cpu.stat", CPU_STAT_V1.format(**v))
            _write(f"{cpu}/cpu.cfs_quota_us", f"{v['quota']}\n")
            _write(f"{cpu}/cpu.cfs_period_us", f"{v['period']}\n")
            _write(f"{mem}/memory.stat", MEM_STAT_V1.format(**{**v, "rss": v["rss_cg"]}))
            _write(f"{v2}/cpu.stat", CPU_STAT_V2.format(**v))
        else:
            lines = "0::{g}/{t}\n"
            v2 = f"{cg}{group}"
            _write(f"{v2}/cpu.stat", CPU_STAT_V2.format(**v) + CPU_STAT_V2_CPU.format(**v))
            _write(f"{v2}/cpu.max", f"{v['quota']} {v['period']}\n")
            _write(f"{v2}/memory.stat", MEM_STAT_V2.format(**v))
            _write(f"{v2}/memory.current", f"{v['current']}\n")
            _write(f"{v2}/memory.max", f"{v['limit']}\n")
            _write(f"{v2}/memory.swap.current", "0\n")
        for sub in ("emulator", "vcpu0"):
            os.makedirs(f"{v2}/{sub}", exist_ok=True)
            if layout == "hybrid":
                os.makedirs(f"{cpu}/{sub}", exist_ok=True)
        _write(f"{proc}/{pid}/cgroup", lines.format(g=group, t="emulator"))
        _write(f"{proc}/{pid}/task/{pid}/cgroup", lines.format(g=group, t="emulator"))
        _write(f"{proc}/{pid}/task/{pid + 100000}/cgroup", lines.format(g=group, t="vcpu0"))
        overlay = f"{root}/overlays/vm{i}.qcow2"
        _write(overlay, "x" * (4096 * (1 + i % 4)))
        tap = f"vmt{i:06d}"
        net.append(NET_LINE.format(name=tap, **v))
        targets.append(Target(key=f"vm{i}", pid=pid, overlay=overlay, tap=tap, cpus=1.0,
                              disk_limit=10 << 30))
    _write(f"{proc}/net/dev", NET_HEAD + "".join(net))
    return targets


def _median_us(action, rounds):
    samples = []
    for _ in range(rounds):
        start = time.perf_counter_ns()
        action()
        samples.append(time.perf_counter_ns() - start)
    return statistics.median(samples) / 1000


Reader = collections.namedtuple("Reader", "read refresh close")


def batch_reader(module, targets, proc):
    """A Reader of every target's kept files with ``module``: ``read()`` is one read_batch,
    ``refresh()`` re-reads every VM's limits (what the Collector does once per LIMITS_TTL)."""
    import array

    mount_points = cgroups.mounts(f"{proc}/self/mountinfo")
    vms = [module.VM(t.key, cgroups.vm_files(t.pid, mount_points, proc, t.overlay), tap=t.tap) for t in targets]
    out = array.array("q", bytes(8 * module.NFIELDS * len(vms)))
    net_fd = os.open(f"{proc}/net/dev", os.O_RDONLY | os.O_CLOEXEC)

    def refresh():
        for vm in vms:
            vm.refresh_limits()

    def close():
        for vm in vms:
            vm.close()
        os.close(net_fd)

    return Reader(lambda: module.read_batch(vms, out, net_fd), refresh, close)


def floor_reader(targets, proc):
    """A Reader making only the system calls read_batch makes (_fast/floors.pyx): one pread
    per counter file, one fstat per overlay, /proc/net/dev once; limits are refresh()'s, left out."""
    from .._fast import layout

    floors = _fast.load("floors")
    mount_points = cgroups.mounts(f"{proc}/self/mountinfo")
    files = [(path, kind) for t in targets
             for path, kind, _slot in cgroups.vm_files(t.pid, mount_points, proc, t.overlay)
             if not kind & layout.K_LIMIT]
    ensure_fd_room(len(os.listdir("/proc/self/fd")) + len(files))  # beside the readers' own kept files
    counters, overlays = [], []
    for path, kind in files:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        (overlays if kind == layout.K_FSTAT else counters).append(fd)
    net_fd = os.open(f"{proc}/net/dev", os.O_RDONLY | os.O_CLOEXEC)
    reader = floors.UsageFiles(counters, overlays, net_fd)

    def close():
        for fd in counters + overlays + [net_fd]:
            os.close(fd)

    return Reader(reader.read, lambda: None, close)


def psutil_collector(targets, proc):
    """The usual Python way: psutil for the process, open/read/close for the cgroup files,
    psutil.net_io_counters for the taps. Returns a no-argument callable doing one poll."""
    import psutil

    if proc != "/proc":
        psutil.PROCFS_PATH = proc
    mount_points = cgroups.mounts(f"{proc}/self/mountinfo")
    per_vm = []
    for t in targets:
        files = [path for path, _, _ in cgroups.vm_files(t.pid, mount_points, proc)
                 if not path.startswith(f"{proc}/")]  # psutil reads /proc itself
        per_vm.append((t, psutil.Process(t.pid), files))

    def poll():
        nics = psutil.net_io_counters(pernic=True)
        result = {}
        for t, p, files in per_vm:
            with p.oneshot():
                record = {"cpu": p.cpu_times(), "mem": p.memory_info(), "threads": p.num_threads()}
            for path in files:
                with open(path) as f:
                    record[path] = [line.split() for line in f.read().splitlines()]
            record["disk"] = os.stat(t.overlay).st_blocks * 512 if t.overlay else None
            record["net"] = nics.get(t.tap)
            result[t.key] = record
        return result

    return poll


def scratch_dir():
    parent = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    return tempfile.mkdtemp(prefix="vmiso-bench-usage-", dir=parent)


def _interleaved(readers, rounds):
    """{name: [ns, ...]}: each reader's read(), in turn, ``rounds`` times (every reader sees the
    same noise from the rest of the machine)."""
    samples = {name: [] for name in readers}
    for _ in range(rounds):
        for name, reader in readers.items():
            start = time.perf_counter_ns()
            reader.read()
            samples[name].append(time.perf_counter_ns() - start)
    return samples


def run_generated(n, layout="hybrid", rounds=None):
    """Medians (µs per VM) of each reader over N generated VMs."""
    rounds = rounds or max(40, min(200, 20000 // max(n, 1)))
    root = scratch_dir()
    try:
        targets = make_tree(root, n, layout)
        proc = f"{root}/proc"
        compiled = _fast.load("stats")
        compiled = None if compiled is _fast.twin("stats") else compiled
        result = {"vms": n, "layout": layout, "rounds": rounds}
        modules = {"cython": compiled, "python": _fast.twin("stats")}
        readers = {}
        try:
            for name, module in modules.items():
                if module is not None:
                    readers[name] = batch_reader(module, targets, proc)
                    readers[name].read()  # warm
            samples = _interleaved(readers, rounds)
            refresh = {name: _median_us(reader.refresh, max(3, rounds // 4)) / n for name, reader in readers.items()}
            # The floor against the best reader, again interleaved; the other reader is closed
            # first: three sets of kept files can pass the hard limit on open files.
            best = "cython" if "cython" in readers else "python"
            for name in [name for name in readers if name != best]:
                readers.pop(name).close()
            readers["floor"] = floor_reader(targets, proc)
            readers["floor"].read()
            against_floor = _interleaved(readers, rounds)
        finally:
            for reader in readers.values():
                reader.close()
        for name in modules:
            result[f"{name}_us_per_vm"] = statistics.median(samples[name]) / 1000 / n if name in samples else None
            result[f"{name}_refresh_us_per_vm"] = refresh.get(name)
        result["floor_us_per_vm"] = statistics.median(against_floor["floor"]) / 1000 / n
        result["floor_ratio"] = statistics.median(against_floor[best]) / statistics.median(against_floor["floor"])
        result["floor_implementation"] = _fast.implementation("floors")
        collector = Collector(proc=proc)
        try:
            collector.read(targets)
            result["usage_all_us_per_vm"] = _median_us(lambda: collector.read(targets), rounds) / n
        finally:
            collector.close()
        poll = psutil_collector(targets, proc)
        poll()
        result["psutil_us_per_vm"] = _median_us(poll, max(3, rounds // 4)) / n
        return result
    finally:
        import psutil

        psutil.PROCFS_PATH = "/proc"
        shutil.rmtree(root, ignore_errors=True)


def run_live(iso, container_ids, rounds=50):
    """Medians (µs per VM) on running VMs: Cython, twin, psutil and libvirt getAllDomainStats."""
    targets = [iso.accounting.target(iso.supervisor.get(cid)) for cid in container_ids]
    n = len(targets)
    result = {"live_vms": n}
    compiled = _fast.load("stats")
    for name, module in (("cython", None if compiled is _fast.twin("stats") else compiled),
                         ("python", _fast.twin("stats"))):
        if module is None:
            result[f"live_{name}_us_per_vm"] = None
            continue
        reader = batch_reader(module, targets, "/proc")
        try:
            reader.read()
            result[f"live_{name}_us_per_vm"] = _median_us(reader.read, rounds) / n
        finally:
            reader.close()
    poll = psutil_collector(targets, "/proc")
    poll()
    result["live_psutil_us_per_vm"] = _median_us(poll, rounds) / n
    doms = [iso.host.lookup(iso.supervisor.get(cid).domain) for cid in container_ids]
    iso.host.all_stats(doms)
    result["libvirt_us_per_vm"] = _median_us(lambda: iso.host.all_stats(doms), rounds) / n
    return result


def run(vms=1000, layout="hybrid", live=0, workdir=None):
    """The benchmark object `vmiso bench usage --json` prints (see the module's docstring)."""
    result = run_generated(vms, layout)
    result["libvirt_us_per_vm"] = None
    result["implementation"] = _fast.implementation("stats")
    if live:
        result.update(_with_live_vms(live, workdir))
    best = result["cython_us_per_vm"] or result["python_us_per_vm"]
    result["speedup_vs_python"] = result["python_us_per_vm"] / best
    result["speedup_vs_psutil"] = result["psutil_us_per_vm"] / best
    return result


def _with_live_vms(count, workdir=None):
    """Boot ``count`` idle micro VMs, measure them, destroy them."""
    import secrets

    from ..isolator import Isolator
    from ..spec import Resources, TaskSpec

    iso = Isolator(**({"workdir": workdir} if workdir else {}), agent_id="vmiso-bench")
    ids = [f"bench-usage-{secrets.token_hex(3)}-{i}" for i in range(count)]
    try:
        for cid in ids:
            iso.launch(cid, TaskSpec(["sleep", "600"], resources=Resources(cpus=1, mem_mib=128)))
        time.sleep(1.0)
        return run_live(iso, ids)
    finally:
        for cid in ids:
            try:
                iso.destroy(cid, grace=0)
            except Exception:  # noqa: BLE001 - best effort cleanup of benchmark VMs
                pass
        iso.host.close()
