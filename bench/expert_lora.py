"""What the routed experts' LoRA adapters cost beside the frozen experts, on one GPU (an experiment).

    python bench/expert_lora.py [--tokens 8192] [--experts 64] [--rank 64] [--json OUT.json]

One MoE layer's routed-expert block of DeepSeek-Coder-V2-Lite (hidden 2048, moe_intermediate 1408,
top-6 of `--experts`, uniform random routing), forward + backward as a LoRA fine-tuning step runs it:
bf16 rows and frozen bf16 expert weights (no weight gradient), fp32 adapters of rank `--rank`.
Variants, each through torch.compile (as the training form's compiled layers run it) and eagerly:

* base: `kernels.expert_swiglu` on the frozen experts (only the input gradient);
* lora: `kernels.expert_swiglu_lora`, the same block with the four stacked adapters.

Reported per variant: the GPU kernels' time per call (summed durations under torch.profiler, gaps
excluded), the CUDA-event wall time, and (for both lora variants and the compiled base) the kernel
time of each operator by input shapes and of each kernel by name (which grouped GEMM, add or cast
the adapters add), so the adapters' cost is attributed operator by operator. The sum times the MoE layer count (26) is what a LoRA step of the
full model pays for its expert adapters.
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.gpu_profile import kernel_ms_per_call, operators_by_shape  # noqa: E402
from bench.train_step import cuda_median_ms  # noqa: E402
from modeling import kernels  # noqa: E402
from modeling.lora import expert_adapter_shapes  # noqa: E402

HIDDEN, FFN, TOP_K, MOE_LAYERS = 2048, 1408, 6, 26


def make_block(tokens, experts, rank, device, seed=0):
    """(inputs, frozen weights, adapters, output gradient) of one layer's routed-expert block."""
    g = torch.Generator(device=device).manual_seed(seed)
    bf16 = dict(device=device, dtype=torch.bfloat16)
    x = torch.randn(tokens, HIDDEN, generator=g, **bf16)
    topk_idx = torch.rand(tokens, experts, device=device, generator=g).topk(TOP_K, dim=-1).indices
    topk_weight = torch.rand(tokens, TOP_K, device=device, generator=g).softmax(-1)
    gate_up = torch.randn(experts, 2, FFN, HIDDEN, generator=g, **bf16) * HIDDEN ** -0.5
    down = torch.randn(experts, HIDDEN, FFN, generator=g, **bf16) * FFN ** -0.5
    adapters = [(torch.randn(shape, device=device, generator=g) * 0.02).requires_grad_()
                for shape in expert_adapter_shapes(experts, HIDDEN, FFN, rank).values()]
    grad_y = torch.randn(tokens, HIDDEN, generator=g, **bf16)
    return x, topk_idx, topk_weight, gate_up, down, adapters, grad_y


class _LowRankUpdate(torch.autograd.Function):
    """An experiment: u = a_e @ B_e^T per expert group (a [N, r] a rank-r input, B [E, F, r]), whose
    backward forms B's gradient as (a^T dy)^T, a [r, N] x [N, F] grouped GEMM over K, so that the
    output gradient dy (a strided half of the gate/up gradient) is read as it lies."""

    @staticmethod
    def forward(ctx, a_Nr, b_EFr, offsets_E):
        ctx.save_for_backward(a_Nr, b_EFr, offsets_E)
        return torch._grouped_mm(a_Nr, b_EFr.transpose(-2, -1), offs=offsets_E)

    @staticmethod
    def backward(ctx, grad_NF):
        a_Nr, b_EFr, offsets_E = ctx.saved_tensors
        grad_a = torch._grouped_mm(grad_NF, b_EFr, offs=offsets_E)
        grad_b = torch._grouped_mm(a_Nr.t(), grad_NF, offs=offsets_E).transpose(-2, -1)
        return grad_a, grad_b, None


def grouped_swiglu_lora_variant(x_ND, weight_N1, offsets_E, gate_up_E2FD, down_EDF, a_gu, b_gu, a_d, b_d, scaling,
                                gate_up_update):
    """kernels.grouped_swiglu_lora (rank aligned, no dropout) with the gate/up updates applied another
    way than its one grouped GEMM over a block-diagonal B (an experiment): two GEMMs, one per B,
    "cat" (base + cat(updates), which the compiled SwiGLU kernel can take as its input) or
    "cat_lowrank" (the same with _LowRankUpdate's gradient formulation for the two B's). The in-place
    adds into the halves of the base output, the kernel before 2026-12-06, measured 6.280 ms against
    the block-diagonal's 5.870 on an H100 (bench/RESULTS.md, seventh session)."""
    E, _, F_, D = gate_up_E2FD.shape
    r = a_gu.shape[2]
    dtype = x_ND.dtype

    def mm(rows, w):
        return kernels.grouped_mm(rows, w.to(dtype), offsets_E)
    b_gu, b_d = b_gu * scaling, b_d * scaling
    gate_up = mm(x_ND, gate_up_E2FD.reshape(E, 2 * F_, D))
    xa = mm(x_ND, a_gu.reshape(E, 2 * r, D))
    if gate_up_update == "cat":
        halves = [mm(xa[:, i * r:(i + 1) * r], b_gu[:, i]) for i in range(2)]
    else:
        halves = [_LowRankUpdate.apply(xa[:, i * r:(i + 1) * r], b_gu[:, i].to(dtype), offsets_E) for i in range(2)]
    gate_up = gate_up + torch.cat(halves, dim=1)
    h = kernels.weighted_swiglu(gate_up, weight_N1)
    return mm(h, down_EDF).add(mm(mm(h, a_d), b_d))


def expert_swiglu_lora_variant(x_TD, topk_idx_TK, topk_weight_TK, gate_up, down, adapters, scaling, gate_up_update):
    top_k = topk_idx_TK.shape[-1]
    sorted_slots, sorted_tokens, slot_position, sorted_experts = kernels.sort_slots(topk_idx_TK)
    x_sorted = kernels.permute(x_TD, sorted_tokens, slot_position, top_k)
    offsets = kernels.group_end_offsets(sorted_experts, gate_up.shape[0])
    weight_N1 = topk_weight_TK.reshape(-1).index_select(0, sorted_slots).unsqueeze(-1)
    y = grouped_swiglu_lora_variant(x_sorted, weight_N1, offsets, gate_up, down, *adapters, scaling, gate_up_update)
    return kernels.unpermute(y, sorted_tokens, slot_position, top_k)


GATE_UP_UPDATES = ("cat", "cat_lowrank")  # beside "lora", the landed kernel (one block-diagonal B GEMM)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=8192, help="tokens of the micro-batch (each routed to top-6 experts)")
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--gate_up_updates", default=",".join(GATE_UP_UPDATES),
                   help="comma-separated experiments beside the landed kernel: how the gate/up adapters' updates "
                        "reach the base output (grouped_swiglu_lora_variant); '' for none")
    p.add_argument("--max_autotune", action="store_true",
                   help="compile with inductor's max-autotune (GEMMs and grouped GEMMs benchmarked against its Triton "
                        "templates, whose epilogues can fuse the adds) instead of the default mode; on torch 2.11 "
                        "its grouped-GEMM template failed to compile (bench/RESULTS.md, seventh session)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/expert_lora.py needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    x0, idx, w, gate_up, down, adapters, grad_y = make_block(args.tokens, args.experts, args.rank, device)
    scaling = 2.0

    def base(x, w_in):
        return kernels.expert_swiglu(x, idx, w_in, gate_up, down)

    def lora(x, w_in):
        return kernels.expert_swiglu_lora(x, idx, w_in, gate_up, down, *adapters, scaling)

    def variant(gate_up_update):
        def block(x, w_in):
            return expert_swiglu_lora_variant(x, idx, w_in, gate_up, down, adapters, scaling, gate_up_update)
        return block

    blocks = [("base", base), ("lora", lora)] + [(f"lora_{u}", variant(u)) for u in args.gate_up_updates.split(",") if u]
    # the variants against the landed kernel: output and adapter gradients
    reference_grads = None
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": args.tokens,
           "experts": args.experts, "rank": args.rank, "max_autotune": args.max_autotune, "variants": {}}
    compile_mode = "max-autotune-no-cudagraphs" if args.max_autotune else None
    for mode in ("compiled", "eager"):
        for name, block in blocks:
            if mode == "eager" and name not in ("base", "lora"):
                continue  # the experiments are for the compiled layers
            fn = torch.compile(block, fullgraph=False, mode=compile_mode) if mode == "compiled" else block

            def step(fn=fn):
                x = x0.detach().requires_grad_()
                w_in = w.detach().requires_grad_()
                for a in adapters:
                    a.grad = None
                fn(x, w_in).backward(grad_y)
            for _ in range(args.warmup):
                step()
            if name.startswith("lora"):  # each variant's adapter gradients against the landed kernel's
                grads = [a.grad.clone() for a in adapters]
                if reference_grads is None:
                    reference_grads = grads
                rel = max(((g - r).norm() / r.norm()).item() for g, r in zip(grads, reference_grads))
            wall = cuda_median_ms(step, 2, args.iters)
            detail = mode == "compiled"
            kernel, profiler = kernel_ms_per_call(step, args.iters, record_shapes=detail)
            ops = operators_by_shape(profiler, args.iters) if detail else None
            key = f"{name}_{mode}"
            out["variants"][key] = {"kernel_ms": kernel, "wall_ms": wall}
            if name.startswith("lora"):
                out["variants"][key]["adapter_grad_rel_diff"] = rel
            print(f"{key:20s} kernels {kernel:.3f} ms, wall {wall:.3f} ms per forward + backward"
                  + (f", adapter gradients within {rel:.1e} of the landed kernel's" if name.startswith("lora") else ""),
                  flush=True)
            if ops:
                out["variants"][key]["ops"] = ops[:30]
                for o in ops[:30]:
                    print(f"    {o['ms']:7.3f} ms  {o['op'][:40]:40s} {o['shapes']}")
    v = out["variants"]
    for mode in ("compiled", "eager"):
        extra = v[f"lora_{mode}"]["kernel_ms"] - v[f"base_{mode}"]["kernel_ms"]
        out[f"adapter_kernel_ms_per_layer_{mode}"] = extra
        print(f"{mode}: the adapters add {extra:.3f} ms of kernels per layer ({100 * extra / v[f'base_{mode}']['kernel_ms']:.0f} % "
              f"of the frozen block), x {MOE_LAYERS} MoE layers = {extra * MOE_LAYERS:.1f} ms per step")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
