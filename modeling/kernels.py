"""Token dispatch for the merged-expert MoE: permute -> grouped GEMM -> unpermute.

Every (token, choice) pair is a "slot"; T tokens with top-K routing make N = T*K slots. Slots are
sorted by expert so that each expert's rows are contiguous, one grouped GEMM per projection computes
all experts at once, and the results are put back in slot order and combined with the routing
weights.

Nothing here reads a tensor's values on the host: sizes and offsets stay on the device, so a step
never waits for the GPU (no `.item()`, no `nonzero`, no boolean-mask indexing, no `bincount`, whose
output size depends on the data).
"""

import warnings

import torch
import torch.nn.functional as F

from .modeling_deepseek import AttentionMask, attention_allowed, eager_attention

try:  # optional accelerator
    from flash_attn import flash_attn_func
except Exception:  # noqa: BLE001
    flash_attn_func = None

try:  # its variable-length form (packed documents), in flash-attn 2
    from flash_attn import flash_attn_varlen_func
except Exception:  # noqa: BLE001
    flash_attn_varlen_func = None

try:  # optional CUDA kernel package (https://github.com/fanshiqing/grouped_gemm)
    import grouped_gemm as _grouped_gemm_pkg
except Exception:  # noqa: BLE001 - any import failure means "not available"
    _grouped_gemm_pkg = None

GROUPED_MM_BACKENDS = ("torch", "grouped_gemm")


_FUSED_KERNELS = {"enabled": True}


def set_fused_kernels(enabled):
    """Turns the torch.compile-fused kernels on CUDA on or off (off: plain eager operators)."""
    _FUSED_KERNELS["enabled"] = bool(enabled)


def _is_compile_failure(error):
    """An error of torch.compile itself (dynamo, inductor, shape guards), not of the computation."""
    module = type(error).__module__
    return module.startswith(("torch._dynamo", "torch._inductor", "torch.fx")) or "dynamo" in str(error).lower()


STATIC_SHAPES = 4  # distinct shapes compiled with static sizes before switching to a symbolic row count


def compiled_on_cuda(fn):
    """fn itself on the CPU and the meta device; on CUDA, one fused kernel made by torch.compile.

    Used for the memory-bound elementwise and gather-reduce work between the grouped GEMMs, where
    eager PyTorch would make one pass over [T*K, ...] tensors per operator.

    Static shapes: the row widths (2F, D) are then known multiples of 16 bytes and the kernels
    vectorise (with every size dynamic they ran 3-5x slower). A plan without expert parallelism has
    one row count per micro-batch shape, so this compiles once or twice. Under expert parallelism
    the rows a rank receives change every step: after STATIC_SHAPES distinct shapes, calls go to a
    second compilation whose row count (dim 0 of every argument) is symbolic and whose widths stay
    static, so it compiles once more and never again."""
    static_compiled, dynamic_compiled, static_shapes = None, None, set()

    def dynamic_rows(*args):  # a code object of its own: its compilations never mix with the static ones
        return fn(*args)

    def call(*args):
        nonlocal static_compiled, dynamic_compiled
        # Inside a torch.compile'd region (a compiled decoder layer) the outer compile fuses fn with
        # its neighbours itself: trace the plain function.
        if torch.compiler.is_compiling() or not (args[0].is_cuda and _FUSED_KERNELS["enabled"]):
            return fn(*args)
        shapes = tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))
        if shapes in static_shapes or len(static_shapes) < STATIC_SHAPES:
            if static_compiled is None:
                torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
                static_compiled = torch.compile(fn, dynamic=False, fullgraph=True)
            static_shapes.add(shapes)
            return static_compiled(*args)
        if any(isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] < 2 for a in args):
            return fn(*args)  # sizes 0 and 1 cannot be symbolic (and cost nothing in eager mode)
        if dynamic_compiled is False:
            return fn(*args)
        if dynamic_compiled is None:
            dynamic_compiled = torch.compile(dynamic_rows, fullgraph=True)
        for a in args:
            if isinstance(a, torch.Tensor) and a.dim() > 0:
                torch._dynamo.maybe_mark_dynamic(a, 0)
        try:
            return dynamic_compiled(*args)
        except Exception as e:  # noqa: BLE001 - filtered just below
            if not _is_compile_failure(e):
                raise
            # A compiler that cannot keep the row count symbolic here would recompile for every
            # step's shape; the eager operators are slower but never recompile.
            warnings.warn(f"{fn.__name__}: no symbolic-row-count kernel ({type(e).__name__}); using eager "
                          "operators for changing shapes", stacklevel=2)
            dynamic_compiled = False
            return fn(*args)

    call.__name__ = call.__qualname__ = fn.__name__
    call.__doc__ = fn.__doc__
    return call


def grouped_gemm_package_available():
    return _grouped_gemm_pkg is not None


def tokens_per_expert(topk_idx_TK, num_experts):
    """Slot count of each expert, int64 [E], computed on the device without a size that depends on data."""
    counts = torch.zeros(num_experts, dtype=torch.int64, device=topk_idx_TK.device)
    return counts.scatter_add_(0, topk_idx_TK.reshape(-1), torch.ones_like(topk_idx_TK.reshape(-1)))


class _DispatchRows(torch.autograd.Function):
    """x_TD -> x_sorted_ND: row j is token sorted_tokens_N[j]. Backward gathers each token's K
    gradient rows (found through the inverse permutation) and sums them, so neither direction
    needs atomic scatter-adds (what index_select's default backward, index_add, would use)."""

    @staticmethod
    def forward(ctx, x_TD, sorted_tokens_N, slot_position_N, top_k):
        ctx.save_for_backward(slot_position_N)
        ctx.top_k = top_k
        return x_TD.index_select(0, sorted_tokens_N)

    @staticmethod
    def backward(ctx, grad_sorted_ND):
        (slot_position_N,) = ctx.saved_tensors
        return _sum_slots(grad_sorted_ND, slot_position_N, ctx.top_k), None, None, None


class _CombineRows(torch.autograd.Function):
    """y_sorted_ND -> y_TD: each token's K slot rows, summed in float32. The backward is the
    dispatch gather."""

    @staticmethod
    def forward(ctx, y_sorted_ND, sorted_tokens_N, slot_position_N, top_k):
        ctx.save_for_backward(sorted_tokens_N)
        return _sum_slots(y_sorted_ND, slot_position_N, top_k)

    @staticmethod
    def backward(ctx, grad_TD):
        (sorted_tokens_N,) = ctx.saved_tensors
        return grad_TD.index_select(0, sorted_tokens_N), None, None, None


@compiled_on_cuda
def _sum_slots(rows_ND, slot_position_N, top_k):
    """Rows in sorted order -> per-token sums [T, D] (float32 accumulation, input dtype out).

    Written as K gathers added element by element (not a reduction over a [T, K, D] view), so the
    fused kernel is a pointwise pass over [T, D] that reads each gathered row contiguously."""
    position_TK = slot_position_N.view(-1, top_k)
    acc_dtype = torch.promote_types(rows_ND.dtype, torch.float32)
    total = rows_ND.index_select(0, position_TK[:, 0]).to(acc_dtype)
    for k in range(1, top_k):
        total = total + rows_ND.index_select(0, position_TK[:, k]).to(acc_dtype)
    return total.to(rows_ND.dtype)


def _swiglu(gate_NF, up_NF, weight_N1):
    """silu(gate) * up * weight, in float32, rounded once to the input dtype."""
    return (F.silu(gate_NF.float()) * up_NF.float() * weight_N1).to(gate_NF.dtype)


@compiled_on_cuda
def _weighted_swiglu_forward(gate_up_N2F, weight_N1):
    return _swiglu(*gate_up_N2F.chunk(2, dim=-1), weight_N1)


@compiled_on_cuda
def _weighted_swiglu_backward(gate_NF, up_NF, weight_N1, grad_h_NF):
    """(gradient of [gate | up] as one [N, 2F] tensor, gradient of the row weights) of
    h = silu(gate) * up * weight, in float32."""
    gate, up = gate_NF.float(), up_NF.float()
    grad_h = grad_h_NF.float()
    sig = torch.sigmoid(gate)
    silu = gate * sig
    grad_act = grad_h * weight_N1  # gradient reaching silu(gate) * up
    grad_gate = grad_act * up * sig * (1 + gate * (1 - sig))
    grad_up = grad_act * silu
    grad_weight = (grad_h * silu * up).sum(dim=-1, keepdim=True)
    grad_gate_up = torch.cat([grad_gate, grad_up], dim=-1).to(gate_NF.dtype)
    return grad_gate_up, grad_weight.to(weight_N1.dtype)


class _WeightedSwiGLU(torch.autograd.Function):
    """h = silu(gate) * up * w for gate_up = [gate | up] ([N, 2F]) and a per-row weight w ([N, 1]).

    One pass each way: the backward writes the [N, 2F] gradient of the fused gate+up GEMM's output
    directly, so the GEMM's input gradient is a single grouped GEMM too."""

    @staticmethod
    def forward(ctx, gate_up_N2F, weight_N1):
        ctx.save_for_backward(gate_up_N2F, weight_N1)
        return _weighted_swiglu_forward(gate_up_N2F, weight_N1)

    @staticmethod
    def backward(ctx, grad_h_NF):
        gate_up_N2F, weight_N1 = ctx.saved_tensors
        return _weighted_swiglu_backward(*gate_up_N2F.chunk(2, dim=-1), weight_N1, grad_h_NF.contiguous())


def weighted_swiglu(gate_up_N2F, weight_N1):
    return _WeightedSwiGLU.apply(gate_up_N2F, weight_N1)


@compiled_on_cuda
def _weighted_swiglu_of_sum_forward(base_N2F, update_N2F, weight_N1):
    """(gate, up, h): the two [N, F] halves of base + update, rounded to the rows' dtype, and the
    weighted SwiGLU of them."""
    F_ = base_N2F.shape[-1] // 2
    gate_NF = base_N2F[:, :F_] + update_N2F[:, :F_]
    up_NF = base_N2F[:, F_:] + update_N2F[:, F_:]
    return gate_NF, up_NF, _swiglu(gate_NF, up_NF, weight_N1)


class _WeightedSwiGLUOfSum(torch.autograd.Function):
    """weighted_swiglu(base + update, w) for two [N, 2F] GEMM outputs (the frozen gate+up projection
    and its LoRA update), without a pass of its own for the sum.

    The sum is what the backward needs, so it is saved. Saved as one [N, 2F] tensor it is made by
    an add over [N, 2F] of its own, which the SwiGLU's [N, F] kernel cannot absorb (an H200 profile
    of the full Coder-V2-Lite LoRA step showed that add as a kernel of 5 ms per step); saved as its
    gate and up halves, it is written by the SwiGLU's own kernel as it computes h, and the sum is
    never read back. Measured on the whole step (bench/RESULTS.md, ninth session) the net change was
    within noise (0.2742 -> 0.2744 s): the larger SwiGLU kernel costs about what the add did. The
    gradient of the sum is that of both GEMM outputs: the same tensor is returned for each."""

    @staticmethod
    def forward(ctx, base_N2F, update_N2F, weight_N1):
        gate_NF, up_NF, h_NF = _weighted_swiglu_of_sum_forward(base_N2F, update_N2F, weight_N1)
        ctx.save_for_backward(gate_NF, up_NF, weight_N1)
        return h_NF

    @staticmethod
    def backward(ctx, grad_h_NF):
        gate_NF, up_NF, weight_N1 = ctx.saved_tensors
        grad_gate_up, grad_weight = _weighted_swiglu_backward(gate_NF, up_NF, weight_N1, grad_h_NF.contiguous())
        return grad_gate_up, grad_gate_up, grad_weight


def weighted_swiglu_of_sum(base_N2F, update_N2F, weight_N1):
    """weighted_swiglu(base_N2F + update_N2F, weight_N1), the sum made inside the SwiGLU's kernel."""
    return _WeightedSwiGLUOfSum.apply(base_N2F, update_N2F, weight_N1)


def sort_slots(topk_idx_TK):
    """Groups the slots by expert. Returns (sorted_slots_N, sorted_tokens_N, slot_position_N,
    sorted_experts_N).

    Position j of the sorted order holds slot sorted_slots_N[j], which belongs to token
    sorted_tokens_N[j] = sorted_slots_N[j] // K and expert sorted_experts_N[j] (int32, ascending:
    `group_end_offsets` turns it into each expert's end row); slot s sits at position
    slot_position_N[s]. A stable sort keeps tokens in order within an expert, which makes the result
    independent of the sort implementation.
    """
    top_k = topk_idx_TK.shape[-1]
    num_slots = topk_idx_TK.numel()
    # int32 keys: the radix sort makes half the passes it would over int64
    sorted_experts_N, sorted_slots_N = torch.sort(topk_idx_TK.reshape(-1).to(torch.int32), stable=True)
    sorted_tokens_N = torch.div(sorted_slots_N, top_k, rounding_mode="floor")
    slot_position_N = torch.empty_like(sorted_slots_N)
    slot_position_N.scatter_(0, sorted_slots_N, torch.arange(num_slots, device=sorted_slots_N.device))
    return sorted_slots_N, sorted_tokens_N, slot_position_N, sorted_experts_N


def group_end_offsets(sorted_experts_N, num_experts):
    """int32 [E]: one past the last sorted row of each expert (the `offs` of torch._grouped_mm)."""
    experts = torch.arange(num_experts, device=sorted_experts_N.device, dtype=sorted_experts_N.dtype)
    return torch.searchsorted(sorted_experts_N, experts, right=True, out_int32=True)


def permute(x_TD, sorted_tokens_N, slot_position_N, top_k):
    """Rows of x, one per slot, grouped by expert: [T*K, D]."""
    return _DispatchRows.apply(x_TD, sorted_tokens_N, slot_position_N, top_k)


def unpermute(y_sorted_ND, sorted_tokens_N, slot_position_N, top_k):
    """Back to tokens: the sum of each token's K (already weighted) slot rows, [T, D]."""
    return _CombineRows.apply(y_sorted_ND, sorted_tokens_N, slot_position_N, top_k)


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


def expert_swiglu(x_TD, topk_idx_TK, topk_weight_TK, gate_up_E2FD, down_EDF, backend="torch"):
    """The routed-expert block: sum_k w_tk * down_e(silu(gate_e x_t) * up_e x_t), e = idx_tk.

    gate_up_E2FD holds each expert's gate and up projections stacked ([E, 2, F, D]), so one grouped
    GEMM computes both. The routing weight scales each slot's activation before the down
    projection (which is linear, so this equals weighting its output) inside the SwiGLU kernel, in
    float32; the K slots of a token are summed in float32. No [T*K, D] float32 tensor is ever
    materialised and no operator waits for the host.
    """
    top_k = topk_idx_TK.shape[-1]
    sorted_slots_N, sorted_tokens_N, slot_position_N, sorted_experts_N = sort_slots(topk_idx_TK)
    x_sorted_ND = permute(x_TD, sorted_tokens_N, slot_position_N, top_k)
    offsets_E = group_end_offsets(sorted_experts_N, gate_up_E2FD.shape[0])
    weight_N1 = topk_weight_TK.reshape(-1).index_select(0, sorted_slots_N).unsqueeze(-1)
    y_sorted_ND = grouped_swiglu(x_sorted_ND, weight_N1, offsets_E, gate_up_E2FD, down_EDF, backend)
    return unpermute(y_sorted_ND, sorted_tokens_N, slot_position_N, top_k)


def grouped_swiglu(x_grouped_ND, weight_N1, group_end_offsets_E, gate_up_E2FD, down_EDF, backend="torch"):
    """Each expert's weighted SwiGLU on its rows, the rows already grouped by expert: [N, D]."""
    E, _, F_, D = gate_up_E2FD.shape
    counts_E = None
    if backend == "grouped_gemm":  # that backend wants per-group sizes
        counts_E = torch.diff(group_end_offsets_E, prepend=group_end_offsets_E.new_zeros(1))
    gate_up_N2F = grouped_mm(x_grouped_ND, gate_up_E2FD.reshape(E, 2 * F_, D), group_end_offsets_E, counts_E, backend)
    h_NF = weighted_swiglu(gate_up_N2F, weight_N1)
    return grouped_mm(h_NF, down_EDF, group_end_offsets_E, counts_E, backend)


# ----------------------------------------------------------------------------------------------
# Attention backends
# ----------------------------------------------------------------------------------------------
# ---- packed documents: regrouped into a batch of documents ---------------------------------------
# A packed row holds several documents and attention must not cross them. An explicit S x S mask would
# do it, but it computes every score of the row and rules out the fast causal kernels (cuDNN, flash;
# on an H200 SDPA's masked path is 5x slower than its causal cuDNN kernel at MLA's head sizes, and all
# S x S scores of a 1024-token row are 4x the work of short documents'). Instead the documents are
# regrouped: each document is copied (gathered) into a window of its own, the windows of one width
# form a batch, the plain causal kernel runs on each batch, and the outputs are gathered back in
# token order. A document of length L sits in a window of the next power of two >= L (at least
# DOCUMENT_MIN_WINDOW), so the work is at most about twice the documents' own and a handful of kernel
# calls cover any mix of lengths (the number of windows of a width is rounded up to a power of two
# with empty ones, so that the kernels see few shapes). Exact, not an approximation: a window's padding comes after its
# document, so causality alone hides it from the document's queries, and the padding queries' outputs
# are dropped (their zero output gradients give the padding keys zero gradient).
DOCUMENT_MIN_WINDOW = 16


class _Gather(torch.autograd.Function):
    """rows_out = rows_in[index], whose backward is a gather too: grad_in = [grad_out; 0][back_index].
    For a regrouping in which every input row is read by exactly one slot whose gradient matters (the
    others' gradients are zero), this is exact and avoids index_select's atomic index_add backward
    (which cost a third of a packed LoRA step on an H200)."""

    @staticmethod
    def forward(ctx, rows_in, index, back_index):
        ctx.save_for_backward(back_index)
        return rows_in.index_select(0, index)

    @staticmethod
    def backward(ctx, grad_out):
        (back_index,) = ctx.saved_tensors
        padded = torch.cat([grad_out, grad_out.new_zeros((1,) + grad_out.shape[1:])])
        return padded.index_select(0, back_index), None, None


def _document_groups(mask, total_tokens, device):
    """The regrouping of a forward's packed documents, built once (one wait for the device, to read the
    document lengths) and kept on the mask so that every layer reuses it:
    (windows [(slot offset, n, W)] per window width W, slot_token [slots]: the token each window slot
    reads (padding slots: their document's first token), token_slot [tokens]: each token's slot,
    slot_source [slots]: a slot's token, or `tokens` (a zero row) for padding)."""
    cached = mask.kernel_cache.get("document_groups")
    if cached is not None:
        return cached
    bounds = mask.document_bounds()
    by_width = {}
    for start, end in zip(bounds[:-1], bounds[1:]):
        width = max(DOCUMENT_MIN_WINDOW, 1 << (end - start - 1).bit_length())
        by_width.setdefault(width, []).append((start, end - start))
    windows, slot_token, slot_source, offset = [], [], [], 0
    for width, docs in sorted(by_width.items()):
        # the window count rounded up to a power of two with empty windows (start 0, length 0): the
        # kernels see few distinct shapes, so cuDNN's per-shape plans are built once, not every step
        docs = docs + [(0, 0)] * ((1 << (len(docs) - 1).bit_length()) - len(docs))
        starts = torch.tensor([s for s, _ in docs]).unsqueeze(1)
        lengths = torch.tensor([n for _, n in docs]).unsqueeze(1)
        offsets = torch.arange(width).unsqueeze(0)
        real = offsets < lengths                                   # [n, W]
        tokens = starts + offsets
        slot_token.append(torch.where(real, tokens, starts).reshape(-1))
        slot_source.append(torch.where(real, tokens, total_tokens).reshape(-1))
        windows.append((offset, len(docs), width))
        offset += len(docs) * width
    slot_token, slot_source = torch.cat(slot_token), torch.cat(slot_source)
    real_slots = torch.nonzero(slot_source < total_tokens).squeeze(1)
    token_slot = torch.empty(total_tokens, dtype=torch.long)
    token_slot[slot_source[real_slots]] = real_slots
    cached = (windows, slot_token.to(device), token_slot.to(device), slot_source.to(device))
    mask.kernel_cache["document_groups"] = cached
    return cached


@torch.compiler.disable  # data-dependent shapes: compiled layers run it eagerly (a graph break)
def attention_by_document(causal, query, key, value, mask, softmax_scale, dropout_p):
    """Block-causal attention of packed documents (`mask.document_ids_BS`, no padding mask) through a
    causal kernel `causal(q, k, v, softmax_scale, dropout_p)` on [n, H, W, d] batches of documents
    (see DOCUMENT_MIN_WINDOW's comment). q/k/v [B, H, S, d] -> [B, H, S, d_v]. Tokens go to window
    slots and back by gathers in both directions (_Gather): the padding slots' gradients are zero
    (their outputs are dropped, and causality hides them from the documents' queries)."""
    B, H, S, _ = query.shape
    windows, slot_token, token_slot, slot_source = _document_groups(mask, B * S, query.device)
    q, k, v = (_Gather.apply(t.transpose(1, 2).reshape(B * S, H, t.shape[-1]), slot_token, token_slot)
               for t in (query, key, value))
    outs = []
    for offset, n, width in windows:
        qd, kd, vd = (t[offset:offset + n * width].view(n, width, H, t.shape[-1]).transpose(1, 2) for t in (q, k, v))
        out = causal(qd, kd, vd, softmax_scale, dropout_p)
        outs.append(out.transpose(1, 2).reshape(n * width, H, out.shape[-1]))
    out = _Gather.apply(torch.cat(outs), token_slot, slot_source)
    return out.view(B, S, H, -1).transpose(1, 2)


# ---- packed documents by FlexAttention (CUDA) ----------------------------------------------------
# FlexAttention runs the block-causal mask inside one fused kernel: a BlockMask, built once per
# forward from the document ids (static shape [B, 1, S/64, S/64]), tells it which 64 x 64 tiles
# are empty (skipped), full (no mask evaluated) or partial (the mask evaluated per score). Nothing
# waits for the host and every shape is static, so compiled layers keep attention in their graph.
# Its backward has no CPU implementation: off CUDA the documents are regrouped (the same result).
try:
    from torch.nn.attention.flex_attention import flex_attention as _flex_attention
except ImportError:  # an older torch
    _flex_attention = None
# Tiles of 64 x 64 for the block mask and the kernel, and backward tiles of 32 / 64 (FlexAttention's
# kernel_options): packed documents of 128 to 512 tokens leave many 128 x 128 tiles partial, whose
# hidden scores are computed and then masked. On an H200 (MLA's 192 / 128 heads, 8 rows of 1024
# tokens, bench/packed_attention.py) forward + backward took 0.857 ms per layer this way against
# 1.337 ms with flex's defaults on 128-token tiles (and 1.302 with the 64-token mask alone); the
# LoRA step of bench/finetune_step.py went from 0.298 s to 0.283 s.
FLEX_BLOCK_SIZE = 64
FLEX_KERNEL_OPTIONS = {"BLOCK_M": 64, "BLOCK_N": 64,
                       "bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 32}
# FlexAttention is only fast compiled: an eager layer calls this compiled function, a compiled layer
# traces through it (torch.compile compiles on the first call, not here)
_COMPILED_FLEX = None if _flex_attention is None else torch.compile(_flex_attention, dynamic=False)


def document_block_mask(document_ids_BS, block_size=FLEX_BLOCK_SIZE):
    """The BlockMask of block-causal attention over packed documents (a query sees the keys of its own
    document up to itself), built from the tiles' document ranges with a few small tensor ops: what
    create_block_mask computes, without evaluating the mask at all B x S x S points (on an H200 that
    took 3.3 ms per forward with the GPU waiting on the host).

    document_ids_BS [B, S]: non-decreasing along each row (modeling_deepseek.document_ids counts
    restarts), so a tile's documents are the range from its first to its last token's. For query tile
    i and key tile j (tiles of `block_size` tokens, the last one cut at S):
      * j > i: empty (causality);
      * j == i: partial (the diagonal tile holds both allowed and hidden scores);
      * j < i: every key precedes every query, so the tile is non-empty iff the key tile's last
        document is the query tile's first, and full iff the key tile's first document is the query
        tile's last and the query tile is whole (create_block_mask pads a cut tile with hidden scores).
    The partial tiles evaluate the mask per score in the kernel (same_document_causal)."""
    from torch.nn.attention.flex_attention import BlockMask
    B, S = document_ids_BS.shape
    device = document_ids_BS.device
    docs = document_ids_BS
    starts = torch.arange(0, S, block_size, device=device)
    ends = torch.clamp(starts + block_size, max=S) - 1
    first, last = docs[:, starts], docs[:, ends]  # [B, T]: each tile's first and last token's document
    tiles = starts.numel()
    q_tile, kv_tile = torch.arange(tiles, device=device).unsqueeze(1), torch.arange(tiles, device=device)
    below = (kv_tile < q_tile).unsqueeze(0)  # [1, T, T]: key tile wholly before the query tile
    whole_q = (starts + block_size <= S).view(1, tiles, 1)
    nonempty = (below & (last.unsqueeze(1) == first.unsqueeze(2))) | (kv_tile == q_tile).unsqueeze(0)
    full = below & whole_q & (first.unsqueeze(1) == last.unsqueeze(2))
    partial = nonempty & ~full

    def ordered(blocks_BTT):
        # as flex's own conversion: per query tile the count, then the tiles in index order, the rest after
        blocks = blocks_BTT.unsqueeze(1).to(torch.int32)  # [B, H = 1, T, T]
        return blocks.sum(-1, dtype=torch.int32), torch.argsort(blocks, dim=-1, descending=True, stable=True).to(torch.int32)

    def same_document_causal(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (docs[b, q_idx] == docs[b, kv_idx])
    kv_num, kv_indices = ordered(partial)
    full_num, full_indices = ordered(full)
    return BlockMask.from_kv_blocks(kv_num, kv_indices, full_num, full_indices, BLOCK_SIZE=(block_size, block_size),
                                    mask_mod=same_document_causal, seq_lengths=(S, S))


def flex_block_mask(mask):
    """The BlockMask of `mask`'s packed documents (document_block_mask), built on the first call of a
    forward and kept on the mask for every layer."""
    cached = mask.kernel_cache.get("flex_block_mask")
    if cached is None:
        cached = document_block_mask(mask.document_ids_BS)
        mask.kernel_cache["flex_block_mask"] = cached
    return cached


def flex_documents(query, key, value, mask, softmax_scale, compiled=True):
    """Block-causal attention of packed documents by FlexAttention: [B, H, S, d_qk] x 2, [B, H, S, d_v]
    -> [B, H, S, d_v]. compiled=False runs flex's unfused reference (forward only off CUDA)."""
    kernel = _COMPILED_FLEX if compiled else _flex_attention
    return kernel(query, key, value, block_mask=flex_block_mask(mask), scale=softmax_scale,
                  kernel_options=FLEX_KERNEL_OPTIONS)


def flex_attention(query, key, value, mask, softmax_scale, dropout_p, training):
    """Packed documents (an AttentionMask with document ids, no padding) on CUDA by FlexAttention
    (flex_documents); whole rows by sdpa's causal kernel; a padding mask, or a CPU, as sdpa_attention
    does them (regrouped documents: the same result, as FlexAttention has no CPU backward)."""
    if not (_documents_only(mask) and query.is_cuda):
        return sdpa_attention(query, key, value, mask, softmax_scale, dropout_p, training)
    if training and dropout_p:
        raise ValueError(f"attention flex takes no attention dropout (the config's attention_dropout is {dropout_p}); "
                         "use --attention sdpa")
    return flex_documents(query, key, value, mask, softmax_scale)


def _prepare_flex(mask):
    """Builds the forward's BlockMask before the layers run (outside any compiled layer)."""
    if _documents_only(mask) and mask.document_ids_BS.is_cuda:
        flex_block_mask(mask)


flex_attention.prepare_mask = _prepare_flex


def _documents_only(mask):
    return isinstance(mask, AttentionMask) and mask.key_padding_BS is None and mask.document_ids_BS is not None


def _sdpa_causal(query, key, value, softmax_scale, dropout_p):
    return F.scaled_dot_product_attention(query, key, value, dropout_p=dropout_p, is_causal=True, scale=softmax_scale)


def sdpa_attention(query, key, value, mask, softmax_scale, dropout_p, training):
    """scaled_dot_product_attention; causal without a mask; packed documents regrouped for the causal
    kernel (attention_by_document); with a padding mask an explicit boolean mask (padded keys, and
    other documents' keys, hidden: modeling_deepseek.attention_allowed), which computes all S x S
    scores: the causal kernels' skipping of the upper triangle is lost."""
    dropout_p = dropout_p if training else 0.0
    if mask is None:
        return _sdpa_causal(query, key, value, softmax_scale, dropout_p)
    if _documents_only(mask):
        return attention_by_document(_sdpa_causal, query, key, value, mask, softmax_scale, dropout_p)
    B, _, S, _ = query.shape
    allowed = attention_allowed(mask, B, S, query.device)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, dropout_p=dropout_p,
                                          scale=softmax_scale)


def flash_attention(query, key, value, mask, softmax_scale, dropout_p, training):
    """flash-attn (bf16/fp16 on CUDA, causal). MLA's value head (128) is narrower than its query/key
    head (192): values are zero-padded to the query width and the result sliced. Packed documents
    (an AttentionMask with document ids and no padding) run flash-attn's varlen kernel, each
    document one causal sequence of the flattened B * S tokens, so no S x S mask is ever built;
    a padding mask, or inputs flash-attn cannot take, go to the masked sdpa path."""
    documents_only = mask is None or (isinstance(mask, AttentionMask) and mask.key_padding_BS is None
                                      and flash_attn_varlen_func is not None)
    if not documents_only or query.dtype not in (torch.float16, torch.bfloat16) or not query.is_cuda:
        return sdpa_attention(query, key, value, mask, softmax_scale, dropout_p, training)
    v_dim = value.shape[-1]
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # flash-attn wants [B, S, H, d]
    if v_dim < q.shape[-1]:
        v = F.pad(v, (0, q.shape[-1] - v_dim))
    dropout_p = dropout_p if training else 0.0
    if mask is None:
        out = flash_attn_func(q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=True)
    else:
        B, S, H, _ = q.shape
        cu_seqlens, max_seqlen = mask.packed_sequences()
        q, k, v = (t.reshape(B * S, H, t.shape[-1]) for t in (q, k, v))  # [total tokens, H, d]
        out = flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p=dropout_p,
                                     softmax_scale=softmax_scale, causal=True).view(B, S, H, -1)
    return out[..., :v_dim].transpose(1, 2)


def _sdpa_forced(backend, pad_value=False):
    """scaled_dot_product_attention restricted to one kernel (causal, no mask). PyTorch's automatic
    choice can be a slower kernel than the best eligible one, and MLA's value head (128) narrower
    than its query/key head (192) rules out its flash kernel; with pad_value the values are
    zero-padded to the query width (the padded output columns are zero and sliced off), which makes
    flash eligible at the price of a wider P.V product. A kernel that cannot run these inputs raises
    (PyTorch's warnings say why): nothing falls back silently to another kernel.

    Packed documents run the forced kernel on the documents regrouped (attention_by_document: exact).
    With a padding mask the math is not changed to fit the kernel: the plain masked sdpa path runs
    instead (PyTorch's choice among the kernels that take an explicit mask)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    kernel = getattr(SDPBackend, backend)

    def causal(query, key, value, softmax_scale, dropout_p):
        v_dim = value.shape[-1]
        if pad_value and v_dim < query.shape[-1]:
            value = F.pad(value, (0, query.shape[-1] - v_dim))
        with sdpa_kernel([kernel]):
            out = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout_p, is_causal=True,
                                                 scale=softmax_scale)
        return out[..., :v_dim] if out.shape[-1] != v_dim else out

    def attention(query, key, value, mask, softmax_scale, dropout_p, training):
        dropout_p = dropout_p if training else 0.0
        if mask is None:
            return causal(query, key, value, softmax_scale, dropout_p)
        if _documents_only(mask):
            return attention_by_document(causal, query, key, value, mask, softmax_scale, dropout_p)
        return sdpa_attention(query, key, value, mask, softmax_scale, dropout_p, training)

    attention.__name__ = f"sdpa_{backend.lower()}" + ("_padded" if pad_value else "")
    return attention


sdpa_flash_padded_attention = _sdpa_forced("FLASH_ATTENTION", pad_value=True)
sdpa_efficient_attention = _sdpa_forced("EFFICIENT_ATTENTION")
sdpa_cudnn_attention = _sdpa_forced("CUDNN_ATTENTION")

# name -> kernel; "sdpa" lets PyTorch choose among the kernels eligible for the inputs, the
# sdpa_* ones force one (efficient and cudnn need CUDA; flash_padded runs on CPUs too).
ATTENTION_BACKENDS = {"eager": eager_attention, "sdpa": sdpa_attention, "flash": flash_attention,
                      "sdpa_flash_padded": sdpa_flash_padded_attention,
                      "sdpa_efficient": sdpa_efficient_attention, "sdpa_cudnn": sdpa_cudnn_attention}
if _flex_attention is not None:
    ATTENTION_BACKENDS["flex"] = flex_attention


def default_attention_backend():
    return "flash" if flash_attn_func is not None else "sdpa"


# ----------------------------------------------------------------------------------------------
# LoRA adapters of the routed experts (modeling/lora.py), by grouped GEMM
# ----------------------------------------------------------------------------------------------
# torch._grouped_mm wants every row stride a multiple of 16 bytes (its CUDA kernel, and the meta
# kernel the compiler traces with): in bf16 a rank that is a multiple of 8.
LORA_RANK_ALIGN = 8


def _pad_rank(r, a_gate_up_E2RD, b_gate_up_E2FR, a_down_ERF, b_down_EDR):
    """The stacked adapters with their rank dim zero-padded from r to a multiple of LORA_RANK_ALIGN."""
    pad = -r % LORA_RANK_ALIGN
    return (F.pad(a_gate_up_E2RD, (0, 0, 0, pad)), F.pad(b_gate_up_E2FR, (0, pad)),
            F.pad(a_down_ERF, (0, 0, 0, pad)), F.pad(b_down_EDR, (0, pad)))


def _lora_rows(x_ND, dropout_p):
    """The adapters' input: x, or x with dropout (training with a LoRA dropout)."""
    return F.dropout(x_ND, p=dropout_p, training=True) if dropout_p > 0 else x_ND


def grouped_swiglu_lora(x_grouped_ND, weight_N1, group_end_offsets_E, gate_up_E2FD, down_EDF,
                        lora_A_gate_up_E2RD, lora_B_gate_up_E2FR, lora_A_down_ERF, lora_B_down_EDR,
                        scaling, dropout_p=0.0, backend="torch"):
    """grouped_swiglu with each expert's LoRA updates, rows already grouped by expert: [N, D].

    gate_up = x W_gu^T + [x A_g^T (s B_g)^T | x A_u^T (s B_u)^T] (s = scaling; expert e's gate_proj and up_proj
    adapters are [e, 0] and [e, 1] of the stacked A and B), then the weighted SwiGLU h, then
    y = h W_d^T + (h A_d^T) (s B_d)^T. Every product is one grouped GEMM over all experts with
    the base's group offsets (4 small ones beside the base's 2: A of gate and up together, B of both
    over a block-diagonal, A and B of down); the adapters are cast to the rows' dtype, so fp32
    adapters train over a bf16 base. The routing weight scales h before the down projection (inside
    the SwiGLU kernel, as in the base path), which weights the down adapter's output the same way:
    the projection is linear."""
    E, _, F_, D = gate_up_E2FD.shape
    r = lora_A_gate_up_E2RD.shape[2]
    if r % LORA_RANK_ALIGN:
        # zero rows of A and columns of B up to an aligned rank: the same sums, exactly
        lora_A_gate_up_E2RD, lora_B_gate_up_E2FR, lora_A_down_ERF, lora_B_down_EDR = _pad_rank(
            r, lora_A_gate_up_E2RD, lora_B_gate_up_E2FR, lora_A_down_ERF, lora_B_down_EDR)
        r = lora_A_gate_up_E2RD.shape[2]
    dtype = x_grouped_ND.dtype
    counts_E = None
    if backend == "grouped_gemm":
        counts_E = torch.diff(group_end_offsets_E, prepend=group_end_offsets_E.new_zeros(1))

    def mm(rows, w):
        return grouped_mm(rows, w.to(dtype), group_end_offsets_E, counts_E, backend)

    # the scaling is folded into the B's (tiny [E, F, r] / [E, D, r] products): each update then
    # adds as it is, and its gradient is the base output's own gradient, with no [N, F] or [N, D]
    # scaled copy of it in the backward
    lora_B_gate_up_E2FR, lora_B_down_EDR = lora_B_gate_up_E2FR * scaling, lora_B_down_EDR * scaling
    gate_up_N2F = mm(x_grouped_ND, gate_up_E2FD.reshape(E, 2 * F_, D))
    # both A's in one GEMM: [N, 2r] = [x A_gate^T | x A_up^T]
    xa_N2R = mm(_lora_rows(x_grouped_ND, dropout_p), lora_A_gate_up_E2RD.reshape(E, 2 * r, D))
    # both B's in one GEMM too, over the block-diagonal [[B_gate, 0], [0, B_up]] [E, 2F, 2r]: it
    # multiplies zero blocks (twice the B's FLOPs, which are tiny), but GEMMs this thin are bound by
    # their launches and their [N, 2F] output, not their FLOPs: one GEMM with a contiguous output and
    # gradient instead of two on strided halves of the base output (whose in-place adds and, in the
    # backward, copies of each half's gradient cost more than the zeros)
    zeros_EFR = lora_B_gate_up_E2FR.new_zeros(E, F_, r)
    b_E2F2R = torch.cat([torch.cat([lora_B_gate_up_E2FR[:, 0], zeros_EFR], -1),
                         torch.cat([zeros_EFR, lora_B_gate_up_E2FR[:, 1]], -1)], 1)
    h_NF = weighted_swiglu_of_sum(gate_up_N2F, mm(xa_N2R, b_E2F2R), weight_N1)
    update_down_ND = mm(mm(_lora_rows(h_NF, dropout_p), lora_A_down_ERF), lora_B_down_EDR)
    return mm(h_NF, down_EDF).add(update_down_ND)


def expert_swiglu_lora(x_TD, topk_idx_TK, topk_weight_TK, gate_up_E2FD, down_EDF, lora_A_gate_up_E2RD,
                       lora_B_gate_up_E2FR, lora_A_down_ERF, lora_B_down_EDR, scaling, dropout_p=0.0,
                       backend="torch"):
    """expert_swiglu with the experts' LoRA updates (grouped_swiglu_lora): the same permute, grouping
    and unpermute around the grouped GEMMs."""
    top_k = topk_idx_TK.shape[-1]
    sorted_slots_N, sorted_tokens_N, slot_position_N, sorted_experts_N = sort_slots(topk_idx_TK)
    x_sorted_ND = permute(x_TD, sorted_tokens_N, slot_position_N, top_k)
    offsets_E = group_end_offsets(sorted_experts_N, gate_up_E2FD.shape[0])
    weight_N1 = topk_weight_TK.reshape(-1).index_select(0, sorted_slots_N).unsqueeze(-1)
    y_sorted_ND = grouped_swiglu_lora(x_sorted_ND, weight_N1, offsets_E, gate_up_E2FD, down_EDF, lora_A_gate_up_E2RD,
                                      lora_B_gate_up_E2FR, lora_A_down_ERF, lora_B_down_EDR, scaling, dropout_p,
                                      backend)
    return unpermute(y_sorted_ND, sorted_tokens_N, slot_position_N, top_k)
