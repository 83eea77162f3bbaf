"""Expert parallelism: the routed experts of a layer split over the ranks of an EP group.

Rank r of an EP group of size ep holds experts [r*E/ep, (r+1)*E/ep). Every rank keeps its own tokens
and routing; the rows (one per (token, choice) slot) travel to the rank that owns their expert with
an all-to-all, go through that rank's grouped GEMMs, and come back with a second all-to-all:

    sort slots by expert -> counts all-to-all -> rows + weights all-to-all -> group by local expert
    -> grouped SwiGLU GEMMs -> ungroup -> rows all-to-all back -> unpermute and sum the K slots

The row all-to-alls are torch.distributed's autograd-aware functional collective, whose backward is
the reverse all-to-all, so gradients reach x and the routing weights on the sending rank, and each
local expert's parameter gradient is the sum over every rank's rows routed to it (no averaging: the
data-parallel reduction, if any, is someone else's business).
"""

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh

from modeling import kernels, spec


def _process_group(ep_group):
    """A ProcessGroup from either a ProcessGroup or a 1-D DeviceMesh (the EP dimension of a mesh)."""
    if isinstance(ep_group, DeviceMesh):
        if ep_group.ndim != 1:
            raise ValueError(f"expert parallelism takes a 1-D DeviceMesh, got {ep_group.ndim} dimensions")
        return ep_group.get_group()
    return ep_group


class ExpertParallelExperts(nn.Module):
    """This rank's share of a layer's stacked experts, with all-to-all token dispatch.

    Parameters keep the names and layout of the model's stacked experts (`spec.EXPERT_PARAMETERS`,
    and with LoRA the stacked adapters `spec.EXPERT_LORA_PARAMETERS`), restricted along the expert
    dim to the local experts: local expert l is global expert
    expert_offset + l. Attributes: num_experts (global E), ep_size, ep_rank, expert_offset,
    num_local_experts, ep_group (the ProcessGroup used by the all-to-alls).

    ep_group may be a ProcessGroup or a 1-D DeviceMesh; the rank order within it fixes which experts
    a rank holds.
    """

    def __init__(self, merged, ep_group):
        """This rank's experts of `merged` (the model's stacked-experts module), copied, or left on
        the meta device when `merged` is there. The slices are cloned so that the full stacked
        tensors can be freed once every rank has taken its share."""
        super().__init__()
        self.ep_group = _process_group(ep_group)
        self.ep_size = dist.get_world_size(self.ep_group)
        self.ep_rank = dist.get_rank(self.ep_group)
        # the base's stacked tensors and, with LoRA, the stacked adapters: all split along EXPERT_DIM
        full = dict(zip(spec.expert_parameter_names(merged), spec.expert_weights(merged)))
        self.lora = getattr(merged, "lora", None)
        self.num_experts = next(iter(full.values())).shape[spec.EXPERT_DIM]
        if self.num_experts % self.ep_size != 0:
            raise ValueError(f"n_routed_experts={self.num_experts} is not divisible by the expert-parallel "
                             f"degree ep={self.ep_size}")
        self.num_local_experts = self.num_experts // self.ep_size
        self.expert_offset = self.ep_rank * self.num_local_experts
        self.grouped_mm_backend = merged.grouped_mm_backend
        for name, weight in full.items():
            local = weight.detach().narrow(spec.EXPERT_DIM, self.expert_offset, self.num_local_experts)
            local = torch.empty_like(local) if weight.device.type == "meta" else local.clone()
            self.register_parameter(name, nn.Parameter(local, requires_grad=weight.requires_grad))

    def extra_repr(self):
        return (f"num_experts={self.num_experts}, ep_size={self.ep_size}, ep_rank={self.ep_rank}, "
                f"local experts [{self.expert_offset}, {self.expert_offset + self.num_local_experts})")

    def forward(self, x_TD, topk_idx_TK, topk_weight_TK):
        """sum_k w_tk * down_e(silu(gate_e x_t) * up_e x_t), e = topk_idx_TK[t, k], for this rank's
        tokens, with every expert computed on the rank that owns it. All ranks of the EP group must
        call it together (each with its own tokens, any number of them)."""
        ep, local_experts = self.ep_size, self.num_local_experts
        top_k = topk_idx_TK.shape[-1]

        # 1. Sort this rank's slots by global expert. Experts are laid out rank by rank, so the
        #    sorted rows are also grouped by destination rank (expert e lives on e // (E/ep)), and
        #    within each destination by its local expert: exactly the order the all-to-all wants.
        sorted_slots_N, sorted_tokens_N, slot_position_N, _ = kernels.sort_slots(topk_idx_TK)
        x_sorted_ND = kernels.permute(x_TD, sorted_tokens_N, slot_position_N, top_k)
        weight_sorted_N = topk_weight_TK.reshape(-1).index_select(0, sorted_slots_N)
        send_counts_PL = kernels.tokens_per_expert(topk_idx_TK, self.num_experts).view(ep, local_experts)

        # 2. Tell each rank how many rows it gets from us for each of its local experts; we receive
        #    recv_counts_PL[p, l] = rows from source rank p for our local expert l.
        recv_counts_PL = torch.empty_like(send_counts_PL)
        dist.all_to_all_single(recv_counts_PL, send_counts_PL, group=self.ep_group)
        # The all-to-all of rows needs its split sizes on the host. This is the one synchronisation
        # expert parallelism cannot avoid: how many rows go where depends on the router's output.
        # Both directions' sizes are fetched with a single device-to-host copy.
        splits = torch.cat([send_counts_PL.sum(dim=1), recv_counts_PL.sum(dim=1)]).tolist()
        send_splits, recv_splits = splits[:ep], splits[ep:]
        num_received = sum(recv_splits)

        # 3. Send the rows and their routing weights. The weights are applied on the receiving side,
        #    inside the same float32 SwiGLU kernel as the single-device path (so results match it
        #    closely); sending them costs one number per row.
        x_recv_RD = all_to_all_single_autograd(x_sorted_ND, recv_splits, send_splits, self.ep_group)
        weight_recv_R = all_to_all_single_autograd(weight_sorted_N, recv_splits, send_splits, self.ep_group)

        # 4. Rows arrive grouped by source rank, then by local expert within each source. Regroup
        #    them by local expert with the same stable sort as step 1 (one "choice" per row, K=1),
        #    which keeps the source-rank order within an expert.
        local_expert_of_row_R = torch.repeat_interleave(
            torch.arange(local_experts, device=x_TD.device).repeat(ep), recv_counts_PL.reshape(-1),
            output_size=num_received)
        group_slots_R, group_rows_R, group_position_R, group_experts_R = kernels.sort_slots(
            local_expert_of_row_R.unsqueeze(-1))
        x_grouped_RD = kernels.permute(x_recv_RD, group_rows_R, group_position_R, 1)
        weight_grouped_R1 = weight_recv_R.index_select(0, group_slots_R).unsqueeze(-1)
        offsets_L = kernels.group_end_offsets(group_experts_R, local_experts)
        y_grouped_RD = spec.routed_experts_grouped(spec.expert_weights(self), x_grouped_RD, weight_grouped_R1,
                                                   offsets_L, self.grouped_mm_backend, spec.expert_lora(self))
        # Back to arrival order (K=1: a plain gather, no sum).
        y_recv_RD = kernels.unpermute(y_grouped_RD, group_rows_R, group_position_R, 1)

        # 5. Return the rows to their sources (the splits swap roles) and combine each token's K
        #    already-weighted slots, summed in float32, in x's dtype.
        y_sorted_ND = all_to_all_single_autograd(y_recv_RD, send_splits, recv_splits, self.ep_group)
        return kernels.unpermute(y_sorted_ND, sorted_tokens_N, slot_position_N, top_k).to(x_TD.dtype)
