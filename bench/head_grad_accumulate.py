"""The chunked loss's lm_head weight-gradient accumulation, kernel by kernel, on one GPU.

    python bench/head_grad_accumulate.py [--chunk 4096] [--vocab 102400] [--hidden 2048]

runtime/loss.py sums each chunk's [V, N] x [N, D] bf16 product into a float32 [V, D] gradient. Three
ways, each timed as the GPU kernels it launches (torch.profiler, per chunk, after a warm-up):
  out=total   torch.addmm(total, a, b, out_dtype=float32, out=total): the GEMM accumulates itself
              (what runtime/loss.py does on CUDA);
  new tensor  total = torch.addmm(total, a, b, out_dtype=float32): the same GEMM, a fresh output
              (ATen copies the old sum into it first);
  add         total += a @ b: a bf16 product, then an add kernel (what it did before).
2026-12-02, H200: 2.276 ms; 2.278 + 0.390 ms copy; 2.149 + 0.747 ms add (bench/RESULTS.md).
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.gpu_profile import gpu_kernels, kernel_ms_per_call  # noqa: E402


def kernels_by_name(fn, calls=5):
    """{kernel name: GPU ms per call} of fn() after a warm-up (bench/gpu_profile.kernel_ms_per_call)."""
    for _ in range(3):
        fn()
    _, profiler = kernel_ms_per_call(fn, calls)
    times = {}
    for e in gpu_kernels(profiler):
        times[e.name[:70]] = times.get(e.name[:70], 0.0) + (e.time_range.end - e.time_range.start) / 1e3 / calls
    return times


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--chunk", type=int, default=4096, help="positions per chunk (N)")
    p.add_argument("--vocab", type=int, default=102400, help="vocabulary size (V, the head's rows)")
    p.add_argument("--hidden", type=int, default=2048, help="hidden size (D, the head's columns)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/head_grad_accumulate.py needs a CUDA GPU", file=sys.stderr)
        return 2
    V, N, D = args.vocab, args.chunk, args.hidden
    a = torch.randn(N, V, device="cuda", dtype=torch.bfloat16).t()  # grad_nV.t(), as the loss passes it
    b = torch.randn(N, D, device="cuda", dtype=torch.bfloat16)
    total = torch.zeros(V, D, device="cuda")
    ways = {"out=total": lambda: torch.addmm(total, a, b, out_dtype=torch.float32, out=total),
            "new tensor": lambda: torch.addmm(total, a, b, out_dtype=torch.float32),
            "add": lambda: total.add_(a @ b)}
    for name, fn in ways.items():
        times = kernels_by_name(fn)
        print(f"{name:10s} {sum(times.values()):7.3f} ms per chunk: "
              + "; ".join(f"{k} {v:.3f}" for k, v in sorted(times.items(), key=lambda kv: -kv[1])), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
