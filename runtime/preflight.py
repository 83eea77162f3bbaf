"""Checks before any heavy work: find the plan, and refuse a run that does not fit it.

Everything here reads flags, files and the plan only (and takes the save directory's lock); nothing
builds a model or touches a device, so a mistake costs a second, not a model load.
"""

import fcntl
import os
import socket

import torch.distributed as dist

from errors import UserError
from compiler.execution import unsupported
from compiler.plan import Plan, default_plan_path, model_fingerprint, model_name_of
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
    try:
        listed = sorted(f for f in os.listdir(args.plans_dir) if f.endswith(".json"))
    except OSError:  # no plans directory (or an unreadable one): only the preferred path can exist
        listed = []
    candidates = [preferred] + [os.path.join(args.plans_dir, f) for f in listed]
    skipped = []
    for path in dict.fromkeys(candidates):  # the preferred file once, first
        if not os.path.isfile(path):
            continue
        try:
            plan = Plan.load(path)
        except Exception as e:  # any file that is not a valid plan (PlanError, or worse) is passed over
            skipped.append(f"{path} ({type(e).__name__})")
            continue
        if plan.model.get("fingerprint_sha") == digest and plan.plan_ngpus == args.plan_ngpus:
            return plan, path
    unreadable = (f" (passed over {len(skipped)} unreadable plan file(s): {', '.join(skipped[:3])}"
                  f"{', ...' if len(skipped) > 3 else ''}; `python train.py --run_mode inspect --plan FILE` says why)"
                  if skipped else "")
    raise RunError(f"no plan in {args.plans_dir}/ for this model with --plan_ngpus {args.plan_ngpus}{unreadable}; "
                   f"compile one with `python train.py --run_mode compile --model_id {args.model_id} --plan_ngpus "
                   f"{args.plan_ngpus} --runtime_ngpus {args.runtime_ngpus or args.plan_ngpus}` or pass --plan")


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
    check_batch_split(plan, runtime, plan_path)
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


def check_batch_split(plan: Plan, runtime, plan_path):
    """The rule compile applies (compiler/search.py), for the devices of this run: its data ranks
    (replicas x dp x ep, each reading its own slice of the global batch) split the global batch into
    whole micro-batches; and a pipeline runs the micro-batches per step its schedule was compiled
    for. Otherwise each rank's rows would be rounded down while the loss is divided as if all were
    used: a run that exits 0 with a wrong loss."""
    global_batch, micro = plan.search_inputs["global_batch_size"], plan.search_inputs["micro_batch_size"]
    dp, ep = plan.mesh["dp"], plan.mesh["ep"]
    replicas = runtime // plan.plan_ngpus
    data_ranks = replicas * dp * ep
    if global_batch % (micro * data_ranks):
        fits = [k * plan.plan_ngpus for k in range(1, global_batch // (micro * dp * ep) + 1)
                if global_batch % (micro * dp * ep * k) == 0]
        use = f"use --runtime_ngpus {' or '.join(map(str, fits))}, or " if fits else ""
        raise RunError(f"--runtime_ngpus {runtime}: its {data_ranks} data-parallel ranks ({replicas} replica(s) x dp "
                       f"{dp} x ep {ep}) do not split the global batch of {global_batch} sequences of {plan_path} into "
                       f"whole micro-batches of {micro} (it must be a multiple of {micro} x {data_ranks}, as compile "
                       f"requires); {use}recompile the plan with --runtime_ngpus {runtime} and a --global_batch_size "
                       f"that is a multiple of {micro * data_ranks}")
    per_pipeline = global_batch // (micro * data_ranks)
    if plan.mesh["pp"] > 1 and per_pipeline != plan.schedule["micro_batches"]:
        compiled = plan.search_inputs.get("runtime_ngpus")
        raise RunError(f"--runtime_ngpus {runtime}: each of the {data_ranks} pipeline(s) would run {per_pipeline} "
                       f"micro-batches per step, but the schedule of {plan_path} was compiled for "
                       f"{plan.schedule['micro_batches']}" + (f" (at --runtime_ngpus {compiled})" if compiled else "")
                       + f"; {f'use --runtime_ngpus {compiled}, or ' if compiled else ''}recompile the plan with "
                       f"--runtime_ngpus {runtime}")


# ---- the save directory ------------------------------------------------------------------------------------
LOCK_FILE = ".run.lock"  # in --save_dir: held (flock) by rank 0 of the run that writes there
_held = {}               # real path of a save directory -> the open lock file of this process


def claim_save_dir(save_dir, rank):
    """--save_dir checked and locked by rank 0 before any heavy work, the verdict sent to every rank
    (one collective) so that all refuse together: a directory (created if missing) that can be
    written and that no other run is using. The lock lasts as long as rank 0's process; the kernel
    releases it when the process ends, however it ends."""
    problem = None
    if rank == 0:
        try:
            check_save_dir(save_dir)
            lock_save_dir(save_dir)
        except RunError as e:
            problem = str(e)
    if dist.is_initialized() and dist.get_world_size() > 1:
        verdict = [problem]
        dist.broadcast_object_list(verdict, src=0)
        problem = verdict[0]
    if problem:
        raise RunError(problem)


def check_save_dir(save_dir):
    if os.path.exists(save_dir) and not os.path.isdir(save_dir):
        raise RunError(f"--save_dir {save_dir} is a file, not a directory; pass a directory (it is created if "
                       "missing)")
    try:
        os.makedirs(save_dir, exist_ok=True)
    except OSError as e:
        raise RunError(f"--save_dir {save_dir} cannot be created ({e.strerror}); pass a directory you can write")
    if not os.access(save_dir, os.W_OK | os.X_OK):
        raise RunError(f"--save_dir {save_dir} is not writable; make it writable or pass another --save_dir")


def lock_save_dir(save_dir):
    """An exclusive lock on `save_dir` for this process (re-entrant within it); refused, naming the
    holder, while another process holds it."""
    key = os.path.realpath(save_dir)
    if key in _held:
        return
    path = os.path.join(save_dir, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise RunError(f"--save_dir {save_dir} is not writable ({path}: {e.strerror}); make it writable or pass "
                       "another --save_dir") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise RunError(f"--save_dir {save_dir} is in use by another run ({holder}, lock {path}); wait for it to end "
                       "or stop it, or pass another --save_dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    _held[key] = fd


def release_save_dirs():
    """The locks this process holds, released (at the end of a run; the kernel does it at exit anyway)."""
    while _held:
        os.close(_held.popitem()[1])


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
    if args.ce_chunk_tokens < 0:
        raise RunError(f"--ce_chunk_tokens must be 0 (plain loss) or positive, got {args.ce_chunk_tokens}")
    # the one rule of what the runtime executes, which the search also obeys
    reason = unsupported(args.execution(), plan.mesh["pp"], plan.zero["level"], compute_dtype_name(args))
    if reason:
        raise RunError(f"{plan_path}: {reason}; drop the flag (--dtype bf16 for compiled layers) or recompile the plan")
