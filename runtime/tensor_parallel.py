"""Tensor parallelism with DTensor, as the model spec declares it.

For each op family a plan splits over the `tp` axis (`plan.ops[family].partition` is "heads" or
"intermediate"), `modeling.spec` names the modules that carry it and a TP plan keyed by child
module name ("colwise" | "rowwise"), plus the attributes that count heads (divided by the degree).
The stacked routed experts split their intermediate dim (`spec.EXPERT_INTERMEDIATE_DIMS`).
Everything a plan leaves replicated (norms, the router, the embedding, lm_head) is computed
identically on every tensor-parallel rank, whose inputs are the same. DTensor's parallel styles move
the activations: a column-parallel projection takes the replicated input (its backward all-reduces
the partial input gradient), a row-parallel one all-reduces its partial output.
"""

from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from errors import UserError
from modeling import spec


def _split_parameters(style, param_dims, module, device_mesh):
    """Each parameter of `module` as a DTensor split on the dim `param_dims` (spec.TP_PARAMETER_DIMS of
    the style) gives it, or replicated; requires_grad kept (a frozen LoRA base stays frozen)."""
    for name, param in list(module.named_parameters(recurse=False)):
        dim = param_dims[name]
        placement = Replicate() if dim is None else Shard(dim)
        module.register_parameter(name, nn.Parameter(
            distribute_tensor(param, device_mesh, [placement], src_data_rank=style.src_data_rank),
            requires_grad=param.requires_grad))


def sum_partial_gradients(model):
    """A whole (Replicate) parameter next to split ones, such as a LoRA adapter's A of a
    column-parallel projection or B of a row-parallel one, gets a partial gradient on each rank,
    which DTensor leaves Partial. A hook sums it in the backward, so that the norm, clipping and
    AdamW read the parameter's gradient as for every other one. Call it once the parameters are
    materialised (materialising replaces the Parameter objects, and their hooks with them)."""
    for param in model.parameters():
        if param.requires_grad and isinstance(param, DTensor) and all(isinstance(p, Replicate) for p in param.placements):
            param.register_hook(_replicate_gradient)


def _replicate_gradient(grad):
    if any(isinstance(p, Partial) for p in grad.placements):
        return grad.redistribute(grad.device_mesh, [Replicate()] * grad.device_mesh.ndim)
    return grad


class _Colwise(ColwiseParallel):
    """ColwiseParallel whose parameters split as spec.TP_PARAMETER_DIMS["colwise"] says (a LoRA
    adapter's A whole, B on its output features), not every one on dim 0."""

    def _partition_linear_fn(self, name, module, device_mesh):
        _split_parameters(self, spec.TP_PARAMETER_DIMS["colwise"], module, device_mesh)


class _Rowwise(RowwiseParallel):
    """RowwiseParallel that also splits a LoRA adapter's A on its input features (B whole)."""

    def _partition_linear_fn(self, name, module, device_mesh):
        _split_parameters(self, spec.TP_PARAMETER_DIMS["rowwise"], module, device_mesh)


_STYLES = {"colwise": _Colwise, "rowwise": _Rowwise}


class TensorParallelExperts(nn.Module):
    """Stacked experts with the intermediate dim split over the tensor-parallel ranks (parameter
    names and layout of the model's stacked experts, each a DTensor Shard(F) over tp).

    Each rank computes every expert on its slice of F; the partial outputs are summed across the
    ranks (an all-reduce, whose backward passes the gradient through), and the replicated input's
    partial gradients are summed in the backward."""

    def __init__(self, merged, tp_mesh):
        super().__init__()
        tp = tp_mesh.size()
        rank = tp_mesh.get_local_rank()
        self.tp_mesh = tp_mesh
        self.grouped_mm_backend = merged.grouped_mm_backend
        self.lora = getattr(merged, "lora", None)
        self.replicated = set()  # LoRA adapters without an intermediate dim: whole on every rank
        for name, full in zip(spec.expert_parameter_names(merged), spec.expert_weights(merged)):
            dim = spec.EXPERT_INTERMEDIATE_DIMS[name]
            if dim is None:
                self.replicated.add(name)
                self.register_parameter(name, nn.Parameter(
                    DTensor.from_local(full.detach().clone(), tp_mesh, [Replicate()], run_check=False),
                    requires_grad=full.requires_grad))
                continue
            if full.shape[dim] % tp:
                raise UserError(f"{name}: intermediate size {full.shape[dim]} is not divisible by the "
                                f"tensor-parallel degree {tp}; compile a plan with another mesh.tp")
            local = full.detach().chunk(tp, dim=dim)[rank].clone()
            self.register_parameter(name, nn.Parameter(DTensor.from_local(local, tp_mesh, [Shard(dim)],
                                                                          run_check=False),
                                                       requires_grad=full.requires_grad))

    def forward(self, x_TD, topk_idx_TK, topk_weight_TK):
        share = _sum_gradients_over(self.tp_mesh)
        # forward: the same x on every rank; backward: sum the ranks' partial gradients of x. A whole
        # adapter's gradient is partial on each rank too (it sums over the rank's slice of F), so it
        # is summed the same way.
        weights = tuple(share(w.to_local()) if name in self.replicated else w.to_local()
                        for name, w in zip(spec.expert_parameter_names(self), spec.expert_weights(self)))
        y_partial = spec.routed_experts(weights, share(x_TD), topk_idx_TK, share(topk_weight_TK),
                                        self.grouped_mm_backend, spec.expert_lora(self))
        return DTensor.from_local(y_partial, self.tp_mesh, [Partial()], run_check=False).redistribute(
            placements=[Replicate()]).to_local()


def _sum_gradients_over(tp_mesh):
    """Identity forward; backward: the ranks' partial gradients summed (all-reduce)."""
    def share(t):
        return DTensor.from_local(t, tp_mesh, [Replicate()], run_check=False).to_local(grad_placements=[Partial()])
    return share


def _split_module(module, family, tp_mesh):
    tp = tp_mesh.size()
    for attr in spec.TP_HEAD_COUNTS.get(family, ()):
        if not hasattr(module, attr):
            continue
        heads = getattr(module, attr)
        if heads % tp:
            raise UserError(f"{type(module).__name__}.{attr} = {heads} is not divisible by the tensor-parallel "
                            f"degree {tp}; compile a plan with another mesh.tp")
        setattr(module, attr, heads // tp)
    if family == "attention":
        spec.set_shared_across_heads(module, _sum_gradients_over(tp_mesh))
    present = {name: _STYLES[style]() for name, style in spec.TP_PLAN[family].items() if hasattr(module, name)}
    parallelize_module(module, tp_mesh, present)


def apply_tensor_parallel(model, tp_mesh, partitions):
    """Splits, in place, the modules of every family whose partition (`partitions`: family ->
    partition, from plan.ops) is one of tensor parallelism's; returns how many modules were split."""
    split = 0
    for family, partition in partitions.items():
        if partition != spec.OP_FAMILIES[family].tensor_parallel:
            continue
        for parent, attribute, module in spec.family_modules(model, family):
            if family == "experts":
                setattr(parent, attribute, TensorParallelExperts(module, tp_mesh))
            else:
                _split_module(module, family, tp_mesh)
            split += 1
    return split
