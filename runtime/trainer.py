"""`torchrun ... train.py [--run_mode run]`: execute a saved plan and train.

Flow: check the run against the plan (model fingerprint, world size, replicas) before any heavy
work -> build the device mesh -> build the training-form model (random from --seed, or the HF
weights of --model_id) -> apply the plan with PyTorch's engine (expert parallel, recompute,
pipeline stages, FSDP2 for the ZeRO level) -> the training loop.

The objective of a step, whatever the plan: J = sum over the global batch's micro-batches of
CE_sum(mb) / TOKENS + aux(mb) / MICROBATCHES, where TOKENS counts the predicted tokens of the whole
global batch. Each rank backpropagates its share and gradients are summed across data-parallel
ranks, so every plan computes the gradient of the same J as a single process does.

The speed options of RunArgs (attention kernel, torch.compile of the decoder layers, the
cross-entropy in chunks from the hidden states, fused AdamW, one gradient reduction per step) change
how a step computes J, not what: each follows the plain path to float rounding
(tests/test_speed_options.py); bench/train_step.py measures what each gains.
"""

import functools
import json
import math
import os
import sys
import time
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from compiler.plan import Plan, PlanError, default_plan_path, model_fingerprint, model_name_of
from runtime.data import GlobalBatches, load_rows
from runtime.loss import chunked_lm_loss_sum
from runtime.mesh import build_mesh


class RunError(ValueError):
    """A run that must not start; the message names the flag or file and the fix."""


@dataclass
class RunArgs:
    model_id: str
    dataset_path: Optional[str]
    plan_ngpus: Optional[int]
    runtime_ngpus: Optional[int]
    plan: Optional[str] = None
    max_steps: int = 10
    lr: float = 3e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    micro_batch_size: Optional[int] = None
    global_batch_size: Optional[int] = None
    seed: int = 0
    device: str = "cuda"
    save_dir: str = "checkpoints"
    dtype: Optional[str] = None         # compute dtype: bf16 (default on cuda) or fp32 (default on cpu)
    plans_dir: str = "plans"
    progress: bool = True
    save_every: int = 0                 # steps between sharded checkpoints (0: only the final one)
    final_save: bool = True             # save a checkpoint after the last step
    tokenizer_path: Optional[str] = None  # tokenizer files to ship with checkpoints (default: --model_id's)
    keep_last: Optional[int] = None     # committed checkpoints to keep
    resume_path: Optional[str] = None   # a checkpoint directory, or "last"
    # ---- speed options (bench/train_step.py measures each); the defaults keep the plain path ----
    attention: Optional[str] = None     # attention kernel (ATTENTION_BACKENDS; default: flash-attn if installed, else sdpa)
    compile: str = "none"               # torch.compile scope of the decoder layers (COMPILE_SCOPES); needs bf16
    compile_backend: str = "inductor"   # torch.compile backend ("aot_eager" for CPU tests)
    ce_chunk_tokens: int = 0            # >0: cross-entropy from the hidden states this many positions at a time
    fused_adamw: bool = False           # AdamW's fused kernel instead of its multi-tensor (foreach) one
    defer_grad_sync: bool = False       # ZeRO 0: reduce gradients once per step, not after every micro-batch


# ---- checks before any heavy work --------------------------------------------------------------------
def find_plan(args: RunArgs, config) -> (Plan, str):
    """--plan, or the plan in plans/ made for this model (by fingerprint) and --plan_ngpus."""
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


def check_run(args: RunArgs, plan: Plan, plan_path, world_size):
    runtime = args.runtime_ngpus or world_size
    if plan.mesh["tp"] > 1 and plan.mesh["ep"] > 1:
        raise RunError(f"{plan_path}: tensor and expert parallelism together (mesh.tp = {plan.mesh['tp']}, mesh.ep = "
                       f"{plan.mesh['ep']}) cannot be executed by this version of the runtime; compile a plan with one "
                       "of them")
    if plan.mesh["tp"] > 1 and plan.zero["level"] > 0:
        raise RunError(f"{plan_path}: tensor parallelism with ZeRO level {plan.zero['level']} cannot be executed by "
                       "this version of the runtime (its gradient norm disagrees with a single process); compile a "
                       "plan with ZeRO 0 or without tensor parallelism")
    plan.check_run(args.plan_ngpus, runtime, source=plan_path)
    if args.tokenizer_path and not os.path.isdir(args.tokenizer_path):
        raise RunError(f"--tokenizer_path {args.tokenizer_path}: no such directory; pass the directory the "
                       "tokenizer was saved to (tokenizer.json, tokenizer_config.json)")
    if world_size != runtime:
        raise RunError(f"{world_size} processes were started but --runtime_ngpus is {runtime}; start "
                       f"`torchrun --nproc_per_node {runtime}` or change --runtime_ngpus")
    adopt_plan_execution(args, plan)
    check_speed_options(args, plan, plan_path)
    for flag, value, planned in (("--micro_batch_size", args.micro_batch_size, plan.search_inputs["micro_batch_size"]),
                                 ("--global_batch_size", args.global_batch_size,
                                  plan.search_inputs["global_batch_size"])):
        if value is not None and value != planned:
            raise RunError(f"{flag} {value} differs from the {planned} the plan {plan_path} was compiled for; "
                           "recompile the plan with the new value")


def compute_dtype_name(args: RunArgs):
    return args.dtype or ("bf16" if args.device == "cuda" else "fp32")


# the speed options a plan records, with their RunArgs defaults
SPEED_DEFAULTS = {f.name: f.default for f in fields(RunArgs)
                  if f.name in ("compile", "ce_chunk_tokens", "fused_adamw", "defer_grad_sync")}


def adopt_plan_execution(args: RunArgs, plan: Plan):
    """The speed options the plan was costed with, for each one this run leaves at its default."""
    for name, default in SPEED_DEFAULTS.items():
        if name in plan.execution and getattr(args, name) == default:
            setattr(args, name, plan.execution[name])


def check_speed_options(args: RunArgs, plan: Plan, plan_path):
    """The speed options against the plan and the compute dtype, before any heavy work."""
    from modeling.modeling_deepseek_modifier import ATTENTION_BACKENDS, COMPILE_SCOPES, flash_attn_func
    if args.attention is not None and args.attention not in ATTENTION_BACKENDS:
        raise RunError(f"--attention {args.attention}: choose one of {', '.join(ATTENTION_BACKENDS)}")
    if args.attention == "flash" and flash_attn_func is None:
        raise RunError("--attention flash needs the flash-attn package, which is not installed; use "
                       "--attention sdpa_flash_padded (PyTorch's own flash kernel) or sdpa")
    if args.compile not in COMPILE_SCOPES:
        raise RunError(f"--compile {args.compile}: choose one of {', '.join(COMPILE_SCOPES)}")
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


# ---- model --------------------------------------------------------------------------------------------
def build_training_model(args: RunArgs, config, run_mesh, device):
    """The training-form model with this rank's share of the weights: built on the meta device, split
    by tensor and expert parallelism, then filled from the HF weights of --model_id when it has them,
    else from the seeded initialisation (a function of --seed and the parameter name: the same
    start for every plan)."""
    from modeling import build_model
    from modeling.modeling_deepseek_modifier import apply_training_form, has_hf_weights
    from runtime.weights import CheckpointReader, materialize
    model = apply_training_form(build_model(config, device="meta", dtype=torch.float32), attention=args.attention)
    if run_mesh.sizes["tp"] > 1:
        from runtime.tensor_parallel import apply_tensor_parallel
        apply_tensor_parallel(model, run_mesh.mesh["tp"])
    apply_expert_parallel(model, run_mesh)
    checkpoint = CheckpointReader(args.model_id, config) if has_hf_weights(args.model_id) else None
    return materialize(model, config, device, args.seed, checkpoint)


def _moe_blocks(module):
    from modeling.modeling_deepseek_modifier import MoEBlock
    return [m for m in module.modules() if isinstance(m, MoEBlock)]


def apply_expert_parallel(model, run_mesh):
    if run_mesh.sizes["ep"] == 1:
        return
    from runtime.expert_parallel import ExpertParallelExperts
    group = run_mesh.group("ep")
    for block in _moe_blocks(model):
        block.experts = ExpertParallelExperts.from_merged(block.experts, group)


def apply_recompute(layers, recompute):
    if recompute == "full":
        from torch.distributed._composable import checkpoint
        for layer in layers:
            checkpoint(layer)


def apply_data_parallel(modules_with_layers, plan, run_mesh, mp_policy):
    """FSDP2 for the plan's ZeRO level: experts over replica x dp (ep splits them), everything else over
    replica x dp x ep. Level 0 replicates; 2 and 3 shard, 3 also regathering for the backward. Gradients
    are summed, not averaged (see the module doc)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard
    level = plan.zero["level"]
    over_replicas = plan.zero["shard_over_replicas"] or run_mesh.replicas == 1
    if run_mesh.data_ranks() == 1 and mp_policy.param_dtype is None:
        return  # one data rank and fp32 compute: nothing to reduce, nothing to cast

    def wrap(module, mesh, ignored=None):
        if level == 0:
            from torch.distributed._composable.replicate_with_fsdp import replicate
            replicate(module, mesh=mesh, mp_policy=mp_policy, ignored_params=ignored)
        elif over_replicas:
            fully_shard(module, mesh=mesh, reshard_after_forward=(level == 3), mp_policy=mp_policy,
                        ignored_params=ignored)
        else:
            raise RunError("ZeRO sharded within a replica (HSDP) is not supported by this version of the runtime; "
                           "compile with shard_over_replicas")

    expert_parallel = run_mesh.sizes["ep"] > 1
    expert_mesh = run_mesh.expert_data_mesh() if expert_parallel else None
    for root, layers in modules_with_layers:
        # Each rank's experts are its own under expert parallelism: they are data parallel only over
        # replica x dp, and must never join the dense parameters' reduction over ep.
        own_experts = set()
        for layer in layers:
            experts = getattr(getattr(layer, "mlp", None), "experts", None)
            if experts is None or not expert_parallel:
                continue
            if expert_mesh.size() > 1 or mp_policy.param_dtype is not None:
                wrap(experts, expert_mesh)  # (also on a mesh of one rank: FSDP casts them for compute)
            else:
                own_experts |= set(experts.parameters())
        for layer in layers:
            wrap(layer, run_mesh.data_mesh(), own_experts or None)
        wrap(root, run_mesh.data_mesh(), own_experts or None)
        for module in root.modules():
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(1.0)
                # plain SUM collectives (gloo has no pre-multiplied sum; NCCL copies less with SUM)
                module.set_force_sum_reduction_for_comms(True)


# ---- gradient norm and clipping -------------------------------------------------------------------------
def grad_norm_and_clip(params, max_norm, run_mesh, expert_params):
    """Global L2 norm of all gradients, each element counted once, then clipped in place.

    Sharded (DTensor Shard) gradients sum their squares over the shard's mesh; expert-parallel
    gradients over the ep group; pipeline stages over the pp group."""
    from torch.distributed.tensor import DTensor, Shard
    device = next(iter(params)).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    by_group = {}
    local_grads = []
    for p in params:
        if p.grad is None:
            continue
        g = p.grad
        groups = []
        if isinstance(g, DTensor):
            groups = [g.device_mesh.get_group(i) for i, pl in enumerate(g.placements) if isinstance(pl, Shard)]
            g = g.to_local()
        if id(p) in expert_params:
            groups.append(run_mesh.group("ep"))
        g = g.detach()
        local_grads.append(g)
        by_group.setdefault(tuple(groups), [groups, []])[1].append(g)
    for groups, grads in by_group.values():
        # one multi-tensor pass per group (per-tensor norms in the gradients' dtype; their squares
        # summed in float64), not one float64 copy of every gradient
        sq = torch.stack([n.double() for n in torch._foreach_norm(grads)]).pow(2).sum()
        for group in groups:
            dist.all_reduce(sq, group=group)
        total += sq
    if run_mesh.sizes["pp"] > 1:
        dist.all_reduce(total, group=run_mesh.group("pp"))
    norm = total.sqrt()
    scale = min(1.0, max_norm / (norm.item() + 1e-6))
    if scale < 1.0 and local_grads:
        torch._foreach_mul_(local_grads, scale)
    return norm.item()


# ---- the loop ---------------------------------------------------------------------------------------------
def lm_loss_sum(logits, input_ids):
    V = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), input_ids[:, 1:].reshape(-1), reduction="sum")


def defer_grad_sync(model, last_microbatch):
    """Gradient accumulation without a reduction per micro-batch (plans with ZeRO 0): FSDP keeps each
    rank's gradients unreduced, accumulated in float32, and the bf16 compute copies of the weights
    gathered, until the last micro-batch of the step, whose backward reduces once. A no-op for a
    model FSDP does not wrap (one data rank computing in fp32)."""
    from torch.distributed.fsdp import FSDPModule
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(last_microbatch)
        model.set_reshard_after_backward(last_microbatch)


class MetricsLog:
    """metrics.jsonl (one JSON object per step) and TensorBoard scalars, written by rank 0 only."""

    def __init__(self, save_dir, enabled):
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        os.makedirs(save_dir, exist_ok=True)
        self.path = os.path.join(save_dir, "metrics.jsonl")
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(os.path.join(save_dir, "tensorboard"))
        except Exception:  # noqa: BLE001 - TensorBoard is optional
            self.writer = None

    def log(self, record):
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key in ("loss", "grad_norm", "lr", "tokens_per_s", "mfu"):
                if key in record:
                    self.writer.add_scalar(f"train/{key}", record[key], record["step"])
            self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()


class NonFiniteError(RuntimeError):
    pass


def train(args: RunArgs):
    """Runs the training; returns the list of per-step records (on every rank)."""
    from modeling import load_config
    from modeling.modeling_deepseek_modifier import compile_layers

    world = dist.get_world_size()
    rank = dist.get_rank()
    config = load_config(args.model_id)
    plan, plan_path = find_plan(args, config)
    check_run(args, plan, plan_path, world)
    seq_len = plan.search_inputs["seq_len"]
    rows = load_rows(args.dataset_path, seq_len)
    global_batch = plan.search_inputs["global_batch_size"]
    micro = plan.search_inputs["micro_batch_size"]
    data = GlobalBatches(rows, global_batch, args.seed)

    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if args.device == "cuda" else torch.device("cpu")
    dtype_name = compute_dtype_name(args)
    compute_dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    run_mesh = build_mesh(plan, device.type)
    from torch.distributed.fsdp import MixedPrecisionPolicy
    mp_policy = MixedPrecisionPolicy(param_dtype=compute_dtype if compute_dtype != torch.float32 else None,
                                     reduce_dtype=torch.float32)

    model = build_training_model(args, config, run_mesh, device)

    tokens_per_step = global_batch * (seq_len - 1)
    microbatches_total = global_batch // micro
    pp = plan.mesh["pp"]
    pipeline = None
    if pp > 1:
        from runtime.pipeline import build_pipeline
        stage_ranges = _stage_ranges(plan)
        pp_rank = run_mesh.coord("pp")

        def wrap_stage(stage_module):
            layers = list(stage_module.model.layers.values())
            norms = [stage_module.model.norm] if stage_module.model.norm is not None else []
            compile_layers(layers, args.compile, args.compile_backend, norms)
            apply_recompute(layers, plan.stages[pp_rank].recompute)
            apply_data_parallel([(stage_module, layers)], plan, run_mesh, mp_policy)
            return stage_module

        pipeline = build_pipeline(
            model, stage_ranges, pp_rank, pp, run_mesh.group("pp"), plan.schedule["name"],
            plan.schedule["micro_batches"], plan.schedule.get("virtual_stages", 1),
            loss_fn=lambda logits, labels: lm_loss_sum(logits, labels) / tokens_per_step,
            device=device, wrap_stage=wrap_stage, total_microbatches=microbatches_total)
        model = None  # the stages hold what this rank needs; let the rest go
    else:
        layers = list(model.model.layers)
        compile_layers(layers, args.compile, args.compile_backend, [model.model.norm])
        apply_recompute(layers, plan.stages[0].recompute)
        apply_data_parallel([(model, layers)], plan, run_mesh, mp_policy)
        if args.ce_chunk_tokens:
            # the loss is computed inside this method: FSDP must gather the parameters for it as for forward
            from torch.distributed.fsdp import register_fsdp_forward_method
            register_fsdp_forward_method(model, "forward_with_head")

    # the modules this rank trains (parameters looked up after FSDP has replaced their objects)
    holders = pipeline.stage_modules if pipeline is not None else [model]
    params = [p for h in holders for p in h.parameters()]
    # experts split by ep hold different values on each ep rank
    expert_params = {id(p) for h in holders for b in _moe_blocks(h) for p in b.experts.parameters()} \
        if run_mesh.sizes["ep"] > 1 else set()
    ep_mesh = run_mesh.mesh["ep"] if run_mesh.sizes["ep"] > 1 else None  # how checkpoints see experts
    optimizer = _adamw(params, args)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / max(1, args.warmup_steps)))
    metrics = MetricsLog(args.save_dir, enabled=(rank == 0))
    peak = _peak_flops(plan)
    # The plan's FLOPs are those of one replica's share of the global batch at the replica count it
    # was compiled for; the global batch (and so the step's FLOPs) is the same at any replica count.
    planned_replicas = plan.search_inputs.get("runtime_ngpus", plan.plan_ngpus) // plan.plan_ngpus
    flops_per_step = plan.predicted.get("model_flops_per_step", 0.0) * planned_replicas
    records = []
    progress = None
    if rank == 0 and args.progress:
        from tqdm import tqdm
        progress = tqdm(total=args.max_steps, desc="train", unit="step", file=sys.stderr)
    data_rank, data_ranks = run_mesh.data_rank(), run_mesh.data_ranks()
    start_step = 0
    if args.resume_path:
        from runtime import checkpoint
        path = checkpoint.resolve(args.resume_path, args.save_dir)
        start_step = checkpoint.load(path, holders, optimizer, scheduler, ep_mesh)
        if progress is not None:
            progress.update(start_step)

    def save_checkpoint(step):
        from runtime import checkpoint
        checkpoint.save(args.save_dir, step, holders, optimizer, scheduler, args.keep_last,
                        hf_files=hf_files_of_run(args) if rank == 0 else None, ep_mesh=ep_mesh)

    for step in range(start_step, args.max_steps):
        started = time.perf_counter()
        if device.type == "cuda":  # the device's own clock too, for benchmarks
            step_events = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
            step_events[0].record()
        batch = data.batch(step)
        local = GlobalBatches.local_slice(batch, data_rank, data_ranks).to(device)
        ce_local = torch.zeros((), dtype=torch.float64, device=device)
        aux_local = torch.zeros((), dtype=torch.float64, device=device)
        if pipeline is not None:
            from runtime.pipeline import pipeline_aux_loss
            ce = pipeline.step(local, local)
            ce_local += 0.0 if ce is None else float(ce)
            aux_local += float(pipeline_aux_loss(pipeline.stage_modules))
        else:
            micro_batches = local.split(micro)
            for i, mb in enumerate(micro_batches):
                if args.defer_grad_sync:
                    defer_grad_sync(model, last_microbatch=(i == len(micro_batches) - 1))
                if args.ce_chunk_tokens:
                    ce_sum, aux_loss = model.forward_with_head(
                        mb, functools.partial(chunked_lm_loss_sum, input_ids_BS=mb, chunk_tokens=args.ce_chunk_tokens))
                else:
                    out = model(input_ids=mb)
                    ce_sum, aux_loss = lm_loss_sum(out.logits, mb), out.aux_loss
                    del out  # its float32 logits: autograd keeps only what the backward needs
                ce = ce_sum / tokens_per_step
                loss = ce
                if aux_loss is not None:
                    aux = aux_loss / microbatches_total
                    loss = loss + aux
                    aux_local += aux.detach().double()
                loss.backward()
                ce_local += ce.detach().double()
        # the step's loss: summed over data ranks (and pipeline stages: CE lives on the last, aux on all);
        # (tensor-parallel ranks hold copies of the same loss: they are not summed)
        totals = torch.stack([ce_local, aux_local])
        dist.all_reduce(totals, group=_loss_group(run_mesh))
        loss_value = float(totals.sum())
        grad_norm = grad_norm_and_clip(params, 1.0, run_mesh, expert_params)
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            raise NonFiniteError(f"step {step + 1}: loss {loss_value} / gradient norm {grad_norm} is not finite; "
                                 "stopped before the optimizer step (lower --lr or check the data)")
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if device.type == "cuda":
            step_events[1].record()
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - started
        tokens = global_batch * seq_len
        record = {"step": step + 1, "loss": loss_value, "lm_loss": float(totals[0]), "aux_loss": float(totals[1]),
                  "grad_norm": grad_norm, "lr": lr, "tokens": tokens, "step_time_s": elapsed,
                  "peak_memory_gib": _peak_memory_gib(device),
                  "tokens_per_s": tokens / elapsed,
                  "mfu": flops_per_step / (elapsed * world * peak) if peak and flops_per_step else 0.0}
        if device.type == "cuda":
            record["step_time_cuda_s"] = step_events[0].elapsed_time(step_events[1]) / 1e3
        records.append(record)
        metrics.log(record)
        periodic = args.save_every and (step + 1) % args.save_every == 0
        if periodic or (args.final_save and step + 1 == args.max_steps):
            save_checkpoint(step + 1)
        if progress is not None:
            progress.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                 mfu=f"{100 * record['mfu']:.1f}%")
            progress.update(1)
    if args.final_save and args.max_steps == 0:  # the weights as loaded, e.g. to merge them straight back
        save_checkpoint(0)
    if progress is not None:
        progress.close()
    metrics.close()
    return records, {n: p for h in holders for n, p in h.named_parameters()}


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json")


def hf_files_of_run(args: RunArgs):
    """What a checkpoint's hf/ folder gets, for merge_ckpt.py: --model_id's config.json (as published),
    its generation_config.json if any, and the tokenizer files of --tokenizer_path (default
    --model_id) that exist."""
    files = {"config.json": os.path.join(args.model_id, "config.json")}
    generation = os.path.join(args.model_id, "generation_config.json")
    if os.path.isfile(generation):
        files["generation_config.json"] = generation
    tokenizer_dir = args.tokenizer_path or args.model_id
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(tokenizer_dir, name)):
            files[name] = os.path.join(tokenizer_dir, name)
    return files


def _peak_memory_gib(device):
    """This process's peak memory so far: allocated device memory on a GPU; on a CPU the resident
    set (which also counts the interpreter and libraries)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def _stage_ranges(plan):
    """Layer ranges of every (virtual) stage, in stage order: the plan's chunks for an interleaved
    schedule (virtual stage k is chunk k // pp of stage k % pp), else each stage's layers."""
    pp = plan.mesh["pp"]
    if plan.schedule["name"] == "Interleaved1F1B":
        v = plan.schedule["virtual_stages"]
        return [tuple(plan.stages[k % pp].chunks[k // pp]) for k in range(pp * v)]
    return [tuple(s.layers) for s in plan.stages]


def _loss_group(run_mesh):
    if run_mesh.sizes["pp"] == 1:
        return run_mesh.data_mesh().get_group()
    return None  # every rank: data ranks x stages


def _adamw(params, args):
    """AdamW (betas 0.9 / 0.95) in fp32 on the master weights; one parameter group per device mesh so
    that the fused multi-tensor path never mixes DTensors of different meshes."""
    from torch.distributed.tensor import DTensor
    groups = {}
    for p in params:
        key = id(p.device_mesh) if isinstance(p, DTensor) else None
        groups.setdefault(key, []).append(p)
    # fused: one kernel per parameter chunk instead of the multi-tensor path's several passes over the
    # fp32 state (the optimizer step reads and writes 16 bytes of state per parameter)
    return torch.optim.AdamW([{"params": g} for g in groups.values()], lr=args.lr, betas=(0.9, 0.95),
                             weight_decay=args.weight_decay, eps=1e-8, fused=True if args.fused_adamw else None)


def _peak_flops(plan):
    try:
        from compiler.profiles import load_profile
        return load_profile(plan.search_inputs["device_profile"]).peak_bf16_tflops * 1e12
    except Exception:  # noqa: BLE001 - MFU is informational
        return 0.0


# ---- entry point -------------------------------------------------------------------------------------------
def init_distributed(device):
    if dist.is_initialized():
        return
    backend = "nccl" if device == "cuda" else "gloo"
    if "WORLD_SIZE" not in os.environ:  # a plain `python train.py`: a world of one
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend)


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: RunArgs):
    """Checks what can be checked before starting processes' work, trains, and cleans up."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda but no GPU is visible; use --device cpu")
    init_distributed(args.device)
    try:
        records, _ = train(args)
    finally:
        dist.destroy_process_group()
    return records
