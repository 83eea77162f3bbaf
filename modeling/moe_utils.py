"""Token dispatch for the merged-expert MoE: permute -> grouped GEMM -> unpermute.

Every (token, choice) pair is a "slot"; T tokens with top-K routing make N = T*K slots. Slots are
sorted by expert so that each expert's rows are contiguous, one grouped GEMM per projection computes
all experts at once, and the results are put back in slot order and combined with the routing
weights.

Nothing here reads a tensor's values on the host: sizes and offsets stay on the device, so a step
never waits for the GPU (no `.item()`, no `nonzero`, no boolean-mask indexing, no `bincount`, whose
output size depends on the data).
"""

import torch
import torch.nn.functional as F

try:  # optional CUDA kernel package (https://github.com/fanshiqing/grouped_gemm)
    import grouped_gemm as _grouped_gemm_pkg
except Exception:  # noqa: BLE001 - any import failure means "not available"
    _grouped_gemm_pkg = None

GROUPED_MM_BACKENDS = ("torch", "grouped_gemm")


def grouped_gemm_package_available():
    return _grouped_gemm_pkg is not None


def tokens_per_expert(topk_idx_TK, num_experts):
    """Slot count of each expert, int64 [E], computed on the device without a size that depends on data."""
    counts = torch.zeros(num_experts, dtype=torch.int64, device=topk_idx_TK.device)
    return counts.scatter_add_(0, topk_idx_TK.reshape(-1), torch.ones_like(topk_idx_TK.reshape(-1)))


def permute(x_TD, topk_idx_TK):
    """Rows of x, one per slot, grouped by expert.

    Returns x_sorted_ND and sorted_slots_N: position j of the sorted order holds slot
    sorted_slots_N[j], i.e. token sorted_slots_N[j] // K. A stable sort keeps tokens in order within
    an expert, which makes the result independent of the sort implementation.
    """
    K = topk_idx_TK.shape[-1]
    sorted_slots_N = torch.argsort(topk_idx_TK.reshape(-1), stable=True)
    return x_TD.index_select(0, sorted_slots_N // K), sorted_slots_N


def unpermute(y_sorted_ND, sorted_slots_N, topk_weight_TK, out_dtype):
    """Back to slot order, weight each slot, sum a token's K slots: [T, D] in out_dtype.

    The weighted sum runs in the routing weights' float32, as the reference does.
    """
    T, K = topk_weight_TK.shape
    # inverse permutation: slot s sits at position slot_position[s] of the sorted order
    slot_position_N = torch.empty_like(sorted_slots_N)
    slot_position_N.scatter_(0, sorted_slots_N, torch.arange(sorted_slots_N.numel(), device=sorted_slots_N.device))
    y_slots_TKD = y_sorted_ND.index_select(0, slot_position_N).view(T, K, -1)
    return (y_slots_TKD * topk_weight_TK.unsqueeze(-1)).sum(dim=1).to(out_dtype)


def grouped_mm(x_ND, w_EOI, group_end_offsets_E, counts_E=None, backend="torch"):
    """y[rows of group e] = x[rows of group e] @ w[e].T for each expert e; w is [E, out, in] (HF layout).

    group_end_offsets_E: int32 cumulative row counts (the `offs` of torch._grouped_mm).
    backend "torch" uses torch._grouped_mm (CUTLASS on Hopper, a C++ fallback elsewhere);
    "grouped_gemm" uses the optional package, which takes per-group sizes on the host and therefore
    costs one device-to-host copy per call.
    """
    if backend == "grouped_gemm":
        if _grouped_gemm_pkg is None:
            raise RuntimeError("grouped_mm backend 'grouped_gemm' requested but the package is not installed")
        return _grouped_gemm_pkg.ops.gmm(x_ND, w_EOI, counts_E.cpu(), trans_b=True)
    if x_ND.device.type == "meta" and x_ND.dtype != torch.bfloat16:
        # torch's meta kernel only accepts bf16 (the CUDA kernel's dtype); shapes are all we need here.
        y = torch._grouped_mm(x_ND.to(torch.bfloat16), w_EOI.to(torch.bfloat16).transpose(-2, -1),
                              offs=group_end_offsets_E)
        return y.to(x_ND.dtype)
    return torch._grouped_mm(x_ND, w_EOI.transpose(-2, -1), offs=group_end_offsets_E)


def expert_swiglu(x_TD, topk_idx_TK, topk_weight_TK, gate_EFD, up_EFD, down_EDF, backend="torch"):
    """The routed-expert block: sum_k w_tk * down_e(silu(gate_e x_t) * up_e x_t), e = idx_tk."""
    num_experts = gate_EFD.shape[0]
    x_sorted_ND, sorted_slots_N = permute(x_TD, topk_idx_TK)
    counts_E = tokens_per_expert(topk_idx_TK, num_experts)
    offsets_E = torch.cumsum(counts_E, 0).to(torch.int32)
    h_NF = F.silu(grouped_mm(x_sorted_ND, gate_EFD, offsets_E, counts_E, backend)) * \
        grouped_mm(x_sorted_ND, up_EFD, offsets_E, counts_E, backend)
    y_sorted_ND = grouped_mm(h_NF, down_EDF, offsets_E, counts_E, backend)
    return unpermute(y_sorted_ND, sorted_slots_N, topk_weight_TK, x_TD.dtype)
