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
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from errors import UserError
from modeling import spec

_STYLES = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}


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
        for name, full in zip(spec.EXPERT_PARAMETERS, spec.expert_weights(merged)):
            dim = spec.EXPERT_INTERMEDIATE_DIMS[name]
            if full.shape[dim] % tp:
                raise UserError(f"{name}: intermediate size {full.shape[dim]} is not divisible by the "
                                f"tensor-parallel degree {tp}; compile a plan with another mesh.tp")
            local = full.detach().chunk(tp, dim=dim)[rank].clone()
            self.register_parameter(name, nn.Parameter(DTensor.from_local(local, tp_mesh, [Shard(dim)],
                                                                          run_check=False)))

    def forward(self, x_TD, topk_idx_TK, topk_weight_TK):
        share = _sum_gradients_over(self.tp_mesh)
        # forward: the same x on every rank; backward: sum the ranks' partial gradients of x
        weights = tuple(w.to_local() for w in spec.expert_weights(self))
        y_partial = spec.routed_experts(weights, share(x_TD), topk_idx_TK, share(topk_weight_TK),
                                        self.grouped_mm_backend)
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
