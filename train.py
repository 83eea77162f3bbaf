"""The command line of the pipeline: parse flags, hand over to the compiler or the runtime.

    python train.py --run_mode compile --model_id DIR --plan_ngpus 4 --runtime_ngpus 8   # plan
    python train.py --run_mode inspect --plan plans/X.json                                 # read a plan
    torchrun --nproc_per_node 8 train.py --model_id DIR --dataset_path DS \\
             --plan_ngpus 4 --runtime_ngpus 8                                              # train

The flags are generated from the option dataclasses of options.py, where each option, its default
and its help text are declared once; this file holds no logic beyond dispatching.
"""

import argparse
import os
import sys

from errors import UserError, run_cli
from options import CompileOptions, ExecutionOptions, RunOptions, add_flags, from_flags, given_flags

RUN_MODES = ("compile", "run", "inspect")
EXIT_NON_FINITE = 3  # the run stopped on a non-finite loss or gradient (not a usage error: exit 2)


def build_parser():
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Compiler-driven auto-parallel training of DeepSeek MoE models. "
                    "`--run_mode compile` traces the model on the meta device and searches a parallel "
                    "plan for --plan_ngpus devices; `--run_mode run` (the default, under torchrun) "
                    "executes that plan replicated over --runtime_ngpus devices; `--run_mode inspect` "
                    "prints a saved plan. User errors print one line and exit with status 2.")
    p.add_argument("--run_mode", choices=RUN_MODES, default="run",
                   help="compile: trace + search + save a plan; run: train with a plan; inspect: print a plan "
                        "(default: run)")
    add_flags(p, CompileOptions, RunOptions)
    return p


def run_compile(args):
    from compiler.compile import compile_plan
    from compiler.plan import summarize
    options = from_flags(args, CompileOptions)
    options.pinned = tuple(given_flags(args, ExecutionOptions))  # a flag given pins that choice
    if options.model_id is None or options.plan_ngpus is None:
        raise UserError("--run_mode compile needs --model_id and --plan_ngpus")
    plan, path = compile_plan(options)
    print(summarize(plan))
    print(f"plan: {path}  report: {path[:-5]}.md, {path[:-5]}.png")
    return 0


def run_inspect(args):
    from compiler.compile import inspect_plan
    if args.plan is None:
        raise UserError("--run_mode inspect needs --plan FILE")
    return inspect_plan(args.plan, args.model_id)


def run_training(args):
    from runtime.step import NonFiniteError
    from runtime.trainer import run
    options = from_flags(args, RunOptions)
    if options.model_id is None:
        raise UserError("--model_id is required")
    try:
        records = run(options)
    except NonFiniteError as e:  # the same on every rank (the loss and norms are all-reduced): said once
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr)
        return EXIT_NON_FINITE
    if records and int(os.environ.get("RANK", "0")) == 0:
        first, last = records[0], records[-1]
        print(f"trained {len(records)} steps: loss {first['loss']:.4f} -> {last['loss']:.4f}; "
              f"metrics in {os.path.join(options.save_dir, 'metrics.jsonl')}")
    return 0


def _main(argv=None):
    args = build_parser().parse_args(argv)
    if args.run_mode == "compile":
        return run_compile(args)
    if args.run_mode == "inspect":
        return run_inspect(args)
    return run_training(args)


def main(argv=None):
    """The command line: exit status 0, or 2 with one line naming the problem and the fix."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
