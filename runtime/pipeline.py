"""Pipeline parallelism: cutting the training-form model into stages and running them with PyTorch's
own schedules (`torch.distributed.pipelining`: PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B).

The loss convention every runtime piece follows: for a global batch of G sequences of length S cut
into micro-batches, the objective is

    J = sum over micro-batches mb of [ CE_sum(mb) / TOKENS + aux(mb) / MICROBATCHES ]

with TOKENS the next-token targets of the whole global batch (G * (S - 1) for pretraining rows; the
labels that are not -100 for instruction data, so it changes from step to step) and MICROBATCHES
the number of micro-batches of the whole global batch (all data-parallel replicas together). A
pipeline splits J in two parts computed in different places:

* the cross-entropy part on the last stage: `loss_fn` (runtime.loss.PipelineLoss, told each step's
  TOKENS) returns CE_sum(mb) / TOKENS for one micro-batch, the schedule's target being the labels,
  and the schedule backpropagates it unchanged (`scale_grads=False`: the scale is already in the
  loss, the schedule must not divide by the micro-batch count again);
* the balance-loss part inside each MoE block, on whichever stage holds it: the block injects
  the gradient of its balance loss times 1 / MICROBATCHES in its own backward
  (`spec.StageModule`), so no loss has to travel between stages. The stages keep its
  values for logging (`pipeline_aux_loss`).

Position ids (packed documents) are not passed from stage to stage: every rank gives the schedule
the batch's position ids as a keyword input, which the schedule cuts into micro-batches and hands
to each of its stages (`spec.StageModule.forward(x, position_ids=...)`).

The chunked loss (--ce_chunk_tokens N) on the last stage: that stage's forward ends in the loss
itself (`StageModule.head_loss`: final norm, then the cross-entropy from the hidden states N
positions at a time with the stage's own lm_head, runtime.loss.chunked_lm_loss_sum), so the full
logits never exist and FSDP sees the head used inside the forward it hooks. The labels reach it
as a keyword input, like the position ids; it returns the micro-batch's CE_sum, which loss_fn
divides by TOKENS.

Gradient reduction across data-parallel ranks (FSDP-wrapped stages). torch's PipelineStage always
runs the micro-batches' backwards without reduction (requires_gradient_sync off, the gathered
weights kept) and reduces once after the last one (`perform_reduce_grad`): the deferred sync,
which under ZeRO 2 / 3 holds unsharded float32 gradients of the whole stage. `ReducingStage`
makes the plan's choice real: with --defer_grad_sync (ZeRO 0 plans) torch's way, one reduction per
step; without it each micro-batch's backward reduces (all-reduce under ZeRO 0, reduce-scatter into
the sharded gradients under ZeRO 2 / 3) and frees its gathered weights, as FSDP does without
pipelining and as compiler/cost_model.py prices it.

Splitting moves modules out of the model (the stages share the model's parameter objects, nothing
is copied): the model should not be used after it has been split, and dropping the caller's
reference to it leaves each rank holding only the parameters of its own stages.
"""

import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B
# the backward PipelineStage itself runs for a whole ("full") micro-batch backward
from torch.distributed.pipelining._backward import stage_backward

from modeling import spec
from runtime.loss import stage_chunked_loss

SCHEDULES = {"1F1B": Schedule1F1B, "Interleaved1F1B": ScheduleInterleaved1F1B}


# ----------------------------------------------------------------------------------------------
# Stage modules
# ----------------------------------------------------------------------------------------------
def split_into_stage(model, layer_range, has_embed, has_head, total_microbatches=1, ce_chunk_tokens=0):
    """This stage's part of a training-form causal LM (see modeling.spec.StageModule).

    layer_range: (first, end) decoder layer indices, end excluded. total_microbatches: MICROBATCHES
    of the loss convention (all micro-batches of the global batch, every data-parallel replica
    included); each MoE block's balance-loss gradient is scaled by its inverse. ce_chunk_tokens: N > 0
    makes the last stage return its micro-batch's summed cross-entropy, computed N positions at a
    time from the hidden states (0: the float32 logits)."""
    if total_microbatches < 1:
        raise ValueError(f"total_microbatches must be at least 1, got {total_microbatches}")
    head_loss = stage_chunked_loss(ce_chunk_tokens) if (has_head and ce_chunk_tokens) else None
    return spec.StageModule(model, tuple(layer_range), has_embed, has_head, 1.0 / total_microbatches,
                            head_loss=head_loss)


class ReducingStage(PipelineStage):
    """A PipelineStage whose FSDP-wrapped module reduces its gradients when the plan says (see the
    module doc): defer_grad_sync, torch's own deferral (one reduction per step, after the last
    micro-batch); otherwise in each micro-batch's backward, FSDP's hooks reducing and resharding
    as they do without pipelining. The step's final `perform_reduce_grad` then finds nothing left
    to reduce and only finalises FSDP's backward. A module FSDP does not wrap has nothing to reduce."""

    def __init__(self, *args, defer_grad_sync=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.defer_grad_sync = bool(defer_grad_sync)

    def backward_maybe_with_nosync(self, backward_type, bwd_kwargs, last_backward=False):
        if self.defer_grad_sync or not isinstance(self.submod, FSDPModule):
            return super().backward_maybe_with_nosync(backward_type, bwd_kwargs, last_backward)
        if backward_type != "full":
            # the split input / weight backwards of zero-bubble schedules; SCHEDULES run full ones
            raise NotImplementedError(f"a {backward_type!r} backward reducing every micro-batch; use a schedule "
                                      f"among {sorted(SCHEDULES)}")
        # each backward is a whole one to FSDP, as in plain gradient accumulation (its defaults)
        self.submod.set_is_last_backward(True)
        self.submod.set_requires_gradient_sync(True)
        self.submod.set_reshard_after_backward(True)
        grads = stage_backward(bwd_kwargs["stage_output"], bwd_kwargs["output_grads"], bwd_kwargs["input_values"])
        return grads, None


def _stage_modules_in(modules):
    """The StageModules in `modules`, also when wrapped (FSDP keeps the class as a base;
    other wrappers hold it as a child)."""
    return [m for module in modules for m in module.modules() if isinstance(m, spec.StageModule)]


def pipeline_aux_loss(stage_modules):
    """The balance-loss part of J held by this rank: the balance losses of its MoE blocks summed over
    the last step's micro-batches, divided by MICROBATCHES. A float32 scalar (zero when the rank has
    no MoE block); sum it over the pipeline ranks for the whole of J's aux part."""
    stages = _stage_modules_in(stage_modules)
    if not stages:
        raise ValueError("no StageModule among the given modules")
    device = next(p.device for s in stages for p in s.parameters())
    total = torch.zeros((), dtype=torch.float32, device=device)
    for stage in stages:
        total = total + stage.balance_loss_part()
    return total


# ----------------------------------------------------------------------------------------------
# Pipelines
# ----------------------------------------------------------------------------------------------
def stage_indices(pp_rank, pp_size, virtual_stages):
    """Loop placement: rank r holds stages r, r + pp, r + 2 pp, ... (the placement
    ScheduleInterleaved1F1B expects)."""
    return [pp_rank + k * pp_size for k in range(virtual_stages)]


def _check_layer_ranges(stage_layer_ranges, num_layers, num_stages):
    if len(stage_layer_ranges) != num_stages:
        raise ValueError(f"{len(stage_layer_ranges)} layer ranges for {num_stages} stages "
                         "(pp_size * virtual_stages); give one (first, end) range per stage")
    expected_first = 0
    for stage, (first, end) in enumerate(stage_layer_ranges):
        if first != expected_first or end < first:
            raise ValueError(f"stage {stage}: layer range ({first}, {end}) should start at {expected_first}; "
                             "ranges must be consecutive, in stage order, and cover every layer once")
        expected_first = end
    if expected_first != num_layers:
        raise ValueError(f"layer ranges end at layer {expected_first} but the model has {num_layers} layers")


class Pipeline:
    """One rank's part of a pipeline: its stage modules, their PipelineStages and the schedule."""

    def __init__(self, stage_modules, stages, schedule, n_microbatches, loss_fn=None):
        self.stage_modules = stage_modules
        self.stages = stages
        self.schedule = schedule
        self.n_microbatches = n_microbatches
        self.loss_fn = loss_fn
        self.has_first_stage = any(s.is_first for s in stages)
        self.has_last_stage = any(s.is_last for s in stages)
        # the last stage computes its loss itself (chunked loss): it takes the labels as an input
        self.last_stage_takes_labels = any(m.head_loss is not None for m in _stage_modules_in(stage_modules))

    def _schedule_inputs(self, input_ids, labels, position_ids):
        """(args, target, losses, kwargs) of a schedule call: only the first stage consumes inputs
        and only the last one targets (what the schedules expect); position ids, a keyword input,
        reach every stage, and so do the labels where the last stage computes its loss itself (this
        rank's other stages ignore them)."""
        if input_ids.shape[0] % self.n_microbatches:
            # tensor_split would make unequal micro-batches, which the loss convention does not weigh.
            raise ValueError(f"batch of {input_ids.shape[0]} sequences does not split into "
                             f"{self.n_microbatches} equal micro-batches")
        args = (input_ids,) if self.has_first_stage else ()
        target = labels if self.has_last_stage else None
        losses = [] if self.has_last_stage else None
        kwargs = {} if position_ids is None else {"position_ids": position_ids}
        if self.last_stage_takes_labels:
            kwargs["labels"] = labels
        return args, target, losses, kwargs

    def step(self, input_ids, labels, position_ids=None, tokens=None):
        """Forward and backward of this rank's local batch (n_microbatches micro-batches along dim 0).
        labels: the targets (the input ids for pretraining rows); position_ids: None or [B, S] (packed
        documents); tokens: TOKENS of this step's global batch, given to the PipelineLoss (None: keep
        its value). Gradients accumulate into the stage parameters' .grad. Returns, on the rank
        holding the last stage, the summed loss_fn values of the micro-batches (J's cross-entropy
        part for this batch with pipeline_loss_fn); None elsewhere. Every rank must call it, each with
        the same batch shape."""
        args, target, losses, kwargs = self._schedule_inputs(input_ids, labels, position_ids)
        if tokens is not None:
            self.loss_fn.tokens = tokens
        stage_modules = _stage_modules_in(self.stage_modules)
        for stage in stage_modules:
            stage.aux_loss_per_forward.clear()
        self.schedule.step(*args, target=target, losses=losses, return_outputs=False, **kwargs)
        # On the first step each PipelineStage learns its shapes by running one extra forward (and an
        # input-only backward) of its module before the micro-batches (dynamic metadata inference),
        # on the first micro-batch or on uninitialised buffers: keep only the micro-batches' forwards,
        # which are the last n_microbatches.
        for stage in stage_modules:
            del stage.aux_loss_per_forward[:-self.n_microbatches]
        if not self.has_last_stage:
            return None
        return torch.stack([loss.detach() for loss in losses]).sum()

    def eval_loss_sum(self, input_ids, labels, position_ids=None):
        """The summed next-token cross-entropy of this rank's local batch, forward only: the
        schedule's own eval pass (no backward; call it under torch.no_grad, with the stage modules in
        eval mode). On the rank holding the last stage the sum over the micro-batches (float32
        scalar), None elsewhere. Every rank must call it. Switching between eval and training makes
        the schedule infer its stages' shapes again on its next call (an extra forward, not counted)."""
        args, target, losses, kwargs = self._schedule_inputs(input_ids, labels, position_ids)
        tokens = self.loss_fn.tokens
        self.loss_fn.tokens = 1  # sums: the caller divides by the targets of the whole eval set
        try:
            # no outputs kept: the losses are all it needs (and a chunked last stage's outputs are
            # scalars, which the schedule's merge along the batch dim would refuse)
            self.schedule.eval(*args, target=target, losses=losses, return_outputs=False, **kwargs)
        finally:
            self.loss_fn.tokens = tokens
            for stage in _stage_modules_in(self.stage_modules):
                stage.aux_loss_per_forward.clear()  # eval forwards are no part of a step's balance loss
        if not self.has_last_stage:
            return None
        return torch.stack([loss.detach() for loss in losses]).sum()


def build_pipeline(model, stage_layer_ranges, pp_rank, pp_size, pp_group, schedule_name, n_microbatches,
                   virtual_stages, loss_fn, device, wrap_stage=None, total_microbatches=None, ce_chunk_tokens=0,
                   defer_grad_sync=False):
    """This rank's stages of `model` (a training-form causal LM) and a schedule to run them.

    stage_layer_ranges: one (first, end) per stage, pp_size * virtual_stages of them in stage order.
    schedule_name: "1F1B" (virtual_stages 1) or "Interleaved1F1B" (loop placement, see stage_indices).
    n_microbatches: micro-batches per step on this pipeline. total_microbatches: MICROBATCHES of the
    loss convention (default n_microbatches, i.e. no data parallelism). loss_fn: e.g.
    runtime.loss.pipeline_loss_fn(TOKENS) (a PipelineLoss, whose TOKENS step() and eval_loss_sum() can change).
    device: the device the stages compute on (PipelineStage allocates its receive buffers there);
    modules are not moved. wrap_stage(module) -> module (e.g. FSDP) is applied before the stage is
    created. ce_chunk_tokens: N > 0, the last stage computes its loss from the hidden states N
    positions at a time (--ce_chunk_tokens). defer_grad_sync: FSDP-wrapped stages reduce their
    gradients once per step instead of in each micro-batch's backward (ReducingStage). Drop the
    caller's `model` afterwards so that other ranks' parameters are freed."""
    if schedule_name not in SCHEDULES:
        raise ValueError(f"schedule {schedule_name!r}: choose one of {sorted(SCHEDULES)}")
    if virtual_stages < 1 or (schedule_name == "1F1B" and virtual_stages != 1):
        raise ValueError(f"virtual_stages={virtual_stages} with schedule {schedule_name}: "
                         "1F1B takes 1, Interleaved1F1B 1 or more")
    if not 0 <= pp_rank < pp_size:
        raise ValueError(f"pp_rank {pp_rank} not in [0, {pp_size})")
    num_stages = pp_size * virtual_stages
    _check_layer_ranges(stage_layer_ranges, spec.num_layers(model), num_stages)
    total_microbatches = n_microbatches if total_microbatches is None else total_microbatches

    stage_modules, stages = [], []
    for index in stage_indices(pp_rank, pp_size, virtual_stages):
        module = split_into_stage(model, stage_layer_ranges[index], has_embed=index == 0,
                                  has_head=index == num_stages - 1, total_microbatches=total_microbatches,
                                  ce_chunk_tokens=ce_chunk_tokens)
        if wrap_stage is not None:
            module = wrap_stage(module)
        stage_modules.append(module)
        # No example inputs: the stages learn the shapes from the first micro-batch (PipelineStage's
        # dynamic mode), which fits any batch and sequence length.
        stages.append(ReducingStage(module, index, num_stages, torch.device(device), group=pp_group,
                                    defer_grad_sync=defer_grad_sync))

    if schedule_name == "1F1B":
        schedule = Schedule1F1B(stages[0], n_microbatches, loss_fn=loss_fn, scale_grads=False)
    else:
        schedule = ScheduleInterleaved1F1B(stages, n_microbatches, loss_fn=loss_fn, scale_grads=False)
    return Pipeline(stage_modules, stages, schedule, n_microbatches, loss_fn)
