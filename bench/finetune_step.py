"""Benchmark of a LoRA fine-tuning step on one device, through the real training path.

    python bench/finetune_step.py [--layers 0] [--lora_rank 64] [--seq_len 1024] [--rows 8] [--json OUT.json]

Model: DeepSeek-Coder-V2-Lite (`--model_dir`, default configs/deepseek-coder-v2-lite), all of its
decoder layers by default (`--layers 0`), random initialisation, the base weights frozen in bf16 (no
fp32 master copy, gradient or optimizer state), LoRA adapters of rank `--lora_rank` on every
projection the `--lora_targets` name (default: attention, dense MLP, shared experts and the routed
experts, whose adapters are stacked per layer and applied by grouped GEMMs), fp32 adapters with AdamW.
Data: `--rows` packed instruction rows of `--seq_len` tokens per optimizer step, as
`bookcorpus.py --format sft` writes them (input_ids, labels with the prompt masked, position_ids
restarting at each example), random tokens in examples of random length, so attention is
document-masked as in a real fine-tuning run.
Plan: compiled by the compiler for one device with the LoRA options and `--document_masking on`
(`--device_profile` h200, `--mem_limit_gib` 80, `--micro_batch_size auto`, no execution flag: the
compiler chooses how the step runs); its predicted step time and peak memory are reported beside the
measurement.

The run is `runtime.trainer.train(RunArgs(...))` in this process for `--warmup` + `--steps` steps;
the median of the timed steps is reported (the trainer's CUDA events around the whole step).

MFU uses the bench's one formula (bench/train_step.py): 6 x active non-embedding parameters (routed
experts counted top_k / E) + causal attention 3 x layers x heads x seq x (d_qk + d_v), per token, over
989 TFLOP/s. A LoRA step does less work than that (no weight gradients of the frozen base), so this
MFU is the rate of the model's full-training FLOPs, comparable across runs, not the FLOPs executed.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.gpu_profile import print_step_summary, start_profiler  # noqa: E402
from bench.train_step import PEAK_TFLOPS, active_parameters, flops_per_token, write_model_dir  # noqa: E402
from compiler.cost_model import RESERVED_GIB  # noqa: E402
from modeling import IGNORE_INDEX  # noqa: E402
from options import ATTENTION_KERNELS, COMPILE_SCOPES  # noqa: E402


def packed_examples(rows, seq_len, generator):
    """(row, start, end) of each example of `rows` packed rows of `seq_len` tokens: examples of random
    length (seq_len / 8 to seq_len / 2 tokens, drawn from `generator`) laid end to end, the last one
    of a row cut at its end."""
    for r in range(rows):
        start = 0
        while start < seq_len:
            end = min(seq_len, start + int(torch.randint(seq_len // 8, seq_len // 2 + 1, (1,), generator=generator)))
            yield r, start, end
            start = end


def write_packed_dataset(out_dir, vocab_size, seq_len, rows, seed=0, prompt_share=0.4, packed=True):
    """`rows` packed instruction rows: examples of random length (seq_len / 8 to seq_len / 2 tokens)
    laid end to end, the last one cut at the row's end; the first `prompt_share` of each example is
    its prompt (label -100), the rest its response; position ids restart at 0 at each example
    (packed=False: no position ids, so the rows are attended as whole sequences)."""
    import datasets
    path = os.path.join(out_dir, f"sft_rows_{rows}x{seq_len}" + ("" if packed else "_unpacked"))
    if os.path.isdir(path):
        return path
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (rows, seq_len), generator=g, dtype=torch.int64)
    labels = ids.clone()
    positions = torch.empty_like(ids)
    for r, start, end in packed_examples(rows, seq_len, g):
        positions[r, start:end] = torch.arange(end - start)
        labels[r, start:start + max(1, int(prompt_share * (end - start)))] = IGNORE_INDEX
    columns = {"input_ids": ids.int().numpy(), "labels": labels.int().numpy()}
    if packed:
        columns["position_ids"] = positions.int().numpy()
    datasets.Dataset.from_dict(columns).save_to_disk(path)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="See the module docstring for the setup and the MFU definition.")
    p.add_argument("--model_dir", default="configs/deepseek-coder-v2-lite", help="config.json directory")
    p.add_argument("--layers", type=int, default=0, help="decoder layers (0: the config's own count)")
    p.add_argument("--seq_len", type=int, default=1024, help="tokens per packed row")
    p.add_argument("--rows", type=int, default=8, help="packed rows per optimizer step (the global batch)")
    p.add_argument("--lora_rank", type=int, default=64)
    p.add_argument("--lora_alpha", type=float, default=128.0)
    p.add_argument("--lora_targets", default="attention,dense_mlp,shared_experts,experts")
    p.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=4, help="untimed first steps (compile, allocator)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--device_profile", default=None, help="compiler profile (default: h200 on cuda, cpu on cpu)")
    p.add_argument("--mem_limit_gib", type=float, default=80.0, help="the compiler's memory limit")
    p.add_argument("--micro_batch_size", default="auto", help="rows per micro-batch, or auto (the compiler)")
    p.add_argument("--compile_backend", default="inductor", help="torch.compile backend (aot_eager: no codegen)")
    p.add_argument("--attention", default=None, choices=ATTENTION_KERNELS,
                   help="pin the attention kernel (default: the compiler's choice)")
    p.add_argument("--compile", default=None, choices=COMPILE_SCOPES,
                   help="pin the plan's --compile scope (default: the compiler chooses), e.g. layer_cudagraphs "
                        "(each compiled layer replayed as CUDA graphs), or layer to run without them")
    p.add_argument("--peak_tflops", type=float, default=PEAK_TFLOPS, help="MFU denominator (dense bf16 peak)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--out_dir", default=None, help="plan, data and run logs (default: a temporary directory)")
    p.add_argument("--packing", choices=("on", "off"), default="on",
                   help="on: packed rows with position ids restarting per example (document-masked attention); "
                        "off: the same tokens and labels as whole-row sequences (plain causal attention)")
    p.add_argument("--profile", action="store_true",
                   help="print the GPU's busy share, kernel time by kind and kernel, and its largest idle spans over "
                        "the timed steps (torch.profiler; the profiler slows the step)")
    p.add_argument("--profile_host", action="store_true",
                   help="with --profile: also the host's ops, and which of them run while the GPU waits")
    p.add_argument("--profile_shapes", action="store_true",
                   help="with --profile: also the host operators by input shapes with the GPU time of their kernels "
                        "(which GEMM of which projection costs what; clearest with --compile layer, whose GEMMs "
                        "are launched by named operators rather than replayed in a CUDA graph)")
    p.add_argument("--json", default=None, help="write the result here")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/finetune_step.py --device cuda needs a CUDA GPU (or pass --device cpu)", file=sys.stderr)
        return 2
    args.device_profile = args.device_profile or ("h200" if args.device == "cuda" else "cpu")
    micro = args.micro_batch_size if args.micro_batch_size == "auto" else int(args.micro_batch_size)

    from compiler.compile import compile_plan
    from modeling import load_config
    from options import CompileOptions
    from runtime.mesh import init_distributed
    from runtime.trainer import RunArgs, train

    out_dir = args.out_dir or tempfile.mkdtemp(prefix="finetune_step_")
    os.makedirs(out_dir, exist_ok=True)
    model_id = write_model_dir(args.model_dir, out_dir, args.layers)
    config = load_config(model_id)
    data_path = write_packed_dataset(out_dir, config.vocab_size, args.seq_len, max(4 * args.rows, 32),
                                     packed=args.packing == "on")
    n_active, n_total = active_parameters(config)
    flops_token = flops_per_token(config, args.seq_len)
    lora = {"lora_rank": args.lora_rank, "lora_alpha": args.lora_alpha, "lora_targets": args.lora_targets}
    plan_path = os.path.join(out_dir, "plan.json")
    started = time.perf_counter()
    plan, _ = compile_plan(CompileOptions(
        model_id=model_id, plan_ngpus=1, runtime_ngpus=1, seq_len=args.seq_len, micro_batch_size=micro,
        global_batch_size=args.rows, mem_limit_gib=args.mem_limit_gib, device_profile=args.device_profile,
        plan_out=plan_path, report=False, document_masking=args.packing == "on", **lora,
        **({"compile": args.compile} if args.compile else {}), **({"attention": args.attention} if args.attention else {})))
    compile_s = time.perf_counter() - started
    setup = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
             "model": os.path.basename(args.model_dir), "layers": config.num_hidden_layers, "seq_len": args.seq_len,
             "packing": args.packing,
             "rows_per_step": args.rows, **lora, "parameters": n_total, "active_parameters": n_active,
             "flops_per_token": flops_token, "peak_tflops": args.peak_tflops,
             "plan": {"micro_batch_size": plan.search_inputs["micro_batch_size"], "execution": plan.execution,
                      "recompute": plan.stages[0].recompute, "zero": plan.zero["level"]},
             "compile_plan_s": round(compile_s, 2)}  # no machine paths: results are committed
    print(json.dumps(setup, indent=1), flush=True)

    init_distributed(args.device)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    profiler = None
    if args.profile and args.device == "cuda":
        profiler = start_profiler(host=args.profile_host, shapes=args.profile_shapes)
    try:
        records, params = train(RunArgs(
            model_id=model_id, dataset_path=data_path, plan_ngpus=1, runtime_ngpus=1, plan=plan_path,
            max_steps=args.warmup + args.steps, lr=args.lr, warmup_steps=1, seed=0, device=args.device,
            save_dir=os.path.join(out_dir, "run"), progress=False, final_save=False,
            compile_backend=args.compile_backend, **lora))
        del params
    finally:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
        if profiler is not None:
            profiler.__exit__(None, None, None)
    timed = records[args.warmup:] or records
    if profiler is not None:
        print_step_summary(profiler, timed)
    key = "step_time_cuda_s" if "step_time_cuda_s" in timed[0] else "step_time_s"
    step = statistics.median(r[key] for r in timed)
    tokens = timed[0]["tokens"]
    result = {**setup, "step_time_s": step, "tokens_per_step": tokens, "tokens_per_s": tokens / step,
              "mfu": flops_token * tokens / (step * args.peak_tflops * 1e12),
              "peak_memory_gib": max(r["peak_memory_gib"] for r in records),
              "first_step_s": records[0]["step_time_s"],
              "predicted_step_time_s": plan.predicted["step_time_s"],
              "predicted_peak_memory_gib": max(plan.predicted["peak_memory_gib"]),
              "predicted_tensor_memory_gib": max(plan.predicted["peak_memory_gib"]) - RESERVED_GIB,
              "losses": [round(r["loss"], 5) for r in records]}
    if args.device == "cuda":
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2 ** 30
    print(f"step {step:.3f} s (predicted {result['predicted_step_time_s']:.3f}), {result['tokens_per_s']:.0f} tokens/s, "
          f"MFU {100 * result['mfu']:.1f} %, peak {result['peak_memory_gib']:.2f} GiB (predicted tensors "
          f"{result['predicted_tensor_memory_gib']:.2f})", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
