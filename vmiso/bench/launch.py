"""Launch latency: N launches of a command (``true``) on micro, or in a container image, through
the real Isolator, phase by phase, with the Mesos-prototype path (bench/baseline.py) for the same
task in the same run (micro only: the prototype had no container images).

Each vmiso launch records, as time.monotonic() stamps: the Isolator's own steps (its
``timeline()``), what the guest prints (bench/marks.py: first console byte, VMISO-USERSPACE,
VMISO-TASK-START, the exit line on the task channel), the VM gone (libvirt's stopped event) and
destroy() returning. Sequential runs alternate vmiso and the prototype so machine noise hits both;
``concurrency`` > 1 runs that many at once (vmiso first, then the prototype) and reports the
throughput. Results: medians and p90s per phase and end to end, and every launch's marks in ms.
"""
import os
import secrets
import statistics
import subprocess
import sys
import threading
import time

from ..errors import InvalidSpec, NotFound
from ..image import micro as micro_mod
from ..image import resolve
from ..spec import NetworkSpec, Resources, TaskSpec
from . import baseline as prototype
from .marks import MarkWatcher, ProcessExit

WAIT_TIMEOUT_S = 180.0
PID_DIR = "/run/libvirt/qemu"  # libvirt's pid files, <domain>.pid
# (mark, phase that ends at it, label), in critical-path order. A phase lasts from the previous
# mark present in a launch to its own mark.
VMISO_MARKS = (
    ("launch:image", "image", "spec validated, image resolved"),
    ("launch:dir", "dir", "container directory"),
    ("launch:checkpoint", "checkpoint", "launching checkpoint"),
    ("launch:overlay", "overlay", "qcow2 overlay"),
    ("launch:seed", "seed", "seed ISO"),
    ("launch:network", "network", "network"),
    ("launch:xml", "xml", "domain XML (host preparation ends)"),
    ("launch:create", "create", "createXML returned"),
    ("console", "console", "first console byte"),
    ("userspace", "userspace", "guest userspace"),
    ("task_start", "task_start", "task started"),
    ("task_exit", "task_exit", "task exited (exit line)"),
    ("qemu_exit", "qemu_exit", "QEMU exited (guest powered off)"),
    ("vm:status", "status", "exit status known (wait() returns)"),
    ("vm:stopped", "vm_gone", "VM gone (libvirt's stopped event)"),
    ("cleaned", "cleanup", "cleaned up (destroy returned)"),
)
# A warm launch (a pool VM, booted before the launch: vmiso/pool.py): its console's boot marks
# are from before the launch and are left out.
WARM_MARKS = (
    ("launch:image", "image", "spec validated, image resolved"),
    ("launch:claim", "claim", "pool VM claimed, checkpoint, metadata"),
    ("launch:dir", "dir", "directory renamed to the container's"),
    ("launch:network", "network", "NIC leased, wired, hot-plugged"),
    ("launch:running", "running", "task's seed files sent (claim port)"),
    ("task_start", "task_start", "task started"),
    ("task_exit", "task_exit", "task exited (exit line)"),
    ("qemu_exit", "qemu_exit", "QEMU exited (guest powered off)"),
    ("vm:status", "status", "exit status known (wait() returns)"),
    ("vm:stopped", "vm_gone", "VM gone (libvirt's stopped event)"),
    ("cleaned", "cleanup", "cleaned up (destroy returned)"),
)
BASELINE_MARKS = (
    ("copy", "copy", "whole-disk copy (cp, 1 GiB)"),
    ("seed", "seed", "seed ISO (genisoimage)"),
    ("define", "define", "defineXML (persistent)"),
    ("started", "create", "create returned"),
    ("console", "console", "first console byte"),
    ("userspace", "userspace", "guest userspace"),
    ("task_start", "task_start", "task started"),
    ("completion", "completion", "completion line seen (polled)"),
    ("cleaned", "cleanup", "destroy, undefine, delete (not counted)"),
)


def vmiso_once(iso, command, mem_mib=256, image="micro", warm=False, network=None):
    """One launch through ``iso`` (an Isolator); {mark: ms since launch start}, plus "ok".
    ``warm``: the launch must take a VM from ``iso``'s pool (it waits, untimed, for one).
    ``network``: a bridge to give the task a NIC on."""
    cid = ("warm-" if warm else "bench-") + secrets.token_hex(4)
    watcher = MarkWatcher(iso.workdir.containers, cid, pidfile=f"{PID_DIR}/vmiso-{cid}.pid")
    watcher.start()
    watcher.ready.wait()
    spec = TaskSpec(command=command, resources=Resources(mem_mib=mem_mib), image=image,
                    network=NetworkSpec(network) if network else None)
    timeline, ok, qemu = {}, False, None
    try:
        status = iso.launch(cid, spec)
        qemu = ProcessExit(f"{PID_DIR}/{status.domain}.pid")  # a warm VM keeps its pool domain's name
        qemu.start()
        termination = iso.wait(cid, timeout=WAIT_TIMEOUT_S)
        ok = termination.exit_code is not None
    finally:
        iso.destroy(cid, grace=0)
        cleaned = time.monotonic()
        try:
            timeline = iso.timeline(cid)
        except NotFound:  # the launch failed: nothing was made
            timeline = {}
        watcher.stop()
        if qemu is not None:
            qemu.join(5)
    marks = {**timeline, **watcher.marks, "cleaned": cleaned}
    if qemu is not None and qemu.when is not None:
        marks["qemu_exit"] = qemu.when
    if warm:
        for boot_mark in ("console", "userspace"):
            marks.pop(boot_mark, None)
        ok = ok and "launch:claim" in marks  # a launch that missed the pool booted cold
    start = marks.pop("launch:start", None) or cleaned
    out = _relative(marks, start, ok)
    if "userspace" in watcher.cpu:
        out["qemu_cpu_to_userspace_s"] = watcher.cpu["userspace"]
    return out


def cli_command(workdir, command, mem_mib=256, image="micro", network=None):
    """argv of ``vmiso run`` for the same task: the console script beside this interpreter (what a
    user runs), else ``python -m vmiso``."""
    script = os.path.join(os.path.dirname(sys.executable), "vmiso")
    head = [script] if os.access(script, os.X_OK) else [sys.executable, "-m", "vmiso"]
    return head + ["--workdir", str(workdir), "--agent-id", "vmiso-bench", "run", "--mem", str(mem_mib),
                   "--image", image, *(("--network", network) if network else ()), "--", *command]


def cli_environment():
    """The environment of the timed ``vmiso run`` processes: this one's, but allowed to write
    byte-code caches, as an installed vmiso has them (pip compiles on install); a tree edited
    since its last run would otherwise recompile on every start."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def cli_once(argv, env):
    """One whole ``vmiso run`` process, fork to exit: {"cli_run": ms, "ok": its exit code was 0}."""
    started = time.monotonic()
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          env=env, timeout=WAIT_TIMEOUT_S)
    ended = time.monotonic()
    out = {"cli_run": round((ended - started) * 1000, 3), "ok": done.returncode == 0}
    if done.returncode != 0:
        out["error"] = done.stderr.decode(errors="replace")[-500:]
    return out


def baseline_once(conn, workdir, base, boot, accel, command, mem_mib=256):
    marks = prototype.once(conn, workdir, base, boot, accel, command, mem_mib)
    # Untimed: the prototype just wrote and deleted a 1 GiB copy. Without this, the file system's
    # commit of that runs into the next vmiso launch and slows its file creation (host
    # preparation drifted upwards over interleaved runs: docs/performance.md).
    os.sync()
    ok = marks.pop("ok")
    return _relative(marks, marks.pop("start"), ok)


def pool_full(iso, timeout=WAIT_TIMEOUT_S):
    """Untimed, before every launch of a --warm run: the pool has refilled, so no launch (warm,
    cold, the CLI's or the prototype's) shares the machine with a pool VM's boot."""
    if iso.pool.config is not None and not iso.pool.wait_ready(iso.pool.target(), timeout):
        raise NotFound("pool", "no warm VM became ready (see the log)")


def _relative(marks, start, ok):
    out = {name: round((t - start) * 1000, 3) for name, t in marks.items() if isinstance(t, float)}
    out["ok"] = ok
    return out


# -- statistics --------------------------------------------------------------------------------

def p90(values):
    values = sorted(values)
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=10, method="inclusive")[8]


def phases(launch, order):
    """{phase: ms} of one launch: each mark minus the previous mark present."""
    out, previous = {}, 0.0
    for mark, phase, _label in order:
        if mark in launch:
            out[phase] = round(launch[mark] - previous, 3)
            previous = launch[mark]
    return out


def _stats(launches, order):
    per = [phases(launch, order) for launch in launches]
    names = [phase for _m, phase, _l in order if any(phase in p for p in per)]
    medians = {n: round(statistics.median([p[n] for p in per if n in p]), 3) for n in names}
    p90s = {n: round(p90([p[n] for p in per if n in p]), 3) for n in names}
    marks = [m for m, _p, _l in order if any(m in launch for launch in launches)]
    at = {m: round(statistics.median([launch[m] for launch in launches if m in launch]), 3) for m in marks}
    return medians, p90s, at


def _span(launches, frm, to):
    return [launch[to] - launch.get(frm, 0.0) for launch in launches if to in launch and (frm is None or frm in launch)]


def _median(values):
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 3) if values else None


def summarize(vm, base=None, wall=None, base_wall=None, concurrency=1, cli=None, warm=None):
    medians, p90s, at = _stats(vm, VMISO_MARKS)
    prep = _span(vm, None, "launch:xml")
    userspace = _span(vm, "launch:xml", "userspace")
    total = _span(vm, None, "cleaned")
    result = {
        "n": len(vm), "concurrency": concurrency, "failures": sum(not v["ok"] for v in vm),
        "phases_ms": medians, "phases_p90_ms": p90s, "marks_ms": at,
        "host_prep_ms": round(statistics.median(prep), 3), "host_prep_p90_ms": round(p90(prep), 3),
        "first_host_prep_ms": round(prep[0], 3),
        "to_userspace_s": round(statistics.median(userspace) / 1000, 3) if userspace else None,
        "to_userspace_p90_s": round(p90(userspace) / 1000, 3) if userspace else None,
        "run_true_s": round(statistics.median(total) / 1000, 3), "run_true_p90_s": round(p90(total) / 1000, 3),
        "to_task_exit_s": round(statistics.median(_span(vm, None, "task_exit")) / 1000, 3),
        "to_status_s": _median([v["vm:status"] / 1000 for v in vm if "vm:status" in v]),
        "qemu_cpu_to_userspace_s": _median([v.get("qemu_cpu_to_userspace_s") for v in vm]),
        "launches": vm,
    }
    if warm:
        w_medians, w_p90s, w_at = _stats(warm, WARM_MARKS)
        status = _span(warm, None, "vm:status")
        cleaned = _span(warm, None, "cleaned")
        result.update({
            "warm_failures": sum(not w["ok"] for w in warm),
            "warm_phases_ms": w_medians, "warm_phases_p90_ms": w_p90s, "warm_marks_ms": w_at,
            # The task's end known (its exit status), as the prototype's end is its completion line.
            "warm_run_true_s": round(statistics.median(status) / 1000, 3) if status else None,
            "warm_run_true_p90_s": round(p90(status) / 1000, 3) if status else None,
            "warm_cleaned_s": round(statistics.median(cleaned) / 1000, 3) if cleaned else None,
            "warm_cleaned_p90_s": round(p90(cleaned) / 1000, 3) if cleaned else None,
            "warm_launches": warm,
        })
    if cli:
        whole = [c["cli_run"] for c in cli if c["ok"]]
        result.update({
            "cli_failures": sum(not c["ok"] for c in cli),
            "cli_run_true_s": round(statistics.median(whole) / 1000, 3) if whole else None,
            "cli_run_true_p90_s": round(p90(whole) / 1000, 3) if whole else None,
            "cli_launches": cli,
        })
        if whole:
            result["cli_overhead_s"] = round(result["cli_run_true_s"] - result["run_true_s"], 3)
    if wall is not None and concurrency > 1:
        result["wall_s"] = round(wall, 3)
        result["throughput_per_min"] = round(len(vm) / wall * 60, 2)
    if base:
        b_medians, b_p90s, b_at = _stats(base, BASELINE_MARKS)
        end = _span(base, None, "completion")
        result.update({
            "baseline_s": round(statistics.median(end) / 1000, 3) if end else None,
            "baseline_p90_s": round(p90(end) / 1000, 3) if end else None,
            "baseline_failures": sum(not b["ok"] for b in base),
            "baseline_phases_ms": b_medians, "baseline_phases_p90_ms": b_p90s, "baseline_marks_ms": b_at,
            "baseline_launches": base,
        })
        if end and result.get("warm_run_true_s"):
            result["warm_speedup_vs_baseline"] = round(result["baseline_s"] / result["warm_run_true_s"], 2)
            result["warm_speedup_vs_baseline_p90"] = round(result["baseline_p90_s"] / result["warm_run_true_p90_s"], 2)
        if end:
            result["speedup_vs_baseline"] = round(result["baseline_s"] / result["run_true_s"], 2)
            # The same end for both (the task's exit line seen), not vmiso's cleaned-up:
            result["speedup_same_end"] = round(result["baseline_s"] / result["to_task_exit_s"], 2)
        if base_wall is not None and concurrency > 1:
            result["baseline_wall_s"] = round(base_wall, 3)
            result["baseline_throughput_per_min"] = round(len(base) / base_wall * 60, 2)
    return result


# -- running -----------------------------------------------------------------------------------

class Progress:
    """One line on stderr, rewritten as launches finish."""

    def __init__(self, total, stream=sys.stderr, enabled=True):
        self.total, self.stream, self.enabled = total, stream, enabled
        self.done, self.lock, self.last = {"vmiso": 0, "warm": 0, "cli": 0, "baseline": 0}, threading.Lock(), ""

    def __call__(self, kind, launch):
        with self.lock:
            self.done[kind] += 1
            end = launch.get({"vmiso": "cleaned", "warm": "vm:status", "cli": "cli_run"}.get(kind, "completion"))
            self.last = f"last {kind} {end / 1000:.2f} s" if end is not None else f"last {kind} FAILED"
            self.show()

    def show(self, note=""):
        if not self.enabled:
            return
        parts = [f"{k} {v}/{self.total[k]}" for k, v in self.done.items() if self.total.get(k)]
        self.stream.write(f"\rbench launch: {', '.join(parts)}  {note or self.last}\x1b[K")
        self.stream.flush()

    def note(self, text):
        self.show(text)

    def close(self):
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


def _pool(jobs, concurrency):
    """Run the no-argument callables ``jobs`` on ``concurrency`` threads; (results in order, wall s)."""
    results = [None] * len(jobs)
    errors = []
    lock = threading.Lock()
    queue = list(enumerate(jobs))

    def worker():
        while True:
            with lock:
                if not queue or errors:
                    return
                index, job = queue.pop(0)
            try:
                results[index] = job()
            except BaseException as err:  # noqa: BLE001 - re-raised below
                with lock:
                    errors.append(err)

    started = time.monotonic()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(min(concurrency, len(jobs)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results, time.monotonic() - started


def run(n=5, concurrency=1, with_baseline=False, command=(b"true",), workdir="/var/lib/vmiso",
        mem_mib=256, progress=True, isolator=None, image="micro", with_cli=True, warm=False, pool_size=1,
        network=None):
    """Measure; return the result object (see summarize). ``image``: "micro", "micro:lean" or
    "micro:stock" (the prototype path boots the same kernel), or a stored container image's name
    or id (the task runs in its root under micro's lean kernel; no prototype path).
    ``with_cli`` (sequential runs only): also time the whole ``vmiso run`` process for the same
    task, interleaved with the in-process launches (one untimed run first). ``warm`` (sequential
    runs only): also N launches into warm VMs of a pool of ``pool_size`` (vmiso/pool.py), each
    launch of every kind starting once the pool has refilled (untimed). ``network``: a bridge every
    task gets a NIC on (no baseline: the prototype path had none)."""
    from ..isolator import Isolator

    command = [a if isinstance(a, bytes) else os.fsencode(a) for a in command]
    if network and with_baseline:
        raise InvalidSpec("baseline", "the prototype path had no network: compare networked launches without it")
    iso = isolator or Isolator(workdir=workdir, agent_id="vmiso-bench")
    built = _kernel_image(iso, image, with_baseline)
    with_cli = with_cli and concurrency == 1
    warm = warm and concurrency == 1
    show = Progress({"vmiso": n, "warm": n if warm else 0, "cli": n if with_cli else 0,
                     "baseline": n if with_baseline else 0}, enabled=progress)
    cli = warm_results = warm_iso = None
    try:
        iso.host.conn()  # connect once, before the first launch is timed
        warm_job = None
        if warm:
            from ..pool import PoolConfig

            # An Isolator of its own holds the pool: the cold launches (same image and size) must
            # not take its VMs.
            warm_iso = Isolator(workdir=iso.workdir.root, agent_id=iso.agent_id, accel=iso.accel.name)
            warm_iso.pool.configure(PoolConfig(size=pool_size, image=image, mem_mib=mem_mib))
            show.note("booting the pool")

            def warm_job():
                pool_full(warm_iso)
                result = vmiso_once(warm_iso, command, mem_mib, image, warm=True, network=network)
                show("warm", result)
                return result
        vm_job = _job(lambda: vmiso_once(iso, command, mem_mib, image, network=network), "vmiso", show)
        cli_job = None
        if with_cli:
            argv, env = cli_command(iso.workdir.root, [os.fsdecode(a) for a in command], mem_mib, image, network), \
                cli_environment()
            show.note("one untimed vmiso run")
            cli_once(argv, env)  # page cache and byte-code caches, as on a machine that ran it before
            cli_job = _job(lambda: cli_once(argv, env), "cli", show)
        base_job = None
        if with_baseline:
            base = prototype.base_image(iso.workdir.root, built, progress=show.note)
            conn = iso.host.conn()
            prototype.remove_leftovers(conn)
            base_job = _job(lambda: baseline_once(conn, iso.workdir.root, base, built, iso.accel, command,
                                                  mem_mib), "baseline", show)
        show.show("starting")
        if concurrency == 1:
            kinds = [j for j in (vm_job, warm_job, cli_job, base_job) if j is not None]
            if warm:
                kinds = [_after(lambda: pool_full(warm_iso), j) if j is not warm_job else j for j in kinds]
            results, _ = _pool([j for _ in range(n) for j in kinds], 1)
            step = len(kinds)
            vm = results[::step]
            warm_results = results[1::step] if warm_job else None
            cli = results[1 + bool(warm_job)::step] if cli_job else None
            base = results[step - 1::step] if base_job else None
            wall = base_wall = None
        else:
            vm, wall = _pool([vm_job] * n, concurrency)
            base, base_wall = _pool([base_job] * n, concurrency) if base_job else (None, None)
    finally:
        show.close()
        pool = None
        if warm_iso is not None:
            pool = {k: v for k, v in warm_iso.pool.status().items() if k not in ("slots", "owner_pid")}
            warm_iso.pool.close()
            warm_iso.host.close()
        if isolator is None:
            iso.host.close()
    result = summarize(vm, base, wall, base_wall, concurrency, cli=cli, warm=warm_results)
    if pool is not None:
        result["pool"] = pool
    result.update(image=image, network=network, kernel=f"{built.kernel_flavour} {built.kernel_version}",
                  cpu_probe="quick" if iso.cpu_probe().quick else "full")
    return result


def _kernel_image(iso, image, with_baseline):
    """The micro build whose kernel ``image`` boots (NotFound, InvalidSpec as a launch would say)."""
    if image == "micro" or image.startswith("micro:"):
        flavour = image.partition(":")[2] or None
        built = micro_mod.find_micro(iso.workdir.root, flavour)  # InvalidSpec for an unknown kernel
        if built is None:
            raise NotFound("image", f"{image} (build it once with 'vmiso image build-micro"
                                    f"{' --kernel ' + flavour if flavour else ''}')")
        return built
    if resolve.resolve(iso.workdir, image, allow_paths=False).container is None:
        raise InvalidSpec("image", f"{image} is neither micro nor a container image (bench launch boots those)")
    if with_baseline:
        raise InvalidSpec("baseline", "the prototype path boots micro only: compare a container image with "
                                      "micro in one run with 'vmiso bench image'")
    return micro_mod.find_micro(iso.workdir.root, "lean")  # resolve found it: a container image boots it


def _after(first, job):
    """``job`` preceded by the untimed ``first()``."""
    def run():
        first()
        return job()
    return run


def _job(fn, kind, progress):
    def job():
        result = fn()
        progress(kind, result)
        return result
    return job


def report(result):
    """The result as a table an operator reads: per phase median and p90, then the totals."""
    lines = [f"launch latency, {result['n']} launches of the task on {result.get('image', 'micro')} "
             f"({result.get('kernel', '?')} kernel, {result.get('cpu_probe', '?')} CPU probe), "
             f"concurrency {result['concurrency']}"
             f"{', ' + str(result['failures']) + ' FAILED' if result['failures'] else ''}",
             f"  {'phase':<44} {'median ms':>10} {'p90 ms':>10}"]
    labels = {phase: label for _m, phase, label in VMISO_MARKS}
    for phase, ms in result["phases_ms"].items():
        lines.append(f"  {labels.get(phase, phase):<44} {ms:>10.1f} {result['phases_p90_ms'][phase]:>10.1f}")
    lines += [
        f"  host preparation (start -> XML):          {result['host_prep_ms']:8.2f} ms   p90 "
        f"{result['host_prep_p90_ms']:.2f} ms   first launch {result['first_host_prep_ms']:.2f} ms",
        f"  createXML call -> guest userspace:         {result['to_userspace_s']:8.3f} s    p90 "
        f"{result['to_userspace_p90_s']:.3f} s",
        f"  launch start -> exit status known:         {result['to_status_s'] or 0:8.3f} s",
        f"  whole run (launch start -> cleaned up):    {result['run_true_s']:8.3f} s    p90 "
        f"{result['run_true_p90_s']:.3f} s",
    ]
    if result.get("warm_run_true_s") is not None:
        labels = {phase: label for _m, phase, label in WARM_MARKS}
        failed = result["warm_failures"]
        lines.append("warm launches (a pool VM booted ahead), same run"
                     f"{', ' + str(failed) + ' FAILED' if failed else ''}")
        for phase, ms in result["warm_phases_ms"].items():
            lines.append(f"  {labels.get(phase, phase):<44} {ms:>10.1f} {result['warm_phases_p90_ms'][phase]:>10.1f}")
        lines.append(f"  launch start -> exit status known:         {result['warm_run_true_s']:8.3f} s    p90 "
                     f"{result['warm_run_true_p90_s']:.3f} s")
        lines.append(f"  launch start -> cleaned up:                {result['warm_cleaned_s']:8.3f} s    p90 "
                     f"{result['warm_cleaned_p90_s']:.3f} s")
    if result.get("cli_run_true_s") is not None:
        lines.append(f"  whole 'vmiso run' process, same task:       {result['cli_run_true_s']:8.3f} s    p90 "
                     f"{result['cli_run_true_p90_s']:.3f} s   (+{result['cli_overhead_s']:.3f} s over in-process)")
    if "throughput_per_min" in result:
        lines.append(f"  throughput: {result['throughput_per_min']:.1f} tasks/min "
                     f"({result['n']} in {result['wall_s']:.1f} s)")
    if "baseline_s" in result:
        b_labels = {phase: label for _m, phase, label in BASELINE_MARKS}
        failed = result["baseline_failures"]
        lines.append(f"prototype path (baseline), same run{', ' + str(failed) + ' FAILED' if failed else ''}")
        for phase, ms in result["baseline_phases_ms"].items():
            p90_ms = result["baseline_phases_p90_ms"][phase]
            lines.append(f"  {b_labels.get(phase, phase):<44} {ms:>10.1f} {p90_ms:>10.1f}")
        lines.append(f"  end to end (start -> completion line):     {result['baseline_s']:8.3f} s    p90 "
                     f"{result['baseline_p90_s']:.3f} s")
        if "baseline_throughput_per_min" in result:
            lines.append(f"  throughput: {result['baseline_throughput_per_min']:.1f} tasks/min")
        if result.get("warm_speedup_vs_baseline"):
            lines.append(f"warm launches are {result['warm_speedup_vs_baseline']:.2f}x faster (p90: "
                         f"{result['warm_speedup_vs_baseline_p90']:.2f}x) than the prototype path, both to the "
                         "task's end known")
        if result.get("speedup_vs_baseline"):
            lines.append(f"vmiso is {result['speedup_vs_baseline']:.2f}x faster end to end (cleaned up) than the "
                         f"prototype path to its completion line; {result['speedup_same_end']:.2f}x to the same "
                         f"end (exit line seen, {result['to_task_exit_s']:.3f} s)")
    return "\n".join(lines)
