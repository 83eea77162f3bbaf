"""A report a person reads beside a plan file: Markdown tables and one PNG figure.

`write_report(plan, md_path, png_path)` writes both. The Markdown says what the plan is and why
(summary, explanation, stages, mesh, op partitions, memory, step time, runners-up) and embeds the
PNG, which shows three panels: which layers sit on which devices, memory per device against the
limit, and a Gantt chart of the pipeline schedule.

Only `Plan`'s required fields are relied on. These optional `plan.predicted` keys are used when
present (the cost model may or may not fill them):

  memory_breakdown_gib  list, one dict per plan device, component name -> GiB
                        (e.g. params, grads, optimizer, activations, buffers)
  breakdown_s           dict, part of the step name -> seconds
  stage_times_s         list, one dict per stage: {"forward": s, "backward": s} for one micro-batch
  step_time_s, tokens_per_s, mfu   numbers (mfu as a fraction, 0.42 = 42 %)
"""

import math
import os

from compiler.plan import Plan, summarize

# The figure is sized in inches at this dpi so that it comes out at about 1600 x 1000 pixels.
FIG_W_IN, FIG_H_IN, FIG_DPI = 16.0, 10.0, 100
# More micro-batches than this make the Gantt boxes too thin to read.
MAX_DRAWN_MICRO_BATCHES = 16
# Past this many scheduled boxes the full-step simulation (only used for the bubble number) is skipped.
MAX_SIMULATED_OPS = 200_000

AXIS_MEANING = {
    "pp": "pipeline parallel: consecutive layers split into stages",
    "dp": "data parallel: the batch is split, parameters replicated (or sharded by ZeRO)",
    "ep": "expert parallel: routed experts split, tokens exchanged by all-to-all",
    "tp": "tensor parallel: attention heads / MLP intermediate split",
}
FORWARD_COLOR, BACKWARD_COLOR = "#4c78a8", "#f58518"


# ---- small formatting helpers ---------------------------------------------------------------------
def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _fmt(x, spec=".2f", missing="n/a"):
    return format(x, spec) if _is_number(x) else missing


def _fmt_seconds(x):
    # Steps range from milliseconds (tiny test models) to tens of seconds; 4 significant digits fit both.
    return format(x, ".4g") if _is_number(x) else "n/a"


def _fmt_pct(fraction):
    return f"{100 * fraction:.1f} %" if _is_number(fraction) else "n/a"


def _cell(value):
    """Text that is safe inside a Markdown table cell: no pipes or newlines to break the row."""
    return str(value).replace("|", "\\|").replace("\n", " ").strip()


def _table(header, rows):
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _compact(value):
    """An op's partition dict on one line: `partition=expert, dispatch=all-to-all`."""
    if isinstance(value, dict):
        return ", ".join(f"{k}={_compact(v)}" for k, v in value.items()) or "-"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_compact(v) for v in value) + "]"
    return str(value)


def _span(first, end):
    if end <= first:
        return "none"
    return str(first) if end - first == 1 else f"{first}-{end - 1}"


def _layer_range(stage):
    """The stage's layers; an interleaved stage's model chunks are listed one by one."""
    chunks = getattr(stage, "chunks", None)
    if chunks:
        return " + ".join(_span(first, end) for first, end in chunks)
    return _span(*stage.layers)


def _num_layers(plan):
    """Decoder layers of the model: the fingerprint's count, else where the last stage ends."""
    n = plan.model.get("fingerprint", {}).get("num_hidden_layers")
    return n if isinstance(n, int) else plan.stages[-1].layers[1]


def _split_axes(plan):
    """The within-stage splits that are on, e.g. "dp=2, ep=4"; a stage has the same on every device."""
    parts = [f"{axis}={plan.mesh[axis]}" for axis in ("dp", "ep", "tp") if plan.mesh.get(axis, 1) > 1]
    return ", ".join(parts) if parts else "no split"


def _device_coords(plan, device):
    """Mesh position of a device without the pp index (the stage column says that)."""
    coords = plan.device_coords(device)
    parts = [f"{axis}{coords[axis]}" for axis in ("dp", "ep", "tp") if plan.mesh.get(axis, 1) > 1]
    return " ".join(parts) if parts else "-"


def _zero_level(plan):
    """The ZeRO level; `plan.zero` is {"level": n, "shard_over_replicas": bool} (a bare int in older plans)."""
    return plan.zero.get("level") if isinstance(plan.zero, dict) else plan.zero


def _zero_text(plan):
    over = isinstance(plan.zero, dict) and plan.zero.get("shard_over_replicas")
    return f"{_zero_level(plan)}" + (" (sharded over replicas too)" if over else "")


def _stage_of_device(plan):
    return {d: s.index for s in plan.stages for d in s.devices}


def _memory_breakdown(plan):
    """The per-device breakdown list and its component names in first-seen order, or (None, [])."""
    breakdown = plan.predicted.get("memory_breakdown_gib")
    if not isinstance(breakdown, list) or not breakdown or not all(isinstance(b, dict) for b in breakdown):
        return None, []
    names = []
    for per_device in breakdown:
        names += [k for k, v in per_device.items() if k not in names and _is_number(v)]
    return breakdown, names


# ---- Markdown ----------------------------------------------------------------------------------------
def _summary_lines(plan):
    try:
        text = summarize(plan)
    except (KeyError, TypeError, ValueError):
        # summarize() assumes a complete `predicted`; a partial plan still deserves a report.
        m = plan.mesh
        text = (f"plan for {plan.model.get('name')} on {plan.plan_ngpus} devices\n"
                f"  mesh: pp={m['pp']} dp={m['dp']} ep={m['ep']} tp={m['tp']}; zero {_zero_text(plan)}; "
                f"schedule {plan.schedule.get('name')} with {plan.schedule.get('micro_batches')} micro-batches")
    return ["```", text, "```"]


def _stage_lines(plan):
    rows = []
    for s in plan.stages:
        holds = [name for name, on in (("embed", s.embed), ("head", s.head)) if on]
        chunks = getattr(s, "chunks", None) or [s.layers]
        n = sum(max(0, end - first) for first, end in chunks)
        devices = ", ".join(str(d) for d in s.devices)
        layers = f"{_layer_range(s)} ({n} layer{'' if n == 1 else 's'})"
        rows.append([s.index, layers, devices, ", ".join(holds) or "-", s.recompute])
    return _table(["stage", "layers", "devices", "embed / head", "recompute"], rows)


def _mesh_lines(plan):
    rows = [[axis, size, AXIS_MEANING.get(axis, "")] for axis, size in plan.mesh.items()]
    runtime = plan.search_inputs.get("runtime_ngpus")
    if isinstance(runtime, int) and runtime >= plan.plan_ngpus:
        # The replica axis is not part of the plan's mesh, but it is what the run will actually use.
        rows.append(["replica (run time)", runtime // plan.plan_ngpus,
                     f"the whole plan repeated for --runtime_ngpus {runtime}; data parallel across copies"])
    lines = _table(["axis", "size", "what it splits"], rows)
    sched = plan.schedule
    lines += ["", f"- ZeRO level: {_zero_text(plan)}",
              f"- Schedule: {sched.get('name')}, {sched.get('micro_batches')} micro-batches"
              + (f", {sched['virtual_stages']} model chunks per device" if sched.get("name") == "Interleaved1F1B"
                 and sched.get("virtual_stages") else "")]
    inputs = [f"{k}={v}" for k, v in plan.search_inputs.items()]
    if inputs:
        lines.append("- Search inputs: " + ", ".join(inputs))
    return lines


def _ops_lines(plan):
    if not plan.ops:
        return ["_No op partitions recorded._"]
    return _table(["op", "partition"], [[name, _compact(choice)] for name, choice in plan.ops.items()])


def _memory_lines(plan):
    peaks = plan.predicted.get("peak_memory_gib") or []
    limit = plan.search_inputs.get("mem_limit_gib")
    breakdown, names = _memory_breakdown(plan)
    stage_of = _stage_of_device(plan)
    rows = []
    for d in range(plan.plan_ngpus):
        peak = peaks[d] if d < len(peaks) else None
        if _is_number(peak) and _is_number(limit):
            headroom = limit - peak
            headroom_text = f"{headroom:.2f}" if headroom >= 0 else f"OVER by {-headroom:.2f}"
        else:
            headroom_text = "n/a"
        row = [d, stage_of.get(d, "?"), _device_coords(plan, d), _fmt(peak), _fmt(limit), headroom_text]
        if breakdown is not None:
            per_device = breakdown[d] if d < len(breakdown) else {}
            row += [_fmt(per_device.get(name), missing="-") for name in names]
        rows.append(row)
    header = ["device", "stage", "mesh coords", "predicted peak GiB", "limit GiB", "headroom GiB"]
    header += [f"{name} GiB" for name in names]
    return _table(header, rows)


def _step_time_lines(plan):
    p = plan.predicted
    step = p.get("step_time_s")
    lines = []
    parts = p.get("breakdown_s")
    if isinstance(parts, dict) and parts:
        rows = [[name, _fmt_seconds(sec), _fmt_pct(sec / step) if _is_number(sec) and _is_number(step) and step > 0
                 else "n/a"] for name, sec in parts.items()]
        lines += _table(["part", "seconds", "% of step"], rows)
        # Communication can overlap compute, so the parts need not add up to the step.
        lines += ["", "_Parts may overlap (communication hidden behind compute), so the percentages need not "
                      "sum to 100._", ""]
    lines.append(f"- step time: {_fmt_seconds(step)}" + (" s" if _is_number(step) else ""))
    if "tokens_per_s" in p:
        lines.append(f"- tokens per second: {_fmt(p['tokens_per_s'], ',.0f')}")
    if "mfu" in p:
        lines.append(f"- MFU: {_fmt_pct(p['mfu'])}")
    return lines


def _max_peak(peaks):
    if isinstance(peaks, list):
        values = [x for x in peaks if _is_number(x)]
        return max(values) if values else None
    return peaks if _is_number(peaks) else None


def _runners_up_lines(plan):
    if not plan.alternatives:
        return ["_The search kept no runners-up._"]
    winner_step = plan.predicted.get("step_time_s")
    # The chosen plan is row 1 so every ratio has its reference in the same table.
    rows = [[1, "(chosen) " + _chosen_summary(plan), _fmt_seconds(winner_step), "1.00x",
             _fmt(_max_peak(plan.predicted.get("peak_memory_gib"))), _fmt_pct(plan.predicted.get("mfu")), ""]]
    for rank, alt in enumerate(plan.alternatives, start=2):
        pred = alt.get("predicted") or {}
        step = pred.get("step_time_s")
        ratio = f"{step / winner_step:.2f}x" if _is_number(step) and _is_number(winner_step) and winner_step > 0 \
            else "n/a"
        note = alt.get("rejected")
        rows.append([rank, alt.get("summary", "?"), _fmt_seconds(step), ratio,
                     _fmt(_max_peak(pred.get("peak_memory_gib"))), _fmt_pct(pred.get("mfu")),
                     f"rejected: {note}" if note else ""])
    return _table(["rank", "summary", "step time s", "vs winner", "max peak GiB", "MFU", "note"], rows)


def _chosen_summary(plan):
    """The chosen plan in the same one-line shape as a runner-up's summary."""
    m = plan.mesh
    return (f"pp={m['pp']} dp={m['dp']} ep={m['ep']} tp={m['tp']} zero={_zero_level(plan)} "
            f"{plan.schedule.get('name')} mb={plan.schedule.get('micro_batches')}")


def render_markdown(plan, png_name):
    """The report's Markdown text; `png_name` is the figure's path relative to the Markdown file."""
    name = plan.model.get("name", "model")
    lines = [f"# Parallel plan for {name} on P={plan.plan_ngpus} devices", ""]
    sections = [
        ("Summary", _summary_lines(plan)),
        ("Why this plan", [plan.explanation if plan.explanation.strip() else "_No explanation recorded._"]),
        ("Stages and devices", _stage_lines(plan)),
        ("Mesh", _mesh_lines(plan)),
        ("Op partitions", _ops_lines(plan)),
        ("Memory per device", _memory_lines(plan)),
        ("Step time", _step_time_lines(plan)),
        ("Runners-up", _runners_up_lines(plan)),
        ("Figure", [f"![Layers on devices, memory per device and pipeline schedule]({png_name})", "",
                    f"Figure file: [{png_name}]({png_name})"]),
    ]
    for title, body in sections:
        lines += [f"## {title}", "", *body, ""]
    return "\n".join(lines)


# ---- pipeline schedule simulation -------------------------------------------------------------------
def _stage_op_order(name, pp, stage, micro_batches, chunks):
    """The order in which one pipeline stage runs its ops, as (kind, micro-batch, chunk) tuples.

    1F1B (PipeDream-flush): stage s first runs pp-1-s forwards (warm-up), then alternates one forward
    and one backward, then drains the remaining backwards. With one stage this is GradAccum's F,B,F,B.
    Interleaved (Megatron-LM): each device holds `chunks` model chunks; forwards walk the chunks in
    groups of pp micro-batches, backwards walk them in reverse, with a longer warm-up.
    """
    if name == "Interleaved1F1B" and chunks > 1:
        total = micro_batches * chunks

        def unit(k, forward):
            chunk = (k // pp) % chunks
            micro_batch = (k // (pp * chunks)) * pp + k % pp
            return ("F" if forward else "B", micro_batch, chunk if forward else chunks - 1 - chunk)

        warmup = min((pp - stage - 1) * 2 + (chunks - 1) * pp, total)
    else:
        total, chunks = micro_batches, 1

        def unit(k, forward):
            return ("F" if forward else "B", k, 0)

        warmup = min(pp - stage - 1, total)
    order = [unit(k, True) for k in range(warmup)]
    for i in range(total - warmup):
        order += [unit(warmup + i, True), unit(i, False)]
    order += [unit(k, False) for k in range(total - warmup, total)]
    return order


def _simulate(orders, pp, chunks, durations):
    """Start and end time of every op, running each stage's ops in order as soon as inputs are ready.

    Virtual stage v = chunk * pp + stage. A forward needs the previous virtual stage's forward of the
    same micro-batch; a backward needs the next virtual stage's backward (the last one: its own
    forward). Communication time is ignored. Returns [(stage, kind, micro_batch, chunk, start, end)];
    raises RuntimeError when the order cannot make progress (an order this code does not model).
    """
    last_virtual = pp * chunks - 1
    done = {}  # (kind, virtual stage, micro_batch) -> end time
    position, free_at, boxes = [0] * pp, [0.0] * pp, []
    remaining = sum(len(o) for o in orders)
    while remaining:
        progressed = False
        for s in range(pp):
            while position[s] < len(orders[s]):
                kind, mb, chunk = orders[s][position[s]]
                v = chunk * pp + s
                if kind == "F":
                    needs = [("F", v - 1, mb)] if v > 0 else []
                else:
                    needs = [("F", v, mb)] + ([("B", v + 1, mb)] if v < last_virtual else [])
                if any(n not in done for n in needs):
                    break
                start = max([free_at[s]] + [done[n] for n in needs])
                end = start + durations[s][kind] / chunks
                done[(kind, v, mb)] = end
                free_at[s] = end
                boxes.append((s, kind, mb, chunk, start, end))
                position[s] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise RuntimeError("pipeline order deadlocks")
    return boxes


def pipeline_timeline(name, pp, micro_batches, virtual_stages=1, stage_times=None):
    """Boxes of a simulated pipeline step and whether they are exact or an approximation.

    `stage_times`: list per stage of {"forward": s, "backward": s} for one micro-batch (the whole
    stage, all its chunks); absent, forward takes 1 unit and backward 2. Returns (boxes, approximate)
    with boxes as in `_simulate`.
    """
    durations = []
    for s in range(pp):
        t = stage_times[s] if stage_times and s < len(stage_times) and isinstance(stage_times[s], dict) else {}
        f, b = t.get("forward"), t.get("backward")
        durations.append({"F": f if _is_number(f) and f > 0 else 1.0, "B": b if _is_number(b) and b > 0 else 2.0})
    chunks = virtual_stages if name == "Interleaved1F1B" and isinstance(virtual_stages, int) else 1
    chunks = max(1, chunks)
    if chunks > 1 and micro_batches % pp == 0:
        try:
            orders = [_stage_op_order(name, pp, s, micro_batches, chunks) for s in range(pp)]
            return _simulate(orders, pp, chunks, durations), False
        except RuntimeError:
            pass  # fall through to the 1F1B drawing below
    orders = [_stage_op_order("1F1B", pp, s, micro_batches, 1) for s in range(pp)]
    boxes = _simulate(orders, pp, 1, durations)
    if chunks == 1:
        return boxes, False
    # Megatron's interleaved order needs micro-batches divisible by pp; otherwise draw each 1F1B box
    # as `chunks` consecutive chunk boxes, which shows the chunking but not the smaller bubble.
    split = []
    for s, kind, mb, _, start, end in boxes:
        step = (end - start) / chunks
        for c in range(chunks):
            chunk = c if kind == "F" else chunks - 1 - c
            split.append((s, kind, mb, chunk, start + c * step, start + (c + 1) * step))
    return split, True


# ---- PNG --------------------------------------------------------------------------------------------
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


def _stage_colors(pp):
    import matplotlib

    # Pastel, so a stage is never mistaken for the schedule's forward (blue) / backward (orange) boxes
    # and black labels stay readable on it.
    cmap = matplotlib.colormaps["Set3" if pp <= 12 else "tab20"]
    return [cmap(i % cmap.N) for i in range(pp)]


def _draw_layers(ax, plan, colors, width_in, height_in):
    P, L = plan.plan_ngpus, _num_layers(plan)
    # y: layer i is the row [i, i+1); the embedding is a band below layer 0 and the head a band above
    # layer L-1, one row high for small models and taller for deep ones so they stay visible.
    band = max(1.0, L / 15)
    row_in, device_in = height_in / (L + 2 * band), width_in / P
    for s in plan.stages:
        lo, hi = min(s.devices), max(s.devices)
        first, end = s.layers
        for d in s.devices:
            if end > first:
                ax.add_patch(_rect((d - 0.44, first), 0.88, end - first, colors[s.index], alpha=0.85))
            if s.embed:
                ax.add_patch(_rect((d - 0.44, -band), 0.88, 0.9 * band, colors[s.index], alpha=0.6, hatch="//"))
            if s.head:
                ax.add_patch(_rect((d - 0.44, L + 0.1 * band), 0.88, 0.9 * band, colors[s.index], alpha=0.6,
                                   hatch="\\\\"))
        # One label per stage over all its devices, as large as the block allows.
        lines = [f"stage {s.index}", f"layer{'s' if s.layers[1] - s.layers[0] != 1 else ''} {_layer_range(s)}",
                 _split_axes(plan)]
        if s.recompute != "none":
            lines.append(f"recompute {s.recompute}")
        n_rows = max(end - first, 1)
        fitted = _fit_text(lines, (hi - lo + 0.88) * device_in, n_rows * row_in)
        if fitted:
            text, size, rotation = fitted
            y = (first + end) / 2 if end > first else first
            ax.text((lo + hi) / 2, y, text, ha="center", va="center", fontsize=size, rotation=rotation,
                    color="black", bbox=dict(boxstyle="round,pad=0.25", fc="white", ec="none", alpha=0.75),
                    in_layout=False)
    ax.set_xlim(-0.6, P - 0.4)
    ax.set_ylim(-band - 0.2, L + band + 0.2)
    # Label the embed and head bands by name and about 15 layer rows by number.
    step = max(1, math.ceil(L / 15))
    ticks = [-0.55 * band] + [i + 0.5 for i in range(0, L, step)] + [L + 0.55 * band]
    ax.set_yticks(ticks, ["embed"] + [str(i) for i in range(0, L, step)] + ["head"])
    ax.set_ylabel("model layer")
    dev_step = max(1, math.ceil(P / 16))
    if P <= 8:
        labels = [f"{d}\n{_device_coords(plan, d)}" if _device_coords(plan, d) != "-" else str(d) for d in range(P)]
        ax.set_xticks(range(P), labels)
    else:
        ax.set_xticks(range(0, P, dev_step))
    ax.set_xlabel("plan device")
    ops = [f"{name}: {choice.get('partition')}" for name, choice in plan.ops.items()
           if isinstance(choice, dict) and "partition" in choice][:4]
    title = "(a) Layers and ops on devices"
    ax.set_title(title + (f"\nops: {'; '.join(ops)}" if ops else ""), fontsize=13)


def _rect(xy, w, h, color, alpha=1.0, hatch=None):
    from matplotlib.patches import Rectangle

    return Rectangle(xy, w, h, facecolor=color, alpha=alpha, edgecolor="black", linewidth=0.6, hatch=hatch)


def _draw_memory(ax, plan, colors):
    P = plan.plan_ngpus
    peaks = [x if _is_number(x) else 0.0 for x in (plan.predicted.get("peak_memory_gib") or [])][:P]
    peaks += [0.0] * (P - len(peaks))
    limit = plan.search_inputs.get("mem_limit_gib")
    breakdown, names = _memory_breakdown(plan)
    xs = list(range(P))
    width = 0.7
    top = max(peaks + [0.0])
    if breakdown is not None:
        import matplotlib

        cmap = matplotlib.colormaps["Set2"]
        bottom = [0.0] * P
        for i, name in enumerate(names):
            values = []
            for d in xs:
                v = breakdown[d].get(name) if d < len(breakdown) else None
                values.append(v if _is_number(v) else 0.0)
            ax.bar(xs, values, width, bottom=bottom, label=name, color=cmap(i % cmap.N), edgecolor="white",
                   linewidth=0.5)
            bottom = [b + v for b, v in zip(bottom, values)]
        top = max([top] + bottom)
        # The peak need not equal the sum of components (they may peak at different moments).
        over = [_is_number(limit) and peak > limit for peak in peaks]
        ax.scatter(xs, peaks, marker="_", s=900 * width, color=["crimson" if o else "black" for o in over],
                   linewidths=2.5, zorder=3, label="predicted peak")
    else:
        stage_of = _stage_of_device(plan)
        ax.bar(xs, peaks, width, color=[colors[stage_of.get(d, 0)] for d in xs], edgecolor="black", linewidth=0.6,
               label="predicted peak")
    if _is_number(limit):
        ax.axhline(limit, color="crimson", linestyle="--", linewidth=1.8, label=f"limit {limit:g} GiB")
        top = max(top, limit)
    if P <= 16:
        for d, peak in zip(xs, peaks):
            ax.text(d, peak + top * 0.01, f"{peak:.1f}", ha="center", va="bottom", fontsize=9)
    ax.set_ylim(0, top * 1.1 if top > 0 else 1.0)
    ax.set_xlim(-0.6, P - 0.4)
    ax.set_xticks(range(0, P, max(1, math.ceil(P / 16))))
    ax.set_xlabel("plan device")
    ax.set_ylabel("GiB")
    ax.set_title("(b) Memory per device", fontsize=13)
    # Outside the axes, so it never hides a bar; constrained layout makes room for it.
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, framealpha=0.9)


def _bubble_text(plan, pp, chunks, stage_times, unit, drawn):
    """The idle share of a step with all micro-batches, from a full simulation when it is small enough."""
    name, M = plan.schedule.get("name"), plan.schedule.get("micro_batches")
    if pp < 2 or not isinstance(M, int) or 2 * M * pp * chunks > MAX_SIMULATED_OPS:
        return ""
    boxes, approximate = pipeline_timeline(name, pp, M, chunks, stage_times)
    span = max(b[5] for b in boxes)
    busy = sum(b[5] - b[4] for b in boxes)
    idle = (f"idle {100 * (1 - busy / (pp * span)):.1f} % of stage time (communication not modelled"
            + ("; 1F1B order, approximate)" if approximate else ")"))
    if drawn == M:
        return f"; spans {span:.4g} {unit}, {idle}"
    return f"; full step ({M} micro-batches) spans {span:.4g} {unit}, {idle}"


def _draw_schedule(ax, plan, width_in):
    pp = plan.mesh["pp"]
    name = plan.schedule.get("name", "1F1B")
    M = plan.schedule.get("micro_batches", 1)
    M = M if isinstance(M, int) and M > 0 else 1
    chunks = plan.schedule.get("virtual_stages") or 1
    drawn = min(M, MAX_DRAWN_MICRO_BATCHES)
    if name == "Interleaved1F1B" and drawn % pp:
        # Keep Megatron's order drawable: it needs a multiple of pp micro-batches.
        drawn = max(pp, drawn - drawn % pp) if M >= pp else drawn
    stage_times = plan.predicted.get("stage_times_s")
    have_times = isinstance(stage_times, list) and len(stage_times) == pp
    unit = "s" if have_times else "units"
    boxes, approximate = pipeline_timeline(name, pp, drawn, chunks, stage_times if have_times else None)
    span = max(b[5] for b in boxes)
    forward_shades = _shades(FORWARD_COLOR, chunks)
    backward_shades = _shades(BACKWARD_COLOR, chunks)
    for s, kind, mb, chunk, start, end in boxes:
        color = (forward_shades if kind == "F" else backward_shades)[chunk]
        ax.barh(s, end - start, left=start, height=0.8, color=color, edgecolor="black", linewidth=0.4)
        label = str(mb)
        box_in = (end - start) / span * width_in
        size = min(9.0, 72 * box_in / (0.6 * len(label) + 0.4))
        if size >= 5.5:
            ax.text((start + end) / 2, s, label, ha="center", va="center", fontsize=size, color="white",
                    in_layout=False)
    ax.set_ylim(pp - 0.4, -0.6)  # stage 0 on top, like the data flowing downwards
    ax.set_xlim(0, span * 1.005)
    stage_labels = []
    for st in plan.stages:
        devices = f"d{min(st.devices)}" + (f"-{max(st.devices)}" if len(st.devices) > 1 else "")
        stage_labels.append(f"stage {st.index}\n({devices})")
    ax.set_yticks(range(pp), stage_labels)
    ax.set_xlabel(f"time ({unit})" + ("" if have_times else ": forward = 1, backward = 2 per micro-batch"))
    shown = f"first {drawn} of {M} micro-batches" if drawn < M else f"{M} micro-batches"
    extra = f", {chunks} chunks per device" if name == "Interleaved1F1B" and chunks > 1 else ""
    note = " (approximate: chunks drawn inside 1F1B slots)" if approximate else ""
    bubble = _bubble_text(plan, pp, chunks if name == "Interleaved1F1B" else 1,
                          stage_times if have_times else None, unit, drawn)
    title = f"(c) Pipeline schedule: {name}, {shown}{extra}{note}"
    # A second line rather than a title wider than the figure.
    title += ("\n" + bubble.lstrip("; ")) if len(title) + len(bubble) > 110 else bubble
    ax.set_title(title, fontsize=13)
    from matplotlib.patches import Patch

    if chunks > 1 and name == "Interleaved1F1B":
        handles = [Patch(color=forward_shades[c], label=f"forward, chunk {c}") for c in range(chunks)]
        handles += [Patch(color=backward_shades[c], label=f"backward, chunk {c}") for c in range(chunks)]
    else:
        handles = [Patch(color=FORWARD_COLOR, label="forward"), Patch(color=BACKWARD_COLOR, label="backward")]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=9, framealpha=0.9,
              title="micro-batch #\nin each box", title_fontsize=8)


def _shades(color, n):
    """n shades of a colour, darkest first, so interleaved chunks are told apart."""
    from matplotlib.colors import to_rgb

    r, g, b = to_rgb(color)
    if n <= 1:
        return [(r, g, b)]
    return [tuple(c + (1 - c) * 0.45 * i / (n - 1) for c in (r, g, b)) for i in range(n)]


def render_png(plan, png_path):
    # matplotlib is imported here, not at module level, so compiling a plan without a report stays fast.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # A bare Figure on the Agg canvas: no pyplot global state, no GUI backend, safe in any process.
    fig = Figure(figsize=(FIG_W_IN, FIG_H_IN), dpi=FIG_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, 2, height_ratios=[1.45, 1.0], width_ratios=[1.35, 1.0])
    ax_layers, ax_memory = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
    ax_schedule = fig.add_subplot(grid[1, :])
    colors = _stage_colors(plan.mesh["pp"])
    # Sizes in inches of the plotting areas, estimated from the grid ratios less room for labels;
    # they only decide font sizes of labels inside boxes.
    top_h = FIG_H_IN * 1.45 / 2.45 - 1.5
    _draw_layers(ax_layers, plan, colors, FIG_W_IN * 1.35 / 2.35 - 1.3, top_h)
    _draw_memory(ax_memory, plan, colors)
    _draw_schedule(ax_schedule, plan, FIG_W_IN - 3.2)  # less the stage labels and the legend
    m, p = plan.mesh, plan.predicted
    title = [f"{plan.model.get('name', 'model')}: P={plan.plan_ngpus} "
             f"(pp={m['pp']} dp={m['dp']} ep={m['ep']} tp={m['tp']})", f"zero {_zero_text(plan)}"]
    if _is_number(p.get("step_time_s")):
        title.append(f"predicted step {_fmt_seconds(p['step_time_s'])} s")
    if _is_number(p.get("mfu")):
        title.append(f"MFU {_fmt_pct(p['mfu'])}")
    fig.suptitle(", ".join(title), fontsize=15)
    tmp = f"{png_path}.tmp"
    fig.savefig(tmp, format="png", dpi=FIG_DPI)
    os.replace(tmp, png_path)  # a reader never sees half a file


def write_report(plan: Plan, md_path: str, png_path: str) -> None:
    """Write the Markdown report to `md_path` and its figure to `png_path` (usually beside the plan)."""
    for path in (md_path, png_path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    render_png(plan, png_path)
    png_name = os.path.relpath(os.path.abspath(png_path), os.path.dirname(os.path.abspath(md_path)))
    text = render_markdown(plan, png_name.replace(os.sep, "/"))
    tmp = f"{md_path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, md_path)
