"""Benchmark of a whole training step on one device, through the real training path, and of each
speed technique's gain.

    python bench/train_step.py [--variants techniques] [--steps 12] [--warmup 4] [--json OUT.json]

Model: DeepSeek-Coder-V2-Lite (`--model_dir`, default configs/deepseek-coder-v2-lite) with
`--layers` decoder layers (default 4: its dense first layer and 3 MoE layers; full hidden size,
64 experts top-6, the full 102400-token vocabulary), random initialisation, bf16 compute on fp32
master weights, AdamW. Data: random token rows of `--seq_len` (2048) tokens saved with `datasets`.
Plan: compiled by the compiler for one device (`compile_plan`, `--device_profile` h100,
`--mem_limit_gib` 75), one plan per micro-batch size; its predicted step time and peak memory are
printed beside the measurement (recompute forced by a variant is re-costed with the same cost model).

Each variant calls `runtime.trainer.train(RunArgs(...))` in this process (the trainer's own loop:
FSDP2 mixed precision on a one-rank mesh, gradient accumulation over the micro-batches, gradient
clipping, AdamW) for `--warmup` + `--steps` steps; the table reports the median over the timed steps.

Variants: comma-separated; each is `base` or settings joined by `+` over the base
(`compile=layer+ce_chunk=4096`). Keys (base value first):
  attention = sdpa | sdpa_flash_padded | sdpa_efficient | sdpa_cudnn | flash | eager   (--attention)
  compile   = none | norm_rope | layer | layer_eager_experts                         (--compile)
  ce_chunk  = 0 | N    cross-entropy N positions at a time from the hidden states    (--ce_chunk_tokens)
  adamw     = foreach | fused                                                       (--fused_adamw)
  sync      = microbatch | step    gradient reduction per micro-batch or per step   (--defer_grad_sync)
  recompute = plan | none | full   activation recompute (plan: what the compiler chose)
  micro     = --micro_batch_size | N   sequences per micro-batch (its own compiled plan)
  dtype     = bf16 on cuda, fp32 on cpu | bf16 | fp32
`plan` is the compiler's own choice: the plan compiled with `--micro_batch_size auto` and no
execution flag, run with what it chose. Every other variant's plan is compiled with its options
pinned, so the prediction is for what it runs.
Presets: `techniques` (each technique alone on top of base, then all together, then all with a
larger micro-batch), `quick` (base and all together), `plan_vs_hand` (base, plan, all options at
micro-batch 8 / 16 / 32) and `calibrate` (each costed option alone, the forced attention kernels, then
all). On a CUDA device the kernel check (each attention kernel on one layer's shapes) goes into the
JSON's `setup.attention_kernels`, which bench/fit_execution_factors.py reads.

Measured per variant: median step time (the trainer's CUDA events around the whole step, from
fetching the batch to the end of the optimizer step; host clock on a CPU), tokens/s, MFU, peak memory
(torch.cuda.max_memory_allocated since the variant started; reserved too), the first step's time
(which includes torch.compile), and the losses (a sanity check: every variant trains the same model
on the same data).

MFU = (6 x N_active x tokens + attention FLOPs) / (step time x 989e12), 989 TFLOP/s being the dense
bf16 peak of an H100 SXM (`--peak_tflops`). tokens = global batch x seq_len (every input position).
N_active = the parameters one token's computation uses: all parameters except the input embedding
(a lookup, no FLOPs; the lm_head counts), with only top-k of the n routed experts of each MoE layer
counted (k/n of their parameters); norms, router and shared experts count in full. 6 = 2 FLOPs per
multiply-add x (forward + 2 x backward). Attention FLOPs (the score and value products, which the
parameters do not cover), per token and layer: 3 x seq_len x heads x (d_qk + d_v): a causal query
attends to seq_len / 2 keys on average, each key costing 2 x d_qk FLOPs for q.k and 2 x d_v for p.v
forward, x 3 for forward and backward. For MLA, d_qk = qk_nope + qk_rope = 192 and d_v = 128
(v_head_dim); the zero columns of a padded value (sdpa_flash_padded) are not counted. For
DeepSeek-Coder-V2-Lite with 4 layers at seq 2048: N_active = 540.0 M, 6 N = 3.240 GFLOP and
attention 0.126 GFLOP per token; 30 % MFU is 88.1 k tokens/s. (The trainer's own `mfu` field
uses the plan's traced FLOPs, which also count the non-causal half of attention; it is kept in the
JSON as `trainer_mfu`.)
"""

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from compiler.cost_model import RESERVED_GIB  # noqa: E402

PEAK_TFLOPS = 989.0
BASE = {"attention": "sdpa", "compile": "none", "ce_chunk": 0, "adamw": "foreach", "sync": "microbatch",
        "recompute": "plan", "micro": None, "dtype": None}
CHOICES = {"attention": ("sdpa", "sdpa_flash_padded", "sdpa_efficient", "sdpa_cudnn", "flash", "eager"),
           "compile": ("none", "norm_rope", "layer", "layer_eager_experts"), "adamw": ("foreach", "fused"),
           "sync": ("microbatch", "step"), "recompute": ("plan", "none", "full"), "dtype": ("bf16", "fp32")}
_ALL = "compile=layer+attention=sdpa_flash_padded+ce_chunk=4096+adamw=fused+sync=step"
PRESETS = {
    "techniques": ["base", "attention=sdpa_flash_padded", "attention=sdpa_cudnn", "compile=norm_rope",
                   "compile=layer", "compile=layer_eager_experts", "ce_chunk=4096", "adamw=fused", "sync=step",
                   "recompute=full", _ALL, _ALL + "+micro=8"],
    "quick": ["base", _ALL],
    # the H200 table of bench/RESULTS.md: the compiler's own plan beside the hand-tuned options
    "plan_vs_hand": ["base", "plan", _ALL + "+micro=8", _ALL + "+micro=16", _ALL + "+micro=32"],
    # each costed option alone at the base micro-batch, then all: the profile's execution factors
    # and the attention kernels beside PyTorch's own choice (the profile's `attention` throughputs)
    "calibrate": ["base", "compile=layer", "ce_chunk=4096", "adamw=fused", "sync=step", "attention=sdpa_flash_padded",
                  "attention=sdpa_cudnn", "attention=sdpa_efficient", _ALL],
}


# ---- FLOPs --------------------------------------------------------------------------------------------
def active_parameters(config):
    """(N_active, N_total) of the causal LM: the input embedding left out, top-k / n of the routed
    experts counted (see the module docstring). Counted on a meta-device model, so exact."""
    from modeling import build_model
    model = build_model(config, device="meta")
    total = routed = embedding = 0
    for name, p in model.named_parameters():
        total += p.numel()
        if name == "model.embed_tokens.weight":
            embedding += p.numel()
        elif ".mlp.experts." in name:
            routed += p.numel()
    share = config.num_experts_per_tok / config.n_routed_experts if config.n_routed_experts else 1.0
    tied = getattr(config, "tie_word_embeddings", False)  # then the one matrix is also the lm_head
    return total - (0 if tied else embedding) - routed + routed * share, total


def attention_flops_per_token(config, seq_len):
    """Causal score and value products, forward and backward, per token (all layers)."""
    if config.model_type == "deepseek_v2":
        d_qk, d_v = config.qk_nope_head_dim + config.qk_rope_head_dim, config.v_head_dim
    else:
        d_qk = d_v = config.hidden_size // config.num_attention_heads
    return 3 * seq_len * config.num_attention_heads * (d_qk + d_v) * config.num_hidden_layers


def flops_per_token(config, seq_len):
    n_active, _ = active_parameters(config)
    return 6 * n_active + attention_flops_per_token(config, seq_len)


# ---- variants -------------------------------------------------------------------------------------------
def parse_variant(text):
    """'base', 'plan' or 'key=value+key=value' -> settings over BASE (values checked). 'plan' is the
    compiler's own choice: micro-batch size and execution searched (`--micro_batch_size auto`, no
    execution flag), run exactly as the plan says."""
    settings = dict(BASE)
    if text == "base":
        return settings
    if text == "plan":
        return {**settings, "plan": True, "micro": "auto"}
    for part in text.split("+"):
        key, sep, value = part.partition("=")
        if not sep or key not in BASE:
            raise ValueError(f"variant {text!r}: {part!r} is not KEY=VALUE with KEY one of {', '.join(BASE)}")
        if key in ("ce_chunk", "micro"):
            if not value.isdigit() or (key == "micro" and int(value) < 1):
                raise ValueError(f"variant {text!r}: {key} needs a whole number, got {value!r}")
            value = int(value)
        elif value not in CHOICES[key]:
            raise ValueError(f"variant {text!r}: {key} must be one of {', '.join(CHOICES[key])}, got {value!r}")
        settings[key] = value
    return settings


def expand_variants(text):
    names = []
    for item in text.split(","):
        item = item.strip()
        if item:
            names.extend(PRESETS.get(item, [item]))
    return names


# ---- setup ------------------------------------------------------------------------------------------------
def write_model_dir(model_dir, out_dir, layers):
    """A config.json-only directory with `layers` decoder layers (0: the config's own count)."""
    with open(os.path.join(model_dir, "config.json")) as f:
        fields = json.load(f)
    if layers:
        fields["num_hidden_layers"] = layers
    path = os.path.join(out_dir, f"model_{fields['num_hidden_layers']}layers")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(fields, f, indent=1)
    return path


def write_dataset(out_dir, vocab_size, seq_len, rows, seed=0):
    """Random token rows saved with `datasets` (throughput does not depend on which tokens)."""
    import datasets
    path = os.path.join(out_dir, f"rows_{rows}x{seq_len}")
    if not os.path.isdir(path):
        ids = torch.randint(0, vocab_size, (rows, seq_len), generator=torch.Generator().manual_seed(seed),
                            dtype=torch.int32)
        datasets.Dataset.from_dict({"input_ids": ids.numpy()}).save_to_disk(path)
    return path


class Plans:
    """One compiled 1-device plan per (micro-batch, recompute) pair, made on first use. The compiler
    chooses recompute; a variant that forces another value gets the same plan with that recompute
    and the cost model's prediction for it."""

    def __init__(self, args, model_id, out_dir):
        self.args, self.model_id, self.out_dir = args, model_id, out_dir
        self.cache = {}

    def get(self, micro, recompute, execution, searched=False, dtype=None):
        """execution: the variant's execution options (options.ExecutionOptions fields), pinned so that
        the prediction is for what the variant runs; searched: the compiler chooses them (and the
        micro-batch, given as "auto") itself."""
        from compiler.compile import compile_plan
        from options import CompileOptions, ExecutionOptions
        tag = "searched" if searched else "_".join(f"{k}-{v}" for k, v in sorted(execution.items()) if v) or "plain"
        key = (micro, tag, dtype)
        if key not in self.cache:
            path = os.path.join(self.out_dir, "plans", f"plan_mb{micro}_{tag}.json")
            plan, _ = compile_plan(CompileOptions(
                model_id=self.model_id, plan_ngpus=1, runtime_ngpus=1, seq_len=self.args.seq_len,
                micro_batch_size=micro, global_batch_size=self.args.global_batch_size,
                mem_limit_gib=self.args.mem_limit_gib, device_profile=self.args.device_profile,
                plan_out=path, report=False, pinned=() if searched else ExecutionOptions.COSTED, compute_dtype=dtype,
                **({} if searched else {k: v for k, v in execution.items() if v is not None})))
            self.cache[key] = (plan, path)
        plan, path = self.cache[key]
        if recompute in ("plan", plan.stages[0].recompute):
            return plan, path
        if key + (recompute,) not in self.cache:
            forced = self._recosted(plan, recompute)
            forced_path = path[:-5] + f"_recompute_{recompute}.json"
            forced.save(forced_path)
            self.cache[key + (recompute,)] = (forced, forced_path)
        return self.cache[key + (recompute,)]

    def _recosted(self, plan, recompute):
        import copy
        from compiler.compile import _predicted
        from compiler.cost_model import Candidate, CostModel, model_costs
        from compiler.profiles import load_profile
        from compiler.trace import build_traced_model, trace_training_step
        from modeling import load_config
        from options import ExecutionOptions
        config = load_config(self.model_id)
        dtype = plan.search_inputs.get("dtype", "bf16")
        graph = trace_training_step(build_traced_model(config, torch.bfloat16 if dtype == "bf16" else torch.float32),
                                    plan.search_inputs["micro_batch_size"], plan.search_inputs["seq_len"])
        cost_model = CostModel(model_costs(graph, config), load_profile(self.args.device_profile),
                               plan.search_inputs["mem_limit_gib"], dtype=dtype,
                               execution=ExecutionOptions.from_plan(plan.execution))
        cand = Candidate(pp=1, dp=1, ep=1, tp=1, zero=plan.zero["level"],
                         zero_over_replicas=plan.zero["shard_over_replicas"], schedule=plan.schedule["name"],
                         splits=(), recompute=(recompute,), micro_batches=plan.schedule["micro_batches"])
        forced = copy.deepcopy(plan)
        forced.stages[0].recompute = recompute
        forced.predicted = _predicted(cost_model.evaluate(cand))
        return forced


# ---- one variant --------------------------------------------------------------------------------------------
def run_variant(name, settings, args, model_id, data_path, plans, flops_token, out_dir, index):
    from bench.gpu_profile import print_step_summary, start_profiler
    from runtime.trainer import RunArgs, train
    searched = settings.get("plan", False)
    micro = settings["micro"] or args.micro_batch_size
    recompute = args.recompute if settings["recompute"] == "plan" and args.recompute else settings["recompute"]
    execution = {"attention": settings["attention"],
                 "compile": settings["compile"] if settings["compile"] != "none" else None,
                 "ce_chunk_tokens": settings["ce_chunk"], "fused_adamw": settings["adamw"] == "fused",
                 "defer_grad_sync": settings["sync"] == "step"}
    plan, plan_path = plans.get(micro, recompute, execution, searched, settings["dtype"])
    if searched:  # run what the plan chose: its execution (adopted by the run) and micro-batch
        micro = plan.search_inputs["micro_batch_size"]
        execution = {"attention": None, "compile": "none", "ce_chunk_tokens": 0, "fused_adamw": False,
                     "defer_grad_sync": False}
        settings = {**settings, "attention": None, "compile": "none", "ce_chunk": 0, "adamw": "foreach",
                    "sync": "microbatch"}
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    run_args = RunArgs(
        model_id=model_id, dataset_path=data_path, plan_ngpus=1, runtime_ngpus=1, plan=plan_path,
        max_steps=args.warmup + args.steps, lr=args.lr, warmup_steps=1, seed=0, device=args.device,
        save_dir=os.path.join(out_dir, "runs", f"{index:02d}"), progress=False, final_save=False,
        dtype=settings["dtype"], attention=settings["attention"], compile=settings["compile"],
        compile_backend=args.compile_backend, ce_chunk_tokens=settings["ce_chunk"],
        fused_adamw=settings["adamw"] == "fused", defer_grad_sync=settings["sync"] == "step")
    profiler = start_profiler() if args.profile and cuda else None
    started = time.perf_counter()
    try:
        records, params = train(run_args)
    finally:
        if profiler is not None:
            profiler.__exit__(None, None, None)
    wall = time.perf_counter() - started
    del params
    timed = records[args.warmup:] or records
    if profiler is not None:
        print_step_summary(profiler, timed)
    key = "step_time_cuda_s" if "step_time_cuda_s" in timed[0] else "step_time_s"
    step = statistics.median(r[key] for r in timed)
    tokens = timed[0]["tokens"]
    result = {
        "variant": name, "settings": settings, "micro_batch_size": micro, "plan_execution": plan.execution,
        "recompute": plan.stages[0].recompute, "zero": plan.zero["level"], "micro_batches": plan.schedule["micro_batches"],
        "steps": len(records), "timed_steps": len(timed), "step_time_s": step,
        "step_time_min_s": min(r[key] for r in timed), "step_time_max_s": max(r[key] for r in timed),
        "host_step_time_s": statistics.median(r["step_time_s"] for r in timed),
        "first_step_s": records[0]["step_time_s"], "wall_s": wall,
        "tokens_per_step": tokens, "tokens_per_s": tokens / step,
        "mfu": flops_token * tokens / (step * args.peak_tflops * 1e12),
        "trainer_mfu": statistics.median(r["mfu"] for r in timed),
        "peak_memory_gib": max(r["peak_memory_gib"] for r in records),
        "predicted_step_time_s": plan.predicted["step_time_s"],
        "predicted_peak_memory_gib": max(plan.predicted["peak_memory_gib"]),
        # what max_memory_allocated can see: the plan's peak less its fixed allowance for the CUDA
        # context and library workspaces (cost_model.RESERVED_GIB), which the allocator never counts
        "predicted_tensor_memory_gib": max(plan.predicted["peak_memory_gib"]) - RESERVED_GIB,
        "losses": [round(r["loss"], 5) for r in records],
    }
    if cuda:
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2 ** 30
        try:
            from torch._dynamo.utils import counters
            result["graph_breaks"] = sum(counters["graph_break"].values())
        except Exception:  # noqa: BLE001 - informational
            pass
    return result


def cleanup(device):
    """Drops what a finished (or failed) variant left: compiled code, cached blocks, peak counters."""
    gc.collect()
    torch._dynamo.reset()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def cuda_median_ms(fn, warmup, iters):
    """Median milliseconds of fn() on the GPU: CUDA events around each of `iters` calls after `warmup`
    untimed ones, the device synchronised after each."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def attention_kernel_check(config, seq_len, batch, device):
    """Which forced SDPA kernels run MLA's head dims here, and their forward + backward time on one
    layer's attention (a micro-benchmark beside the whole-step figures). Returns (lines to print,
    {kernel: {"ms", "kernel_flops", "tflops"} or {"error"}}): kernel_flops in the convention of the
    device profiles' `attention` curves (compiler/profiles.py: causal, the kernel's own value width,
    padded for sdpa_flash_padded and flash), which bench/fit_execution_factors.py reads."""
    from modeling.kernels import ATTENTION_BACKENDS, flash_attn_func
    H = config.num_attention_heads
    d_qk = config.qk_nope_head_dim + config.qk_rope_head_dim
    d_v = config.v_head_dim
    g = torch.Generator(device=device).manual_seed(0)
    q, k = (torch.randn(batch, H, seq_len, d_qk, device=device, dtype=torch.bfloat16, generator=g) for _ in range(2))
    v = torch.randn(batch, H, seq_len, d_v, device=device, dtype=torch.bfloat16, generator=g)
    lines, measured = [], {"batch": batch, "seq_len": seq_len, "kernels": {}}
    names = ["sdpa", "sdpa_flash_padded", "sdpa_efficient", "sdpa_cudnn"] + (["flash"] if flash_attn_func else [])
    for name in names:
        fn = ATTENTION_BACKENDS[name]
        try:
            qi, ki, vi = (t.detach().requires_grad_() for t in (q, k, v))

            def forward_backward(fn=fn):
                out = fn(qi, ki, vi, None, d_qk ** -0.5, 0.0, True)
                out.backward(torch.ones_like(out))
            ms = cuda_median_ms(forward_backward, warmup=3, iters=5)
            flops = attention_flops_per_token(config, seq_len) / config.num_hidden_layers * batch * seq_len
            lines.append(f"  {name:18s} fwd+bwd {ms:7.3f} ms  {flops / (ms * 1e-3) / 1e12:6.1f} TFLOP/s (causal FLOPs)")
            width = d_qk if name in ("sdpa_flash_padded", "flash") else d_v  # the kernel's value width
            kernel_flops = 3 * batch * H * seq_len * seq_len * (d_qk + width)
            measured["kernels"][name] = {"ms": ms, "kernel_flops": kernel_flops,
                                         "tflops": kernel_flops / (ms * 1e-3) / 1e12}
        except Exception as e:  # noqa: BLE001 - report and go on
            lines.append(f"  {name:18s} cannot run: {str(e).splitlines()[0][:150]}")
            measured["kernels"][name] = {"error": str(e).splitlines()[0][:150] if str(e) else type(e).__name__}
    return lines, measured


# ---- main ------------------------------------------------------------------------------------------------------
def print_row(r):
    if "error" in r:
        print(f"{r['variant'][:60]:60s} FAILED: {r['error']}", flush=True)
        return
    print(f"{r['variant'][:60]:60s} {r['step_time_s']:8.3f} {r['tokens_per_s']:9.0f} {100 * r['mfu']:6.1f} "
          f"{r['peak_memory_gib']:7.2f} {r['predicted_step_time_s']:8.3f} {r['predicted_tensor_memory_gib']:8.2f} "
          f"{r['first_step_s']:7.1f}", flush=True)


def markdown(results, base_step):
    out = ["| variant | mb | recompute | step s | tokens/s | MFU % | gain vs base | peak GiB | pred. step s | "
           "pred. tensors GiB | first step s |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if "error" in r:
            out.append(f"| {r['variant']} | | | failed: {r['error'][:80]} | | | | | | | |")
            continue
        gain = f"{base_step / r['step_time_s']:.2f}x" if base_step else ""
        out.append(f"| {r['variant']} | {r['micro_batch_size']} | {r['recompute']} | {r['step_time_s']:.3f} | "
                   f"{r['tokens_per_s']:.0f} | {100 * r['mfu']:.1f} | {gain} | {r['peak_memory_gib']:.2f} | "
                   f"{r['predicted_step_time_s']:.3f} | {r['predicted_tensor_memory_gib']:.2f} | {r['first_step_s']:.1f} |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="See the module docstring for the variants and the MFU definition.")
    p.add_argument("--model_dir", default="configs/deepseek-coder-v2-lite", help="config.json directory")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (0: the config's own count)")
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--micro_batch_size", type=int, default=4, help="sequences per micro-batch (variants may override)")
    p.add_argument("--global_batch_size", type=int, default=16, help="sequences per optimizer step")
    p.add_argument("--steps", type=int, default=12, help="timed steps per variant (the median is reported)")
    p.add_argument("--warmup", type=int, default=4, help="untimed first steps per variant (compile, allocator)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--variants", default="techniques",
                   help=f"comma-separated variants or presets ({', '.join(PRESETS)}); see the module docstring")
    p.add_argument("--recompute", choices=("none", "full"), default=None,
                   help="activation recompute for variants that leave it to the plan (default: the plan's choice)")
    p.add_argument("--device_profile", default=None, help="compiler profile (default: h100 on cuda, cpu on cpu)")
    p.add_argument("--mem_limit_gib", type=float, default=75.0, help="the compiler's memory limit")
    p.add_argument("--compile_backend", default="inductor", help="torch.compile backend (aot_eager: no codegen)")
    p.add_argument("--peak_tflops", type=float, default=PEAK_TFLOPS, help="MFU denominator (H100 SXM dense bf16)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--out_dir", default=None, help="plans, data and run logs (default: a temporary directory)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--profile", action="store_true",
                   help="CUDA: print each variant's kernel time by kind and kernel and the GPU's idle spans over "
                        "its timed steps (torch.profiler; the profiler slows the step)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/train_step.py --device cuda needs a CUDA GPU (or pass --device cpu)", file=sys.stderr)
        return 2
    args.device_profile = args.device_profile or ("h100" if args.device == "cuda" else "cpu")
    names = expand_variants(args.variants)
    try:
        variants = [(name, parse_variant(name)) for name in names]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from modeling import load_config
    from runtime.mesh import init_distributed
    out_dir = args.out_dir or tempfile.mkdtemp(prefix="train_step_")
    os.makedirs(out_dir, exist_ok=True)
    model_id = write_model_dir(args.model_dir, out_dir, args.layers)
    config = load_config(model_id)
    rows = max(64, args.global_batch_size)
    data_path = write_dataset(out_dir, config.vocab_size, args.seq_len, rows)
    n_active, n_total = active_parameters(config)
    flops_token = flops_per_token(config, args.seq_len)
    header = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "torch": torch.__version__, "model": os.path.basename(model_id), "layers": config.num_hidden_layers,
              "seq_len": args.seq_len, "global_batch_size": args.global_batch_size,
              "micro_batch_size": args.micro_batch_size, "steps": args.steps, "warmup": args.warmup,
              "parameters": n_total, "active_parameters": n_active, "flops_per_token": flops_token,
              "attention_flops_per_token": attention_flops_per_token(config, args.seq_len),
              "peak_tflops": args.peak_tflops}  # no machine paths: results are committed
    print(json.dumps(header, indent=1), flush=True)
    print(f"{n_total / 1e9:.3f} B parameters, {n_active / 1e6:.1f} M active per token; "
          f"{flops_token / 1e9:.3f} GFLOP per token; 30 % MFU = "
          f"{0.3 * args.peak_tflops * 1e12 / flops_token:.0f} tokens/s", flush=True)

    init_distributed(args.device)
    if args.device == "cuda" and config.model_type == "deepseek_v2":
        print("attention kernels on one layer's MLA attention (batch = micro-batch):")
        lines, header["attention_kernels"] = attention_kernel_check(config, args.seq_len, args.micro_batch_size,
                                                                    "cuda")
        for line in lines:
            print(line, flush=True)
        cleanup(args.device)

    plans = Plans(args, model_id, out_dir)
    results = []
    print(f"\n{'variant':60s} {'step s':>8s} {'tok/s':>9s} {'MFU %':>6s} {'peakGiB':>7s} {'pred s':>8s} "
          f"{'predGiB*':>8s} {'1st s':>7s}", flush=True)
    try:
        for index, (name, settings) in enumerate(variants):
            try:
                result = run_variant(name, settings, args, model_id, data_path, plans, flops_token, out_dir, index)
            except Exception as e:  # noqa: BLE001 - one variant failing (OOM, a kernel missing) is a result too
                message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                result = {"variant": name, "settings": settings, "error": f"{type(e).__name__}: {message[:300]}"}
            results.append(result)
            print_row(result)
            cleanup(args.device)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"setup": header, "results": results}, f, indent=1)
    finally:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()

    base = next((r for r in results if r["variant"] == "base" and "error" not in r), None)
    print("\nmarkdown:")
    print(markdown(results, base["step_time_s"] if base else None))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
