"""What the GPU did during a benchmark, from torch.profiler: kernel time by kind and by kernel, the
GPU's idle spans and (with host activity profiled) what the host was doing meanwhile. Shared by the
step benchmarks (bench/train_step.py, bench/finetune_step.py: `--profile`, print_step_summary) and
the operator ones (bench/lora_linear.py, bench/expert_lora.py, bench/head_grad_accumulate.py:
kernel_ms_per_call, operators_by_shape)."""

import torch

KERNEL_KINDS = (("grouped GEMM", ("grouped", "group_gemm", "GroupProblem")), ("attention", ("fmha", "flash", "cudnn", "attention")),
                ("GEMM", ("gemm", "nvjet", "sm90_xmma", "cutlass")), ("gather/scatter", ("index", "gather", "scatter")),
                ("compiled (triton)", ("triton",)), ("copy", ("copy", "Memcpy", "Memset", "cat")))


def kernel_kind(name):
    lowered = name.lower()
    for kind, keys in KERNEL_KINDS:
        if any(k.lower() in lowered for k in keys):
            return kind
    return "other"


def gpu_kernels(profiler):
    """The profiler's GPU kernels: its CUDA-side events less the user annotations (a record_function
    scope also appears on the GPU timeline, spanning the kernels it launched, which would count
    twice: the trainer's phases did under --profile_host)."""
    return [e for e in profiler.events()
            if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]


def kernel_ms_per_call(fn, iters, record_shapes=False):
    """(milliseconds of GPU kernels per call of fn, their durations summed and the gaps between them not;
    the profiler). record_shapes: host operators recorded with their input shapes too, for
    key_averages(group_by_input_shape=True)."""
    activities = [torch.profiler.ProfilerActivity.CUDA] + ([torch.profiler.ProfilerActivity.CPU] if record_shapes else [])
    with torch.profiler.profile(activities=activities, record_shapes=record_shapes) as profiler:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    return sum(e.time_range.end - e.time_range.start for e in gpu_kernels(profiler)) / 1e3 / iters, profiler


def operators_by_shape(profiler, iters):
    """Each host operator's (and each kernel's) GPU time per call, by input shapes, largest first."""
    ops = []
    for avg in profiler.key_averages(group_by_input_shape=True):
        device_us = getattr(avg, "self_device_time_total", None)
        if device_us is None:
            device_us = avg.self_cuda_time_total
        if device_us > 0 and not avg.key.startswith("ProfilerStep"):
            ops.append({"op": avg.key, "shapes": str(avg.input_shapes)[:160], "ms": device_us / 1e3 / iters})
    return sorted(ops, key=lambda o: -o["ms"])


def kernel_summary(profiler, timed_wall_s, timed_steps):
    """What the GPU did over the timed steps (the last `timed_wall_s` seconds of kernels the profiler
    saw): the share of that time some kernel ran (the rest: the GPU waiting for the host), and kernel
    time per step by kind and by kernel."""
    kernels = gpu_kernels(profiler)
    if not kernels:
        return "profile: no CUDA kernels recorded"
    end = max(e.time_range.end for e in kernels)
    start = end - timed_wall_s * 1e6
    spans = sorted((max(e.time_range.start, start), e.time_range.end, e.name) for e in kernels if e.time_range.end > start)
    busy, reach = 0.0, start
    by_kind, by_name = {}, {}
    for s, e, name in spans:
        busy += max(0.0, e - max(s, reach))
        reach = max(reach, e)
        by_kind[kernel_kind(name)] = by_kind.get(kernel_kind(name), 0.0) + (e - s)
        by_name[name] = by_name.get(name, 0.0) + (e - s)
    per_step = 1e3 * timed_steps
    gaps, previous = {}, None  # the GPU's idle spans between kernels, by the kernels around them
    short_idle = 0.0  # idle in gaps of at most 50 us: kernels launched no faster than they run
    for s, e, name in spans:
        if previous is not None and s - previous[0] > 50:
            key = (previous[1][:60], name[:60])
            total, count = gaps.get(key, (0.0, 0))
            gaps[key] = (total + s - previous[0], count + 1)
        elif previous is not None:
            short_idle += max(0.0, s - previous[0])
        if previous is None or e > previous[0]:
            previous = (e, name)
    lines = [f"profile over the {timed_steps} timed steps: GPU busy {100 * busy / (end - start):.1f} % of "
             f"{timed_wall_s / timed_steps * 1e3:.1f} ms per step; {len(spans) / timed_steps:.0f} kernels per step, "
             f"{short_idle / per_step:.2f} ms per step idle in gaps of at most 50 us (the host launching no faster "
             "than the kernels run); kernel ms per step by kind:"]
    lines += [f"  {kind:20s} {t / per_step:8.2f}" for kind, t in sorted(by_kind.items(), key=lambda kv: -kv[1])]
    lines.append("top kernels, ms per step:")
    lines += [f"  {t / per_step:8.2f}  {name[:110]}" for name, t in sorted(by_name.items(), key=lambda kv: -kv[1])[:25]]
    lines.append("largest GPU idle spans (> 50 us), ms per step: after kernel -> before kernel (count per step)")
    lines += [f"  {t / per_step:8.2f}  ({n / timed_steps:.0f}x)  {a}  ->  {b}"
              for (a, b), (t, n) in sorted(gaps.items(), key=lambda kv: -kv[1][0])[:15]]
    lines += host_during_idle(profiler, spans, start)
    return "\n".join(lines)


def host_during_idle(profiler, spans, start, longest=6, min_us=500):
    """With host activity profiled (--profile_host): for the longest single GPU idle spans of the
    timed steps, the host's ops (and the trainer's record_function phases, train.*) that overlap
    each, by overlap time: what the GPU waited for."""
    host = [e for e in profiler.events() if e.device_type == torch.autograd.DeviceType.CPU
            and e.time_range.end > start]
    if not host:
        return []
    idle, reach = [], None
    for s, e, _ in spans:
        if reach is not None and s - reach > min_us:
            idle.append((reach, s))
        reach = e if reach is None else max(reach, e)
    lines = [f"host ops during the {longest} longest GPU idle spans (> {min_us} us), ms of overlap:"]
    for a, b in sorted(idle, key=lambda span: span[0] - span[1])[:longest]:
        overlap = {}
        for ev in host:
            o = min(b, ev.time_range.end) - max(a, ev.time_range.start)
            if o > 0:
                overlap[ev.name] = overlap.get(ev.name, 0.0) + o
        top = sorted(overlap.items(), key=lambda kv: -kv[1])[:8]
        lines.append(f"  idle {(b - a) / 1e3:.2f} ms: " + "; ".join(f"{n[:48]} {o / 1e3:.2f}" for n, o in top))
    return lines


def operators_in_window(profiler, timed_wall_s, timed_steps, top=40):
    """Lines: the host operators (by name and input shapes) whose GPU kernels took the most time per
    step over the timed steps, each with the kernel time it launched itself (self device time). The
    window is the last `timed_wall_s` seconds before the last kernel, applied to the operators' host
    start times: the host runs ahead of the GPU by up to a step, so the figures are per step to within
    that edge. Needs a profiler started with shapes=True (host ops and their input shapes)."""
    kernels = gpu_kernels(profiler)
    start = max(e.time_range.end for e in kernels) - timed_wall_s * 1e6
    by_op = {}
    for e in profiler.events():
        if e.device_type != torch.autograd.DeviceType.CPU or e.time_range.start < start:
            continue
        device_us = e.self_device_time_total
        if device_us > 0:
            key = (e.name, str(e.input_shapes)[:150])
            by_op[key] = by_op.get(key, 0.0) + device_us
    total = sum(by_op.values())
    lines = [f"host operators by input shapes, GPU ms per step (their own kernels; {total / 1e3 / timed_steps:.1f} ms "
             "per step in all):"]
    lines += [f"  {t / 1e3 / timed_steps:8.3f}  {name[:70]}  {shapes}"
              for (name, shapes), t in sorted(by_op.items(), key=lambda kv: -kv[1])[:top]]
    return lines


def start_profiler(host=False, shapes=False):
    """A started torch.profiler recording CUDA kernels (and the host's ops with host=True; the host's
    ops with their input shapes with shapes=True)."""
    host = host or shapes
    activities = [torch.profiler.ProfilerActivity.CUDA] + ([torch.profiler.ProfilerActivity.CPU] if host else [])
    profiler = torch.profiler.profile(activities=activities, record_shapes=shapes)
    profiler.__enter__()
    return profiler


def print_step_summary(profiler, timed_records):
    """Prints kernel_summary over a run's timed steps (trainer records with step_time_s), and with
    shapes recorded the operators by shape; a diagnostic, so a failure to summarise is reported, never
    raised (the run's result is kept)."""
    wall_s, steps = sum(r["step_time_s"] for r in timed_records), len(timed_records)
    try:
        print(kernel_summary(profiler, wall_s, steps), flush=True)
        if profiler.record_shapes:
            print("\n".join(operators_in_window(profiler, wall_s, steps)), flush=True)
    except Exception as e:  # noqa: BLE001
        print(f"profile summary failed: {type(e).__name__}: {e}", flush=True)
