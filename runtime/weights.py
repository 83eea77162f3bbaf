"""Materialising a model built on the meta device: each rank fills only the parameters it holds.

The model is built on the meta device (no memory), split by the plan (tensor and expert
parallelism turn parameters into local pieces), then `materialize` allocates this rank's pieces
and fills them, parameter by parameter, from the Hugging Face checkpoint of --model_id (experts
merged as they are read) or from the seeded initialisation of `modeling.loading.initial_value`.
Only one full parameter exists at a time, so a rank's memory peaks at its own share plus the
largest single tensor.
"""

import json
import os

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from modeling.loading import initial_value


class CheckpointReader:
    """Tensors of a HF checkpoint directory by name, read lazily with safetensors."""

    def __init__(self, model_dir, config):
        from safetensors import safe_open
        self.config = config
        index = os.path.join(model_dir, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        else:
            single = os.path.join(model_dir, "model.safetensors")
            with safe_open(single, framework="pt") as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}
        self.files = {}
        self.where = {}
        for key, file in weight_map.items():
            path = os.path.join(model_dir, file)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: listed in {model_dir}'s checkpoint index but missing")
            self.where[key] = path
        self._open = safe_open

    def _read(self, key):
        if key not in self.where:
            raise KeyError(f"the checkpoint has no tensor {key}")
        path = self.where[key]
        if path not in self.files:
            self.files[path] = self._open(path, framework="pt")
        return self.files[path].get_tensor(key)

    def full(self, name):
        """The full value of a (training-form) parameter name; merged experts are stacked from the
        per-expert tensors."""
        prefix, _, leaf = name.rpartition(".")
        E = self.config.n_routed_experts
        if leaf == "gate_up_proj_E2FD":
            return torch.stack([torch.stack([self._read(f"{prefix}.{i}.gate_proj.weight"),
                                             self._read(f"{prefix}.{i}.up_proj.weight")]) for i in range(E)])
        if leaf == "down_proj_EDF":
            return torch.stack([self._read(f"{prefix}.{i}.down_proj.weight") for i in range(E)])
        return self._read(name)


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
    """Allocates the meta model's parameters on `device` and fills them (checkpoint or seeded init)."""
    expert_slices = {}
    for module_name, module in model.named_modules():
        offset = getattr(module, "expert_offset", None)
        if offset is not None:
            for pname, _ in module.named_parameters(recurse=False):
                full_name = f"{module_name}.{pname}" if module_name else pname
                expert_slices[full_name] = slice(offset, offset + module.num_local_experts)
    model.to_empty(device=device)
    with torch.no_grad():
        for name, param in model.named_parameters():
            full_shape = tuple(param.shape)
            if name in expert_slices:
                full_shape = (config.n_routed_experts,) + full_shape[1:]
            if checkpoint is not None:
                full = checkpoint.full(name)
            else:
                full = initial_value(name, full_shape, config, seed, device=device)
            if tuple(full.shape) != full_shape:
                raise ValueError(f"{name}: the checkpoint holds shape {tuple(full.shape)}, the model needs {full_shape}")
            piece = _local_piece(full.to(torch.float32), param, expert_slices.get(name))
            target = param.to_local() if isinstance(param, DTensor) else param
            target.copy_(piece)
    return model
