"""Materialising a model built on the meta device: each rank fills only the parameters it holds.

The model is built on the meta device (no memory), split by the plan (tensor and expert
parallelism turn parameters into local pieces), then `materialize` allocates this rank's pieces
and fills them, parameter by parameter, from the Hugging Face checkpoint of --model_id (experts
merged as they are read) or from the seeded initialisation of `modeling.loading.initial_value`.
Only one full parameter exists at a time, so a rank's memory peaks at its own share plus the
largest single tensor.
"""

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from errors import UserError
from modeling import spec
from modeling.loading import initial_value


def _local_piece(full, param, expert_slice):
    """The part of `full` that this rank's `param` holds."""
    if expert_slice is not None:
        full = full[expert_slice]
    if isinstance(param, DTensor):
        shape, offset = compute_local_shape_and_global_offset(full.shape, param.device_mesh, param.placements)
        index = tuple(slice(o, o + s) for o, s in zip(offset, shape))
        return full[index]
    return full


def materialize(model, config, device, seed, checkpoint=None):
    """Allocates the meta model's parameters on `device` and fills them: from `checkpoint` (a
    modeling.hf_adapter.WeightReader) or the seeded initialisation; LoRA adapters always from their
    seeded initialisation (spec.lora_initial_value). Each parameter keeps the dtype it has on meta
    (frozen LoRA base weights the compute dtype). Expert-parallel modules say which experts they
    hold (expert_offset, num_local_experts, num_experts)."""
    expert_slices = {}
    for module_name, module in model.named_modules():
        offset = getattr(module, "expert_offset", None)
        if offset is not None:
            for pname, _ in module.named_parameters(recurse=False):
                full_name = f"{module_name}.{pname}" if module_name else pname
                expert_slices[full_name] = (slice(offset, offset + module.num_local_experts), module.num_experts)
    model.to_empty(device=device)
    with torch.no_grad():
        for name, param in model.named_parameters():
            full_shape = tuple(param.shape)
            expert_slice, num_experts = expert_slices.get(name, (None, None))
            if expert_slice is not None:
                full_shape = (num_experts,) + full_shape[1:]
            if spec.is_lora_parameter(name):  # adapters start as PEFT's, whatever the base weights are
                full = spec.lora_initial_value(name, full_shape, seed, device=device)
            elif checkpoint is not None:
                full = checkpoint.full(name)
            else:
                full = initial_value(name, full_shape, config, seed, device=device)
            if tuple(full.shape) != full_shape:
                raise UserError(f"{name}: the checkpoint of --model_id holds shape {tuple(full.shape)}, the model "
                                f"of its config.json needs {full_shape}; the weights and config.json disagree")
            piece = _local_piece(full.to(torch.float32), param, expert_slice)
            target = param.to_local() if isinstance(param, DTensor) else param
            target.copy_(piece)
    return model
