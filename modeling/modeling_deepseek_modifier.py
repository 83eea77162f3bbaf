"""The training form of the DeepSeek models.

`apply_training_form(model)` rewrites a reference `DeepseekV2ForCausalLM` / `DeepseekForCausalLM`
(built on the meta device or loaded from a checkpoint) in place:

* the router (scores, top-k choice, weights, balance loss) becomes one registered custom op,
  `deepseek::moe_route`, with a fake implementation (so it traces on the meta device), its own
  autograd, and an annotation in the compiler's registry saying how it may be partitioned;
* each MoE layer's experts are merged into stacked parameters (`gate_up_proj_E2FD`: gate and up
  of every expert, `down_proj_EDF`) computed by permute -> grouped GEMM -> unpermute
  (`moe_utils.py`);
* attention runs through `scaled_dot_product_attention`, or flash-attn when it is installed.

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
    DeepseekV2Attention,
    causal_attention_mask,
    eager_attention,
    gate_scores,
    load_balance_loss,
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


ATTENTION_BACKENDS = {"eager": eager_attention, "sdpa": sdpa_attention, "flash": flash_attention}


def default_attention_backend():
    return "flash" if flash_attn_func is not None else "sdpa"


# ----------------------------------------------------------------------------------------------
# The rewrite
# ----------------------------------------------------------------------------------------------
def apply_training_form(model, attention=None, grouped_mm_backend="torch"):
    """Rewrites `model` in place into the training form and returns it.

    attention: "sdpa" (default without flash-attn), "flash" (default with it) or "eager".
    grouped_mm_backend: "torch" (torch._grouped_mm, no host synchronisation) or "grouped_gemm".
    """
    attention = attention or default_attention_backend()
    if attention not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {attention!r}: choose one of {sorted(ATTENTION_BACKENDS)}")
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
        getattr(layer.self_attn, "attention_fn", None) in (sdpa_attention, flash_attention)
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
