"""The training form of the DeepSeek models.

`apply_training_form(model)` rewrites a reference `DeepseekV2ForCausalLM` / `DeepseekForCausalLM`
(built on the meta device or loaded from a checkpoint) in place:

* the router (scores, top-k choice, weights, balance loss) becomes one registered custom op,
  `deepseek::moe_route`, with a fake implementation (so it traces on the meta device), its own
  autograd, and an annotation in the compiler's registry saying how it may be partitioned;
* each MoE layer's experts are merged into stacked parameters (`gate_up_proj_E2FD`: gate and up
  of every expert, `down_proj_EDF`) computed by permute -> grouped GEMM -> unpermute
  (`moe_utils.py`);
* attention runs through `scaled_dot_product_attention` (PyTorch's choice of kernel, or one kernel
  forced: `ATTENTION_BACKENDS`), or flash-attn when it is installed.

`compile_layers(layers, scope)` optionally compiles the decoder layers (or only their RMSNorm and
rotary embedding) with `torch.compile`, for speed on GPUs.

Outputs equal the reference's to float tolerance, forward and backward. `merge_experts` and
`split_experts` convert state dicts between the Hugging Face per-expert names and the merged names,
bitwise exactly; `load_hf_weights` reads a checkpoint directory straight into a training-form model.
"""

import json
import os
import re

import torch
import torch.nn.functional as F
from torch import nn

from compiler.annotations import annotate

from . import moe_utils
from .modeling_deepseek import (
    DeepseekAttention,
    DeepseekMoE,
    DeepseekRMSNorm,
    DeepseekV2Attention,
    apply_rotary_pos_emb,
    causal_attention_mask,
    eager_attention,
    gate_scores,
    load_balance_loss,
    rms_norm,
    scale_topk_weights,
    select_topk_experts,
)

try:  # optional accelerator
    from flash_attn import flash_attn_func
except Exception:  # noqa: BLE001
    flash_attn_func = None


# ----------------------------------------------------------------------------------------------
# The router as one custom op
# ----------------------------------------------------------------------------------------------
# Batch n and sequence l of the hidden states in, one row per token out. Only n may be split:
# with seq_aux the balance loss needs whole sequences, the hidden dim is contracted in full, and
# the experts (e) and choices (k) of a token are decided together. The balance loss is a scalar;
# split along n, each part is the loss of its own sequences (averaged like the training loss).
ROUTER_ANNOTATION = "n l^ h^, e^ h^, ?, ?, ?, ?, ?, ?, ?, ?, ? -> (n l^) k^, (n l^) k^, 1"


def _routing_weights_and_aux(hidden_BSD, gate_weight_ED, topk_idx_TK, norm_topk_prob,
                             routed_scaling_factor, aux_loss_alpha, seq_aux, scores_in_float32):
    """The differentiable part of routing, for a fixed choice of experts."""
    B, S, D = hidden_BSD.shape
    scores_TE = gate_scores(hidden_BSD.reshape(-1, D), gate_weight_ED, scores_in_float32)
    weights_TK = scale_topk_weights(scores_TE.gather(1, topk_idx_TK), norm_topk_prob, routed_scaling_factor)
    if aux_loss_alpha > 0:
        aux = load_balance_loss(scores_TE, topk_idx_TK, B, aux_loss_alpha, seq_aux)
    else:
        aux = scores_TE.new_zeros((), dtype=torch.promote_types(scores_TE.dtype, torch.float32))
    return scores_TE, weights_TK, aux


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
        scores_TE = gate_scores(hidden_BSD.reshape(-1, D), gate_weight_ED, scores_in_float32)
        _, topk_idx_TK = select_topk_experts(scores_TE, top_k, topk_method, n_group, topk_group)
        _, weights_TK, aux = _routing_weights_and_aux(hidden_BSD, gate_weight_ED, topk_idx_TK, norm_topk_prob,
                                                      routed_scaling_factor, aux_loss_alpha, seq_aux,
                                                      scores_in_float32)
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
        _, weights_TK, aux = _routing_weights_and_aux(x, w, topk_idx_TK, *ctx.routing)
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

    # the intermediate (F) dim of each parameter, which tensor parallelism splits
    TP_SHARD_DIMS = {"gate_up_proj_E2FD": 2, "down_proj_EDF": 2}

    def __init__(self, num_experts, hidden_size, intermediate_size, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.num_experts = num_experts
        self.gate_up_proj_E2FD = nn.Parameter(torch.empty(num_experts, 2, intermediate_size, hidden_size, **kw))
        self.down_proj_EDF = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size, **kw))
        self.grouped_mm_backend = "torch"

    @classmethod
    def from_experts(cls, experts):
        """Stacks a ModuleList of DeepseekMLP (meta or real) into one MergedExperts."""
        first = experts[0]
        merged = cls(len(experts), first.hidden_size, first.intermediate_size,
                     device=first.gate_proj.weight.device, dtype=first.gate_proj.weight.dtype)
        if first.gate_proj.weight.device.type != "meta":
            with torch.no_grad():
                merged.gate_up_proj_E2FD.copy_(torch.stack(
                    [torch.stack([e.gate_proj.weight, e.up_proj.weight]) for e in experts]))
                merged.down_proj_EDF.copy_(torch.stack([e.down_proj.weight for e in experts]))
        return merged

    def forward(self, x_TD, topk_idx_TK, topk_weight_TK):
        return moe_utils.expert_swiglu(x_TD, topk_idx_TK, topk_weight_TK, self.gate_up_proj_E2FD,
                                       self.down_proj_EDF, backend=self.grouped_mm_backend)


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
    as the reference except the experts (see merge_experts).

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
# Attention backends
# ----------------------------------------------------------------------------------------------
def sdpa_attention(query, key, value, padding_mask, softmax_scale, dropout_p, training):
    """scaled_dot_product_attention; causal without a padding mask, else an explicit boolean mask."""
    dropout_p = dropout_p if training else 0.0
    if padding_mask is None:
        return F.scaled_dot_product_attention(query, key, value, dropout_p=dropout_p, is_causal=True,
                                              scale=softmax_scale)
    B, _, S, _ = query.shape
    allowed = causal_attention_mask(padding_mask, B, S, query.dtype, query.device) == 0
    return F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, dropout_p=dropout_p,
                                          scale=softmax_scale)


def flash_attention(query, key, value, padding_mask, softmax_scale, dropout_p, training):
    """flash-attn (bf16/fp16 on CUDA, causal, no padding). MLA's value head (128) is narrower than
    its query/key head (192): values are zero-padded to the query width and the result sliced."""
    if padding_mask is not None or query.dtype not in (torch.float16, torch.bfloat16) or not query.is_cuda:
        return sdpa_attention(query, key, value, padding_mask, softmax_scale, dropout_p, training)
    v_dim = value.shape[-1]
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # flash-attn wants [B, S, H, d]
    if v_dim < q.shape[-1]:
        v = F.pad(v, (0, q.shape[-1] - v_dim))
    out = flash_attn_func(q, k, v, dropout_p=dropout_p if training else 0.0, softmax_scale=softmax_scale,
                          causal=True)
    return out[..., :v_dim].transpose(1, 2)


def _sdpa_forced(backend, pad_value=False):
    """scaled_dot_product_attention restricted to one kernel (causal, no padding mask; with a padding
    mask the plain sdpa path runs). PyTorch's automatic choice can be a slower kernel than the best
    eligible one, and MLA's value head (128) narrower than its query/key head (192) rules out its
    flash kernel; with pad_value the values are zero-padded to the query width (the padded output
    columns are zero and sliced off), which makes flash eligible at the price of a wider P.V
    product. A kernel that cannot run these inputs raises (PyTorch's warnings say why): nothing
    falls back silently to another kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    kernel = getattr(SDPBackend, backend)

    def attention(query, key, value, padding_mask, softmax_scale, dropout_p, training):
        if padding_mask is not None:
            return sdpa_attention(query, key, value, padding_mask, softmax_scale, dropout_p, training)
        v_dim = value.shape[-1]
        if pad_value and v_dim < query.shape[-1]:
            value = F.pad(value, (0, query.shape[-1] - v_dim))
        with sdpa_kernel([kernel]):
            out = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout_p if training else 0.0,
                                                 is_causal=True, scale=softmax_scale)
        return out[..., :v_dim] if out.shape[-1] != v_dim else out

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


def default_attention_backend():
    return "flash" if flash_attn_func is not None else "sdpa"


# ----------------------------------------------------------------------------------------------
# torch.compile of the decoder layers
# ----------------------------------------------------------------------------------------------
# none: eager. norm_rope: only the RMSNorm and the rotary embedding, each one fused kernel (the
# memory-bound float32 statistics and the rotate/concatenate of RoPE are several eager kernels).
# layer: each decoder layer's forward as one compiled region (norms, RoPE, attention glue,
# residuals, the router's surroundings and the routed experts' permute/unpermute fused with their
# neighbours). layer_eager_experts: the same with the routed-expert block left out (a graph
# break): bench/moe_block.py found that block slower compiled whole than with its own fused
# kernels (bench/RESULTS.md, "whole").
COMPILE_SCOPES = ("none", "norm_rope", "layer", "layer_eager_experts")
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
    for layer in layers:
        if scope == "layer_eager_experts" and isinstance(layer.mlp, MoEBlock):
            experts = layer.mlp.experts
            experts.forward = torch.compiler.disable(experts.forward)
        layer.forward = torch.compile(layer.forward, backend=backend, dynamic=False)


# ----------------------------------------------------------------------------------------------
# The rewrite
# ----------------------------------------------------------------------------------------------
def apply_training_form(model, attention=None, grouped_mm_backend="torch"):
    """Rewrites `model` in place into the training form and returns it.

    attention: "sdpa" (default without flash-attn), "flash" (default with it), "eager", or an SDPA
    kernel forced: "sdpa_flash_padded", "sdpa_efficient", "sdpa_cudnn" (see _sdpa_forced).
    grouped_mm_backend: "torch" (torch._grouped_mm, no host synchronisation) or "grouped_gemm".
    """
    attention = attention or default_attention_backend()
    if attention not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {attention!r}: choose one of {sorted(ATTENTION_BACKENDS)}")
    if attention == "flash" and flash_attn_func is None:
        raise ValueError("attention backend 'flash' needs the flash-attn package, which is not installed; "
                         "use sdpa or sdpa_flash_padded (PyTorch's own flash kernel)")
    if grouped_mm_backend not in moe_utils.GROUPED_MM_BACKENDS:
        raise ValueError(f"grouped_mm_backend {grouped_mm_backend!r}: choose one of {moe_utils.GROUPED_MM_BACKENDS}")
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


# ----------------------------------------------------------------------------------------------
# State-dict conversion between HF per-expert names and merged names
# ----------------------------------------------------------------------------------------------
_EXPERT_KEY = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<idx>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")
_MERGED_KEY = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<name>gate_up_proj_E2FD|down_proj_EDF)$")


def merge_experts(state_dict, config):
    """HF names (`...mlp.experts.{i}.{gate,up,down}_proj.weight`) -> `...mlp.experts.gate_up_proj_E2FD`
    and `...mlp.experts.down_proj_EDF`.

    Raises ValueError naming the layer and projection if an expert is missing."""
    out, layers = {}, {}
    for key, value in state_dict.items():
        m = _EXPERT_KEY.match(key)
        if m is None:
            out[key] = value
            continue
        layers.setdefault(m["prefix"], {}).setdefault(m["proj"], {})[int(m["idx"])] = value
    expected = set(range(config.n_routed_experts))
    for prefix, projections in layers.items():
        for proj in ("gate_proj", "up_proj", "down_proj"):
            missing = sorted(expected - set(projections.get(proj, {})))
            if missing:
                raise ValueError(f"{prefix}: {proj} of expert(s) {missing[:8]} missing; a layer needs all "
                                 f"{config.n_routed_experts} experts (n_routed_experts) to be merged")
        gate, up, down = ([projections[proj][i] for i in range(config.n_routed_experts)]
                          for proj in ("gate_proj", "up_proj", "down_proj"))
        out[f"{prefix}.gate_up_proj_E2FD"] = torch.stack([torch.stack(pair) for pair in zip(gate, up)])
        out[f"{prefix}.down_proj_EDF"] = torch.stack(down)
    return out


def split_experts(state_dict, config):
    """Inverse of merge_experts: stacked tensors -> one HF-named tensor per expert."""
    out = {}
    for key, value in state_dict.items():
        m = _MERGED_KEY.match(key)
        if m is None:
            out[key] = value
            continue
        if value.shape[0] != config.n_routed_experts:
            raise ValueError(f"{key}: first dim {value.shape[0]} != n_routed_experts {config.n_routed_experts}")
        prefix = m["prefix"]
        for i, tensor in enumerate(value.unbind(0)):
            if m["name"] == "down_proj_EDF":
                out[f"{prefix}.{i}.down_proj.weight"] = tensor.clone()
            else:
                out[f"{prefix}.{i}.gate_proj.weight"] = tensor[0].clone()
                out[f"{prefix}.{i}.up_proj.weight"] = tensor[1].clone()
    return out


def _checkpoint_files(model_dir):
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(model_dir, n) for n in names]
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    bins = sorted(n for n in os.listdir(model_dir) if re.fullmatch(r"pytorch_model(-\d+-of-\d+)?\.bin", n))
    if bins:
        return [os.path.join(model_dir, n) for n in bins]
    return []


def has_hf_weights(model_dir):
    return os.path.isdir(model_dir) and bool(_checkpoint_files(model_dir))


def read_hf_state_dict(model_dir):
    """All tensors of a HF checkpoint directory (safetensors shards, or .bin read with weights_only)."""
    files = _checkpoint_files(model_dir)
    if not files:
        raise FileNotFoundError(f"{model_dir}: no model.safetensors, model.safetensors.index.json or "
                                "pytorch_model*.bin found")
    state = {}
    for path in files:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: listed in the checkpoint index but missing")
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            state.update(load_file(path))
        else:
            state.update(torch.load(path, map_location="cpu", weights_only=True))
    return state


def load_hf_weights(model, model_dir, strict=True):
    """Loads a HF checkpoint directory into a training-form model (experts merged as they are read).

    Works for a model on the meta device too: tensors are assigned, not copied."""
    state = merge_experts(read_hf_state_dict(model_dir), model.config)
    dtype = next(model.parameters()).dtype
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    on_meta = any(p.device.type == "meta" for p in model.parameters())
    result = model.load_state_dict(state, strict=strict, assign=on_meta)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    return result
