"""The report's Markdown: what the plan is and why, as short sections of tables."""

from compiler.plan import summarize
from compiler.report.facts import (device_coords, fmt_pct, fmt_seconds, is_number, layer_range,
                                   memory_breakdown, stage_of_device, zero_level, zero_text)

AXIS_MEANING = {
    "pp": "pipeline parallel: consecutive layers split into stages",
    "dp": "data parallel: the batch is split, parameters replicated (or sharded by ZeRO)",
    "ep": "expert parallel: routed experts split, tokens exchanged by all-to-all",
    "tp": "tensor parallel: attention heads / MLP intermediate split",
}


def _fmt(x, spec=".2f", missing="n/a"):
    return format(x, spec) if is_number(x) else missing


def _cell(value):
    """Text that is safe inside a Markdown table cell: no pipes or newlines to break the row."""
    return str(value).replace("|", "\\|").replace("\n", " ").strip()


def _table(header, rows):
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]


def _compact(value):
    """An op's partition dict on one line: `partition=expert, dispatch=all-to-all`."""
    if isinstance(value, dict):
        return ", ".join(f"{k}={_compact(v)}" for k, v in value.items()) or "-"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_compact(v) for v in value) + "]"
    return str(value)


def _max_peak(peaks):
    values = [x for x in (peaks if isinstance(peaks, list) else [peaks]) if is_number(x)]
    return max(values) if values else None


def _summary_lines(plan):
    try:
        text = summarize(plan)
    except (KeyError, TypeError, ValueError):
        # summarize() assumes a complete `predicted`; a partial plan still deserves a report.
        m = plan.mesh
        text = (f"plan for {plan.model.get('name')} on {plan.plan_ngpus} devices\n"
                f"  mesh: pp={m['pp']} dp={m['dp']} ep={m['ep']} tp={m['tp']}; zero {zero_text(plan)}; "
                f"schedule {plan.schedule.get('name')} with {plan.schedule.get('micro_batches')} micro-batches")
    return ["```", text, "```"]


def _stage_lines(plan):
    rows = []
    for s in plan.stages:
        holds = [name for name, on in (("embed", s.embed), ("head", s.head)) if on]
        n = sum(max(0, end - first) for first, end in s.chunks or [s.layers])
        layers = f"{layer_range(s)} ({n} layer{'' if n == 1 else 's'})"
        rows.append([s.index, layers, ", ".join(str(d) for d in s.devices), ", ".join(holds) or "-", s.recompute])
    return _table(["stage", "layers", "devices", "embed / head", "recompute"], rows)


def _schedule_text(plan):
    sched = plan.schedule
    text = f"{sched.get('name')}, {sched.get('micro_batches')} micro-batches"
    if sched.get("name") == "Interleaved1F1B" and sched.get("virtual_stages"):
        text += f", {sched['virtual_stages']} model chunks per device"
    return text


def _mesh_lines(plan):
    rows = [[axis, size, AXIS_MEANING.get(axis, "")] for axis, size in plan.mesh.items()]
    runtime = plan.search_inputs.get("runtime_ngpus")
    if isinstance(runtime, int) and runtime >= plan.plan_ngpus:
        # The replica axis is not part of the plan's mesh, but it is what the run will actually use.
        rows.append(["replica (run time)", runtime // plan.plan_ngpus,
                     f"the whole plan repeated for --runtime_ngpus {runtime}; data parallel across copies"])
    lines = _table(["axis", "size", "what it splits"], rows)
    lines += ["", f"- ZeRO level: {zero_text(plan)}", f"- Schedule: {_schedule_text(plan)}"]
    inputs = [f"{k}={v}" for k, v in plan.search_inputs.items()]
    if inputs:
        lines.append("- Search inputs: " + ", ".join(inputs))
    return lines


def _ops_lines(plan):
    """One row per op family (spec.OP_FAMILIES) and per annotated custom op of `plan.ops`."""
    if not plan.ops:
        return ["_No op partitions recorded._"]
    rows = []
    for name, choice in plan.ops.items():
        if not isinstance(choice, dict):
            rows.append([name, _compact(choice), "-", "-"])
            continue
        rest = {k: v for k, v in choice.items() if k not in ("partition", "annotation")}
        annotation = choice.get("annotation")
        rows.append([name, choice.get("partition", "-"), _compact(rest), f"`{annotation}`" if annotation else "-"])
    return _table(["op", "partition", "degrees, dispatch, split", "annotation"], rows)


def _headroom(peak, limit):
    if not (is_number(peak) and is_number(limit)):
        return "n/a"
    return f"{limit - peak:.2f}" if limit >= peak else f"OVER by {peak - limit:.2f}"


def _memory_lines(plan):
    peaks = plan.predicted.get("peak_memory_gib") or []
    limit = plan.search_inputs.get("mem_limit_gib")
    breakdown, names = memory_breakdown(plan)
    stage_of = stage_of_device(plan)
    rows = []
    for d in range(plan.plan_ngpus):
        peak = peaks[d] if d < len(peaks) else None
        row = [d, stage_of.get(d, "?"), device_coords(plan, d), _fmt(peak), _fmt(limit), _headroom(peak, limit)]
        if breakdown is not None:
            per_device = breakdown[d] if d < len(breakdown) else {}
            row += [_fmt(per_device.get(name), missing="-") for name in names]
        rows.append(row)
    header = ["device", "stage", "mesh coords", "predicted peak GiB", "limit GiB", "headroom GiB"]
    return _table(header + [f"{name} GiB" for name in names], rows)


def _share(part, whole):
    return fmt_pct(part / whole) if is_number(part) and is_number(whole) and whole > 0 else "n/a"


def _step_time_lines(plan):
    p = plan.predicted
    step = p.get("step_time_s")
    lines = []
    parts = p.get("breakdown_s")
    if isinstance(parts, dict) and parts:
        lines += _table(["part", "seconds", "% of step"],
                        [[name, fmt_seconds(sec), _share(sec, step)] for name, sec in parts.items()])
        # Communication can overlap compute, so the parts need not add up to the step.
        lines += ["", "_Parts may overlap (communication hidden behind compute), so the percentages need not "
                      "sum to 100._", ""]
    lines.append(f"- step time: {fmt_seconds(step)}" + (" s" if is_number(step) else ""))
    if "tokens_per_s" in p:
        lines.append(f"- tokens per second: {_fmt(p['tokens_per_s'], ',.0f')}")
    if "mfu" in p:
        lines.append(f"- MFU: {fmt_pct(p['mfu'])}")
    return lines


def _chosen_summary(plan):
    """The chosen plan in the same one-line shape as a runner-up's summary."""
    m = plan.mesh
    return (f"pp={m['pp']} dp={m['dp']} ep={m['ep']} tp={m['tp']} zero={zero_level(plan)} "
            f"{plan.schedule.get('name')} mb={plan.schedule.get('micro_batches')}")


def _ratio(step, winner_step):
    ok = is_number(step) and is_number(winner_step) and winner_step > 0
    return f"{step / winner_step:.2f}x" if ok else "n/a"


def _runners_up_lines(plan):
    if not plan.alternatives:
        return ["_The search kept no runners-up._"]
    p = plan.predicted
    winner_step = p.get("step_time_s")
    # The chosen plan is row 1 so every ratio has its reference in the same table.
    rows = [[1, "(chosen) " + _chosen_summary(plan), fmt_seconds(winner_step), "1.00x",
             _fmt(_max_peak(p.get("peak_memory_gib"))), fmt_pct(p.get("mfu")), ""]]
    for rank, alt in enumerate(plan.alternatives, start=2):
        pred = alt.get("predicted") or {}
        note = alt.get("rejected")
        rows.append([rank, alt.get("summary", "?"), fmt_seconds(pred.get("step_time_s")),
                     _ratio(pred.get("step_time_s"), winner_step), _fmt(_max_peak(pred.get("peak_memory_gib"))),
                     fmt_pct(pred.get("mfu")), f"rejected: {note}" if note else ""])
    return _table(["rank", "summary", "step time s", "vs winner", "max peak GiB", "MFU", "note"], rows)


def render_markdown(plan, png_name):
    """The report's Markdown text; `png_name` is the figure's path relative to the Markdown file."""
    lines = [f"# Parallel plan for {plan.model.get('name', 'model')} on P={plan.plan_ngpus} devices", ""]
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
