"""The report's PNG: layers on devices, memory per device, and the pipeline schedule as a Gantt chart.

matplotlib is imported inside the functions, not at module level, so compiling a plan without a
report never pays for importing it.
"""

import math
import os

from compiler import schedule
from compiler.report.facts import (device_coords, fmt_pct, fmt_seconds, is_number, layer_range,
                                   memory_breakdown, split_ops_text, stage_of_device, zero_text)

# The figure is sized in inches at this dpi so that it comes out at about 1600 x 1000 pixels.
FIG_W_IN, FIG_H_IN, FIG_DPI = 16.0, 10.0, 100
# More micro-batches than this make the Gantt boxes too thin to read.
MAX_DRAWN_MICRO_BATCHES = 16
# Past this many scheduled ops the full-step simulation (only used for the bubble number) is skipped.
MAX_SIMULATED_OPS = 200_000
FORWARD_COLOR, BACKWARD_COLOR = "#4c78a8", "#f58518"


# ---- drawing helpers -------------------------------------------------------------------------------
def _fit_text(lines, width_in, height_in, max_size=11, min_size=6.5):
    """Text, font size and rotation that fit a box of the given inches, or None if nothing fits.

    Estimates glyph sizes (0.6 em wide, 1.25 em line height) rather than measuring, which is close
    enough for short labels and avoids drawing the figure twice.
    """
    for candidate in (lines, lines[:2], lines[:1]):
        chars = max(len(line) for line in candidate)
        for rotation, w, h in ((0, width_in, height_in), (90, height_in, width_in)):
            size = min(max_size, 72 * w / (0.6 * chars + 0.5), 72 * h / (1.25 * len(candidate) + 0.3))
            if size >= min_size:
                return "\n".join(candidate), size, rotation
    return None


def _rect(xy, w, h, color, alpha=1.0, hatch=None):
    from matplotlib.patches import Rectangle

    return Rectangle(xy, w, h, facecolor=color, alpha=alpha, edgecolor="black", linewidth=0.6, hatch=hatch)


def _stage_colors(pp):
    import matplotlib

    # Pastel, so a stage is never mistaken for the schedule's forward (blue) / backward (orange) boxes
    # and black labels stay readable on it.
    cmap = matplotlib.colormaps["Set3" if pp <= 12 else "tab20"]
    return [cmap(i % cmap.N) for i in range(pp)]


def _shades(color, n):
    """n shades of a colour, darkest first, so interleaved chunks are told apart."""
    from matplotlib.colors import to_rgb

    r, g, b = to_rgb(color)
    if n <= 1:
        return [(r, g, b)]
    return [tuple(c + (1 - c) * 0.45 * i / (n - 1) for c in (r, g, b)) for i in range(n)]


def _device_ticks(ax, P):
    # Past 16 devices every label would overlap its neighbours.
    ax.set_xlim(-0.6, P - 0.4)
    ax.set_xticks(range(0, P, max(1, math.ceil(P / 16))))
    ax.set_xlabel("plan device")


# ---- (a) layers on devices -------------------------------------------------------------------------
def _num_layers(plan):
    """Decoder layers of the model: the fingerprint's count, else where the last stage ends."""
    n = plan.model.get("fingerprint", {}).get("num_hidden_layers")
    return n if isinstance(n, int) else plan.stages[-1].layers[1]


def _split_axes(plan):
    """The within-stage splits that are on, e.g. "dp=2, ep=4"; a stage has the same on every device."""
    parts = [f"{axis}={plan.mesh[axis]}" for axis in ("dp", "ep", "tp") if plan.mesh.get(axis, 1) > 1]
    return ", ".join(parts) if parts else "no split"


def _draw_stage_blocks(ax, stage, color, L, band):
    """The stage's layers as a column per device, with hatched embed / head bands below / above."""
    first, end = stage.layers
    for d in stage.devices:
        if end > first:
            ax.add_patch(_rect((d - 0.44, first), 0.88, end - first, color, alpha=0.85))
        if stage.embed:
            ax.add_patch(_rect((d - 0.44, -band), 0.88, 0.9 * band, color, alpha=0.6, hatch="//"))
        if stage.head:
            ax.add_patch(_rect((d - 0.44, L + 0.1 * band), 0.88, 0.9 * band, color, alpha=0.6, hatch="\\\\"))


def _label_stage(ax, plan, stage, device_in, row_in):
    """One label per stage over all its devices, as large as the block allows (none if nothing fits)."""
    first, end = stage.layers
    lines = [f"stage {stage.index}", f"layer{'s' if end - first != 1 else ''} {layer_range(stage)}",
             _split_axes(plan)]
    if stage.recompute != "none":
        lines.append(f"recompute {stage.recompute}")
    lo, hi = min(stage.devices), max(stage.devices)
    fitted = _fit_text(lines, (hi - lo + 0.88) * device_in, max(end - first, 1) * row_in)
    if fitted:
        text, size, rotation = fitted
        y = (first + end) / 2 if end > first else first
        ax.text((lo + hi) / 2, y, text, ha="center", va="center", fontsize=size, rotation=rotation,
                color="black", bbox=dict(boxstyle="round,pad=0.25", fc="white", ec="none", alpha=0.75),
                in_layout=False)


def _draw_layers(ax, plan, colors, width_in, height_in):
    P, L = plan.plan_ngpus, _num_layers(plan)
    # y: layer i is the row [i, i+1); the embedding is a band below layer 0 and the head a band above
    # layer L-1, one row high for small models and taller for deep ones so they stay visible.
    band = max(1.0, L / 15)
    for s in plan.stages:
        _draw_stage_blocks(ax, s, colors[s.index], L, band)
        _label_stage(ax, plan, s, width_in / P, height_in / (L + 2 * band))
    ax.set_ylim(-band - 0.2, L + band + 0.2)
    # Label the embed and head bands by name and about 15 layer rows by number.
    step = max(1, math.ceil(L / 15))
    ticks = [-0.55 * band] + [i + 0.5 for i in range(0, L, step)] + [L + 0.55 * band]
    ax.set_yticks(ticks, ["embed"] + [str(i) for i in range(0, L, step)] + ["head"])
    ax.set_ylabel("model layer")
    _device_ticks(ax, P)
    if P <= 8:  # room to print each device's mesh position under its number
        coords = [device_coords(plan, d) for d in range(P)]
        ax.set_xticks(range(P), [f"{d}\n{c}" if c != "-" else str(d) for d, c in enumerate(coords)])
    ops = split_ops_text(plan)
    ax.set_title("(a) Layers and ops on devices" + (f"\nops: {ops}" if ops else ""), fontsize=13)


# ---- (b) memory per device -------------------------------------------------------------------------
def _stacked_breakdown(ax, breakdown, names, xs, width):
    """Components stacked per device; returns the stack heights."""
    import matplotlib

    cmap = matplotlib.colormaps["Set2"]
    bottom = [0.0] * len(xs)
    for i, name in enumerate(names):
        values = [breakdown[d].get(name) if d < len(breakdown) else None for d in xs]
        values = [v if is_number(v) else 0.0 for v in values]
        ax.bar(xs, values, width, bottom=bottom, label=name, color=cmap(i % cmap.N), edgecolor="white",
               linewidth=0.5)
        bottom = [b + v for b, v in zip(bottom, values)]
    return bottom


def _draw_memory(ax, plan, colors):
    P = plan.plan_ngpus
    peaks = [x if is_number(x) else 0.0 for x in (plan.predicted.get("peak_memory_gib") or [])][:P]
    peaks += [0.0] * (P - len(peaks))
    limit = plan.search_inputs.get("mem_limit_gib")
    breakdown, names = memory_breakdown(plan)
    xs, width = list(range(P)), 0.7
    top = max(peaks + [0.0])
    if breakdown is not None:
        top = max([top] + _stacked_breakdown(ax, breakdown, names, xs, width))
        # The peak is a marker, not the stack's top: components may peak at different moments.
        over = ["crimson" if is_number(limit) and peak > limit else "black" for peak in peaks]
        ax.scatter(xs, peaks, marker="_", s=900 * width, color=over, linewidths=2.5, zorder=3,
                   label="predicted peak")
    else:
        stage_of = stage_of_device(plan)
        ax.bar(xs, peaks, width, color=[colors[stage_of.get(d, 0)] for d in xs], edgecolor="black", linewidth=0.6,
               label="predicted peak")
    if is_number(limit):
        ax.axhline(limit, color="crimson", linestyle="--", linewidth=1.8, label=f"limit {limit:g} GiB")
        top = max(top, limit)
    if P <= 16:
        for d, peak in zip(xs, peaks):
            ax.text(d, peak + top * 0.01, f"{peak:.1f}", ha="center", va="bottom", fontsize=9)
    ax.set_ylim(0, top * 1.1 if top > 0 else 1.0)
    _device_ticks(ax, P)
    ax.set_ylabel("GiB")
    ax.set_title("(b) Memory per device", fontsize=13)
    # Outside the axes, so it never hides a bar; constrained layout makes room for it.
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, framealpha=0.9)


# ---- (c) pipeline schedule -------------------------------------------------------------------------
def _drawn_micro_batches(name, pp, M):
    drawn = min(M, MAX_DRAWN_MICRO_BATCHES)
    if name == "Interleaved1F1B" and drawn % pp and M >= pp:
        # Keep Megatron's order drawable: it needs a multiple of pp micro-batches.
        drawn = max(pp, drawn - drawn % pp)
    return drawn


def _bubble_text(name, pp, M, chunks, stage_times, unit, drawn):
    """The idle share of a step with all M micro-batches, from a full simulation when it is small enough."""
    if pp < 2 or 2 * M * pp * chunks > MAX_SIMULATED_OPS:
        return ""
    boxes, approximate = schedule.pipeline_timeline(name, pp, M, chunks, stage_times)
    span = schedule.makespan(boxes)
    idle = (f"idle {100 * schedule.idle_fraction(boxes, pp):.1f} % of stage time (communication not modelled"
            + ("; 1F1B order, approximate)" if approximate else ")"))
    if drawn == M:
        return f"; spans {span:.4g} {unit}, {idle}"
    return f"; full step ({M} micro-batches) spans {span:.4g} {unit}, {idle}"


def _draw_boxes(ax, boxes, chunks, width_in):
    """One bar per op, shaded by chunk, labelled with its micro-batch where the label fits."""
    span = schedule.makespan(boxes)
    shades = {"F": _shades(FORWARD_COLOR, chunks), "B": _shades(BACKWARD_COLOR, chunks)}
    for b in boxes:
        ax.barh(b.stage, b.end - b.start, left=b.start, height=0.8, color=shades[b.kind][b.chunk],
                edgecolor="black", linewidth=0.4)
        label = str(b.micro_batch)
        box_in = (b.end - b.start) / span * width_in
        size = min(9.0, 72 * box_in / (0.6 * len(label) + 0.4))
        if size >= 5.5:
            ax.text((b.start + b.end) / 2, b.stage, label, ha="center", va="center", fontsize=size,
                    color="white", in_layout=False)
    ax.set_xlim(0, span * 1.005)
    return shades


def _schedule_legend(ax, shades, chunks):
    from matplotlib.patches import Patch

    if chunks > 1:
        handles = [Patch(color=shades["F"][c], label=f"forward, chunk {c}") for c in range(chunks)]
        handles += [Patch(color=shades["B"][c], label=f"backward, chunk {c}") for c in range(chunks)]
    else:
        handles = [Patch(color=FORWARD_COLOR, label="forward"), Patch(color=BACKWARD_COLOR, label="backward")]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=9, framealpha=0.9,
              title="micro-batch #\nin each box", title_fontsize=8)


def _device_span(devices):
    return f"d{min(devices)}" + (f"-{max(devices)}" if len(devices) > 1 else "")


def _draw_schedule(ax, plan, width_in):
    pp = plan.mesh["pp"]
    name = plan.schedule.get("name", "1F1B")
    M = plan.schedule.get("micro_batches", 1)
    M = M if isinstance(M, int) and M > 0 else 1
    # Only the interleaved schedule has model chunks; a stale virtual_stages elsewhere is ignored.
    chunks = (plan.schedule.get("virtual_stages") or 1) if name == "Interleaved1F1B" else 1
    stage_times = plan.predicted.get("stage_times_s")
    if not (isinstance(stage_times, list) and len(stage_times) == pp):
        stage_times = None  # unit times: forward 1, backward 2
    unit = "s" if stage_times else "units"
    drawn = _drawn_micro_batches(name, pp, M)
    boxes, approximate = schedule.pipeline_timeline(name, pp, drawn, chunks, stage_times)
    shades = _draw_boxes(ax, boxes, chunks, width_in)
    ax.set_ylim(pp - 0.4, -0.6)  # stage 0 on top, like the data flowing downwards
    ax.set_yticks(range(pp), [f"stage {st.index}\n({_device_span(st.devices)})" for st in plan.stages])
    ax.set_xlabel(f"time ({unit})" + ("" if stage_times else ": forward = 1, backward = 2 per micro-batch"))
    shown = f"first {drawn} of {M} micro-batches" if drawn < M else f"{M} micro-batches"
    extra = f", {chunks} chunks per device" if chunks > 1 else ""
    note = " (approximate: chunks drawn inside 1F1B slots)" if approximate else ""
    bubble = _bubble_text(name, pp, M, chunks, stage_times, unit, drawn)
    title = f"(c) Pipeline schedule: {name}, {shown}{extra}{note}"
    # A second line rather than a title wider than the figure.
    title += ("\n" + bubble.lstrip("; ")) if len(title) + len(bubble) > 110 else bubble
    ax.set_title(title, fontsize=13)
    _schedule_legend(ax, shades, chunks)


# ---- the figure ------------------------------------------------------------------------------------
def _suptitle(plan):
    m, p = plan.mesh, plan.predicted
    title = [f"{plan.model.get('name', 'model')}: P={plan.plan_ngpus} "
             f"(pp={m['pp']} dp={m['dp']} ep={m['ep']} tp={m['tp']})", f"zero {zero_text(plan)}"]
    if is_number(p.get("step_time_s")):
        title.append(f"predicted step {fmt_seconds(p['step_time_s'])} s")
    if is_number(p.get("mfu")):
        title.append(f"MFU {fmt_pct(p['mfu'])}")
    return ", ".join(title)


def render_png(plan, png_path):
    """Draw the three panels into `png_path`, replacing it atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # A bare Figure on the Agg canvas: no pyplot global state, no GUI backend, safe in any process.
    fig = Figure(figsize=(FIG_W_IN, FIG_H_IN), dpi=FIG_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, 2, height_ratios=[1.45, 1.0], width_ratios=[1.35, 1.0])
    colors = _stage_colors(plan.mesh["pp"])
    # Sizes in inches of the plotting areas, estimated from the grid ratios less room for labels;
    # they only decide font sizes of labels inside boxes.
    _draw_layers(fig.add_subplot(grid[0, 0]), plan, colors, FIG_W_IN * 1.35 / 2.35 - 1.3,
                 FIG_H_IN * 1.45 / 2.45 - 1.5)
    _draw_memory(fig.add_subplot(grid[0, 1]), plan, colors)
    _draw_schedule(fig.add_subplot(grid[1, :]), plan, FIG_W_IN - 3.2)  # less the stage labels and the legend
    fig.suptitle(_suptitle(plan), fontsize=15)
    tmp = f"{png_path}.tmp"
    fig.savefig(tmp, format="png", dpi=FIG_DPI)
    os.replace(tmp, png_path)  # a reader never sees half a file
