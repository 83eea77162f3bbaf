"""Forward + backward time of one LoRA projection, two formulations, on one GPU (an experiment).

    python bench/lora_linear.py [--tokens 8192] [--rank 64] [--json OUT.json]

Shapes: DeepSeek-Coder-V2-Lite's adapted dense projections (hidden 2048): attention's q_proj,
kv_a_proj_with_mqa, kv_b_proj, o_proj, and the shared experts' gate, up and down (2 x 1408 wide),
`--tokens` rows, bf16 activations and frozen weight, fp32 adapters (as a LoRA run keeps them).
Formulations, the two adapted ones checked against each other (the gradients of x, A and B):

* base: the frozen projection alone (no adapter; only x's gradient): the floor the adapters add to;

* separate: the model's own `modeling.lora.LoraLinear` (y = x W^T + s (x A^T) B^T: the base GEMM,
  two skinny adapter GEMMs and an add);
* fused_k: the update folded into the base GEMM's K dimension, y = [x | s x A^T] [W | B]^T (a
  prototype here, `FusedKLora`): one GEMM of K = in + r instead of the B GEMM and the add; its
  backward gets the input gradients of both from one GEMM as well.

Each runs eagerly (no torch.compile: the difference of the formulations, not of a fusion pass),
`--warmup` untimed calls, then `--iters` calls under torch.profiler: the reported time is the sum of
the GPU kernels' durations per call (`kernel_ms`), since one eager projection launches its kernels
faster than the host can (a first run on an H200 timed ~0.9 ms per call with CUDA events, the host's
launch time, not the GPU's); `wall_ms` (CUDA events around each call) is kept as that check. The sum
over one decoder layer's seven projections, times the layer count, is what a LoRA step of the full
model would save.
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.gpu_profile import kernel_ms_per_call  # noqa: E402
from bench.train_step import cuda_median_ms  # noqa: E402
from modeling.lora import LoraLinear  # noqa: E402

HIDDEN, SHARED = 2048, 2 * 1408
PROJECTIONS = {"q_proj": (HIDDEN, 3072), "kv_a_proj_with_mqa": (HIDDEN, 576), "kv_b_proj": (512, 4096),
               "o_proj": (HIDDEN, HIDDEN), "shared gate_proj": (HIDDEN, SHARED), "shared up_proj": (HIDDEN, SHARED),
               "shared down_proj": (SHARED, HIDDEN)}


class FusedKLora(torch.autograd.Function):
    """y = [x | s x A^T] [W | B]^T for a frozen W [out, in] (no gradient), A [r, in], B [out, r]."""

    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, scaling):
        a, b = lora_A.to(x.dtype), lora_B.to(x.dtype)
        xa = x @ a.t()
        x_cat = torch.cat([x, xa * scaling], dim=-1)
        w_cat = torch.cat([weight, b], dim=-1)
        ctx.save_for_backward(x, xa, w_cat, a)
        ctx.scaling, ctx.dtypes, ctx.inputs = scaling, (lora_A.dtype, lora_B.dtype), x.shape[-1]
        return x_cat @ w_cat.t()

    @staticmethod
    def backward(ctx, grad_y):
        x, xa, w_cat, a = ctx.saved_tensors
        s, n_in = ctx.scaling, ctx.inputs
        grad_cat = grad_y @ w_cat  # [N, in + r]: the base input gradient beside the update's
        grad_xa = grad_cat[:, n_in:] * s
        grad_b = grad_y.t() @ (xa * s)
        grad_a = grad_xa.t() @ x
        grad_x = grad_cat[:, :n_in] + grad_xa @ a
        return grad_x, None, grad_a.to(ctx.dtypes[0]), grad_b.to(ctx.dtypes[1]), None


def time_projection(n_in, n_out, tokens, rank, warmup, iters, device):
    g = torch.Generator(device=device).manual_seed(0)
    linear = LoraLinear(n_in, n_out, bias=False, rank=rank, scaling=2.0, device=device, dtype=torch.bfloat16,
                        adapter_dtype=torch.float32)
    with torch.no_grad():
        linear.weight.normal_(std=0.02, generator=g)
        linear.lora_A.normal_(std=0.02, generator=g)
        linear.lora_B.normal_(std=0.02, generator=g)
    linear.weight.requires_grad_(False)
    x = torch.randn(tokens, n_in, device=device, dtype=torch.bfloat16, generator=g, requires_grad=True)
    grad_y = torch.randn(tokens, n_out, device=device, dtype=torch.bfloat16, generator=g)
    formulations = {"base": lambda: torch.nn.functional.linear(x, linear.weight),  # no adapter: the floor
                    "separate": lambda: linear(x),
                    "fused_k": lambda: FusedKLora.apply(x, linear.weight, linear.lora_A, linear.lora_B, linear.scaling)}
    results, grads = {}, {}
    for name, forward in formulations.items():
        def step(forward=forward):
            x.grad = linear.lora_A.grad = linear.lora_B.grad = None
            forward().backward(grad_y)
        step()
        if name != "base":
            grads[name] = [t.grad.float().clone() for t in (x, linear.lora_A, linear.lora_B)]
        wall = cuda_median_ms(step, warmup, iters)
        results[name] = {"kernel_ms": kernel_ms_per_call(step, iters)[0], "wall_ms": wall}
    for got, want, what in zip(grads["fused_k"], grads["separate"], ("x", "lora_A", "lora_B")):
        results["fused_k"][f"grad_{what}_rel_diff"] = float((got - want).norm() / want.norm().clamp_min(1e-30))
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=8192, help="rows (a micro-batch's tokens)")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--layers", type=int, default=27, help="decoder layers the per-layer sum is multiplied by")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/lora_linear.py needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": args.tokens,
           "rank": args.rank, "projections": {}}
    total = {"base": 0.0, "separate": 0.0, "fused_k": 0.0}
    for name, (n_in, n_out) in PROJECTIONS.items():
        r = time_projection(n_in, n_out, args.tokens, args.rank, args.warmup, args.iters, device)
        out["projections"][name] = {"in": n_in, "out": n_out, **r}
        for k in total:
            total[k] += r[k]["kernel_ms"]
        print(f"{name:20s} [{n_in} -> {n_out}]  kernels: base {r['base']['kernel_ms']:.3f}, separate {r['separate']['kernel_ms']:.3f} ms, fused_k "
              f"{r['fused_k']['kernel_ms']:.3f} ms (wall {r['separate']['wall_ms']:.3f} / {r['fused_k']['wall_ms']:.3f}; "
              f"grad rel diff x {r['fused_k']['grad_x_rel_diff']:.1e}, A {r['fused_k']['grad_lora_A_rel_diff']:.1e}, "
              f"B {r['fused_k']['grad_lora_B_rel_diff']:.1e})", flush=True)
    out["per_layer_kernel_ms"] = total
    out["per_step_kernel_ms"] = {k: v * args.layers for k, v in total.items()}
    print(f"kernel time per layer: frozen projections alone {total['base']:.3f} ms, separate {total['separate']:.3f} ms, fused_k {total['fused_k']:.3f} ms; x {args.layers} "
          f"layers: {total['separate'] * args.layers:.1f} -> {total['fused_k'] * args.layers:.1f} ms per step")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
