"""Applying a plan to the model with PyTorch's engine: what each rank builds and how it is wrapped.

    build_rank_model   the training form on the meta device, split as `plan.ops` says (tensor
                       parallel families, expert-parallel or replicated experts), then this rank's
                       pieces filled from the Hugging Face weights or the seeded initialisation
    parallelize        compiled layers, activation recompute and FSDP2 for the ZeRO level, on the
                       whole model or on this rank's pipeline stages

Which module carries which op family, and how a family splits, come from `modeling.spec`; the
choice among those ways comes from the plan.
"""

import torch
from torch.distributed._composable import checkpoint as activation_checkpoint
from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

from modeling import spec
from modeling.hf_adapter import WeightReader, has_hf_weights
from runtime.expert_parallel import ExpertParallelExperts
from runtime.preflight import compute_dtype_name
from runtime.tensor_parallel import apply_tensor_parallel, sum_partial_gradients
from runtime.weights import materialize


def build_rank_model(args, config, partitions, run_mesh, device):
    """The training-form model with this rank's share of the weights (see the module doc). With
    --lora_rank, the adapters are added before the plan splits the model (so expert parallelism
    splits the experts' stacked adapters with them) and every other parameter is frozen in the
    compute dtype: no fp32 copy of the base weights is ever allocated."""
    model = spec.build_training_model(config, device="meta", attention=args.attention)
    if args.lora_rank:
        spec.apply_lora(model, args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_targets,
                        adapter_dtype=torch.float32)
        compute_dtype = torch.bfloat16 if compute_dtype_name(args) == "bf16" else torch.float32
        for param in model.parameters():
            if not param.requires_grad:
                param.data = param.data.to(compute_dtype)  # on the meta device: a dtype, no memory
    if run_mesh.sizes["tp"] > 1:
        apply_tensor_parallel(model, run_mesh.mesh["tp"], partitions)
    if partitions["experts"] == "expert":
        group = run_mesh.group("ep")
        for parent, attribute, experts in spec.family_modules(model, "experts"):
            setattr(parent, attribute, ExpertParallelExperts(experts, group))
    reader = WeightReader(args.model_id, config.n_routed_experts or 0) if has_hf_weights(args.model_id) else None
    model = materialize(model, config, device, args.seed, reader)
    if run_mesh.sizes["tp"] > 1:
        sum_partial_gradients(model)
    return model


def expert_parameters(modules, partitions):
    """The parameters that differ between expert-parallel ranks (none when experts are replicated)."""
    if partitions["experts"] != "expert":
        return set()
    return {id(p) for m in modules for _, _, experts in spec.family_modules(m, "experts") for p in experts.parameters()}


def parallelize(module, args, plan, stage_index, run_mesh, mp_policy, partitions):
    """Compile, recompute and FSDP-wrap one module holding decoder layers (the whole model, or one
    pipeline stage); returns it."""
    layers = spec.decoder_layers(module)
    spec.compile_layers(layers, args.compile, args.compile_backend, spec.final_norms(module))
    if plan.stages[stage_index].recompute == "full":
        for layer in layers:
            activation_checkpoint(layer)
    apply_data_parallel(module, layers, plan, run_mesh, mp_policy, partitions["experts"] == "expert",
                        keep_gathered=args.zero3_keep_gathered)
    if args.ce_chunk_tokens and isinstance(module, FSDPModule) and not isinstance(module, spec.StageModule):
        # the loss is computed inside this method: FSDP must gather the parameters for it as for forward
        # (a pipeline stage computes it inside forward itself)
        register_fsdp_forward_method(module, spec.FORWARD_WITH_HEAD)
    return module


def apply_data_parallel(root, layers, plan, run_mesh, mp_policy, expert_parallel, keep_gathered=0):
    """FSDP2 for the plan's ZeRO level: experts over replica x dp when ep splits them, everything else
    over replica x dp x ep. Level 0 replicates; 2 and 3 shard, 3 also regathering for the backward,
    except for the last `keep_gathered` units to run their forward (--zero3_keep_gathered: the root,
    which holds the head, then the decoder layers from the last), which keep their gathered weights
    until their backward (reshard_after_forward=False). Gradients are summed, not averaged (the
    trainer's objective is already the global-batch mean)."""
    level = plan.zero["level"]
    kept = {id(layer) for layer in list(layers)[::-1][:max(0, keep_gathered - 1)]}
    # LoRA: the frozen base weights have no gradient to reduce and are already in the compute dtype;
    # the adapters cast themselves to it (modeling/lora.py), so one data rank needs no FSDP at all
    frozen = {p for p in root.parameters() if not p.requires_grad}
    if run_mesh.data_ranks() == 1 and (mp_policy.param_dtype is None or frozen):
        return  # one data rank and fp32 compute (or LoRA): nothing to reduce, nothing to cast

    wrapped = []  # (module, the mesh its parameters are reduced over)

    def wrap(module, mesh, ignored=None, keep=False):
        wrapped.append((module, mesh))
        if level == 0:
            # ZeRO 0 replicates: the frozen weights stay out of FSDP (no gathered copy, no reduction)
            ignored = (ignored or set()) | {p for p in module.parameters() if p in frozen}
            replicate(module, mesh=mesh, mp_policy=mp_policy, ignored_params=ignored or None)
        else:
            fully_shard(module, mesh=mesh, reshard_after_forward=(level == 3 and not keep), mp_policy=mp_policy,
                        ignored_params=ignored)

    # Each rank's experts are its own under expert parallelism: they are data parallel only over
    # replica x dp, and must never join the dense parameters' reduction over ep.
    own_experts = set()
    if expert_parallel:
        expert_mesh = run_mesh.expert_data_mesh()
        for layer in layers:
            for _, _, experts in spec.family_modules_of_layer(layer, "experts"):
                if expert_mesh.size() > 1 or mp_policy.param_dtype is not None:
                    # (also on a mesh of one rank: FSDP casts them for compute)
                    wrap(experts, expert_mesh, keep=id(layer) in kept)
                else:
                    own_experts |= set(experts.parameters())
    for layer in layers:
        wrap(layer, run_mesh.data_mesh(), own_experts or None, keep=id(layer) in kept)
    wrap(root, run_mesh.data_mesh(), own_experts or None, keep=keep_gathered >= 1)
    for module, mesh in wrapped:
        if mesh.size() > 1:
            # a sum, not FSDP's mean. (Over one rank FSDP's default already sums, and a divide factor
            # set there makes it divide every gradient by 1 into a float32 temporary before its copy:
            # 5.7 ms per step on an H200 for the 4-layer Coder-V2-Lite slice.)
            module.set_gradient_divide_factor(1.0)
            # plain SUM collectives (gloo has no pre-multiplied sum; NCCL copies less with SUM)
            module.set_force_sum_reduction_for_comms(True)


def stage_ranges(plan):
    """Layer ranges of every (virtual) stage, in stage order: the plan's chunks for an interleaved
    schedule (virtual stage k is chunk k // pp of stage k % pp), else each stage's layers."""
    pp = plan.mesh["pp"]
    if plan.schedule["name"] == "Interleaved1F1B":
        v = plan.schedule["virtual_stages"]
        return [tuple(plan.stages[k % pp].chunks[k // pp]) for k in range(pp * v)]
    return [tuple(s.layers) for s in plan.stages]
