"""`torchrun ... train.py [--run_mode run]`: execute a saved plan and train.

The data flow of a run, one function each:

    preflight      find the plan, check the run against it (runtime/preflight.py)
    mesh           the device mesh: replica x the plan's axes (runtime/mesh.py)
    model          the training form built on meta, split as plan.ops says, this rank's weights
                   filled (runtime/parallelize.py, runtime/weights.py)
    parallelize    compiled layers, recompute, FSDP2 for the ZeRO level; pipeline stages
    loop           per step: forward + backward (runtime/step.py), loss and gradient norm over
                   the ranks, AdamW, metrics (runtime/metrics.py), checkpoints (runtime/checkpoint.py)

The execution options of a run (attention kernel, compiled layers, chunked loss, fused AdamW, one
gradient reduction per step) change how a step computes the objective, not what: each follows the
plain path to float rounding (tests/test_speed_options.py); bench/train_step.py measures them.
"""

import dataclasses
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.profiler import record_function
from torch.distributed.fsdp import MixedPrecisionPolicy
from tqdm import tqdm

from modeling import load_config
from options import RunOptions
from runtime import checkpoint
from runtime.data import DataError, GlobalBatches, evaluation_batches, load_rows
from runtime.loss import pipeline_loss_fn
from runtime.mesh import build_mesh, init_distributed
from runtime.metrics import MetricsLog, StepTimer, model_flops_per_step, peak_flops, peak_memory_gib
from runtime.parallelize import build_rank_model, expert_parameters, parallelize, stage_ranges
from runtime.pipeline import build_pipeline
from runtime.preflight import (RunError, adopt_plan_lora, check_document_masking, check_run, check_save_dir_shared,
                               claim_save_dir, compute_dtype_name, find_plan, release_save_dirs)
from runtime.step import (NonFiniteError, StepShape, UpdateGuard, build_optimizer, finish_step,
                          forward_backward_step, forward_only_loss_sum, loss_group, lr_factor,
                          pipeline_forward_only_loss_sum, pipeline_step)

RunArgs = RunOptions  # the runtime's name for the options of a run


@dataclass
class RankState:
    """What one rank trains with, once the plan is applied."""

    model: object            # the whole model (no pipeline stages), else None
    pipeline: object         # this rank's pipeline stages and schedule, else None
    holders: list            # the modules whose parameters this rank trains and saves
    expert_params: set       # ids of parameters that differ between expert-parallel ranks
    ep_mesh: object          # the ep mesh, when checkpoints must present experts as one tensor
    lora_file: dict = None   # a LoRA run's lora.json, saved with every checkpoint (None: no LoRA)


def train(args: RunOptions):
    """Trains `args.max_steps` steps; returns (the per-step records, {parameter name: this rank's
    tensor}), on every rank."""
    # the checks, cheapest first and all before any heavy work: the option values, the plan against
    # the run, the save directory (and its lock: one run per --save_dir), then the data
    args.validate()
    lr_factor(args)  # the schedule's flags (--lr_scheduler, --min_lr), checked before any work
    if args.eval_every and not args.eval_dataset_path:
        raise RunError(f"--eval_every {args.eval_every} needs --eval_dataset_path (the dataset to evaluate on)")
    checkpoint.check_options(args)
    world, rank = dist.get_world_size(), dist.get_rank()
    config = load_config(args.model_id, trust_remote_code=args.trust_remote_code)
    plan, plan_path = find_plan(args, config)
    check_run(args, plan, plan_path, world)
    adopt_plan_lora(args, plan, plan_path)  # the plan's LoRA options, or a refusal of other ones
    claim_save_dir(args.save_dir, rank)
    check_save_dir_shared(args.save_dir, rank)  # every node sees the same directory, or no checkpoint is whole
    resume_dir = None
    if args.resume_path:  # checked in full (checksums, metadata) before any heavy work
        resume_dir, committed = checkpoint.open_resume(args.resume_path, args.save_dir)
        checkpoint.check_lora(resume_dir, args.lora_record())  # the adapters it continues, or a full model
        if args.max_steps <= committed["step"]:
            raise checkpoint.CheckpointError(
                f"--max_steps {args.max_steps}: --resume_path {resume_dir} is at step {committed['step']} already; "
                f"give a --max_steps larger than {committed['step']} (the total, not the steps to add)")
    partitions = plan.op_partitions(plan_path)  # the plan's ops: how each op family is split
    seq_len, global_batch = plan.search_inputs["seq_len"], plan.search_inputs["global_batch_size"]
    micro = plan.search_inputs["micro_batch_size"]
    rows = load_rows(args.dataset_path, seq_len, config.vocab_size)
    check_document_masking(plan, plan_path, rows, "--dataset_path", args.dataset_path)
    data = GlobalBatches(rows, global_batch, args.seed, source=f"--dataset_path {args.dataset_path}")
    eval_set = None
    if args.eval_dataset_path:
        eval_rows = load_rows(args.eval_dataset_path, seq_len, config.vocab_size, flag="--eval_dataset_path")
        check_document_masking(plan, plan_path, eval_rows, "--eval_dataset_path", args.eval_dataset_path)
        eval_set = evaluation_batches(eval_rows, global_batch)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if args.device == "cuda" else torch.device("cpu")
    run_mesh = build_mesh(plan, device.type)
    # TOKENS of a batch of pretraining rows; each step's own count (labels) replaces it in the loop
    shape = StepShape(tokens=global_batch * (seq_len - 1), microbatches=global_batch // micro, micro_batch_size=micro)

    state = apply_plan(args, config, plan, partitions, run_mesh, device, shape)
    params = [p for h in state.holders for p in h.parameters() if p.requires_grad]  # LoRA: the adapters only
    optimizer, scheduler = build_optimizer(params, args)
    start_step = 0
    if resume_dir is not None:
        start_step = checkpoint.load(resume_dir, state.holders, optimizer, scheduler, state.ep_mesh)
    healthy = resume_dir  # the newest checkpoint of this run's lineage: what to go back to if it diverges
    guard = UpdateGuard(params, run_mesh, state.expert_params)

    def save(step):
        nonlocal healthy
        hf_files = checkpoint.hf_files_of_run(args.model_id, args.tokenizer_path) if rank == 0 else None
        healthy = checkpoint.save(args.save_dir, step, state.holders, optimizer, scheduler, args.keep_last,
                                  hf_files=hf_files, ep_mesh=state.ep_mesh, parent=healthy, protect=resume_dir,
                                  lora=state.lora_file)

    metrics = MetricsLog(args.save_dir, enabled=(rank == 0))
    progress = tqdm(total=args.max_steps, initial=start_step, desc="train", unit="step", file=sys.stderr,
                    disable=not (rank == 0 and args.progress))
    flops, peak = model_flops_per_step(plan), peak_flops(plan)
    data_rank, data_ranks = run_mesh.data_rank(), run_mesh.data_ranks()
    records = []

    def run_eval(step):
        eval_loss = evaluate(state, eval_set, shape, args, run_mesh, device, show=rank == 0 and args.progress)
        if rank == 0:
            tqdm.write(f"step {step}: eval_loss {eval_loss:.4f}")
        return eval_loss

    def prepare(step):
        """Step `step`'s batch on this rank's device and its StepShape, or the DataError its batch
        raises (raised when that step begins). Called for the next step while the device still runs
        this one, so the host's data work (the rows' gather, the target count, the copy) is not time
        the device waits for between steps (an H200 profile showed 0.7 ms a step, and 20 ms on some)."""
        try:
            batch = data.batch(step)
            step_shape = dataclasses.replace(shape, tokens=data.target_count(batch, step))
            return GlobalBatches.local_slice(batch, data_rank, data_ranks).to(device, non_blocking=True), step_shape
        except DataError as e:
            return e

    upcoming = prepare(start_step) if start_step < args.max_steps else None
    for step in range(start_step, args.max_steps):
        timer = StepTimer(device)
        # the record_function scopes name a step's phases in a profiler trace (bench/finetune_step.py
        # --profile_host); without a profiler they cost nothing measurable
        if isinstance(upcoming, DataError):
            raise upcoming
        local, step_shape = upcoming
        with record_function("train.forward_backward"):
            if state.pipeline is not None:
                parts = pipeline_step(state.pipeline, local, step_shape)
            else:
                parts = forward_backward_step(state.model, local, step_shape, args)
        with record_function("train.data"):
            upcoming = prepare(step + 1) if step + 1 < args.max_steps else None
        try:
            with record_function("train.finish_step"):
                loss, ce, aux, grad_norm, lr = finish_step(step, parts, params, state.expert_params, run_mesh,
                                                           optimizer, scheduler, guard)
        except NonFiniteError as e:
            raise_with_resume_hint(e, healthy)
        times = timer.stop()
        tokens = global_batch * seq_len
        record = {"step": step + 1, "loss": loss, "lm_loss": ce, "aux_loss": aux, "grad_norm": grad_norm, "lr": lr,
                  "tokens": tokens, "targets": step_shape.tokens, **times, "peak_memory_gib": peak_memory_gib(device),
                  "tokens_per_s": tokens / times["step_time_s"],
                  "mfu": flops / (times["step_time_s"] * world * peak) if peak and flops else 0.0}
        if eval_set is not None and ((args.eval_every and (step + 1) % args.eval_every == 0)
                                     or step + 1 == args.max_steps):
            settle(guard, healthy)  # no evaluation of a diverged step's weights
            record["eval_loss"] = run_eval(step + 1)  # after the step's timing: not part of its time
        records.append(record)
        with record_function("train.metrics"):
            metrics.log(record)
        if (args.save_every and (step + 1) % args.save_every == 0) or (args.final_save and step + 1 == args.max_steps):
            settle(guard, healthy)  # the step's own weight check first: a diverged step is never saved
            save(step + 1)
        progress.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", mfu=f"{100 * record['mfu']:.1f}%")
        progress.update(1)
    settle(guard, healthy)  # the last step's weight check
    if args.max_steps == 0 and eval_set is not None:  # an evaluation of the weights as loaded
        record = {"step": 0, "eval_loss": run_eval(0)}
        records.append(record)
        metrics.log(record)
    if args.final_save and args.max_steps == 0:  # the weights as loaded, e.g. to merge them straight back
        save(0)
    progress.close()
    metrics.close()
    return records, {n: p for h in state.holders for n, p in h.named_parameters()}


def raise_with_resume_hint(error, healthy):
    """Re-raises a NonFiniteError naming what to resume from (nothing after the failed step is saved)."""
    if healthy is None:
        raise type(error)(f"{error}; no checkpoint of this run to go back to: start again with a lower --lr") from None
    raise type(error)(f"{error}; the last healthy checkpoint is {healthy}: resume from it with --resume_path "
                      f"{healthy} and a lower --lr") from None


def settle(guard, healthy):
    """The guard's pending weight check, now (UpdateGuard.settle)."""
    try:
        guard.settle()
    except NonFiniteError as e:
        raise_with_resume_hint(e, healthy)


def evaluate(state: RankState, batches, shape: StepShape, args, run_mesh, device, show=False):
    """eval_loss: the mean next-token cross-entropy over every target of the eval set (its response
    tokens, for instruction data), forward only with the modules in eval mode (no dropout, no balance
    loss). Each data rank computes its slice of each global batch micro-batch by micro-batch, as in
    training; the summed cross-entropies are added over the ranks whose loss parts add up (those of
    a step's loss) and divided by the set's target count, known on every rank. The modules' modes
    are restored afterwards."""
    modules = [m for holder in state.holders for m in holder.modules()]
    modes = [m.training for m in modules]
    for holder in state.holders:
        holder.eval()
    data_rank, data_ranks = run_mesh.data_rank(), run_mesh.data_ranks()
    total = torch.zeros((), dtype=torch.float64, device=device)
    try:
        for batch in tqdm(batches, desc="eval", unit="batch", leave=False, file=sys.stderr, disable=not show):
            local = GlobalBatches.local_slice(batch, data_rank, data_ranks).to(device)
            if state.pipeline is not None:
                total += pipeline_forward_only_loss_sum(state.pipeline, local)
            else:
                total += forward_only_loss_sum(state.model, local, shape, args)
    finally:
        for module, mode in zip(modules, modes):
            module.training = mode
    dist.all_reduce(total, group=loss_group(run_mesh))
    return float(total) / sum(batch.target_count() for batch in batches)


def apply_plan(args, config, plan, partitions, run_mesh, device, shape: StepShape) -> RankState:
    """This rank's model (or pipeline stages), split and wrapped as the plan says."""
    compute_dtype = torch.bfloat16 if compute_dtype_name(args) == "bf16" else torch.float32
    mp_policy = MixedPrecisionPolicy(param_dtype=compute_dtype if compute_dtype != torch.float32 else None,
                                     reduce_dtype=torch.float32)
    model = build_rank_model(args, config, partitions, run_mesh, device)
    lora_file = checkpoint.lora_file(args.lora_record(), model, config.n_routed_experts or 0) if args.lora_rank else None
    ep_mesh = run_mesh.mesh["ep"] if partitions["experts"] == "expert" else None
    if plan.mesh["pp"] == 1:
        model = parallelize(model, args, plan, 0, run_mesh, mp_policy, partitions)
        return RankState(model, None, [model], expert_parameters([model], partitions), ep_mesh, lora_file)
    pp_rank = run_mesh.coord("pp")
    pipeline = build_pipeline(
        model, stage_ranges(plan), pp_rank, plan.mesh["pp"], run_mesh.group("pp"), plan.schedule["name"],
        plan.schedule["micro_batches"], plan.schedule.get("virtual_stages", 1),
        loss_fn=pipeline_loss_fn(shape.tokens), device=device, total_microbatches=shape.microbatches,
        wrap_stage=lambda stage: parallelize(stage, args, plan, pp_rank, run_mesh, mp_policy, partitions),
        ce_chunk_tokens=args.ce_chunk_tokens, defer_grad_sync=args.defer_grad_sync)
    holders = pipeline.stage_modules  # the model itself is dropped: the stages hold what this rank needs
    return RankState(None, pipeline, holders, expert_parameters(holders, partitions), ep_mesh, lora_file)


def run(args: RunOptions):
    """Checks what can be checked before starting the processes' work, trains, and cleans up;
    returns the per-step records."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda but no GPU is visible; use --device cpu")
    init_distributed(args.device)
    try:
        records, _ = train(args)
    finally:
        release_save_dirs()
        dist.destroy_process_group()
    return records

