"""bench/finetune_step.py's profile summary (a CUDA run's diagnostic) on a hand-made trace: the GPU's
busy share, kernel time by kind, the idle spans between kernels, and the host ops that overlap the
longest of them."""

from types import SimpleNamespace

import torch

from bench.gpu_profile import kernel_summary

CUDA, CPU = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU


def _event(name, device, start_us, end_us, annotation=False):
    return SimpleNamespace(name=name, device_type=device, time_range=SimpleNamespace(start=start_us, end=end_us),
                           is_user_annotation=annotation)


def test_profile_summary_finds_the_idle_span_and_what_the_host_did_in_it():
    events = [_event("nvjet_gemm", CUDA, 0, 4000), _event("cutlass_grouped_gemm", CUDA, 4000, 7000),
              # 2 ms of idle GPU while the host steps the optimizer
              _event("triton_poi_fused_add", CUDA, 9000, 10000),
              _event("train.finish_step", CPU, 6500, 9500), _event("Optimizer.step#AdamW.step", CPU, 7100, 8900),
              # a record_function scope on the GPU timeline: not a kernel, its span not busy time
              _event("train.forward_backward", CUDA, 0, 10000, annotation=True)]
    trace = SimpleNamespace(events=lambda: events)
    text = kernel_summary(trace, timed_wall_s=0.010, timed_steps=1)
    assert "GPU busy 80.0 %" in text
    assert "3 kernels per step, 0.00 ms per step idle in gaps of at most 50 us" in text
    assert "grouped GEMM" in text and "GEMM" in text and "compiled (triton)" in text
    assert "2.00  (1x)  cutlass_grouped_gemm  ->  triton_poi_fused_add" in text
    idle_line = next(line for line in text.splitlines() if line.strip().startswith("idle 2.00 ms"))
    assert "train.finish_step 2.00" in idle_line and "Optimizer.step#AdamW.step 1.80" in idle_line


def test_profile_summary_adds_up_the_short_gaps_between_kernels():
    """Many kernels each waiting 20 us for the next launch: no long idle span, but their gaps add up."""
    events = [_event(f"triton_poi_fused_{i}", CUDA, i * 30, i * 30 + 10) for i in range(100)]
    text = kernel_summary(SimpleNamespace(events=lambda: events), timed_wall_s=0.00299, timed_steps=1)
    assert "100 kernels per step, 1.98 ms per step idle in gaps of at most 50 us" in text
