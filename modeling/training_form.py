"""The training form of the DeepSeek models.

`apply_training_form(model)` rewrites a reference `DeepseekV2ForCausalLM` / `DeepseekForCausalLM`
(built on the meta device or loaded from a checkpoint) in place:

* the router (scores, top-k choice, weights, balance loss) becomes one registered custom op,
  `deepseek::moe_route`, with a fake implementation (so it traces on the meta device), its own
  autograd, and an annotation in the compiler's registry saying how it may be partitioned;
* each MoE layer's experts are merged into stacked parameters (`gate_up_proj_E2FD`: gate and up
  of every expert, `down_proj_EDF`) computed by permute -> grouped GEMM -> unpermute
  (`kernels.py`); with LoRA (`modeling/lora.py`) they also hold stacked per-expert adapters
  (`EXPERT_LORA_PARAMETERS`), applied by grouped GEMMs over the same grouping;
* attention runs through `scaled_dot_product_attention` (PyTorch's choice of kernel, or one kernel
  forced: `ATTENTION_BACKENDS`), or flash-attn when it is installed.

`compile_layers(layers, scope)` optionally compiles the decoder layers (or only their RMSNorm and
rotary embedding) with `torch.compile`, for speed on GPUs.

Outputs equal the reference's to float tolerance, forward and backward. The names of the merged
experts and their Hugging Face counterparts are mapped in `hf_adapter.py`, the one place that
knows them.
"""

from dataclasses import dataclass

import torch
from torch import nn

from compiler.annotations import annotate

from . import hf_adapter, kernels
from .kernels import ATTENTION_BACKENDS, default_attention_backend, flash_attn_func
from .modeling_deepseek import (
    DeepseekAttention,
    DeepseekMoE,
    DeepseekRMSNorm,
    DeepseekV2Attention,
    apply_rotary_pos_emb,
    gate_scores,
    load_balance_loss,
    rms_norm,
    scale_topk_weights,
    select_topk_experts,
)


# ----------------------------------------------------------------------------------------------
# The router as one custom op
# ----------------------------------------------------------------------------------------------
# Batch n and sequence l of the hidden states in, one row per token out. Only n may be split:
# with seq_aux the balance loss needs whole sequences, the hidden dim is contracted in full, and
# the experts (e) and choices (k) of a token are decided together. The balance loss is a scalar;
# split along n, each part is the loss of its own sequences (averaged like the training loss).
ROUTER_ANNOTATION = "n l^ h^, e^ h^, ?, ?, ?, ?, ?, ?, ?, ?, ? -> (n l^) k^, (n l^) k^, 1"


class _Float32Logits(torch.autograd.Function):
    """x W^T in float32 for bf16 / fp16 x and W on CUDA: one GEMM in their own dtype with float32
    accumulation and output. The products of such values are exact in float32, so this computes what
    F.linear(x.float(), W.float()) does (the public code's float32 gate) up to the order of the sum,
    on the tensor cores instead of float32 CUDA cores (several times faster at the router's shape).
    The backward is the float32 one, as the reference's."""

    @staticmethod
    def forward(ctx, x_TD, weight_ED):
        ctx.save_for_backward(x_TD, weight_ED)
        return torch.mm(x_TD, weight_ED.t(), out_dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad_TE):
        x_TD, weight_ED = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_TE @ weight_ED.float()).to(x_TD.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (grad_TE.t() @ x_TD.float()).to(weight_ED.dtype)
        return grad_x, grad_w


def router_scores(x_TD, weight_ED, scores_in_float32):
    """modeling_deepseek.gate_scores, with the float32 gate's GEMM on the tensor cores where the
    inputs are half-precision CUDA tensors (_Float32Logits)."""
    half = (torch.bfloat16, torch.float16)
    if scores_in_float32 and x_TD.is_cuda and x_TD.dtype in half and weight_ED.dtype == x_TD.dtype:
        return _Float32Logits.apply(x_TD, weight_ED).softmax(dim=-1, dtype=torch.float32)
    return gate_scores(x_TD, weight_ED, scores_in_float32)


def _routing_weights_and_aux(scores_TE, topk_idx_TK, batch_size, norm_topk_prob, routed_scaling_factor,
                             aux_loss_alpha, seq_aux):
    """The differentiable part of routing from the scores, for a fixed choice of experts."""
    weights_TK = scale_topk_weights(scores_TE.gather(1, topk_idx_TK), norm_topk_prob, routed_scaling_factor)
    if aux_loss_alpha > 0:
        aux = load_balance_loss(scores_TE, topk_idx_TK, batch_size, aux_loss_alpha, seq_aux)
    else:
        aux = scores_TE.new_zeros((), dtype=torch.promote_types(scores_TE.dtype, torch.float32))
    return weights_TK, aux


@annotate(ROUTER_ANNOTATION)
@torch.library.custom_op("deepseek::moe_route", mutates_args=())
def moe_route(hidden_BSD: torch.Tensor, gate_weight_ED: torch.Tensor, top_k: int, topk_method: str,
              n_group: int, topk_group: int, norm_topk_prob: bool, routed_scaling_factor: float,
              aux_loss_alpha: float, seq_aux: bool, scores_in_float32: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns topk_idx [T, K] int64, topk_weight [T, K] (float32 when scores_in_float32, else the
    input dtype) and the balance loss [] float32 (zero when aux_loss_alpha is 0, which the caller
    passes outside training)."""
    with torch.no_grad():
        B, S, D = hidden_BSD.shape
        scores_TE = router_scores(hidden_BSD.reshape(-1, D), gate_weight_ED, scores_in_float32)
        _, topk_idx_TK = select_topk_experts(scores_TE, top_k, topk_method, n_group, topk_group)
        weights_TK, aux = _routing_weights_and_aux(scores_TE, topk_idx_TK, B, norm_topk_prob, routed_scaling_factor,
                                                   aux_loss_alpha, seq_aux)
    return topk_idx_TK, weights_TK, aux


@moe_route.register_fake
def _moe_route_fake(hidden_BSD, gate_weight_ED, top_k, topk_method, n_group, topk_group, norm_topk_prob,
                    routed_scaling_factor, aux_loss_alpha, seq_aux, scores_in_float32):
    T = hidden_BSD.shape[0] * hidden_BSD.shape[1]
    scores_dtype = torch.float32 if scores_in_float32 else hidden_BSD.dtype
    return (hidden_BSD.new_empty((T, top_k), dtype=torch.int64),
            hidden_BSD.new_empty((T, top_k), dtype=scores_dtype),
            hidden_BSD.new_empty((), dtype=torch.promote_types(scores_dtype, torch.float32)))


def _moe_route_setup_context(ctx, inputs, output):
    hidden_BSD, gate_weight_ED, *_ = inputs
    ctx.save_for_backward(hidden_BSD, gate_weight_ED, output[0])
    ctx.mark_non_differentiable(output[0])  # expert indices
    # norm_topk_prob, routed_scaling_factor, aux_loss_alpha, seq_aux, scores_in_float32
    ctx.routing = tuple(inputs[6:])


def _moe_route_backward(ctx, grad_idx, grad_weights_TK, grad_aux):
    # Recompute the small gate GEMM and softmax instead of saving the [T, E] scores: the gate is
    # cheap next to the experts, and the choice of experts (saved) has no gradient.
    hidden_BSD, gate_weight_ED, topk_idx_TK = ctx.saved_tensors
    with torch.enable_grad():
        x = hidden_BSD.detach().requires_grad_(ctx.needs_input_grad[0])
        w = gate_weight_ED.detach().requires_grad_(ctx.needs_input_grad[1])
        norm_topk_prob, routed_scaling_factor, aux_loss_alpha, seq_aux, scores_in_float32 = ctx.routing
        B, S, D = x.shape
        scores_TE = router_scores(x.reshape(-1, D), w, scores_in_float32)
        weights_TK, aux = _routing_weights_and_aux(scores_TE, topk_idx_TK, B, norm_topk_prob, routed_scaling_factor,
                                                   aux_loss_alpha, seq_aux)
        outputs, grads = [], []
        if grad_weights_TK is not None:
            outputs.append(weights_TK), grads.append(grad_weights_TK)
        if grad_aux is not None and aux.requires_grad:
            outputs.append(aux), grads.append(grad_aux)
        inputs = [t for t in (x, w) if t.requires_grad]
        if not outputs or not inputs:
            return (None,) * 11
        got = iter(torch.autograd.grad(outputs, inputs, grads, allow_unused=True))
    grad_x = next(got) if x.requires_grad else None
    grad_w = next(got) if w.requires_grad else None
    return (grad_x, grad_w) + (None,) * 9


moe_route.register_autograd(_moe_route_backward, setup_context=_moe_route_setup_context)


class RouterGate(nn.Module):
    """Holds the gate weight under its checkpoint name (`mlp.gate.weight`) and calls the router op."""

    def __init__(self, gate):
        super().__init__()
        self.weight = gate.weight
        self.top_k = gate.top_k
        self.topk_method = gate.topk_method
        self.n_group = gate.n_group or 1
        self.topk_group = gate.topk_group or 1
        self.norm_topk_prob = gate.norm_topk_prob
        self.routed_scaling_factor = float(gate.routed_scaling_factor)
        self.alpha = float(gate.alpha)
        self.seq_aux = gate.seq_aux
        self.scores_in_float32 = gate.scores_in_float32

    def forward(self, hidden_BSD):
        alpha = self.alpha if self.training else 0.0
        topk_idx, topk_weight, aux = torch.ops.deepseek.moe_route(
            hidden_BSD, self.weight, self.top_k, self.topk_method, self.n_group, self.topk_group,
            self.norm_topk_prob, self.routed_scaling_factor, alpha, self.seq_aux, self.scores_in_float32)
        return topk_idx, topk_weight, (aux if alpha > 0 else None)


# ----------------------------------------------------------------------------------------------
# Merged experts
# ----------------------------------------------------------------------------------------------
class MergedExperts(nn.Module):
    """All routed experts of a layer as two stacked tensors, in the HF [out, in] orientation:
    gate_up_proj_E2FD[e, 0] is expert e's gate_proj.weight, [e, 1] its up_proj.weight, and
    down_proj_EDF[e] its down_proj.weight. Keeping gate and up on their own axis (rather than
    concatenated along F) lets a tensor-parallel plan split F with a plain shard of dim 2."""


    def __init__(self, num_experts, hidden_size, intermediate_size, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.num_experts = num_experts
        self.gate_up_proj_E2FD = nn.Parameter(torch.empty(num_experts, 2, intermediate_size, hidden_size, **kw))
        self.down_proj_EDF = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size, **kw))
        self.grouped_mm_backend = "torch"
        self.lora = None  # ExpertAdapters once modeling/lora.py has added the stacked adapters

    @classmethod
    def from_experts(cls, experts):
        """Stacks a ModuleList of DeepseekMLP (meta or real) into one MergedExperts, with the
        layout hf_adapter defines."""
        first = experts[0]
        merged = cls(len(experts), first.hidden_size, first.intermediate_size,
                     device=first.gate_proj.weight.device, dtype=first.gate_proj.weight.dtype)
        if first.gate_proj.weight.device.type != "meta":
            per_expert = {f"layer.mlp.experts.{i}.{name}": t for i, e in enumerate(experts)
                          for name, t in e.state_dict().items()}
            stacked = hf_adapter.from_hf(per_expert, len(experts))
            with torch.no_grad():
                for name, param in merged.named_parameters():
                    param.copy_(stacked[f"layer.mlp.experts.{name}"])
        return merged

    def forward(self, x_TD, topk_idx_TK, topk_weight_TK):
        return routed_experts(expert_weights(self), x_TD, topk_idx_TK, topk_weight_TK, self.grouped_mm_backend,
                              expert_lora(self))


# The stacked expert parameters, in the order the expert kernels take them. A runtime that splits
# the experts (over experts or over their intermediate dim) keeps these names and calls the two
# functions below with its own pieces, so checkpoints and optimizer state keep one naming.
EXPERT_PARAMETERS = ("gate_up_proj_E2FD", "down_proj_EDF")
# The stacked LoRA adapters of the experts (modeling/lora.py adds them), in the order the kernels
# take them after EXPERT_PARAMETERS: gate+up A [E, 2, r, D] and B [E, 2, F, r], down A [E, r, F] and
# B [E, D, r]. Every one holds the experts along dim 0, like the base.
EXPERT_LORA_PARAMETERS = ("lora_A_gate_up_E2RD", "lora_B_gate_up_E2FR", "lora_A_down_ERF", "lora_B_down_EDR")


@dataclass(frozen=True)
class ExpertAdapters:
    """How a stacked-experts module applies its LoRA adapters: y += scaling * B (A drop(x)), with
    dropout of probability `dropout` in training mode."""

    scaling: float
    dropout: float


def expert_parameter_names(module):
    """The stacked tensors a stacked-experts module holds: EXPERT_PARAMETERS, then the adapters'
    (EXPERT_LORA_PARAMETERS) when it has them."""
    return EXPERT_PARAMETERS + (EXPERT_LORA_PARAMETERS if getattr(module, "lora", None) is not None else ())


def expert_weights(module):
    """The stacked expert tensors of a module holding EXPERT_PARAMETERS (local parts of DTensors),
    followed by its adapters when it has them (expert_parameter_names)."""
    return tuple(getattr(module, name) for name in expert_parameter_names(module))


def expert_lora(module):
    """The module's ExpertAdapters for this call (dropout off outside training), or None."""
    lora = getattr(module, "lora", None)
    if lora is None or module.training or lora.dropout == 0.0:
        return lora
    return ExpertAdapters(lora.scaling, 0.0)


def routed_experts(weights, x_TD, topk_idx_TK, topk_weight_TK, backend="torch", lora=None):
    """sum_k w_tk * expert_{idx_tk}(x_t) over a token's K choices, weights = expert_weights(...);
    with `lora` (ExpertAdapters) the weights carry the adapters too, applied by grouped GEMMs."""
    if lora is None:
        return kernels.expert_swiglu(x_TD, topk_idx_TK, topk_weight_TK, *weights[:2], backend=backend)
    return kernels.expert_swiglu_lora(x_TD, topk_idx_TK, topk_weight_TK, *weights, scaling=lora.scaling,
                                      dropout_p=lora.dropout, backend=backend)


def routed_experts_grouped(weights, x_grouped_ND, weight_N1, group_end_offsets_E, backend="torch", lora=None):
    """Each expert's weighted output on rows already grouped by expert (expert parallelism)."""
    if lora is None:
        return kernels.grouped_swiglu(x_grouped_ND, weight_N1, group_end_offsets_E, *weights[:2], backend=backend)
    return kernels.grouped_swiglu_lora(x_grouped_ND, weight_N1, group_end_offsets_E, *weights, scaling=lora.scaling,
                                       dropout_p=lora.dropout, backend=backend)


class _AddAuxLossGrad(torch.autograd.Function):
    """Identity on y whose backward also sends `scale` as the gradient of the balance loss: the
    loss is optimised where it is computed, without travelling to the end of the model (what a
    pipeline stage needs; the public remote code does the same with scale 1)."""

    @staticmethod
    def forward(ctx, y, aux_loss, scale):
        ctx.scale = scale
        ctx.aux_meta = (aux_loss.shape, aux_loss.dtype, aux_loss.device)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad_y):
        shape, dtype, device = ctx.aux_meta
        return grad_y, torch.full(shape, ctx.scale, dtype=dtype, device=device), None


class MoEBlock(nn.Module):
    """Training form of DeepseekMoE: router op, merged experts, shared experts; same parameter names
    as the reference except the experts (see hf_adapter).

    By default the balance loss is returned to the caller, which adds it to the training loss. With
    `aux_loss_grad_scale` set (a float), its gradient times that scale is injected in the backward
    instead, it is returned as None, and its value is kept in `last_aux_loss` for logging."""

    def __init__(self, moe: DeepseekMoE):
        super().__init__()
        self.config = moe.config
        self.aux_loss_grad_scale = None
        self.last_aux_loss = None
        self.gate = RouterGate(moe.gate)
        self.experts = MergedExperts.from_experts(moe.experts)
        if hasattr(moe, "shared_experts"):
            self.shared_experts = moe.shared_experts

    def forward(self, hidden_states_BSD):
        B, S, D = hidden_states_BSD.shape
        topk_idx_TK, topk_weight_TK, aux_loss = self.gate(hidden_states_BSD)
        y_TD = self.experts(hidden_states_BSD.reshape(-1, D), topk_idx_TK, topk_weight_TK)
        y_BSD = y_TD.view(B, S, D)
        if hasattr(self, "shared_experts"):
            y_BSD = y_BSD + self.shared_experts(hidden_states_BSD)
        if aux_loss is not None and self.aux_loss_grad_scale is not None:
            self.last_aux_loss = aux_loss.detach()
            return _AddAuxLossGrad.apply(y_BSD, aux_loss, self.aux_loss_grad_scale), None
        return y_BSD, aux_loss


# ----------------------------------------------------------------------------------------------
# torch.compile of the decoder layers
# ----------------------------------------------------------------------------------------------
# none: eager. norm_rope: only the RMSNorm and the rotary embedding, each one fused kernel (the
# memory-bound float32 statistics and the rotate/concatenate of RoPE are several eager kernels).
# layer: each decoder layer's forward as one compiled region (norms, RoPE, attention glue,
# residuals, the router's surroundings and the routed experts' permute/unpermute fused with their
# neighbours). layer_eager_experts: the same with the routed-expert block left out (a graph
# break): bench/moe_block.py found that block slower compiled whole than with its own fused
# kernels (bench/RESULTS.md, "whole"). layer_cudagraphs: as layer, each compiled layer replayed as
# CUDA graphs (inductor's reduce-overhead mode), so the host launches one graph per layer and pass
# instead of each of its kernels: for steps of many small kernels (LoRA's adapters), where the GPU
# waits on the host's launches; it needs the layers' weights at fixed addresses (no FSDP gathering
# them), so runs allow it on one device with LoRA only (compiler/execution.cudagraph_refusal).
COMPILE_SCOPES = ("none", "norm_rope", "layer", "layer_eager_experts", "layer_cudagraphs")
# the scopes that compile each decoder layer whole (the cost model prices them alike)
WHOLE_LAYER_SCOPES = ("layer", "layer_cudagraphs")
_COMPILED_FUNCTIONS = {}


def _compiled(fn, backend):
    """One compiled wrapper per (function, backend), shared by all modules: compiled code is reused
    for every call with the same shapes and dtypes, whichever layer makes it."""
    key = (fn, backend)
    if key not in _COMPILED_FUNCTIONS:
        _COMPILED_FUNCTIONS[key] = torch.compile(fn, backend=backend, dynamic=False)
    return _COMPILED_FUNCTIONS[key]


def compile_layers(layers, scope, backend="inductor", norms=()):
    """Compiles `layers` (decoder layers of a training-form model) in place for `scope`
    (COMPILE_SCOPES); `norms` are further RMSNorm modules to fuse under "norm_rope" (the final norm).

    Only `forward` is compiled, never the module call, so hooks that a runtime adds afterwards
    (FSDP's parameter gathering, activation checkpointing) stay eager around the compiled code, and
    the parameter names do not change. Shapes are static (one compile per micro-batch shape; the
    recompile limit is raised to leave room for every layer). The compile itself happens at the
    first call. torch._grouped_mm's compile-time kernel accepts only bfloat16, so compiling MoE
    layers needs a bf16 model."""
    if scope not in COMPILE_SCOPES:
        raise ValueError(f"compile scope {scope!r}: choose one of {COMPILE_SCOPES}")
    if scope == "none":
        return
    layers = list(layers)
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, 8 * len(layers) + 8)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 64 * len(layers) + 256)
    if scope == "norm_rope":
        norm_fn, rotary_fn = _compiled(rms_norm, backend), _compiled(apply_rotary_pos_emb, backend)
        for module in [m for layer in layers for m in layer.modules()] + list(norms):
            if isinstance(module, DeepseekRMSNorm):
                module.norm_fn = norm_fn
            if isinstance(module, (DeepseekV2Attention, DeepseekAttention)):
                module.rotary_fn = rotary_fn
        return
    inductor_options = {}
    if scope == "layer_cudagraphs":
        if backend != "inductor":
            raise ValueError(f"compile scope layer_cudagraphs needs the inductor backend (CUDA graphs are its "
                             f"reduce-overhead mode), not {backend!r}")
        # reduce-overhead mode spelled as its option, beside combo kernels: inductor launches each
        # group of a layer's independent small kernels (the LoRA adapters' fp32 -> bf16 casts among
        # them) as one. The LoRA step of the full Coder-V2-Lite on an H200: 0.274 -> 0.270 s per step
        # (bench/RESULTS.md, ninth session)
        inductor_options = {"options": {"triton.cudagraphs": True, "combo_kernels": True}}
    for layer in layers:
        if scope == "layer_eager_experts" and isinstance(layer.mlp, MoEBlock):
            experts = layer.mlp.experts
            experts.forward = torch.compiler.disable(experts.forward)
        layer.forward = torch.compile(layer.forward, backend=backend, dynamic=False, **inductor_options)


# ----------------------------------------------------------------------------------------------
# The rewrite
# ----------------------------------------------------------------------------------------------
def apply_training_form(model, attention=None, grouped_mm_backend="torch"):
    """Rewrites `model` in place into the training form and returns it.

    attention: "sdpa" (default without flash-attn), "flash" (default with it), "eager", an SDPA
    kernel forced: "sdpa_flash_padded", "sdpa_efficient", "sdpa_cudnn" (see _sdpa_forced), or "flex"
    (packed documents through FlexAttention on CUDA: kernels.flex_attention).
    grouped_mm_backend: "torch" (torch._grouped_mm, no host synchronisation) or "grouped_gemm".
    """
    attention = attention or default_attention_backend()
    if attention not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {attention!r}: choose one of {sorted(ATTENTION_BACKENDS)}")
    if attention == "flash" and flash_attn_func is None:
        raise ValueError("attention backend 'flash' needs the flash-attn package, which is not installed; "
                         "use sdpa or sdpa_flash_padded (PyTorch's own flash kernel)")
    if grouped_mm_backend not in kernels.GROUPED_MM_BACKENDS:
        raise ValueError(f"grouped_mm_backend {grouped_mm_backend!r}: choose one of {kernels.GROUPED_MM_BACKENDS}")
    if is_training_form(model):
        raise ValueError("model is already in the training form")
    for layer in model.model.layers:
        if isinstance(layer.self_attn, (DeepseekV2Attention, DeepseekAttention)):
            layer.self_attn.attention_fn = ATTENTION_BACKENDS[attention]
        if isinstance(layer.mlp, DeepseekMoE):
            layer.mlp = MoEBlock(layer.mlp)
            layer.mlp.experts.grouped_mm_backend = grouped_mm_backend
    return model


def is_training_form(model):
    return any(isinstance(m, MoEBlock) for m in model.modules()) or any(
        getattr(layer.self_attn, "attention_fn", None) in
        [fn for name, fn in ATTENTION_BACKENDS.items() if name != "eager"]
        for layer in model.model.layers)
