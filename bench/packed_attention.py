"""Forward + backward time of document-masked (packed-row) attention, kernel by kernel, on one GPU.

    python bench/packed_attention.py [--rows 8] [--seq_len 1024] [--json OUT.json]

The shape is DeepSeek-V2's MLA attention in training (16 heads, query/key head 192, value head 128,
bf16) over `--rows` rows of `--seq_len` tokens, each row packed with documents of random length
(seq_len / 8 to seq_len / 2, as bench/finetune_step.py packs them). Variants:

* causal_rows: the causal kernel over whole rows (what the same tokens cost without packing: the
  lower bound, not document-masked);
* regrouped: modeling/kernels.attention_by_document (documents gathered into power-of-two windows,
  the causal kernel per window width);
* flex: torch's FlexAttention with a block mask of the documents (compiled), no regrouping, with the
  model's tiles (kernels.FLEX_BLOCK_SIZE, FLEX_KERNEL_OPTIONS); the flex_* variants are other tiles;
* cudnn_varlen: cuDNN's ragged attention over the documents laid end to end (_CudnnRagged, an
  experiment: not used by the model);
* varlen: torch.nn.attention.varlen (flash-attention over cumulative lengths; values zero-padded to
  the query head, as flash needs one head size), where this torch has it.

Each variant is checked against the masked float32 reference (max abs difference of the output and
of the q/k/v gradients) and timed
with CUDA events: `--warmup` untimed calls, then the median of `--iters`.
"""

import argparse
import inspect
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.finetune_step import packed_examples  # noqa: E402
from bench.train_step import cuda_median_ms  # noqa: E402
from modeling.kernels import FLEX_KERNEL_OPTIONS, attention_by_document  # noqa: E402
from modeling.modeling_deepseek import AttentionMask, attention_allowed, document_ids  # noqa: E402


class _CudnnRagged(torch.autograd.Function):
    """An experiment (2026-12-02, fifth session): cuDNN's ragged attention through the aten ops that
    nested-tensor SDPA calls (q/k [T, H, d_qk], v [T, H, d_v], documents end to end at `cu_seqlens`).
    On an H200 with torch 2.11 its forward was right but took 55 ms per layer and its gradients were
    wrong (torch.nn.attention.varlen keeps this path switched off), so the model does not use it."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, softmax_scale):
        out, lse, _, _, _, _, seed, offset, _ = torch.ops.aten._cudnn_attention_forward(
            q, k, v, None, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, True, 0.0, True, False,
            scale=softmax_scale)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, seed, offset)
        ctx.max_seqlen, ctx.softmax_scale = max_seqlen, softmax_scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, cu_seqlens, seed, offset = ctx.saved_tensors
        grads = torch.ops.aten._cudnn_attention_backward(
            grad_out.contiguous(), q, k, v, out, lse, seed, offset, None, cu_seqlens, cu_seqlens,
            ctx.max_seqlen, ctx.max_seqlen, 0.0, True, scale=ctx.softmax_scale)
        return (*grads, None, None, None)


# (variant, the block mask's tile, FlexAttention kernel_options), beside "flex" (the model's own tiles,
# kernels.FLEX_BLOCK_SIZE and FLEX_KERNEL_OPTIONS); ROWS_GUARANTEED_SAFE (every query sees its own
# key) made the results NaN on torch 2.11 (2026-12-02, sixth session) and is not tried
FLEX_EXPERIMENTS = (
    ("flex_defaults", 128, None),  # flex's own tiles, as the model ran it before the sixth session
    ("flex_mask64", 64, None),
    ("flex_tile64_bwd64", 64, {**FLEX_KERNEL_OPTIONS, "bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64,
                               "bwd_BLOCK_N2": 64}),
    ("flex_tile64_bwd_w8", 64, {**FLEX_KERNEL_OPTIONS, "bwd_num_warps": 8}),
    ("flex_tile64_fwd128", 64, {**FLEX_KERNEL_OPTIONS, "BLOCK_M": 128}),
    ("flex_tile32", 32, {"BLOCK_M": 32, "BLOCK_N": 32, "bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 32, "bwd_BLOCK_M2": 32,
                         "bwd_BLOCK_N2": 32}),
)


def packed_positions(rows, seq_len, seed=0):
    """Position ids of rows packed as bench/finetune_step.py packs them (restarting at each example)."""
    positions = torch.empty(rows, seq_len, dtype=torch.long)
    for r, start, end in packed_examples(rows, seq_len, torch.Generator().manual_seed(seed)):
        positions[r, start:end] = torch.arange(end - start)
    return positions


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--qk_dim", type=int, default=192)
    p.add_argument("--v_dim", type=int, default=128)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--only", default="", help="comma-separated variant names to run (default: all)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/packed_attention.py needs a CUDA GPU", file=sys.stderr)
        return 2
    B, H, S = args.rows, args.heads, args.seq_len
    scale = args.qk_dim ** -0.5
    positions = packed_positions(B, S).cuda()
    docs = document_ids(positions)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k = (torch.randn(B, H, S, args.qk_dim, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    v = torch.randn(B, H, S, args.v_dim, device="cuda", dtype=torch.bfloat16, generator=g)
    grad = torch.randn(B, H, S, args.v_dim, device="cuda", dtype=torch.bfloat16, generator=g)
    for t in (q, k, v):
        t.requires_grad_(True)
    allowed = attention_allowed(AttentionMask(document_ids_BS=docs), B, S, "cuda")
    q32, k32, v32 = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    reference = F.scaled_dot_product_attention(q32, k32, v32, attn_mask=allowed, scale=scale)
    reference.backward(grad.float())
    reference = reference.detach()
    reference_grads = [t.grad for t in (q32, k32, v32)]

    def causal(qd, kd, vd, softmax_scale, dropout_p):
        return F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=softmax_scale)

    # variant: (setup once per forward -> state, per-layer call(state) -> output [B, H, S, d_v])
    variants = {"causal_rows": (lambda: None, lambda _: causal(q, k, v, scale, 0.0))}

    def regroup_setup():
        from modeling.kernels import _document_groups
        mask = AttentionMask(document_ids_BS=docs)
        _document_groups(mask, B * S, q.device)  # what the first layer of a forward builds (cached on the mask)
        return mask
    variants["regrouped"] = (regroup_setup, lambda mask: attention_by_document(causal, q, k, v, mask, scale, 0.0))
    try:
        from torch.nn.attention.flex_attention import flex_attention
        from modeling.kernels import document_block_mask
        flex = torch.compile(flex_attention)

        def flex_setup():  # the runtime's own builder (the tiles' document ranges, a few small ops)
            return document_block_mask(docs)
        variants["flex"] = (flex_setup, lambda block_mask: flex(q, k, v, block_mask=block_mask, scale=scale,
                                                                 kernel_options=FLEX_KERNEL_OPTIONS))
        # experiments: finer tiles of the block mask and the kernel (short documents leave fewer
        # scores computed and then masked), other backward tiles; each compiled on its own
        for name, block, options in FLEX_EXPERIMENTS:
            def setup(block=block):
                return document_block_mask(docs, block)

            def call(block_mask, options=options):
                return flex(q, k, v, block_mask=block_mask, scale=scale, kernel_options=options)
            variants[name] = (setup, call)
        flex_tuned = torch.compile(flex_attention, mode="max-autotune-no-cudagraphs")
        variants["flex_autotune"] = (flex_setup, lambda block_mask: flex_tuned(q, k, v, block_mask=block_mask,
                                                                                 scale=scale))
    except ImportError as e:
        print(f"flex: not available ({e})")
    def cudnn_setup():  # the documents' offsets (one read of the device per forward), padded to 2^k documents
        cu, _ = AttentionMask(document_ids_BS=docs).packed_sequences()
        padded = 1 << (cu.numel() - 2).bit_length()
        return torch.cat([cu, cu[-1:].expand(padded + 1 - cu.numel())])

    def cudnn_call(cu):
        qt, kt, vt = (t.transpose(1, 2).reshape(B * S, H, t.shape[-1]) for t in (q, k, v))
        return _CudnnRagged.apply(qt, kt, vt, cu, S, scale).view(B, S, H, -1).transpose(1, 2)
    variants["cudnn_varlen"] = (cudnn_setup, cudnn_call)
    try:
        from torch.nn.attention import varlen
        params = inspect.signature(varlen.varlen_attn).parameters
        print("varlen_attn", list(params))

        def varlen_setup():
            starts = torch.ones_like(docs, dtype=torch.bool)
            starts[:, 1:] = docs[:, 1:] != docs[:, :-1]
            offsets = torch.nonzero(starts.reshape(-1)).reshape(-1)
            return torch.cat([offsets, offsets.new_full((1,), B * S)]).to(torch.int32)

        def varlen_call(cu):
            qt, kt, vt = (t.transpose(1, 2).reshape(B * S, H, t.shape[-1]) for t in (q, k, v))
            vt = F.pad(vt, (0, args.qk_dim - args.v_dim))
            extra = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
            out = varlen.varlen_attn(qt, kt, vt, cu, cu, S, S, scale=scale, **extra)
            return out[..., :args.v_dim].view(B, S, H, args.v_dim).transpose(1, 2)
        variants["varlen"] = (varlen_setup, varlen_call)
    except (ImportError, AttributeError) as e:
        print(f"varlen: not available ({e})")

    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": B, "seq_len": S,
               "heads": H, "qk_dim": args.qk_dim, "v_dim": args.v_dim,
               "documents": int(docs[:, -1].sum()), "variants": {}}
    only = [n for n in args.only.split(",") if n]
    for name, (setup, call) in variants.items():
        if only and name not in only:
            continue
        try:
            state = setup()
            out = call(state)
            error = (out.float() - reference).abs().max().item()
            for t in (q, k, v):
                t.grad = None
            out.backward(grad)
            grad_error = max((t.grad.float() - r).abs().max().item() for t, r in zip((q, k, v), reference_grads))

            def step():
                for t in (q, k, v):
                    t.grad = None
                call(state).backward(grad)
            setup_ms = cuda_median_ms(setup, args.warmup, args.iters)
            fwd_ms = cuda_median_ms(lambda: call(state), args.warmup, args.iters)
            step_ms = cuda_median_ms(step, args.warmup, args.iters)
            results["variants"][name] = {"setup_ms": setup_ms, "forward_ms": fwd_ms, "forward_backward_ms": step_ms,
                                         "max_abs_error": error, "max_abs_grad_error": grad_error}
            print(f"{name:12s} setup (once per forward) {setup_ms:7.3f} ms  per layer: forward {fwd_ms:7.3f} ms  "
                  f"forward+backward {step_ms:7.3f} ms  max |error| {error:.3g} (gradients {grad_error:.3g})",
                  flush=True)
        except Exception as e:  # a kernel this torch or GPU cannot run: report it, time the others
            results["variants"][name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(f"{name:12s} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
