"""One optimizer step: forward and backward of this rank's share of the global batch, the loss summed
over the ranks, the gradient norm and clipping, the check for non-finite values, AdamW.

The objective of a step, whatever the plan: J = sum over the global batch's micro-batches of
CE_sum(mb) / TOKENS + aux(mb) / MICROBATCHES, where CE_sum sums the cross-entropy of the next-token
targets (the labels; -100 marks a position that is no target: a prompt, padding) and TOKENS counts
the targets of the whole global batch, so the cross-entropy part is the mean over every target of
the batch however its rows spread over micro-batches and ranks. Each rank backpropagates its share
and gradients are summed across data-parallel ranks, so every plan computes the gradient of the
same J as a single process does.
"""

import functools
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Shard

from modeling import spec
from runtime.loss import chunked_lm_loss_sum, lm_loss_sum
from runtime.pipeline import pipeline_aux_loss


class NonFiniteError(RuntimeError):
    """The loss or gradient norm is not finite: the run stops before the optimizer step."""


class DivergedError(NonFiniteError):
    """An optimizer step made the weights non-finite or changed them absurdly (MAX_WEIGHT_NORM_CHANGE):
    the run stops, and that step is never saved."""


# "Absurd" update: a step that changes the global L2 norm of the weights by more than this fraction of
# the norm before it (|  ||w_after|| - ||w_before||  | / ||w_before|| > 1: the norm more than doubled, or
# fell to nothing). By the triangle inequality this is a lower bound of ||update|| / ||w_before||; it
# costs one norm pass over the weights per step, all-reduced like the gradient norm so that every rank
# takes the same decision. On the tiny model (tests/test_faults_checkpoints.py) AdamW steps move it by
# about 2e-3 at --lr 3e-3 and 0.15 at --lr 3e-2 without warmup; --lr 0.1 without warmup doubles it in
# the first step (1.1), --lr 1e6 multiplies it by 2e7.
MAX_WEIGHT_NORM_CHANGE = 1.0


class UpdateGuard:
    """Measures each optimizer step's change of the global weight norm (see MAX_WEIGHT_NORM_CHANGE).

    The norm after a step is computed on the device right after it (after_step) and read with the next
    step's loss and gradient norm, in the same wait for the device (finish_step), so the check costs
    no wait of its own; settle() reads it at once, which the trainer does before anything is saved and
    when the run ends. A diverged step is therefore never saved, and at most the next step's forward
    and backward run before the run stops."""

    def __init__(self, params, run_mesh, expert_params):
        self.params, self.run_mesh, self.expert_params = list(params), run_mesh, expert_params
        self.norm = None  # the weights' norm after the last checked step (= before the next)
        self.pending = None  # (0-based step, the weights' norm after it, a device tensor): not checked yet

    def _weight_norm(self):
        with torch.no_grad():
            return global_norm(self.params, self.params, self.run_mesh, self.expert_params)[0]

    def before_step(self):
        if self.norm is None:  # the first step: the weights as loaded
            self.norm = self._weight_norm().item()

    def after_step(self, step):
        """Starts the check of step `step` (0-based): the weights' norm after it, on the device."""
        self.pending = (step, self._weight_norm())

    def pending_norm(self):
        """The unchecked norm tensor (for the caller to read with its own values), or None."""
        return None if self.pending is None else self.pending[1]

    def settle(self, after=None):
        """Checks the pending step, reading its norm unless `after` (that norm, read by the caller) is
        given; raises DivergedError if that step made the weights non-finite or absurd."""
        if self.pending is None:
            return
        (step, tensor), self.pending = self.pending, None
        before, after = self.norm, (tensor.item() if after is None else after)
        self.norm = after
        change = abs(after - before) / before if before > 0 else (0.0 if after == 0 else math.inf)
        if not (math.isfinite(after) and change <= MAX_WEIGHT_NORM_CHANGE):
            raise DivergedError(f"step {step + 1}: the weights' norm went from {before:.4g} to {after:.4g} (a change "
                                f"of {change:.3g} of it, above MAX_WEIGHT_NORM_CHANGE = {MAX_WEIGHT_NORM_CHANGE} in "
                                "runtime/step.py): the run diverged; this step was not saved")


@dataclass
class StepShape:
    tokens: int          # TOKENS: next-token targets of the global batch
    microbatches: int    # MICROBATCHES: micro-batches of the global batch, every data rank together
    micro_batch_size: int


def forward_backward_step(model, local_batch, shape: StepShape, args):
    """Forward and backward of a model without pipeline stages over this rank's micro-batches (a
    data.Batch); returns this rank's (cross-entropy part, balance-loss part) of J as float64 scalars."""
    device = local_batch.input_ids.device
    ce_total = torch.zeros((), dtype=torch.float64, device=device)
    aux_total = torch.zeros((), dtype=torch.float64, device=device)
    micro_batches = local_batch.split(shape.micro_batch_size)
    for i, mb in enumerate(micro_batches):
        begin_graph_replays(args)
        if args.defer_grad_sync:
            defer_grad_sync(model, last_microbatch=(i == len(micro_batches) - 1))
        ce_sum, aux = micro_batch_loss(model, mb, args.ce_chunk_tokens)
        ce = ce_sum / shape.tokens
        loss = ce
        if aux is not None:
            aux = aux / shape.microbatches
            loss = loss + aux
            aux_total += aux.detach().double()
        loss.backward()
        ce_total += ce.detach().double()
    return ce_total, aux_total


def begin_graph_replays(args):
    """Under --compile layer_cudagraphs, tells the CUDA graphs of the layers that a new micro-batch
    starts: the previous one's forward and backward are done, so the graphs' output memory may be
    overwritten by the next replays (torch.compiler.cudagraph_mark_step_begin)."""
    if args.compile == "layer_cudagraphs":
        torch.compiler.cudagraph_mark_step_begin()


def micro_batch_loss(model, batch, ce_chunk_tokens):
    """(summed next-token cross-entropy over the batch's targets, balance loss or None) of one
    micro-batch (a data.Batch): over full logits, or from the final hidden states `ce_chunk_tokens`
    positions at a time. Its position ids, when it has them, reach the model (rotary positions, and
    attention within each packed document); without them the call is the plain one."""
    targets = batch.targets()
    if ce_chunk_tokens:
        # instruction rows (labels given) have prompts the head need not see; pretraining rows have
        # a target at every position but the last, and skip the wait for the device that finding them costs
        loss = functools.partial(chunked_lm_loss_sum, labels_BS=targets, chunk_tokens=ce_chunk_tokens,
                                 targets_only=batch.labels is not None)
        return getattr(model, spec.FORWARD_WITH_HEAD)(batch.input_ids, loss, position_ids=batch.position_ids)
    out = model(input_ids=batch.input_ids, position_ids=batch.position_ids)
    # the float32 logits go with `out`: autograd keeps only what the backward needs
    return lm_loss_sum(out.logits, targets), out.aux_loss


def pipeline_step(pipeline, local_batch, shape: StepShape):
    """Forward and backward of this rank's pipeline stages; the same two parts of J as above (the
    cross-entropy part lives on the last stage, the balance-loss part on every stage with MoE)."""
    ce = pipeline.step(local_batch.input_ids, local_batch.targets(), position_ids=local_batch.position_ids,
                       tokens=shape.tokens)
    device = local_batch.input_ids.device
    ce_part = torch.zeros((), dtype=torch.float64, device=device) + (0.0 if ce is None else float(ce))
    aux_part = torch.zeros((), dtype=torch.float64, device=device) + float(pipeline_aux_loss(pipeline.stage_modules))
    return ce_part, aux_part


def forward_only_loss_sum(model, local_batch, shape: StepShape, args):
    """This rank's summed next-token cross-entropy of its share of an eval batch: the forward only
    (no graph is kept), micro-batch by micro-batch as in training; float64 scalar. The caller puts the
    model in eval mode (no dropout, no balance loss)."""
    total = torch.zeros((), dtype=torch.float64, device=local_batch.input_ids.device)
    with torch.no_grad():
        for mb in local_batch.split(shape.micro_batch_size):
            begin_graph_replays(args)
            ce_sum, _ = micro_batch_loss(model, mb, args.ce_chunk_tokens)
            total += ce_sum.double()
    return total


def pipeline_forward_only_loss_sum(pipeline, local_batch):
    """The same for pipeline stages (the schedule's forward-only pass): the sum on the rank holding
    the last stage, zero elsewhere; float64 scalar."""
    with torch.no_grad():
        ce = pipeline.eval_loss_sum(local_batch.input_ids, local_batch.targets(), position_ids=local_batch.position_ids)
    return torch.zeros((), dtype=torch.float64, device=local_batch.input_ids.device) + (0.0 if ce is None else float(ce))


def defer_grad_sync(model, last_microbatch):
    """Gradient accumulation without a reduction per micro-batch (plans with ZeRO 0): FSDP keeps each
    rank's gradients unreduced, accumulated in float32, and the bf16 compute copies of the weights
    gathered, until the last micro-batch of the step, whose backward reduces once. A no-op for a
    model FSDP does not wrap (one data rank computing in fp32)."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(last_microbatch)
        model.set_reshard_after_backward(last_microbatch)


def clip_gradients(local_grads, norm, max_norm, optimizer=None):
    """Scales the gradients so that their global L2 norm `norm` (a float) is at most max_norm.

    With a fused AdamW `optimizer` the scaling is left to its kernel, which divides each gradient by
    the optimizer's `grad_scale` as it reads it (the hook torch.amp.GradScaler uses): the same update
    without a pass of its own over every gradient (2.5 ms per LoRA step of the full Coder-V2-Lite on
    an H200). The caller clears it after the step (end_clipping). Otherwise the gradients are scaled
    in place."""
    scale = min(1.0, max_norm / (norm + 1e-6))
    if scale == 1.0 or not local_grads:
        return
    if optimizer is not None and _is_fused(optimizer):
        optimizer.grad_scale = torch.full((), 1.0 / scale, dtype=torch.float32, device=local_grads[0].device)
        return
    torch._foreach_mul_(local_grads, scale)


def end_clipping(optimizer):
    """Forgets the clipping a fused optimizer was given for its last step (clip_gradients)."""
    if getattr(optimizer, "grad_scale", None) is not None:
        optimizer.grad_scale = None


def _is_fused(optimizer):
    return all(group.get("fused") for group in optimizer.param_groups)


def global_norm(params, tensors, run_mesh, expert_params):
    """(global L2 norm as a float64 tensor, the local tensors) of `tensors`, one per parameter of
    `params` laid out as it is (its gradient, or the parameter itself; None is skipped), each element
    counted once: sharded (DTensor Shard) tensors sum their squares over the shard's mesh,
    expert-parallel ones over the ep group, pipeline stages over the pp group. Every rank gets the
    same value."""
    device = next(iter(params)).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    by_group = {}
    local_grads = []
    for p, g in zip(params, tensors):
        if g is None:
            continue
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
        # summed in float64), not one float64 copy of every gradient; the norms are stacked per dtype
        # before the cast (a few kernels, not one per tensor: a LoRA model has hundreds of tensors)
        by_dtype = {}
        for n in torch._foreach_norm(grads):
            by_dtype.setdefault(n.dtype, []).append(n)
        sq = torch.cat([torch.stack(norms).double() for norms in by_dtype.values()]).pow(2).sum()
        for group in groups:
            dist.all_reduce(sq, group=group)
        total += sq
    if run_mesh.sizes["pp"] > 1:
        dist.all_reduce(total, group=run_mesh.group("pp"))
    return total.sqrt(), local_grads


LR_SCHEDULERS = ("constant", "cosine", "linear")


def lr_factor(args):
    """The learning rate of step s (0-based) as a multiple of --lr, f(s): linear warmup
    (s + 1) / W over the first W = max(1, --warmup_steps) steps, reaching --lr at step W - 1; then
    constant, or a cosine or linear decay that reaches --min_lr at the last step, --max_steps - 1
    (progress (s - W + 1) / (max_steps - W), held at 1 beyond it). A plain function of the step (no
    state of its own), so a resumed run, whose schedule restores its step, continues it from there
    under the run's flags. Refuses a --min_lr above --lr for a decaying schedule."""
    from options import OptionError
    kind, warmup, max_steps = args.lr_scheduler, max(1, args.warmup_steps), args.max_steps
    if kind not in LR_SCHEDULERS:
        raise OptionError(f"--lr_scheduler {kind}: choose one of {', '.join(LR_SCHEDULERS)}")
    if kind != "constant" and args.min_lr > args.lr:
        raise OptionError(f"--min_lr {args.min_lr} is above --lr {args.lr}: a {kind} schedule decays from --lr down "
                          "to --min_lr; give a --min_lr of at most --lr")
    floor = args.min_lr / args.lr if args.lr > 0 else 0.0
    decay_steps = max_steps - warmup

    def factor(step):
        if step < warmup - 1 or kind == "constant" or decay_steps <= 0:
            return min(1.0, (step + 1) / warmup)
        progress = min(1.0, (step - warmup + 1) / decay_steps)
        remaining = 0.5 * (1.0 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress
        return floor + (1.0 - floor) * remaining

    return factor


def build_optimizer(params, args):
    """AdamW (betas 0.9 / 0.95) in fp32 on the master weights, one parameter group per device mesh so
    that the fused multi-tensor path never mixes DTensors of different meshes, and the learning-rate
    schedule (lr_factor: warmup, then constant, cosine or linear)."""
    groups = {}
    for p in params:
        key = id(p.device_mesh) if isinstance(p, DTensor) else None
        groups.setdefault(key, []).append(p)
    # fused: one kernel per parameter chunk instead of the multi-tensor path's several passes over the
    # fp32 state (the optimizer step reads and writes 16 bytes of state per parameter)
    optimizer = torch.optim.AdamW([{"params": g} for g in groups.values()], lr=args.lr, betas=(0.9, 0.95),
                                  weight_decay=args.weight_decay, eps=1e-8, fused=True if args.fused_adamw else None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(args))
    return optimizer, scheduler


def loss_group(run_mesh):
    """The ranks whose loss parts add up to J: the data ranks (tensor-parallel ranks hold copies of
    the same loss), or every rank when pipeline stages hold different parts."""
    if run_mesh.sizes["pp"] == 1:
        return run_mesh.data_mesh().get_group()
    return None


def finish_step(step, parts, params, expert_params, run_mesh, optimizer, scheduler, guard=None):
    """J summed over the ranks, gradients clipped at norm 1.0, the optimizer and schedule stepped.
    Returns (loss, cross-entropy part, balance-loss part, gradient norm, learning rate used). With an
    UpdateGuard, a step that made the weights non-finite or absurd raises DivergedError when the next
    step reads its values (here) or when the trainer settles the guard before a save: never saved."""
    totals = torch.stack(list(parts))
    dist.all_reduce(totals, group=loss_group(run_mesh))
    norm, local_grads = global_norm(params, [p.grad for p in params], run_mesh, expert_params)
    # the step's one wait for the device: the loss parts, the gradient norm and the previous step's
    # weight norm (the guard's pending check) read together
    pending = None if guard is None else guard.pending_norm()
    values = torch.cat([totals, norm.reshape(1)] + ([] if pending is None else [pending.reshape(1)])).tolist()
    ce, aux, grad_norm = values[:3]
    if pending is not None:
        guard.settle(values[3])  # the previous step diverged: stop before this one changes anything
    loss = ce + aux
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise NonFiniteError(f"step {step + 1}: loss {loss} / gradient norm {grad_norm} is not finite; "
                             "stopped before the optimizer step (lower --lr or check the data)")
    lr = scheduler.get_last_lr()[0]
    if guard is not None:
        guard.before_step()
    clip_gradients(local_grads, grad_norm, 1.0, optimizer)
    optimizer.step()
    end_clipping(optimizer)
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    if guard is not None:
        guard.after_step(step)
    return loss, ce, aux, grad_norm, lr

