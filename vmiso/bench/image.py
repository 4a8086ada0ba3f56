"""``vmiso bench image``: container images, in one run, with micro as the baseline.

1. Import of a ~100 MB image (``vmiso.testing.oci.debian_python_image``: a Debian 12 root with
   python3, two gzip layers, built once from Debian's packages into ``<workdir>/cache/testimages``)
   from its OCI layout, ``imports`` times each way: **cold** (a fresh work dir: empty layer cache,
   nothing stored) and **warm** (the same work dir after ``image rm``: every layer cached, the
   root file system built again).
2. Launches through the real Isolator (launch -> wait -> destroy, what ``vmiso run`` does minus
   its own process start, which is the same for both), interleaved so machine noise hits each
   alike: ``true`` on micro, ``true`` in the image, ``python3 -c pass`` in the image; one
   untimed round first (libvirt's connection, the new files' first reads), then ``n`` timed ones.
   Each launch's marks and phases are bench/launch.py's (the guest's VMISO-USERSPACE and
   VMISO-TASK-START are the same for micro and container images: the same init and wrapper).

Everything happens in a temporary work dir under ``<workdir>/cache/bench`` (QEMU's user can
reach it there), removed afterwards: the operator's store, layer cache and containers are not
touched. micro is built into it from the host cache of Debian packages and lean kernels
(paths.HostCache), so nothing is compiled or downloaded again.
"""
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from ..errors import VmisoError
from . import launch

IMAGE = "debian-python:12"
KINDS = (  # (key, image, command)
    ("micro_true", "micro", (b"true",)),
    ("oci_true", IMAGE, (b"true",)),
    ("oci_python", IMAGE, (b"python3", b"-c", b"pass")),
)


def _median(values):
    return round(statistics.median(values), 3) if values else None


def _imports(scratch, layout, repeat, note):
    """``repeat`` cold and warm imports, each cold one into a fresh work dir; the last work dir
    (with the image stored) is returned for the launches."""
    from ..image import store
    from ..image.oci import importer
    from ..paths import Workdir

    cold, warm, last, work = [], [], None, None
    for i in range(repeat):
        if work is not None:
            shutil.rmtree(work.root)
        work = Workdir(Path(scratch) / f"work-{i}")
        work.images.mkdir(parents=True)
        work.containers.mkdir()
        note(f"import {i + 1}/{repeat}: cold")
        start = time.monotonic()
        first = importer.import_path(work, f"{layout}:12", names=[IMAGE])
        cold.append(time.monotonic() - start)
        store.rm(work, IMAGE)
        note(f"import {i + 1}/{repeat}: warm")
        start = time.monotonic()
        last = importer.import_path(work, f"{layout}:12", names=[IMAGE])
        warm.append(time.monotonic() - start)
        if first.fetched_layers != first.layers or last.fetched_layers or not last.created:
            raise VmisoError(f"bench image: the cold import fetched {first.fetched_layers} of {first.layers} "
                             f"layers and the warm one {last.fetched_layers} (expected all, then none)")
    result = {
        "imports": repeat,
        "import_cold_s": _median(cold), "import_warm_s": _median(warm),
        "import_cold_all_s": [round(s, 3) for s in cold], "import_warm_all_s": [round(s, 3) for s in warm],
        "image": {"name": IMAGE, "id": last.image.sha256, "layers": last.layers,
                  "layer_bytes": first.fetched_bytes, "tree_bytes": last.tree.get("bytes"),
                  "tree_entries": last.tree.get("entries"), "base_bytes": last.image.virtual_size},
    }
    return result, work.root


def _summary(launches):
    s = launch.summarize(launches)
    task = [v["task_exit"] - v["task_start"] for v in launches if "task_exit" in v and "task_start" in v]
    guest = [v["task_exit"] - v["userspace"] for v in launches if "task_exit" in v and "userspace" in v]
    return {"run_s": s["run_true_s"], "run_p90_s": s["run_true_p90_s"], "to_task_exit_s": s["to_task_exit_s"],
            "to_userspace_s": s["to_userspace_s"], "task_ms": _median(task), "guest_ms": _median(guest),
            "failures": s["failures"],
            "phases_ms": s["phases_ms"], "launches": launches}


def _launches(iso, n, mem_mib, note):
    runs = {key: [] for key, _i, _c in KINDS}
    for round_ in range(n + 1):  # round 0: untimed
        for key, image, command in KINDS:
            note(f"launches: round {round_}/{n} {key}" + (" (untimed)" if not round_ else ""))
            result = launch.vmiso_once(iso, list(command), mem_mib, image)
            if not result["ok"]:
                raise VmisoError(f"bench image: {key} did not report an exit status")
            if round_:
                runs[key].append(result)
    return {key: _summary(launches) for key, launches in runs.items()}


def run(workdir="/var/lib/vmiso", n=5, imports=1, mem_mib=256, uri=None, accel="auto", progress=None):
    """Measure; return the result object (keys: docs/performance.md, "Container images")."""
    from ..image import micro
    from ..isolator import Isolator
    from ..paths import Workdir
    from ..testing import oci

    note = progress or (lambda text: None)
    operator = Workdir(workdir)
    layout = oci.debian_python_image(operator.test_images, progress=note)
    operator.bench_cache.mkdir(parents=True, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix="image-", dir=operator.bench_cache)
    os.chmod(scratch, 0o755)  # QEMU's user passes through it to the temporary work dir
    try:
        result, work = _imports(scratch, layout, imports, note)
        note("building micro into the temporary work dir")
        micro.build_micro(work, progress=note)
        iso = Isolator(workdir=work, agent_id="vmiso-bench", **({"uri": uri} if uri else {}), accel=accel)
        try:
            iso.host.conn()
            runs = _launches(iso, n, mem_mib, note)
        finally:
            iso.host.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    micro_true, oci_true, oci_python = (runs[key] for key, _i, _c in KINDS)
    result.update({
        "n": n, "accel": iso.accel.name, "mem_mib": mem_mib,
        "micro_true_s": micro_true["run_s"], "oci_true_s": oci_true["run_s"], "oci_python_s": oci_python["run_s"],
        "oci_minus_micro_s": round(oci_true["run_s"] - micro_true["run_s"], 3),
        "oci_minus_micro_guest_ms": round(oci_true["guest_ms"] - micro_true["guest_ms"], 3),
        "oci_python_task_ms": oci_python["task_ms"],
        "runs": runs,
    })
    return result


def report(result):
    image = result["image"]
    lines = [
        f"container image {image['name']} ({image['tree_bytes'] / 1e6:.0f} MB in {image['tree_entries']} files, "
        f"{image['layers']} layers, {image['layer_bytes'] / 1e6:.0f} MB compressed), {result['accel']}",
        f"  import from its OCI layout, median of {result['imports']}:",
        f"    cold (empty layer cache, nothing stored)   {result['import_cold_s']:7.2f} s",
        f"    warm (layers cached, root built again)     {result['import_warm_s']:7.2f} s",
        f"  launch -> cleaned up, median of {result['n']} interleaved (p90; in the guest):",
    ]
    for key, label in (("micro_true", "micro: true"), ("oci_true", "image: true"),
                       ("oci_python", "image: python3 -c pass")):
        r = result["runs"][key]
        lines.append(f"    {label:<26} {r['run_s']:7.3f} s  (p90 {r['run_p90_s']:.3f} s; userspace -> exit line "
                     f"{r['guest_ms']:.0f} ms, of it the task {r['task_ms']:.0f} ms)")
    lines.append(f"  image - micro (true): {result['oci_minus_micro_s'] * 1000:+.0f} ms, in the guest after its "
                 f"boot {result['oci_minus_micro_guest_ms']:+.0f} ms")
    return "\n".join(lines)
