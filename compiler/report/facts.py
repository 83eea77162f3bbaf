"""What both halves of the report read from a plan, and how they print its numbers.

Only `Plan`'s required fields are relied on; the optional `plan.predicted` keys are described in
`compiler/report/__init__.py`. Every reader here tolerates their absence.
"""

import math

from compiler.plan import PlanError, split_ops_text as _plan_split_ops_text


def is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def fmt_seconds(x):
    # Steps range from milliseconds (tiny test models) to tens of seconds; 4 significant digits fit both.
    return format(x, ".4g") if is_number(x) else "n/a"


def fmt_pct(fraction):
    return f"{100 * fraction:.1f} %" if is_number(fraction) else "n/a"


def _span(first, end):
    if end <= first:
        return "none"
    return str(first) if end - first == 1 else f"{first}-{end - 1}"


def layer_range(stage):
    """The stage's layers, e.g. "0-3"; an interleaved stage's model chunks are listed one by one."""
    if stage.chunks:
        return " + ".join(_span(first, end) for first, end in stage.chunks)
    return _span(*stage.layers)


def device_coords(plan, device):
    """Mesh position of a device without the pp index (the stage says that), e.g. "dp0 ep1"."""
    coords = plan.device_coords(device)
    parts = [f"{axis}{coords[axis]}" for axis in ("dp", "ep", "tp") if plan.mesh.get(axis, 1) > 1]
    return " ".join(parts) if parts else "-"


def zero_level(plan):
    """The ZeRO level; `plan.zero` is {"level": n, "shard_over_replicas": bool} (a bare int in older plans)."""
    return plan.zero.get("level") if isinstance(plan.zero, dict) else plan.zero


def zero_text(plan):
    over = isinstance(plan.zero, dict) and plan.zero.get("shard_over_replicas")
    return f"{zero_level(plan)}" + (" (sharded over replicas too)" if over else "")


def stage_of_device(plan):
    return {d: s.index for s in plan.stages for d in s.devices}


def memory_breakdown(plan):
    """The per-device breakdown list and its component names in first-seen order, or (None, [])."""
    breakdown = plan.predicted.get("memory_breakdown_gib")
    if not isinstance(breakdown, list) or not breakdown or not all(isinstance(b, dict) for b in breakdown):
        return None, []
    names = []
    for per_device in breakdown:
        names += [k for k, v in per_device.items() if k not in names and is_number(v)]
    return breakdown, names


def split_ops_text(plan):
    """The op families the plan splits ("experts expert (all_to_all), others replicated"), or "" when
    its `ops` do not say (a hand-built plan that was never validated)."""
    try:
        return _plan_split_ops_text(plan)
    except (PlanError, AttributeError, TypeError):
        return ""
