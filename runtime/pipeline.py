"""Pipeline parallelism: cutting the training-form model into stages and running them with PyTorch's
own schedules (`torch.distributed.pipelining`: PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B).

The loss convention every runtime piece follows: for a global batch of G sequences of length S cut
into micro-batches, the objective is

    J = sum over micro-batches mb of [ CE_sum(mb) / TOKENS + aux(mb) / MICROBATCHES ]

with TOKENS = G * (S - 1) (next-token targets of the whole global batch) and MICROBATCHES the number
of micro-batches of the whole global batch (all data-parallel replicas together). A pipeline splits
J in two parts computed in different places:

* the cross-entropy part on the last stage: `loss_fn` returns CE_sum(mb) / TOKENS for one
  micro-batch, and the schedule backpropagates it unchanged (`scale_grads=False`: the scale is
  already in the loss, the schedule must not divide by the micro-batch count again);
* the balance-loss part inside each MoE block, on whichever stage holds it: the block injects
  the gradient of its balance loss times 1 / MICROBATCHES in its own backward
  (`spec.StageModule`), so no loss has to travel between stages. The stages keep its
  values for logging (`pipeline_aux_loss`).

Splitting moves modules out of the model (the stages share the model's parameter objects, nothing
is copied): the model should not be used after it has been split, and dropping the caller's
reference to it leaves each rank holding only the parameters of its own stages.
"""

import torch
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

from modeling import spec

SCHEDULES = {"1F1B": Schedule1F1B, "Interleaved1F1B": ScheduleInterleaved1F1B}


# ----------------------------------------------------------------------------------------------
# Stage modules
# ----------------------------------------------------------------------------------------------
def split_into_stage(model, layer_range, has_embed, has_head, total_microbatches=1):
    """This stage's part of a training-form causal LM (see modeling.spec.StageModule).

    layer_range: (first, end) decoder layer indices, end excluded. total_microbatches: MICROBATCHES
    of the loss convention (all micro-batches of the global batch, every data-parallel replica
    included); each MoE block's balance-loss gradient is scaled by its inverse."""
    if total_microbatches < 1:
        raise ValueError(f"total_microbatches must be at least 1, got {total_microbatches}")
    return spec.StageModule(model, tuple(layer_range), has_embed, has_head, 1.0 / total_microbatches)


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

    def __init__(self, stage_modules, stages, schedule, n_microbatches):
        self.stage_modules = stage_modules
        self.stages = stages
        self.schedule = schedule
        self.n_microbatches = n_microbatches
        self.has_first_stage = any(s.is_first for s in stages)
        self.has_last_stage = any(s.is_last for s in stages)

    def step(self, input_ids, labels):
        """Forward and backward of this rank's local batch (n_microbatches micro-batches along dim 0).
        Gradients accumulate into the stage parameters' .grad. Returns, on the rank holding the last
        stage, the summed loss_fn values of the micro-batches (J's cross-entropy part for this batch
        with pipeline_loss_fn); None elsewhere. Every rank must call it, each with the same batch shape."""
        if input_ids.shape[0] % self.n_microbatches:
            # tensor_split would make unequal micro-batches, which the loss convention does not weigh.
            raise ValueError(f"batch of {input_ids.shape[0]} sequences does not split into "
                             f"{self.n_microbatches} equal micro-batches")
        stage_modules = _stage_modules_in(self.stage_modules)
        for stage in stage_modules:
            stage.aux_loss_per_forward.clear()
        # Only the first stage consumes inputs and only the last one targets (what the schedules expect).
        args = (input_ids,) if self.has_first_stage else ()
        target = labels if self.has_last_stage else None
        losses = [] if self.has_last_stage else None
        self.schedule.step(*args, target=target, losses=losses, return_outputs=False)
        # On the first step each PipelineStage learns its shapes by running one extra forward (and an
        # input-only backward) of its module before the micro-batches (dynamic metadata inference),
        # on the first micro-batch or on uninitialised buffers: keep only the micro-batches' forwards,
        # which are the last n_microbatches.
        for stage in stage_modules:
            del stage.aux_loss_per_forward[:-self.n_microbatches]
        if not self.has_last_stage:
            return None
        return torch.stack([loss.detach() for loss in losses]).sum()


def build_pipeline(model, stage_layer_ranges, pp_rank, pp_size, pp_group, schedule_name, n_microbatches,
                   virtual_stages, loss_fn, device, wrap_stage=None, total_microbatches=None):
    """This rank's stages of `model` (a training-form causal LM) and a schedule to run them.

    stage_layer_ranges: one (first, end) per stage, pp_size * virtual_stages of them in stage order.
    schedule_name: "1F1B" (virtual_stages 1) or "Interleaved1F1B" (loop placement, see stage_indices).
    n_microbatches: micro-batches per step on this pipeline. total_microbatches: MICROBATCHES of the
    loss convention (default n_microbatches, i.e. no data parallelism). loss_fn: e.g. runtime.loss.pipeline_loss_fn(TOKENS).
    device: the device the stages compute on (PipelineStage allocates its receive buffers there);
    modules are not moved. wrap_stage(module) -> module (e.g. FSDP) is applied before the stage is
    created. Drop the caller's `model` afterwards so that other ranks' parameters are freed."""
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
                                  has_head=index == num_stages - 1, total_microbatches=total_microbatches)
        if wrap_stage is not None:
            module = wrap_stage(module)
        stage_modules.append(module)
        # No example inputs: the stages learn the shapes from the first micro-batch (PipelineStage's
        # dynamic mode), which fits any batch and sequence length.
        stages.append(PipelineStage(module, index, num_stages, torch.device(device), group=pp_group))

    if schedule_name == "1F1B":
        schedule = Schedule1F1B(stages[0], n_microbatches, loss_fn=loss_fn, scale_grads=False)
    else:
        schedule = ScheduleInterleaved1F1B(stages, n_microbatches, loss_fn=loss_fn, scale_grads=False)
    return Pipeline(stage_modules, stages, schedule, n_microbatches)
