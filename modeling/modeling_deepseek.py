"""Hugging Face-compatible reference implementation of the DeepSeek MoE families.

* DeepSeek-V2 (`DeepseekV2ForCausalLM`, config "deepseek_v2"): multi-head latent attention (MLA)
  whose RoPE part is stored interleaved in the checkpoints, YaRN scaling of the RoPE frequencies,
  of cos/sin and of the softmax scale.
* DeepSeekMoE v1 (`DeepseekForCausalLM`, config "deepseek"): LLaMA-style multi-head attention.

Both share the DeepSeekMoE feed-forward: softmax gating, greedy or group-limited top-k,
`norm_topk_prob`, `routed_scaling_factor`, shared experts, and the (sequence-level when `seq_aux`)
auxiliary balance loss, which a model in training mode adds to its returned loss.

Parameter names and shapes are exactly those of the published checkpoints, so `from_pretrained`
reads them unchanged. This is the readable reference the training form
(`training_form.py`) is checked against: plain per-expert loops, eager attention.
It knows nothing of devices meshes or ranks.

Shape letters in names: B batch, S sequence, H heads, D hidden, T tokens (B*S), K top-k, E experts.

This file is exported next to merged checkpoints and loaded by transformers' remote-code loader,
so it imports only torch, transformers and its configuration file.
"""

import math
from dataclasses import dataclass, field
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel

from .configuration_deepseek import DeepseekConfig, DeepseekV2Config


# ----------------------------------------------------------------------------------------------
# Normalisation and feed-forward
# ----------------------------------------------------------------------------------------------
def rms_norm(hidden_states, weight, eps):
    """RMSNorm with its statistics in float32 whatever the compute dtype, as the public models do."""
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + eps)
    return weight * hidden_states.to(input_dtype)


class DeepseekRMSNorm(nn.Module):
    # The normalisation function; the training form may swap in a fused (compiled) one with the
    # same signature, as it swaps attention kernels.
    norm_fn = staticmethod(rms_norm)

    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        return self.norm_fn(hidden_states, self.weight, self.variance_epsilon)


class DeepseekMLP(nn.Module):
    """SwiGLU feed-forward: used for dense layers, each routed expert and the shared experts."""

    def __init__(self, config, hidden_size=None, intermediate_size=None):
        super().__init__()
        self.hidden_size = config.hidden_size if hidden_size is None else hidden_size
        self.intermediate_size = config.intermediate_size if intermediate_size is None else intermediate_size
        self.gate_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=False)
        self.up_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=False)
        self.down_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


# ----------------------------------------------------------------------------------------------
# Routing
# ----------------------------------------------------------------------------------------------
def select_topk_experts(scores_TE, top_k, topk_method="greedy", n_group=None, topk_group=None):
    """Returns (weights_TK, idx_TK) of the chosen experts, in no particular order within a token.

    greedy: the top_k highest scores. group_limited_greedy (DeepSeek-V2): experts are split into
    n_group equal groups, a group scores its best expert, only the topk_group best groups compete.
    """
    if topk_method == "greedy":
        return torch.topk(scores_TE, k=top_k, dim=-1, sorted=False)
    if topk_method == "group_limited_greedy":
        T, E = scores_TE.shape
        group_scores_TG = scores_TE.view(T, n_group, E // n_group).max(dim=-1).values
        group_idx = torch.topk(group_scores_TG, k=topk_group, dim=-1, sorted=False)[1]
        group_mask_TG = torch.zeros_like(group_scores_TG).scatter_(1, group_idx, 1)
        score_mask_TE = group_mask_TG.unsqueeze(-1).expand(T, n_group, E // n_group).reshape(T, E)
        masked_scores_TE = scores_TE.masked_fill(~score_mask_TE.bool(), 0.0)
        return torch.topk(masked_scores_TE, k=top_k, dim=-1, sorted=False)
    raise ValueError(f"unknown topk_method {topk_method!r}")


def scale_topk_weights(topk_weight_TK, norm_topk_prob, routed_scaling_factor):
    """With norm_topk_prob the chosen scores are renormalised to sum to 1 (and, as in the public
    DeepSeek-V2 code, not scaled); otherwise they are multiplied by routed_scaling_factor."""
    if topk_weight_TK.shape[-1] > 1 and norm_topk_prob:
        denominator = topk_weight_TK.sum(dim=-1, keepdim=True) + 1e-20
        return topk_weight_TK / denominator
    return topk_weight_TK * routed_scaling_factor


def gate_scores(x_TD, weight_ED, scores_in_float32):
    """Softmax router scores [T, E]. DeepSeek-V2 computes them in float32; DeepSeekMoE v1 in the
    compute dtype (as the public code of each does)."""
    if scores_in_float32:
        return F.linear(x_TD.to(torch.float32), weight_ED.to(torch.float32)).softmax(dim=-1, dtype=torch.float32)
    return F.linear(x_TD, weight_ED).softmax(dim=-1)


def load_balance_loss(scores_TE, topk_idx_TK, batch_size, alpha, seq_aux):
    """The DeepSeekMoE expert-balance loss, alpha * sum_e f_e * P_e.

    f_e is the fraction of the T*K routing slots given to expert e, times E; P_e the mean gate
    score of e. With seq_aux both are taken per sequence and the result is averaged over sequences.
    Counts are kept in at least float32 (bf16 cannot count past 256).
    """
    T, E = scores_TE.shape
    K = topk_idx_TK.shape[-1]
    count_dtype = torch.promote_types(scores_TE.dtype, torch.float32)
    if seq_aux:
        seq_len = T // batch_size
        idx_BSK = topk_idx_TK.view(batch_size, seq_len * K)
        counts_BE = torch.zeros(batch_size, E, device=scores_TE.device, dtype=count_dtype)
        counts_BE.scatter_add_(1, idx_BSK, torch.ones_like(idx_BSK, dtype=count_dtype))
        f_BE = counts_BE / (seq_len * K / E)
        P_BE = scores_TE.view(batch_size, seq_len, E).mean(dim=1)
        return (f_BE * P_BE).sum(dim=1).mean() * alpha
    f_E = F.one_hot(topk_idx_TK.reshape(-1), num_classes=E).to(count_dtype).mean(0) * E
    P_E = scores_TE.mean(0)
    return (P_E * f_E).sum() * alpha


class MoEGate(nn.Module):
    """The router: softmax scores over routed experts, top-k choice, weights and balance loss."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.top_k = config.num_experts_per_tok
        self.n_routed_experts = config.n_routed_experts
        self.routed_scaling_factor = getattr(config, "routed_scaling_factor", 1.0)
        self.scoring_func = config.scoring_func
        self.alpha = config.aux_loss_alpha
        self.seq_aux = config.seq_aux
        self.topk_method = getattr(config, "topk_method", "greedy")
        self.n_group = getattr(config, "n_group", None)
        self.topk_group = getattr(config, "topk_group", None)
        self.norm_topk_prob = config.norm_topk_prob
        self.gating_dim = config.hidden_size
        self.scores_in_float32 = config.model_type == "deepseek_v2"
        self.weight = nn.Parameter(torch.empty((self.n_routed_experts, self.gating_dim)))

    def forward(self, hidden_states_BSD):
        """Returns topk_idx_TK, topk_weight_TK and the balance loss (None unless training)."""
        B, S, D = hidden_states_BSD.shape
        if self.scoring_func != "softmax":
            raise NotImplementedError(f"scoring_func {self.scoring_func!r}")
        scores_TE = gate_scores(hidden_states_BSD.reshape(-1, D), self.weight, self.scores_in_float32)
        topk_weight, topk_idx = select_topk_experts(
            scores_TE, self.top_k, self.topk_method, self.n_group, self.topk_group)
        topk_weight = scale_topk_weights(topk_weight, self.norm_topk_prob, self.routed_scaling_factor)
        aux_loss = None
        if self.training and self.alpha > 0.0:
            aux_loss = load_balance_loss(scores_TE, topk_idx, B, self.alpha, self.seq_aux)
        return topk_idx, topk_weight, aux_loss


class DeepseekMoE(nn.Module):
    """Routed experts chosen per token by the gate, plus shared experts every token goes through."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.num_experts_per_tok = config.num_experts_per_tok
        self.experts = nn.ModuleList(
            [DeepseekMLP(config, intermediate_size=config.moe_intermediate_size)
             for _ in range(config.n_routed_experts)])
        self.gate = MoEGate(config)
        if config.n_shared_experts is not None:
            self.shared_experts = DeepseekMLP(
                config, intermediate_size=config.moe_intermediate_size * config.n_shared_experts)

    def forward(self, hidden_states_BSD):
        """Returns (output_BSD, aux_loss or None)."""
        topk_idx_TK, topk_weight_TK, aux_loss = self.gate(hidden_states_BSD)
        B, S, D = hidden_states_BSD.shape
        x_TD = hidden_states_BSD.reshape(-1, D)
        T, K = topk_idx_TK.shape
        # One row per (token, choice); each expert computes the rows routed to it.
        x_slots = x_TD.repeat_interleave(K, dim=0)
        flat_idx = topk_idx_TK.reshape(-1)
        y_slots = torch.empty_like(x_slots)
        for e, expert in enumerate(self.experts):
            chosen = flat_idx == e
            y_slots[chosen] = expert(x_slots[chosen])
        y_TD = (y_slots.view(T, K, D) * topk_weight_TK.unsqueeze(-1)).sum(dim=1)
        y_BSD = y_TD.to(hidden_states_BSD.dtype).view(B, S, D)
        if self.config.n_shared_experts is not None:
            y_BSD = y_BSD + self.shared_experts(hidden_states_BSD)
        return y_BSD, aux_loss


# ----------------------------------------------------------------------------------------------
# Rotary position embedding
# ----------------------------------------------------------------------------------------------
def yarn_find_correction_dim(num_rotations, dim, base=10000, max_position_embeddings=2048):
    """The rotary dim index whose wavelength makes `num_rotations` turns over the original context."""
    return (dim * math.log(max_position_embeddings / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def yarn_find_correction_range(low_rot, high_rot, dim, base=10000, max_position_embeddings=2048):
    low = math.floor(yarn_find_correction_dim(low_rot, dim, base, max_position_embeddings))
    high = math.ceil(yarn_find_correction_dim(high_rot, dim, base, max_position_embeddings))
    return max(low, 0), min(high, dim - 1)


def yarn_get_mscale(scale=1.0, mscale=1.0):
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def yarn_linear_ramp_mask(low, high, dim):
    if low == high:
        high += 0.001  # avoid a division by zero
    linear = (torch.arange(dim, dtype=torch.float32) - low) / (high - low)
    return torch.clamp(linear, 0, 1)


class DeepseekRotaryEmbedding(nn.Module):
    """cos/sin tables for given positions, with no scaling or linear, dynamic-NTK or YaRN scaling.

    Tables are computed from the positions at every call (cheap next to attention) instead of a
    cached buffer, so the module holds no state: it works unchanged on the meta device and after
    `from_pretrained`, whatever device the model lands on.
    """

    def __init__(self, dim, max_position_embeddings, base, rope_scaling=None):
        super().__init__()
        self.dim = dim
        self.max_position_embeddings = max_position_embeddings
        self.base = base
        self.rope_scaling = rope_scaling
        self.scaling_type = None if rope_scaling is None else rope_scaling["type"]
        self.factor = 1.0 if rope_scaling is None else float(rope_scaling["factor"])
        # Multiplier on cos and sin (YaRN only).
        self.cos_sin_scale = 1.0
        if self.scaling_type == "yarn":
            self.cos_sin_scale = float(
                yarn_get_mscale(self.factor, rope_scaling.get("mscale", 1))
                / yarn_get_mscale(self.factor, rope_scaling.get("mscale_all_dim", 0)))

    def inv_freq(self, seq_len=None, device=None):
        """Per-pair angular frequencies, float32, shape [dim // 2]."""
        dim = self.dim
        exponents = torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim
        if self.scaling_type == "yarn":
            rs = self.rope_scaling
            freq_extra = 1.0 / (self.base ** exponents)
            freq_inter = 1.0 / (self.factor * self.base ** exponents)
            low, high = yarn_find_correction_range(
                rs.get("beta_fast", 32), rs.get("beta_slow", 1), dim, self.base,
                rs.get("original_max_position_embeddings", 4096))
            # 1 where the original frequency is kept (high frequencies), 0 where interpolated.
            extrapolate = 1.0 - yarn_linear_ramp_mask(low, high, dim // 2).to(device=device)
            return freq_inter * (1 - extrapolate) + freq_extra * extrapolate
        base = self.base
        if self.scaling_type == "dynamic" and seq_len is not None and seq_len > self.max_position_embeddings:
            base = self.base * ((self.factor * seq_len / self.max_position_embeddings)
                                - (self.factor - 1)) ** (dim / (dim - 2))
        return 1.0 / (base ** exponents)

    def forward(self, position_ids_BS, dtype):
        """Returns cos, sin of shape [B, S, dim] in `dtype` (half-split layout: both halves equal)."""
        seq_len = position_ids_BS.shape[-1]
        inv_freq = self.inv_freq(seq_len, position_ids_BS.device)
        positions = position_ids_BS.to(torch.float32)
        if self.scaling_type == "linear":
            positions = positions / self.factor
        freqs = positions.unsqueeze(-1) * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.cos_sin_scale).to(dtype), (emb.sin() * self.cos_sin_scale).to(dtype)


def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def deinterleave(x):
    """[..., (d/2 2)] -> [..., (2 d/2)]: the DeepSeek-V2 checkpoints store each rotary pair as
    adjacent features (x0, x1), (x2, x3), ...; the half-split form puts the first elements of all
    pairs first. q and k get the same permutation, so their dot products are unchanged."""
    *lead, d = x.shape
    return x.view(*lead, d // 2, 2).transpose(-1, -2).reshape(*lead, d)


def apply_rotary_pos_emb(q, k, cos, sin, interleaved=False):
    """q, k: [B, H, S, d]; cos, sin: [B, S, d]. Rotates each feature pair by its position's angle."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    if interleaved:
        q, k = deinterleave(q), deinterleave(k)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


# ----------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------
@dataclass(eq=False)
class AttentionMask:
    """What a query may see beyond causality, built once per forward and shared by every layer:

    * key_padding_BS: Hugging Face's attention_mask [B, S], 1 for tokens and 0 for padding; padded
      keys are hidden from every query;
    * document_ids_BS: [B, S] the document of each token of packed rows (`document_ids`); a query
      sees only the keys of its own document (block-causal attention).

    The attention kernels take None (plain causal attention, the fast path) or one of these."""

    key_padding_BS: Optional[torch.Tensor] = None
    document_ids_BS: Optional[torch.Tensor] = None
    _packed: Optional[Tuple[torch.Tensor, int, List[int]]] = field(default=None, repr=False)
    # what attention kernels derive from the mask once per forward and share across layers
    kernel_cache: dict = field(default_factory=dict, repr=False)

    def packed_sequences(self):
        """(cu_seqlens int32 [N + 1], max_seqlen) of the N documents of the B * S tokens flattened
        row after row (a row's end also ends its last document): the form flash-attn's varlen kernels
        take. Computed on the first call and kept, so the layers of a forward share it."""
        cu_seqlens, max_seqlen, _ = self._documents()
        return cu_seqlens, max_seqlen

    def document_bounds(self):
        """cu_seqlens as a host list (document d is tokens [bounds[d], bounds[d + 1]) of the flattened
        rows), from the same one read of the device as packed_sequences."""
        return self._documents()[2]

    def _documents(self):
        if self._packed is None:
            docs = self.document_ids_BS
            starts = torch.ones_like(docs, dtype=torch.bool)
            starts[:, 1:] = docs[:, 1:] != docs[:, :-1]
            offsets = torch.nonzero(starts.reshape(-1)).reshape(-1)
            cu_seqlens = torch.cat([offsets, offsets.new_full((1,), docs.numel())]).to(torch.int32)
            bounds = cu_seqlens.tolist()  # the one copy to the host: max_seqlen and the kernels' regrouping
            self._packed = (cu_seqlens, max(b - a for a, b in zip(bounds[:-1], bounds[1:])), bounds)
        return self._packed


def document_ids(position_ids_BS):
    """The document of each token, [B, S] int64: the count of position-id restarts (position 0) up to
    and including it, so documents start exactly where position_ids are 0. None when no row restarts
    after its first token: the plain causal path then runs, exactly as without position_ids. The
    check waits for the device once per forward. On the meta device (a trace, which cannot read
    values) position ids are taken to restart, so a trace given them sees the masked form."""
    if position_ids_BS.device.type != "meta" and not bool((position_ids_BS[:, 1:] == 0).any()):
        return None
    return torch.cumsum(position_ids_BS == 0, dim=1)


def attention_mask_for(attention_mask_BS=None, position_ids_BS=None):
    """The AttentionMask of a forward (HF padding mask and/or packed position ids), or None for
    plain causal attention."""
    docs = None if position_ids_BS is None else document_ids(position_ids_BS)
    if attention_mask_BS is None and docs is None:
        return None
    return AttentionMask(key_padding_BS=attention_mask_BS, document_ids_BS=docs)


def prepare_attention(mask, layers):
    """Lets each attention kernel of `layers` derive what it needs from a forward's mask once, before
    the layers run and outside any compiled layer: the kernel's optional `prepare_mask(mask)`, which
    keeps its result in mask.kernel_cache."""
    prepared = set()
    for layer in layers:
        prepare = getattr(getattr(layer.self_attn, "attention_fn", None), "prepare_mask", None)
        if prepare is not None and prepare not in prepared:
            prepare(mask)
            prepared.add(prepare)


def attention_allowed(mask, batch_size, seq_len, device):
    """bool [B, 1, S, S]: True where query i may attend key j (j <= i, and as `mask` says: None, an
    AttentionMask, or a [B, S] padding mask with 1 for tokens and 0 for padding)."""
    allowed = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
    allowed = allowed.view(1, 1, seq_len, seq_len).expand(batch_size, 1, seq_len, seq_len)
    if mask is None:
        return allowed
    if not isinstance(mask, AttentionMask):
        mask = AttentionMask(key_padding_BS=mask)
    if mask.key_padding_BS is not None:
        allowed = allowed & mask.key_padding_BS.bool().view(batch_size, 1, 1, seq_len)
    if mask.document_ids_BS is not None:
        docs = mask.document_ids_BS
        allowed = allowed & (docs.view(batch_size, 1, seq_len, 1) == docs.view(batch_size, 1, 1, seq_len))
    return allowed


def eager_attention(query, key, value, mask, softmax_scale, dropout_p, training):
    """softmax(q k^T * scale + causal mask) v with the softmax in float32. q/k/v: [B, H, S, d];
    mask: None (causal), an AttentionMask (padding, documents) or a [B, S] padding mask."""
    B, _, S, _ = query.shape
    weights = torch.matmul(query, key.transpose(2, 3)) * softmax_scale
    weights = weights + causal_attention_mask(mask, B, S, weights.dtype, weights.device)
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout_p, training=training)
    return torch.matmul(weights, value)


class DeepseekV2Attention(nn.Module):
    """Multi-head latent attention: keys and values come from a low-rank latent (kv_lora_rank)
    plus one rotary key shared by all heads; queries optionally through a low-rank q_lora_rank."""

    # The attention kernel; the training form swaps in SDPA or flash-attn.
    attention_fn = staticmethod(eager_attention)
    # The rotary embedding of q and k; the training form may swap in a fused (compiled) one.
    rotary_fn = staticmethod(apply_rotary_pos_emb)
    # The rotary key is one tensor shared by all heads. Identity here; a program that gives each
    # process part of the heads replaces it with one whose backward sums the parts' gradients.
    share_across_heads = staticmethod(lambda t: t)

    def __init__(self, config, layer_idx=None):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.v_head_dim = config.v_head_dim
        self.q_head_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
        self.attention_dropout = config.attention_dropout

        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(self.hidden_size, self.num_heads * self.q_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(self.hidden_size, config.q_lora_rank, bias=config.attention_bias)
            self.q_a_layernorm = DeepseekRMSNorm(config.q_lora_rank)
            self.q_b_proj = nn.Linear(config.q_lora_rank, self.num_heads * self.q_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(
            self.hidden_size, config.kv_lora_rank + config.qk_rope_head_dim, bias=config.attention_bias)
        self.kv_a_layernorm = DeepseekRMSNorm(config.kv_lora_rank)
        self.kv_b_proj = nn.Linear(
            config.kv_lora_rank, self.num_heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.v_head_dim, self.hidden_size, bias=config.attention_bias)

        self.softmax_scale = self.q_head_dim ** (-0.5)
        if config.rope_scaling is not None:
            # YaRN's attention-temperature correction, applied to the whole head (mscale_all_dim).
            mscale_all_dim = config.rope_scaling.get("mscale_all_dim", 0)
            if mscale_all_dim:
                mscale = yarn_get_mscale(config.rope_scaling["factor"], mscale_all_dim)
                self.softmax_scale = self.softmax_scale * mscale * mscale

    def project_qkv(self, hidden_states_BSD, position_embeddings):
        """Returns query, key [B, H, S, q_head_dim] and value [B, H, S, v_head_dim]."""
        B, S, _ = hidden_states_BSD.shape
        if self.q_lora_rank is None:
            q = self.q_proj(hidden_states_BSD)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states_BSD)))
        q = q.view(B, S, self.num_heads, self.q_head_dim).transpose(1, 2)
        q_nope, q_pe = torch.split(q, [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)

        compressed_kv = self.kv_a_proj_with_mqa(hidden_states_BSD)
        compressed_kv, k_pe = torch.split(compressed_kv, [self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        k_pe = self.share_across_heads(k_pe).view(B, S, 1, self.qk_rope_head_dim).transpose(1, 2)
        kv = self.kv_b_proj(self.kv_a_layernorm(compressed_kv))
        kv = kv.view(B, S, self.num_heads, self.qk_nope_head_dim + self.v_head_dim).transpose(1, 2)
        k_nope, value = torch.split(kv, [self.qk_nope_head_dim, self.v_head_dim], dim=-1)

        cos, sin = position_embeddings
        q_pe, k_pe = self.rotary_fn(q_pe, k_pe, cos, sin, interleaved=True)
        query = torch.cat([q_nope, q_pe], dim=-1)
        key = torch.cat([k_nope, k_pe.expand(B, self.num_heads, S, self.qk_rope_head_dim)], dim=-1)
        return query, key, value

    def forward(self, hidden_states_BSD, position_embeddings, mask):
        B, S, _ = hidden_states_BSD.shape
        query, key, value = self.project_qkv(hidden_states_BSD, position_embeddings)
        out = self.attention_fn(query, key, value, mask, self.softmax_scale,
                                self.attention_dropout, self.training)
        out = out.transpose(1, 2).reshape(B, S, self.num_heads * self.v_head_dim)
        return self.o_proj(out)


class DeepseekAttention(nn.Module):
    """DeepSeekMoE v1 attention: LLaMA-style multi-head (or grouped-query) attention."""

    attention_fn = staticmethod(eager_attention)
    rotary_fn = staticmethod(apply_rotary_pos_emb)

    def __init__(self, config, layer_idx=None):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.hidden_size // self.num_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.attention_dropout = config.attention_dropout
        bias = config.attention_bias
        self.q_proj = nn.Linear(self.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(self.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(self.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, self.hidden_size, bias=bias)
        self.softmax_scale = self.head_dim ** (-0.5)

    def project_qkv(self, hidden_states_BSD, position_embeddings):
        B, S, _ = hidden_states_BSD.shape
        q = self.q_proj(hidden_states_BSD).view(B, S, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states_BSD).view(B, S, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states_BSD).view(B, S, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = self.rotary_fn(q, k, cos, sin, interleaved=False)
        if self.num_key_value_groups > 1:
            k = k.repeat_interleave(self.num_key_value_groups, dim=1)
            v = v.repeat_interleave(self.num_key_value_groups, dim=1)
        return q, k, v

    def forward(self, hidden_states_BSD, position_embeddings, mask):
        B, S, _ = hidden_states_BSD.shape
        query, key, value = self.project_qkv(hidden_states_BSD, position_embeddings)
        out = self.attention_fn(query, key, value, mask, self.softmax_scale,
                                self.attention_dropout, self.training)
        out = out.transpose(1, 2).reshape(B, S, self.num_heads * self.head_dim)
        return self.o_proj(out)


# ----------------------------------------------------------------------------------------------
# Decoder layer and models
# ----------------------------------------------------------------------------------------------
def is_moe_layer(config, layer_idx):
    """The published rule: MoE from layer first_k_dense_replace on, every moe_layer_freq-th layer."""
    return (config.n_routed_experts is not None
            and layer_idx >= config.first_k_dense_replace
            and layer_idx % config.moe_layer_freq == 0)


class DeepseekDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.hidden_size = config.hidden_size
        attention_cls = DeepseekV2Attention if config.model_type == "deepseek_v2" else DeepseekAttention
        self.self_attn = attention_cls(config, layer_idx)
        self.mlp = DeepseekMoE(config) if is_moe_layer(config, layer_idx) else DeepseekMLP(config)
        self.input_layernorm = DeepseekRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = DeepseekRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, position_embeddings, mask=None):
        """Returns (hidden_states, aux_loss or None). mask: None (causal) or an AttentionMask."""
        residual = hidden_states
        hidden_states = self.self_attn(self.input_layernorm(hidden_states), position_embeddings, mask)
        hidden_states = residual + hidden_states
        residual = hidden_states
        mlp_out = self.mlp(self.post_attention_layernorm(hidden_states))
        aux_loss = None
        if isinstance(mlp_out, tuple):
            mlp_out, aux_loss = mlp_out
        return residual + mlp_out, aux_loss


def causal_attention_mask(mask, batch_size, seq_len, dtype, device):
    """Additive [B, 1, S, S] mask: 0 where a query may attend, the dtype's minimum elsewhere.
    mask (None, an AttentionMask, or a [B, S] padding mask: 1 = token, 0 = padding) optionally hides
    padded keys and other documents' keys too (attention_allowed)."""
    min_value = torch.finfo(dtype).min
    allowed = attention_allowed(mask, batch_size, seq_len, device)
    zeros = torch.zeros((), dtype=dtype, device=device)
    return torch.where(allowed, zeros, torch.full((), min_value, dtype=dtype, device=device))


IGNORE_INDEX = -100


def next_token_cross_entropy(logits_BSV, labels_BS, reduction="mean"):
    """The language-model loss: position s predicts labels[s + 1] (the last position predicts
    nothing), labels equal to IGNORE_INDEX count for nothing; statistics in float32. reduction
    "mean" (over the counted targets, as Hugging Face models report it) or "sum" (what a trainer
    divides by the token count of a whole global batch)."""
    vocab = logits_BSV.shape[-1]
    return F.cross_entropy(logits_BSV[..., :-1, :].reshape(-1, vocab).float(), labels_BS[..., 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction=reduction)


@dataclass
class MoECausalLMOutput(CausalLMOutputWithPast):
    """CausalLMOutputWithPast plus the MoE balance loss (already included in `loss` when training)."""

    aux_loss: Optional[torch.FloatTensor] = None
    lm_loss: Optional[torch.FloatTensor] = None


@dataclass
class MoEModelOutput(BaseModelOutputWithPast):
    aux_loss: Optional[torch.FloatTensor] = None


class _DeepseekPreTrainedMixin:
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = "past_key_values"

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.padding_idx is not None:
                module.weight.data[module.padding_idx].zero_()
        elif isinstance(module, MoEGate):
            module.weight.data.normal_(mean=0.0, std=std)
        elif isinstance(module, DeepseekRMSNorm):
            module.weight.data.fill_(1.0)


class _DeepseekModelBody:
    """Embedding, decoder layers and final norm; shared by both families."""

    def _build(self, config):
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [DeepseekDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)])
        self.norm = DeepseekRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if config.model_type == "deepseek_v2":
            rope_dim = config.qk_rope_head_dim
        else:
            rope_dim = config.hidden_size // config.num_attention_heads
        self.rotary_emb = DeepseekRotaryEmbedding(
            rope_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling)
        self.gradient_checkpointing = False

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[List[torch.FloatTensor]] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
    ) -> Union[Tuple, MoEModelOutput]:
        if past_key_values is not None:
            raise NotImplementedError("this reference model has no KV cache; call it with full sequences")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else self.config.output_hidden_states)
        return_dict = return_dict if return_dict is not None else self.config.use_return_dict
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        B, S = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        # Padding and, when position_ids restart inside a row (packed documents), the documents;
        # None without either: the kernels' plain causal path.
        mask = attention_mask_for(attention_mask, position_ids)
        if mask is not None:
            prepare_attention(mask, self.layers)
        if position_ids is None:
            position_ids = torch.arange(S, device=device).unsqueeze(0).expand(B, S)
        position_embeddings = self.rotary_emb(position_ids, inputs_embeds.dtype)

        hidden_states = inputs_embeds
        all_hidden_states = () if output_hidden_states else None
        aux_losses = []
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if self.gradient_checkpointing and self.training:
                hidden_states, aux_loss = self._gradient_checkpointing_func(
                    layer.__call__, hidden_states, position_embeddings, mask)
            else:
                hidden_states, aux_loss = layer(hidden_states, position_embeddings, mask)
            if aux_loss is not None:
                aux_losses.append(aux_loss)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        total_aux = torch.stack(aux_losses).sum() if aux_losses else None
        if not return_dict:
            return tuple(v for v in (hidden_states, None, all_hidden_states, None, total_aux) if v is not None)
        return MoEModelOutput(last_hidden_state=hidden_states, past_key_values=None,
                              hidden_states=all_hidden_states, attentions=None, aux_loss=total_aux)


class _DeepseekForCausalLMBody:
    """The language-model head and loss; shared by both families."""

    _tied_weights_keys = ["lm_head.weight"]

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def get_decoder(self):
        return self.model

    def set_decoder(self, decoder):
        self.model = decoder

    def forward(
        self,
        input_ids: torch.LongTensor = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[List[torch.FloatTensor]] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
    ) -> Union[Tuple, MoECausalLMOutput]:
        """labels: next-token targets aligned with input_ids (shifted inside), -100 is ignored.
        position_ids: rotary positions; when they restart at 0 inside a row (several documents packed
        in it), each token attends only to the earlier tokens of its own document.
        In training mode the returned loss is the token-mean cross-entropy plus the balance loss."""
        return_dict = return_dict if return_dict is not None else self.config.use_return_dict
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=past_key_values, inputs_embeds=inputs_embeds,
                             output_hidden_states=output_hidden_states, return_dict=True)
        logits = self.lm_head(outputs.last_hidden_state).float()
        loss = lm_loss = None
        if labels is not None:
            lm_loss = next_token_cross_entropy(logits, labels.to(logits.device), reduction="mean")
            loss = lm_loss if outputs.aux_loss is None else lm_loss + outputs.aux_loss
        if not return_dict:
            output = (logits,) + ((outputs.hidden_states,) if outputs.hidden_states is not None else ())
            return ((loss,) + output) if loss is not None else output
        return MoECausalLMOutput(loss=loss, logits=logits, past_key_values=None,
                                 hidden_states=outputs.hidden_states, attentions=None,
                                 aux_loss=outputs.aux_loss, lm_loss=lm_loss)

    def forward_with_head(self, input_ids, head_fn, position_ids=None):
        """The body (embedding, layers, final norm), then `head_fn(hidden_states_BSD, lm_head)`, in one
        call; returns (head_fn's result, the balance loss or None). position_ids as in forward (packed
        rows: attention within each document).

        For a trainer that computes its loss straight from the final hidden states, e.g. the
        cross-entropy a chunk of positions at a time, never holding the full float32 logits. The
        lm_head is used inside this call so that a wrapper hooking the model's forward methods (FSDP
        gathering the parameters) sees it used."""
        outputs = self.model(input_ids=input_ids, position_ids=position_ids, return_dict=True)
        return head_fn(outputs.last_hidden_state, self.lm_head), outputs.aux_loss

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        # No KV cache: every generation step reruns the whole sequence.
        return {"input_ids": input_ids, "attention_mask": attention_mask}


# ---- DeepSeek-V2 ----------------------------------------------------------------------------
class DeepseekV2PreTrainedModel(_DeepseekPreTrainedMixin, PreTrainedModel):
    config_class = DeepseekV2Config
    _no_split_modules = ["DeepseekDecoderLayer"]


class DeepseekV2Model(_DeepseekModelBody, DeepseekV2PreTrainedModel):
    def __init__(self, config: DeepseekV2Config):
        DeepseekV2PreTrainedModel.__init__(self, config)
        self._build(config)
        self.post_init()


class DeepseekV2ForCausalLM(_DeepseekForCausalLMBody, DeepseekV2PreTrainedModel):
    def __init__(self, config: DeepseekV2Config):
        DeepseekV2PreTrainedModel.__init__(self, config)
        self.model = DeepseekV2Model(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


# ---- DeepSeekMoE v1 -------------------------------------------------------------------------
class DeepseekPreTrainedModel(_DeepseekPreTrainedMixin, PreTrainedModel):
    config_class = DeepseekConfig
    _no_split_modules = ["DeepseekDecoderLayer"]


class DeepseekModel(_DeepseekModelBody, DeepseekPreTrainedModel):
    def __init__(self, config: DeepseekConfig):
        DeepseekPreTrainedModel.__init__(self, config)
        self._build(config)
        self.post_init()


class DeepseekForCausalLM(_DeepseekForCausalLMBody, DeepseekPreTrainedModel):
    def __init__(self, config: DeepseekConfig):
        DeepseekPreTrainedModel.__init__(self, config)
        self.model = DeepseekModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
