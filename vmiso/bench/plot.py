"""A waterfall of launch phases as plain SVG text (no plotting library): one horizontal bar per
launch, one coloured segment per phase, each prototype (baseline) launch right under the vmiso
launch it alternated with. Hovering a segment shows its phase and duration."""
from xml.sax.saxutils import escape

from .launch import BASELINE_MARKS, VMISO_MARKS

# Host preparation phases share one colour: at this scale they are a sliver.
HOST_PREP = ("image", "dir", "checkpoint", "overlay", "seed", "network", "xml")
COLOURS = {
    "host prep": "#4e79a7", "create": "#f28e2b", "console": "#e15759", "userspace": "#76b7b2",
    "task_start": "#59a14f", "task_exit": "#edc948", "qemu_exit": "#b07aa1", "vm_gone": "#ff9da7",
    "cleanup": "#9c755f", "copy": "#79706e", "define": "#d37295", "completion": "#bcbd22",
    "uncounted": "#dddddd",
}
NAMES = {
    "host prep": "host preparation", "create": "createXML / create", "console": "kernel boot (to 1st console byte)",
    "userspace": "to userspace marker", "task_start": "init -> task start", "task_exit": "task runs",
    "qemu_exit": "guest powers off, QEMU exits", "vm_gone": "libvirt reports the VM gone",
    "cleanup": "cleanup", "copy": "prototype: whole-disk copy", "define": "prototype: defineXML",
    "completion": "prototype: completion line polled",
    "uncounted": "prototype: destroy, undefine, delete (not counted)",
}
LEFT, RIGHT, TOP, BAR, GAP = 120, 30, 74, 16, 6


def _colour_key(phase, baseline):
    if phase in HOST_PREP and not (baseline and phase == "seed"):
        return "host prep"
    if baseline and phase == "seed":
        return "define"
    if baseline and phase == "cleanup":
        return "uncounted"  # external tool + define: one colour for the prototype's preparation
    return phase


def _segments(launch, order, baseline):
    previous = 0.0
    for mark, phase, label in order:
        if mark not in launch:
            continue
        start, end = previous, max(previous, launch[mark])
        previous = end
        yield _colour_key(phase, baseline), label, start, end


def _ticks(limit_s):
    step = next(s for s in (0.5, 1, 2, 5, 10, 20, 30, 60, 120) if limit_s / s <= 12)
    value = 0.0
    while value <= limit_s + 1e-9:
        yield value
        value += step


def render(result, width=1100):
    rows = []
    base = result.get("baseline_launches") or []
    for i, launch in enumerate(result["launches"]):
        rows.append((f"vmiso {i + 1}", launch, VMISO_MARKS, False))
        if i < len(base):
            rows.append((f"prototype {i + 1}", base[i], BASELINE_MARKS, True))
    extra = enumerate(base[len(result["launches"]):], start=len(result["launches"]))
    rows += [(f"prototype {i + 1}", b, BASELINE_MARKS, True) for i, b in extra]
    limit_ms = max(max(v for k, v in r[1].items() if isinstance(v, float)) for r in rows)
    plot_w = width - LEFT - RIGHT
    x = lambda ms: LEFT + plot_w * ms / limit_ms  # noqa: E731
    used = []
    height = TOP + len(rows) * (BAR + GAP) + 40
    legend_rows = 4  # up to 16 phase colours, 4 a row
    total_h = height + legend_rows * 20 + 20
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{total_h}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{total_h}" fill="white"/>']
    title = f"vmiso launch waterfall: {result['n']} launches, concurrency {result['concurrency']}"
    sub = (f"medians: host preparation {result['host_prep_ms']:.1f} ms, createXML -> userspace "
           f"{result['to_userspace_s']:.2f} s, whole run {result['run_true_s']:.2f} s")
    if result.get("baseline_s"):
        sub += (f"; prototype path {result['baseline_s']:.2f} s to its completion line "
                f"(vmiso {result.get('speedup_vs_baseline', 0):.2f}x faster)")
    out.append(f'<text x="{LEFT}" y="20" font-size="14" font-weight="bold">{escape(title)}</text>')
    out.append(f'<text x="{LEFT}" y="38" fill="#333">{escape(sub)}</text>')
    for t in _ticks(limit_ms / 1000):
        xx = x(t * 1000)
        out.append(f'<line x1="{xx:.1f}" y1="{TOP - 8}" x2="{xx:.1f}" y2="{height - 34}" stroke="#ddd"/>')
        out.append(f'<text x="{xx:.1f}" y="{TOP - 12}" text-anchor="middle" fill="#555">{t:g} s</text>')
    for row, (label, launch, order, baseline) in enumerate(rows):
        y = TOP + row * (BAR + GAP)
        colour = "#777" if baseline else "#000"
        out.append(f'<text x="{LEFT - 8}" y="{y + BAR - 4}" text-anchor="end" fill="{colour}">{escape(label)}</text>')
        for key, name, start, end in _segments(launch, order, baseline):
            if key not in used:
                used.append(key)
            w = max(x(end) - x(start), 0.0)
            opacity = ' fill-opacity="0.75"' if baseline else ""
            fill = COLOURS.get(key, "#999")
            out.append(f'<rect x="{x(start):.2f}" y="{y}" width="{w:.2f}" height="{BAR}" fill="{fill}"{opacity}>'
                       f'<title>{escape(label)}: {escape(name)} {end - start:.1f} ms '
                       f'(ends at {end / 1000:.3f} s)</title></rect>')
        if not launch.get("ok", True):
            out.append(f'<text x="{LEFT + 4}" y="{y + BAR - 4}" fill="red">FAILED</text>')
    y = height - 10
    for i, key in enumerate(used):
        lx = LEFT + (i % 4) * (plot_w // 4)
        ly = y + (i // 4) * 20
        out.append(f'<rect x="{lx}" y="{ly - 11}" width="14" height="14" fill="{COLOURS.get(key, "#999")}"/>')
        out.append(f'<text x="{lx + 20}" y="{ly}">{escape(NAMES.get(key, key))}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def write(path, result):
    with open(path, "w") as f:
        f.write(render(result))
