"""Tensor parallelism with DTensor, driven by what the model declares.

A module that can be split declares `TP_LAYOUT` ({child linear: "colwise" | "rowwise"}) and
`TP_HEAD_ATTRS` (attributes counting heads, divided by the degree); the merged experts declare
`TP_SHARD_DIMS` (the intermediate dim of each stacked parameter). Everything else (norms, the router,
the embedding, lm_head) stays whole and is computed identically on every tensor-parallel rank, whose
inputs are the same. DTensor's parallel styles move the activations: a column-parallel projection
takes the replicated input (its backward all-reduces the partial input gradient), a row-parallel
one all-reduces its partial output.
"""

from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from modeling import moe_utils

_STYLES = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}


class TensorParallelError(ValueError):
    pass


class TensorParallelExperts(nn.Module):
    """Merged experts with the intermediate dim split over the tensor-parallel ranks.

    Each rank computes every expert on its slice of F; the partial outputs are summed across the
    ranks (an all-reduce, whose backward passes the gradient through), and the replicated input's
    partial gradients are summed in the backward."""

    def __init__(self, merged, tp_mesh):
        super().__init__()
        tp = tp_mesh.size()
        rank = tp_mesh.get_local_rank()
        self.tp_mesh = tp_mesh
        self.grouped_mm_backend = merged.grouped_mm_backend
        for name, dim in merged.TP_SHARD_DIMS.items():
            full = getattr(merged, name)
            if full.shape[dim] % tp:
                raise TensorParallelError(f"{name}: intermediate size {full.shape[dim]} is not divisible by the "
                                          f"tensor-parallel degree {tp}")
            local = full.detach().chunk(tp, dim=dim)[rank].clone()
            setattr(self, name, nn.Parameter(DTensor.from_local(local, tp_mesh, [Shard(dim)], run_check=False)))

    def forward(self, x_TD, topk_idx_TK, topk_weight_TK):
        # forward: the same x on every rank; backward: sum the ranks' partial gradients of x
        x_local = DTensor.from_local(x_TD, self.tp_mesh, [Replicate()], run_check=False).to_local(
            grad_placements=[Partial()])
        weight_local = DTensor.from_local(topk_weight_TK, self.tp_mesh, [Replicate()], run_check=False).to_local(
            grad_placements=[Partial()])
        y_partial = moe_utils.expert_swiglu(x_local, topk_idx_TK, weight_local, self.gate_up_proj_E2FD.to_local(),
                                            self.down_proj_EDF.to_local(), backend=self.grouped_mm_backend)
        return DTensor.from_local(y_partial, self.tp_mesh, [Partial()], run_check=False).redistribute(
            placements=[Replicate()]).to_local()


def _sum_gradients_over(tp_mesh):
    """Identity forward; backward: the ranks' partial gradients summed (all-reduce)."""
    def share(t):
        return DTensor.from_local(t, tp_mesh, [Replicate()], run_check=False).to_local(grad_placements=[Partial()])
    return share


def apply_tensor_parallel(model, tp_mesh):
    """Splits every module that declares a layout (and gives its tensors shared by all heads a
    backward that sums the ranks' partial gradients); returns how many modules were split."""
    from modeling.modeling_deepseek_modifier import MergedExperts
    tp = tp_mesh.size()
    split = 0
    for module in list(model.modules()):
        layout = getattr(module, "TP_LAYOUT", None)
        if layout:
            for attr in module.TP_HEAD_ATTRS:
                heads = getattr(module, attr)
                if heads % tp:
                    raise TensorParallelError(f"{type(module).__name__}.{attr} = {heads} is not divisible by the "
                                              f"tensor-parallel degree {tp}")
                setattr(module, attr, heads // tp)
            if hasattr(module, "share_across_heads"):
                module.share_across_heads = _sum_gradients_over(tp_mesh)
            present = {name: _STYLES[style]() for name, style in layout.items() if hasattr(module, name)}
            parallelize_module(module, tp_mesh, present)
            split += 1
        for name, child in list(module.named_children()):
            if isinstance(child, MergedExperts):
                setattr(module, name, TensorParallelExperts(child, tp_mesh))
                split += 1
    return split
