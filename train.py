"""The command line of the pipeline: parse flags, hand over to the compiler or the runtime.

    python train.py --run_mode compile --model_id DIR --plan_ngpus 4 --runtime_ngpus 8   # plan
    python train.py --run_mode inspect --plan plans/X.json                                 # read a plan
    torchrun --nproc_per_node 8 train.py --model_id DIR --dataset_path DS \\
             --plan_ngpus 4 --runtime_ngpus 8                                              # train

This file holds no logic of its own beyond the flags; see compiler/ and runtime/.
"""

import argparse
import os
import sys

RUN_MODES = ("compile", "run", "inspect")


def build_parser():
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Compiler-driven auto-parallel training of DeepSeek MoE models. "
                    "`--run_mode compile` traces the model on the meta device and searches a parallel "
                    "plan for --plan_ngpus devices; `--run_mode run` (the default, under torchrun) "
                    "executes that plan replicated over --runtime_ngpus devices; `--run_mode inspect` "
                    "prints a saved plan.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run_mode", choices=RUN_MODES, default="run",
                   help="compile: trace + search + save a plan; run: train with a plan; inspect: print a plan")

    model = p.add_argument_group("model and data")
    model.add_argument("--model_id", help="a local directory with config.json (and optionally HF weights), "
                                          "e.g. configs/tiny-deepseek-v2, or a Hugging Face hub id")
    model.add_argument("--dataset_path", help="a dataset saved by bookcorpus.py (column input_ids)")
    model.add_argument("--seq_len", type=int, default=2048, help="tokens per sequence")

    plan = p.add_argument_group("parallel plan")
    plan.add_argument("--plan_ngpus", type=int, help="devices one copy of the plan spans")
    plan.add_argument("--runtime_ngpus", type=int,
                      help="devices of the run; a multiple of --plan_ngpus, the plan being replicated runtime_ngpus / plan_ngpus times (default: --plan_ngpus)")
    plan.add_argument("--plan", help="plan file to run or inspect (default: found in plans/ by model and P)")
    plan.add_argument("--plan_out", help="where compile writes the plan (default plans/<model>-<P>gpu.json)")
    plan.add_argument("--plan_rank", type=int, default=1,
                      help="compile: write the K-th best plan instead of the best (2 = the first runner-up), to "
                           "measure the search's ranking")
    plan.add_argument("--mem_limit_gib", type=float, default=64.0, help="memory limit per device for the search")
    plan.add_argument("--device_profile", default="h100",
                      help="h100, h200, cpu, or a profile JSON file, for the cost model")

    train = p.add_argument_group("training")
    train.add_argument("--micro_batch_size", type=int, default=None,
                       help="sequences per micro-batch (compile: default 4; run: must match the plan)")
    train.add_argument("--global_batch_size", type=int, default=None,
                       help="sequences per optimizer step (compile: default 64; run: must match the plan)")
    train.add_argument("--max_steps", type=int, default=1000, help="optimizer steps to run")
    train.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (AdamW, betas 0.9 / 0.95)")
    train.add_argument("--weight_decay", type=float, default=0.1, help="AdamW weight decay")
    train.add_argument("--warmup_steps", type=int, default=100, help="linear warmup steps")
    train.add_argument("--seed", type=int, default=0, help="seed of initialisation and data order")
    train.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cuda (NCCL) or cpu (gloo)")
    train.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                       help="compute dtype; master weights and optimizer state stay fp32 (default: bf16 on "
                            "cuda, fp32 on cpu)")
    train.add_argument("--save_dir", default="checkpoints", help="checkpoints, metrics.jsonl, TensorBoard")
    train.add_argument("--save_every", type=int, default=0,
                       help="save a sharded checkpoint every N steps (0: only after the last step)")
    train.add_argument("--no_final_save", action="store_true",
                       help="do not save a checkpoint after the last step (saved by default)")
    train.add_argument("--tokenizer_path", default=None,
                       help="directory whose tokenizer files are kept with each checkpoint, for merge_ckpt.py "
                            "(default: the tokenizer files of --model_id, if it has any)")
    train.add_argument("--keep_last", type=int, default=None, help="committed checkpoints to keep (default: all)")
    train.add_argument("--resume_path", default=None,
                       help="resume from a checkpoint directory, or `last` for the newest one in --save_dir")

    speed = p.add_argument_group(
        "speed (each measured by bench/train_step.py). Given to compile, they are recorded in the plan and costed; "
        "a run uses the plan's unless it sets its own. Unset everywhere: the plain path")
    speed.add_argument("--attention", default=None,
                       choices=("sdpa", "sdpa_flash_padded", "sdpa_efficient", "sdpa_cudnn", "flash", "eager"),
                       help="attention kernel: sdpa lets PyTorch choose; sdpa_flash_padded forces its flash kernel "
                            "(MLA's 128-wide values zero-padded to the 192-wide query/key head); sdpa_efficient, "
                            "sdpa_cudnn force those kernels (CUDA only); flash needs the flash-attn package. "
                            "Unset: flash if installed, else sdpa")
    speed.add_argument("--compile", default="none", choices=("none", "norm_rope", "layer", "layer_eager_experts"),
                       help="torch.compile of each decoder layer's forward (layer), the same with the routed experts "
                            "left eager (layer_eager_experts), or only RMSNorm and RoPE as fused kernels (norm_rope); "
                            "needs bf16 compute; the first step includes the compile time")
    speed.add_argument("--ce_chunk_tokens", type=int, default=0,
                       help="compute the cross-entropy from the final hidden states this many positions at a time, "
                            "never holding the full float32 logits (0: the plain loss over full logits; plans "
                            "without pipeline stages)")
    speed.add_argument("--fused_adamw", action="store_true", help="AdamW's fused kernel instead of the foreach one")
    speed.add_argument("--defer_grad_sync", action="store_true",
                       help="ZeRO 0 plans: accumulate gradients over the step's micro-batches (float32) and reduce "
                            "them once, keeping the bf16 weight copies gathered in between")
    return p


def speed_options(args):
    """The speed flags that change the cost of a step, as a plan records them."""
    return {"compile": args.compile if args.compile != "none" else None, "ce_chunk_tokens": args.ce_chunk_tokens,
            "fused_adamw": args.fused_adamw, "defer_grad_sync": args.defer_grad_sync}


def run_compile(args):
    from compiler.compile import CompileRequest, compile_plan
    from compiler.plan import summarize
    if args.model_id is None or args.plan_ngpus is None:
        raise UsageError("--run_mode compile needs --model_id and --plan_ngpus")
    plan, path = compile_plan(CompileRequest(
        model_id=args.model_id, plan_ngpus=args.plan_ngpus, runtime_ngpus=args.runtime_ngpus,
        seq_len=args.seq_len, micro_batch_size=args.micro_batch_size or 4,
        global_batch_size=args.global_batch_size or 64,
        mem_limit_gib=args.mem_limit_gib, device_profile=args.device_profile, plan_out=args.plan_out,
        plan_rank=args.plan_rank, execution=speed_options(args)))
    print(summarize(plan))
    print(f"plan: {path}  report: {path[:-5]}.md, {path[:-5]}.png")
    return 0


def run_inspect(args):
    from compiler.compile import inspect_plan
    if args.plan is None:
        raise UsageError("--run_mode inspect needs --plan FILE")
    return inspect_plan(args.plan, args.model_id)


def run_training(args):
    from runtime.trainer import RunArgs, run
    if args.model_id is None:
        raise UsageError("--model_id is required")
    records = run(RunArgs(
        model_id=args.model_id, dataset_path=args.dataset_path, plan_ngpus=args.plan_ngpus,
        runtime_ngpus=args.runtime_ngpus, plan=args.plan, max_steps=args.max_steps, lr=args.lr,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, micro_batch_size=args.micro_batch_size,
        global_batch_size=args.global_batch_size, seed=args.seed, device=args.device, save_dir=args.save_dir,
        dtype=args.dtype, save_every=args.save_every, keep_last=args.keep_last, resume_path=args.resume_path,
        final_save=not args.no_final_save, tokenizer_path=args.tokenizer_path, attention=args.attention,
        compile=args.compile, ce_chunk_tokens=args.ce_chunk_tokens, fused_adamw=args.fused_adamw,
        defer_grad_sync=args.defer_grad_sync))
    if records and int(os.environ.get("RANK", "0")) == 0:
        first, last = records[0], records[-1]
        print(f"trained {len(records)} steps: loss {first['loss']:.4f} -> {last['loss']:.4f}; "
              f"metrics in {os.path.join(args.save_dir, 'metrics.jsonl')}")
    return 0


class UsageError(ValueError):
    pass


def main(argv=None):
    args = build_parser().parse_args(argv)
    from compiler.plan import PlanError
    from compiler.profiles import ProfileError
    from compiler.search import NoPlanFits
    from modeling.loading import ModelDirError
    from runtime.data import DataError
    from runtime.checkpoint import CheckpointError
    from runtime.trainer import NonFiniteError, RunError
    try:
        if args.run_mode == "compile":
            return run_compile(args)
        if args.run_mode == "inspect":
            return run_inspect(args)
        return run_training(args)
    except (UsageError, PlanError, ProfileError, NoPlanFits, ModelDirError, RunError, DataError,
            CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
