"""Checks before any heavy work: find the plan, and refuse a run that does not fit it.

Everything here reads flags, files and the plan only; nothing builds a model or touches a device,
so a mistake costs a second, not a model load.
"""

import os

from errors import UserError
from compiler.plan import Plan, PlanError, default_plan_path, model_fingerprint, model_name_of
from modeling.kernels import flash_attn_func
from options import ATTENTION_KERNELS, COMPILE_SCOPES, ExecutionOptions, RunOptions


class RunError(UserError):
    """A run that must not start; the message names the flag or file and the fix."""


def find_plan(args: RunOptions, config):
    """(plan, path): --plan, or the plan in plans/ made for this model (by fingerprint) and --plan_ngpus.
    A plan file that cannot be read is passed over in the lookup, so one bad file does not hide the others."""
    if args.plan:
        plan = Plan.load(args.plan)
        plan.check_model(config, source=args.plan)
        return plan, args.plan
    _, digest = model_fingerprint(config)
    if args.plan_ngpus is None:
        raise RunError("give --plan FILE or --plan_ngpus P (to find plans/<model>-<P>gpu.json)")
    preferred = default_plan_path(model_name_of(args.model_id), args.plan_ngpus, args.plans_dir)
    candidates = [preferred] + sorted(os.path.join(args.plans_dir, f) for f in os.listdir(args.plans_dir)
                                      if f.endswith(".json")) if os.path.isdir(args.plans_dir) else []
    for path in candidates:
        if not os.path.isfile(path):
            continue
        try:
            plan = Plan.load(path)
        except PlanError:
            continue
        if plan.model.get("fingerprint_sha") == digest and plan.plan_ngpus == args.plan_ngpus:
            return plan, path
    raise RunError(f"no plan in {args.plans_dir}/ for this model with --plan_ngpus {args.plan_ngpus}; compile one with "
                   f"`python train.py --run_mode compile --model_id {args.model_id} --plan_ngpus {args.plan_ngpus} "
                   f"--runtime_ngpus {args.runtime_ngpus or args.plan_ngpus}` or pass --plan")


def check_run(args: RunOptions, plan: Plan, plan_path, world_size):
    """The run against the plan: devices, processes, batch shape, what the runtime can execute, and
    the execution options (the plan's, for each one the run leaves at its default)."""
    runtime = args.runtime_ngpus or world_size
    if plan.mesh["tp"] > 1 and plan.mesh["ep"] > 1:
        raise RunError(f"{plan_path}: tensor and expert parallelism together (mesh.tp = {plan.mesh['tp']}, mesh.ep = "
                       f"{plan.mesh['ep']}) cannot be executed by this version of the runtime; compile a plan with one "
                       "of them")
    if plan.mesh["tp"] > 1 and plan.zero["level"] > 0:
        raise RunError(f"{plan_path}: tensor parallelism with ZeRO level {plan.zero['level']} cannot be executed by "
                       "this version of the runtime (its gradient norm disagrees with a single process); compile a "
                       "plan with ZeRO 0 or without tensor parallelism")
    if plan.zero["level"] > 0 and not plan.zero["shard_over_replicas"] and runtime > plan.plan_ngpus:
        raise RunError(f"{plan_path}: ZeRO sharded within a replica (HSDP) is not supported by this version of the "
                       "runtime; compile the plan again (the search shards over the replicas)")
    plan.check_run(args.plan_ngpus, runtime, source=plan_path)
    if args.tokenizer_path and not os.path.isdir(args.tokenizer_path):
        raise RunError(f"--tokenizer_path {args.tokenizer_path}: no such directory; pass the directory the "
                       "tokenizer was saved to (tokenizer.json, tokenizer_config.json)")
    if world_size != runtime:
        raise RunError(f"{world_size} processes were started but --runtime_ngpus is {runtime}; start "
                       f"`torchrun --nproc_per_node {runtime}` or change --runtime_ngpus")
    adopt_plan_execution(args, plan)
    check_execution(args, plan, plan_path)
    for flag, value, planned in (("--seq_len", args.seq_len, plan.search_inputs["seq_len"]),
                                 ("--micro_batch_size", args.micro_batch_size, plan.search_inputs["micro_batch_size"]),
                                 ("--global_batch_size", args.global_batch_size,
                                  plan.search_inputs["global_batch_size"])):
        if value is not None and value != planned:
            raise RunError(f"{flag} {value} differs from the {planned} the plan {plan_path} was compiled for; "
                           "recompile the plan with the new value or leave the flag out")


def compute_dtype_name(args: RunOptions):
    return args.dtype or ("bf16" if args.device == "cuda" else "fp32")


def adopt_plan_execution(args: RunOptions, plan: Plan):
    """The execution options the plan was costed with, for each one this run leaves at its default."""
    defaults = ExecutionOptions()
    for name, value in ExecutionOptions.from_plan(plan.execution).costed().items():
        if getattr(args, name) == getattr(defaults, name):
            setattr(args, name, value)


def check_execution(args: RunOptions, plan: Plan, plan_path):
    """The execution options against the plan and the compute dtype."""
    if args.attention is not None and args.attention not in ATTENTION_KERNELS:
        raise RunError(f"--attention {args.attention}: choose one of {', '.join(ATTENTION_KERNELS)}")
    if args.compile not in COMPILE_SCOPES:
        raise RunError(f"--compile {args.compile}: choose one of {', '.join(COMPILE_SCOPES)}")
    if args.attention == "flash" and flash_attn_func is None:
        raise RunError("--attention flash needs the flash-attn package, which is not installed; use "
                       "--attention sdpa_flash_padded (PyTorch's own flash kernel) or sdpa")
    if args.compile != "none" and compute_dtype_name(args) != "bf16":
        raise RunError(f"--compile {args.compile} needs bf16 compute (torch._grouped_mm compiles only for "
                       f"bfloat16) but the compute dtype is {compute_dtype_name(args)}; pass --dtype bf16 or "
                       "leave --compile at none (the default; on a CPU compiling rarely pays off)")
    if args.ce_chunk_tokens < 0:
        raise RunError(f"--ce_chunk_tokens must be 0 (plain loss) or positive, got {args.ce_chunk_tokens}")
    if args.ce_chunk_tokens and plan.mesh["pp"] > 1:
        raise RunError(f"--ce_chunk_tokens applies to plans without pipeline stages; {plan_path} has "
                       f"{plan.mesh['pp']} (its last stage computes the loss from full logits); drop the flag")
    if args.defer_grad_sync and (plan.mesh["pp"] > 1 or plan.zero["level"] != 0):
        raise RunError(f"--defer_grad_sync needs a plan with ZeRO 0 and no pipeline stages ({plan_path} has ZeRO "
                       f"{plan.zero['level']}, pp {plan.mesh['pp']}): under ZeRO 2 / 3 each rank would hold "
                       "unsharded float32 gradients; drop the flag")
