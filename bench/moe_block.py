"""Benchmark of the MoE expert block, forward and backward, on one GPU.

    python bench/moe_block.py [--variants loop,naive,gather,fused,grouped] [--iters 30] [--profile 16384x64]

The block is what the training form runs for the routed experts of one layer: permute the
(token, choice) slots by expert, grouped GEMM for gate and up, SwiGLU, grouped GEMM for down,
unpermute and combine with the routing weights. Shapes: hidden 2048, moe_intermediate 1408, top-6,
uniform random routing, at the (tokens, experts) pairs of the nnScaler DeepSeek example, whose
figures (H100, grouped_gemm 1.1.4 CUTLASS kernel) are printed beside ours.

MFU = tokens x 6 x 3 x (6 x 2048 x 1408) / (time x 989e12): top-6 choices, forward + backward = 3x the
forward FLOPs, 3 projections x 2 FLOPs per multiply-add, H100 SXM dense bf16 peak 989 TFLOP/s.

Variants (each a step of what made the difference, see bench/RESULTS.md):
  loop      per-expert torch.mm over host-side slices (the reference's structure; syncs the host)
  naive     torch._grouped_mm for gate, up and down, but permute/unpermute by index_select with
            autograd's default backward (atomic index_add) and the weighted combine on a
            [T*K, D] float32 tensor
  gather    + gather-only permutation both ways (custom autograd), routing weight folded into the
            down projection's input, float32 sum over a token's K slots
  fused     + gate and up as one grouped GEMM ([E, 2, F, D] weights) and a SwiGLU autograd function
            whose backward writes the [T*K, 2F] gradient directly (one input-gradient GEMM, no add)
  grouped   + the elementwise SwiGLU and the gather-sum fused into single kernels by torch.compile:
            kernels.expert_swiglu as the training form runs it
Timing: CUDA events around forward and backward, warm-up first, median of --iters runs.
"""

import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from modeling import kernels  # noqa: E402

HIDDEN, FFN, TOP_K = 2048, 1408, 6
PEAK_FLOPS = 989e12
# (tokens, experts) -> (forward ms, backward ms, MFU %) of the nnScaler example on an H100
EXAMPLE = {(4096, 64): (3.190, 6.363, 13.5), (2048, 32): (1.851, 3.367, 12.3), (8192, 64): (5.148, 8.964, 18.2),
           (2048, 16): (1.613, 2.459, 15.8), (16384, 64): (8.901, 14.90, 21.6), (2048, 8): (1.663, 2.329, 16.1)}


def block_flops(tokens, hidden=HIDDEN, ffn=FFN, top_k=TOP_K):
    return tokens * top_k * 3 * (6 * hidden * ffn)


def make_inputs(tokens, experts, hidden, ffn, top_k, device, dtype, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(tokens, hidden, device=device, dtype=dtype, generator=g)
    # uniform random routing: K distinct experts per token, softmax weights
    topk_idx = torch.rand(tokens, experts, device=device, generator=g).topk(top_k, dim=-1).indices
    topk_weight = torch.rand(tokens, top_k, device=device, generator=g).softmax(-1)
    scale = hidden ** -0.5
    gate = torch.randn(experts, ffn, hidden, device=device, dtype=dtype, generator=g) * scale
    up = torch.randn(experts, ffn, hidden, device=device, dtype=dtype, generator=g) * scale
    down = torch.randn(experts, hidden, ffn, device=device, dtype=dtype, generator=g) * ffn ** -0.5
    return x, topk_idx, topk_weight, gate, up, down


def _naive_permute(x, topk_idx):
    K = topk_idx.shape[-1]
    sorted_slots = torch.argsort(topk_idx.reshape(-1), stable=True)
    return x.index_select(0, sorted_slots // K), sorted_slots


def _naive_unpermute(y_sorted, sorted_slots, topk_weight, out_dtype):
    T, K = topk_weight.shape
    position = torch.empty_like(sorted_slots).scatter_(
        0, sorted_slots, torch.arange(sorted_slots.numel(), device=sorted_slots.device))
    y_slots = y_sorted.index_select(0, position).view(T, K, -1)
    return (y_slots * topk_weight.unsqueeze(-1)).sum(dim=1).to(out_dtype)


def loop_block(x, topk_idx, topk_weight, gate, up, down):
    """Per-expert matmuls over host-side slices: the structure of the reference model."""
    x_sorted, sorted_slots = _naive_permute(x, topk_idx)
    counts = kernels.tokens_per_expert(topk_idx, gate.shape[0]).tolist()  # host sync
    outs, start = [], 0
    for e, n in enumerate(counts):
        rows = x_sorted[start:start + n]
        outs.append((F.silu(rows @ gate[e].T) * (rows @ up[e].T)) @ down[e].T)
        start += n
    return _naive_unpermute(torch.cat(outs), sorted_slots, topk_weight, x.dtype)


def naive_block(x, topk_idx, topk_weight, gate, up, down):
    """Grouped GEMMs, but the first version's permutation and weighted combine."""
    x_sorted, sorted_slots = _naive_permute(x, topk_idx)
    offsets = torch.cumsum(kernels.tokens_per_expert(topk_idx, gate.shape[0]), 0).to(torch.int32)
    h = F.silu(kernels.grouped_mm(x_sorted, gate, offsets)) * kernels.grouped_mm(x_sorted, up, offsets)
    return _naive_unpermute(kernels.grouped_mm(h, down, offsets), sorted_slots, topk_weight, x.dtype)


def gather_block(x, topk_idx, topk_weight, gate, up, down):
    """Separate gate and up GEMMs with the gather-only permutation and the folded routing weight."""
    K = topk_idx.shape[-1]
    sorted_slots, sorted_tokens, slot_position, _ = kernels.sort_slots(topk_idx)
    x_sorted = kernels.permute(x, sorted_tokens, slot_position, K)
    offsets = torch.cumsum(kernels.tokens_per_expert(topk_idx, gate.shape[0]), 0).to(torch.int32)
    weight = topk_weight.reshape(-1).index_select(0, sorted_slots).unsqueeze(-1).to(x.dtype)
    h = F.silu(kernels.grouped_mm(x_sorted, gate, offsets)) * kernels.grouped_mm(x_sorted, up, offsets) * weight
    return kernels.unpermute(kernels.grouped_mm(h, down, offsets), sorted_tokens, slot_position, K)


def make_variant(name, gate, up, down):
    """Returns (fn(x, idx, w) -> y, parameters)."""
    blocks = {"loop": loop_block, "naive": naive_block, "gather": gather_block}
    if name in blocks:
        params = [gate, up, down]

        def run_eager(x, i, w):
            kernels.set_fused_kernels(False)  # these steps come before the fused kernels
            return blocks[name](x, i, w, *params)
        return run_eager, params
    if name in ("fused", "grouped", "whole"):
        gate_up = torch.stack([gate, up], dim=1).detach().requires_grad_()
        down = down.detach().requires_grad_()
        block = torch.compile(kernels.expert_swiglu, fullgraph=True) if name == "whole" else kernels.expert_swiglu

        def run(x, i, w):
            kernels.set_fused_kernels(name == "grouped")
            return block(x, i, w, gate_up, down)
        return run, [gate_up, down]
    raise ValueError(f"unknown variant {name!r}")


def time_variant(fn, params, x, topk_idx, topk_weight, warmup, iters):
    """Median forward and backward milliseconds, timed with CUDA events."""
    grad_out = torch.randn_like(x)
    fwd_ms, bwd_ms = [], []
    for i in range(warmup + iters):
        x_in = x.detach().requires_grad_()
        w_in = topk_weight.detach().requires_grad_()
        for p in params:
            p.grad = None
        start, mid, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        start.record()
        y = fn(x_in, topk_idx, w_in)
        mid.record()
        y.backward(grad_out)
        end.record()
        kernels.set_fused_kernels(True)
        end.synchronize()
        if i >= warmup:
            fwd_ms.append(start.elapsed_time(mid))
            bwd_ms.append(mid.elapsed_time(end))
    return statistics.median(fwd_ms), statistics.median(bwd_ms)


def check_against_float32(variant, device):
    """The variant's output and all gradients against a float32 per-expert loop, fresh random inputs.
    Returns the worst relative error (norm of the difference over norm of the reference)."""
    x, idx, w, gate, up, down = make_inputs(512, 8, 256, 128, TOP_K, device, torch.bfloat16, seed=123)
    params = [t.detach().requires_grad_() for t in (gate, up, down)]
    fn, fn_params = make_variant(variant, *params)
    x_in, w_in = x.detach().requires_grad_(), w.detach().requires_grad_()
    y = fn(x_in, idx, w_in)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    kernels.set_fused_kernels(True)
    ref_params = [t.detach().float().requires_grad_() for t in (gate, up, down)]
    x_ref, w_ref = x.detach().float().requires_grad_(), w.detach().requires_grad_()
    ref = loop_block(x_ref, idx, w_ref, *ref_params)
    ref.backward(grad_out.float())
    if len(fn_params) == 2:  # stacked gate_up
        got_param_grads = [fn_params[0].grad[:, 0], fn_params[0].grad[:, 1], fn_params[1].grad]
    else:
        got_param_grads = [p.grad for p in fn_params]
    pairs = [(y, ref), (x_in.grad, x_ref.grad), (w_in.grad, w_ref.grad)] + \
        list(zip(got_param_grads, [p.grad for p in ref_params]))
    worst = max(((a.float() - b).norm() / b.norm()).item() for a, b in pairs)
    if not worst < 2e-2:
        raise AssertionError(f"variant {variant}: relative error {worst:.3g} against float32")
    return worst


def profile(variants, shape, device):
    """Kernel-level breakdown of one forward+backward per variant (after warm-up)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    tokens, experts = shape
    x, idx, w, gate, up, down = make_inputs(tokens, experts, HIDDEN, FFN, TOP_K, device, torch.bfloat16)
    for v in variants:
        params = [t.detach().requires_grad_() for t in (gate, up, down)]
        fn, fn_params = make_variant(v, *params)
        time_variant(fn, fn_params, x, idx, w, warmup=3, iters=1)
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            time_variant(fn, fn_params, x, idx, w, warmup=0, iters=3)
        print(f"\n=== {v} at {tokens}x{experts} (3 iterations), by GPU time")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70))
        print(f"\n=== {v} at {tokens}x{experts} (3 iterations), by host time")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70))
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default="loop,naive,gather,fused,grouped",
                   help="comma-separated: loop, naive, gather, fused, grouped")
    p.add_argument("--shapes", default="4096x64,2048x32,8192x64,2048x16,16384x64,2048x8",
                   help="comma-separated TOKENSxEXPERTS")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs per variant and shape")
    p.add_argument("--iters", type=int, default=30, help="timed runs; the median is reported")
    p.add_argument("--profile", metavar="TOKENSxEXPERTS",
                   help="instead of the table, profile the variants at one shape and print the top kernels")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/moe_block.py needs a CUDA GPU", file=sys.stderr)
        return 2
    device = "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"grouped_gemm package: {kernels.grouped_gemm_package_available()}")
    variants = args.variants.split(",")
    for v in variants:
        print(f"check {v}: relative error vs float32 {check_against_float32(v, device):.2e}")
    if args.profile:
        return profile(variants, tuple(int(n) for n in args.profile.split("x")), device)
    shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",")]
    header = f"{'tokens':>6} {'experts':>7} {'variant':>9} {'fwd ms':>8} {'bwd ms':>8} {'MFU %':>6} {'example MFU %':>13}"
    print(header)
    rows = []
    for tokens, experts in shapes:
        x, idx, w, gate, up, down = make_inputs(tokens, experts, HIDDEN, FFN, TOP_K, device, torch.bfloat16)
        for v in variants:
            params = [t.detach().requires_grad_() for t in (gate, up, down)]
            fn, fn_params = make_variant(v, *params)
            fwd, bwd = time_variant(fn, fn_params, x, idx, w, args.warmup, args.iters)
            mfu = block_flops(tokens) / ((fwd + bwd) * 1e-3 * PEAK_FLOPS) * 100
            example = EXAMPLE.get((tokens, experts), (None, None, float("nan")))[2]
            rows.append((tokens, experts, v, fwd, bwd, mfu, example))
            print(f"{tokens:>6} {experts:>7} {v:>9} {fwd:>8.3f} {bwd:>8.3f} {mfu:>6.1f} {example:>13.1f}", flush=True)
            del fn, fn_params, params
        torch.cuda.empty_cache()
    print("\nmarkdown:")
    print("| tokens | experts | variant | fwd ms | bwd ms | MFU % | example MFU % |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.3f} | {r[4]:.3f} | {r[5]:.1f} | {r[6]:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
