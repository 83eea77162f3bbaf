"""The command line of the pipeline: parse flags, hand over to the compiler or the runtime.

    python train.py --run_mode compile --model_id DIR --plan_ngpus 4 --runtime_ngpus 8   # plan
    python train.py --run_mode inspect --plan plans/X.json                                 # read a plan
    torchrun --nproc_per_node 8 train.py --model_id DIR --dataset_path DS \\
             --plan_ngpus 4 --runtime_ngpus 8                                              # train

This file holds no logic of its own beyond the flags; see compiler/ and runtime/.
"""

import argparse
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
                      help="devices of the run; a multiple of --plan_ngpus (the plan is replicated)")
    plan.add_argument("--plan", help="plan file to run or inspect (default: found in plans/ by model and P)")
    plan.add_argument("--plan_out", help="where compile writes the plan (default plans/<model>-<P>gpu.json)")
    plan.add_argument("--mem_limit_gib", type=float, default=64.0, help="memory limit per device for the search")
    plan.add_argument("--device_profile", default="h100",
                      help="h100, h200, cpu, or a profile JSON file, for the cost model")

    train = p.add_argument_group("training")
    train.add_argument("--micro_batch_size", type=int, default=4, help="sequences per micro-batch")
    train.add_argument("--global_batch_size", type=int, default=64, help="sequences per optimizer step")
    train.add_argument("--max_steps", type=int, default=1000, help="optimizer steps to run")
    train.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (AdamW)")
    train.add_argument("--warmup_steps", type=int, default=100, help="linear warmup steps")
    train.add_argument("--seed", type=int, default=0, help="seed of initialisation and data order")
    train.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cuda (NCCL) or cpu (gloo)")
    train.add_argument("--save_dir", default="checkpoints", help="checkpoints, metrics.jsonl, TensorBoard")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    # The compiler and runtime land in later steps; say so plainly instead of pretending to run.
    print(f"train.py: --run_mode {args.run_mode} is not available yet in this version; "
          "see README.md for what runs today (python demo.py).", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
