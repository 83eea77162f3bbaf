"""Everything the compiler and the runtime may know of a DeepSeek model, in one place.

`compiler/` and `runtime/` name no module attribute of the model (`mlp.experts`, `self_attn`,
`embed_tokens`, `lm_head`, ...): they ask this module (tests/test_layering.py checks it). It says

* how to build the training form (on the meta device, for tracing and for the runtime to split
  before any memory is allocated) and where its decoder layers are;
* the op families, each with its annotation in the grammar of `compiler/annotations.py` and the
  partitions it admits (`OP_FAMILIES`): the search chooses among them, the cost model prices them,
  the plan records them in `ops` and the runtime applies them;
* which module of a layer carries each family (`family_of_path`, `family_modules`), and, for the
  families that tensor parallelism splits, the plan keyed by child module name (`TP_PLAN`) with
  the attributes that count heads (`TP_HEAD_COUNTS`);
* the pipeline pieces (`StageModule`: embedding, a run of decoder layers, final norm and head);
* LoRA (`apply_lora`, modeling/lora.py): which families may carry adapters (`LORA_TARGETS`), the
  experts' stacked adapters (`EXPERT_LORA_PARAMETERS`, split like the base by
  `EXPERT_DIM` / `EXPERT_INTERMEDIATE_DIMS`), how tensor parallelism splits an adapted projection
  (`TP_PARAMETER_DIMS`), and the adapters' seeded initial values (`lora_initial_value`);
* the config fields that fix every shape (`FINGERPRINT_FIELDS`) and the kind of each layer.

The exported `modeling_deepseek.py` stays the model only: nothing here ships with a checkpoint.
"""

import copy
import re
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from .loading import build_model
from .modeling_deepseek import (DeepseekAttention, DeepseekMLP, DeepseekV2Attention, attention_mask_for,
                                is_moe_layer)
from .training_form import (  # noqa: F401 - what the runtime may use of the training form
    EXPERT_LORA_PARAMETERS,
    EXPERT_PARAMETERS,
    ROUTER_ANNOTATION,
    WHOLE_LAYER_SCOPES,
    MoEBlock,
    apply_training_form,
    compile_layers,
    expert_lora,
    expert_parameter_names,
    expert_weights,
    routed_experts,
    routed_experts_grouped,
)
from .lora import (  # noqa: F401 - LoRA as the compiler and runtime see it
    DEFAULT_LORA_TARGETS,
    LORA_TARGETS,
    LoraConfig,
    apply_lora,
    is_lora_parameter,
    lora_config_of,
    lora_initial_value,
    parse_targets as parse_lora_targets,
)

# ---- op families -----------------------------------------------------------------------------------------
# Partition names and what they split:
#   replicate     nothing: every device of the axis computes the whole op (always allowed)
#   heads         attention heads, over the tensor-parallel axis
#   intermediate  the MLP / expert intermediate dim, over the tensor-parallel axis
#   expert        the routed experts, over the expert-parallel axis (tokens travel by all-to-all)
# Annotations (compiler/annotations.py): n is the token dim, which data parallelism splits; a dim
# marked `^` may not be split, `+` may be split and leaves partial sums to reduce.


@dataclass(frozen=True)
class OpFamily:
    name: str
    annotation: str                 # the family's principal computation, in the annotation grammar
    splits: Dict[str, str]          # partition -> the annotation dim it splits
    tensor_parallel: Optional[str] = None   # the partition a tensor-parallel axis uses
    expert_parallel: Optional[str] = None   # the partition an expert-parallel axis uses

    @property
    def partitions(self) -> Tuple[str, ...]:
        return ("replicate",) + tuple(self.splits)


_MLP = "n d^, f+ d^, f+ d^, d^ f+ -> n d^"  # x, gate_proj, up_proj, down_proj (SwiGLU)
OP_FAMILIES = {f.name: f for f in (
    OpFamily("embed", "n, v^ d^ -> n d^", {}),
    # x, the per-head query/key/value projections, o_proj: the heads h are contracted by o_proj
    OpFamily("attention", "n d^, (h+ q^) d^, d^ (h+ v^) -> n d^", {"heads": "h"}, tensor_parallel="heads"),
    OpFamily("norm", "n d^, d^ -> n d^", {}),
    OpFamily("dense_mlp", _MLP, {"intermediate": "f"}, tensor_parallel="intermediate"),
    OpFamily("router", ROUTER_ANNOTATION, {}),
    # x, stacked gate+up [E, 2F, D], stacked down [E, D, F]: each token's output sums over experts
    OpFamily("experts", "n d^, e+ (g^ f+) d^, e+ d^ f+ -> n d^", {"expert": "e", "intermediate": "f"},
             tensor_parallel="intermediate", expert_parallel="expert"),
    OpFamily("shared_experts", _MLP, {"intermediate": "f"}, tensor_parallel="intermediate"),
    OpFamily("head", "n d^, v^ d^ -> n v^", {}),
)}


def partitions_for_mesh(tp, ep):
    """{family: partition} when a plan's mesh has `tp` tensor-parallel and `ep` expert-parallel ranks:
    a family splits over each axis the mesh has and the family can use (expert parallelism first)."""
    chosen = {}
    for name, family in OP_FAMILIES.items():
        if ep > 1 and family.expert_parallel:
            chosen[name] = family.expert_parallel
        elif tp > 1 and family.tensor_parallel:
            chosen[name] = family.tensor_parallel
        else:
            chosen[name] = "replicate"
    return chosen


def splits_with_tensor_parallel(family):
    """Whether a family's work and parameters divide over the tensor-parallel axis."""
    return OP_FAMILIES[family].tensor_parallel is not None


# ---- module paths -> families ----------------------------------------------------------------------------
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


def layer_of_path(path) -> Optional[int]:
    """The decoder layer a module or parameter path belongs to (None outside the layers)."""
    m = _LAYER.search(path)
    return int(m.group(1)) if m else None


def family_of_path(path) -> str:
    """The op family of a module (or parameter) path of the training form."""
    if path.startswith("model.embed_tokens"):
        return "embed"
    if ".self_attn" in path:
        return "attention"
    if path.endswith("layernorm") or ".input_layernorm" in path or ".post_attention_layernorm" in path:
        return "norm"
    if re.search(r"\.mlp\.gate(\.|$)", path):
        return "router"
    if ".mlp.experts" in path:
        return "experts"
    if ".mlp.shared_experts" in path:
        return "shared_experts"
    if ".mlp" in path:
        return "dense_mlp"
    if _LAYER.search(path):
        return "norm"  # residual adds and the like, inside a decoder layer
    return "head"      # final norm, lm_head, loss and everything outside the layers


def layer_kinds(config):
    """"moe" or "dense" for each decoder layer, in order."""
    return ["moe" if is_moe_layer(config, i) else "dense" for i in range(config.num_hidden_layers)]


def representative_config(config):
    """A copy of `config` cut to the fewest leading layers that hold one layer of each kind: every
    layer of a kind has the same shapes, so a trace of this model costs what the whole one does per
    layer (the compiler traces it and repeats each kind as `layer_kinds(config)` says)."""
    kinds = layer_kinds(config)
    last_first = max(kinds.index(kind) for kind in set(kinds))
    cut = copy.deepcopy(config)
    cut.num_hidden_layers = last_first + 1
    return cut


# Config fields that fix the shapes of every tensor: a plan is valid for a model iff these agree.
FINGERPRINT_FIELDS = (
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "n_routed_experts",
    "n_shared_experts", "num_experts_per_tok", "first_k_dense_replace", "moe_layer_freq",
    "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
    "tie_word_embeddings",
)


# ---- building and finding modules ------------------------------------------------------------------------
def build_training_model(config, device="meta", dtype=torch.float32, attention=None):
    """The training form of `config` (router op, stacked experts), on `device`; "meta" allocates
    nothing. Random values only off the meta device (the runtime fills parameters itself)."""
    return apply_training_form(build_model(config, device=device, dtype=dtype), attention=attention)


def decoder_layers(model):
    """The decoder layers of a training-form causal LM or of a StageModule, in order."""
    layers = model.model.layers
    return list(layers.values()) if isinstance(layers, nn.ModuleDict) else list(layers)


def final_norms(model):
    """The RMSNorm after the last layer (absent from a StageModule without the head)."""
    norm = model.model.norm
    return [norm] if norm is not None else []


def set_attention_kernel(model, kernel):
    """Every attention module computes softmax(QK^T)V with `kernel` (see kernels.ATTENTION_BACKENDS)."""
    for layer in decoder_layers(model):
        layer.self_attn.attention_fn = kernel


def moe_blocks(module):
    return [m for m in module.modules() if isinstance(m, MoEBlock)]


# Where each family's module sits in a decoder layer (families split by a runtime only).
def _family_module(layer, family):
    if family == "attention":
        return "self_attn", layer.self_attn
    if family == "dense_mlp" and isinstance(layer.mlp, DeepseekMLP):
        return "mlp", layer.mlp
    if family == "shared_experts" and isinstance(layer.mlp, MoEBlock):
        shared = getattr(layer.mlp, "shared_experts", None)
        return ("mlp.shared_experts", shared) if shared is not None else (None, None)
    if family == "experts" and isinstance(layer.mlp, MoEBlock):
        return "mlp.experts", layer.mlp.experts
    return None, None


def family_modules_of_layer(layer, family):
    """[(parent, attribute, module)] carrying `family` in one decoder layer (empty or one entry), so
    that a runtime can split the module in place or replace it (setattr(parent, attribute, new))."""
    path, module = _family_module(layer, family)
    if module is None:
        return []
    parent_path, _, attribute = path.rpartition(".")
    return [(layer.get_submodule(parent_path) if parent_path else layer, attribute, module)]


def family_modules(model, family):
    """family_modules_of_layer over every decoder layer of `model`."""
    return [found for layer in decoder_layers(model) for found in family_modules_of_layer(layer, family)]


# ---- tensor parallelism, by module name -------------------------------------------------------------------
# Column-parallel projections split their output features, row-parallel ones their input features
# and sum the partial outputs. Children a model variant lacks (q_proj vs q_b_proj, MLA vs MHA) are
# skipped. The shared latent of MLA (kv_a_proj_with_mqa, q_a_proj and their norms) stays whole.
_MLP_TP = {"gate_proj": "colwise", "up_proj": "colwise", "down_proj": "rowwise"}
TP_PLAN = {
    "attention": {"q_proj": "colwise", "q_b_proj": "colwise", "kv_b_proj": "colwise", "k_proj": "colwise",
                  "v_proj": "colwise", "o_proj": "rowwise"},
    "dense_mlp": _MLP_TP,
    "shared_experts": _MLP_TP,
}
# attributes of a family's module that count heads, divided by the tensor-parallel degree
TP_HEAD_COUNTS = {"attention": ("num_heads", "num_key_value_heads")}
# The dim of each parameter of a (LoRA-adapted) projection that each style splits (None: whole on
# every rank). Column-parallel: the output features of weight, bias and lora_B; lora_A [r, in] stays
# whole. Row-parallel: the input features of weight and lora_A; bias and lora_B [out, r] stay whole
# (their outputs are partial sums, summed with the base's).
TP_PARAMETER_DIMS = {"colwise": {"weight": 0, "bias": 0, "lora_A": None, "lora_B": 0},
                     "rowwise": {"weight": 1, "bias": None, "lora_A": 1, "lora_B": None}}
# Stacked expert parameters (EXPERT_PARAMETERS) hold the experts along dim 0; the intermediate (F)
# dim, which the intermediate partition splits, is dim 2 of each ([E, 2, F, D] and [E, D, F]).
EXPERT_DIM = 0
EXPERT_INTERMEDIATE_DIMS = dict(zip(EXPERT_PARAMETERS, (2, 2)))
# The experts' stacked LoRA adapters (modeling/lora.py) hold the experts along EXPERT_DIM too, so
# expert parallelism splits them like the base. Their intermediate (F) dim: B of gate+up
# [E, 2, F, r] and A of down [E, r, F] have it at dim 2; A of gate+up [E, 2, r, D] and B of down
# [E, D, r] have none (None: whole on every tensor-parallel rank).
EXPERT_INTERMEDIATE_DIMS.update(dict(zip(EXPERT_LORA_PARAMETERS, (None, 2, 2, None))))


def set_shared_across_heads(attention, fn):
    """MLA's rotary key is shared by all heads: with the heads split, `fn` (identity forward, a sum
    of the ranks' partial gradients backward) is applied to it. No-op for multi-head attention."""
    if isinstance(attention, DeepseekV2Attention):
        attention.share_across_heads = fn
    elif not isinstance(attention, DeepseekAttention):
        raise TypeError(f"not a DeepSeek attention module: {type(attention).__name__}")


# ---- the loss from hidden states --------------------------------------------------------------------------
# The causal LM's method that runs the body and hands the final hidden states and lm_head to a loss
# function; a runtime wrapping forward methods (FSDP) must wrap this one too.
FORWARD_WITH_HEAD = "forward_with_head"


def output_projection(model):
    """The lm_head of a causal LM or last StageModule."""
    return model.lm_head


# ---- pipeline stages ---------------------------------------------------------------------------------------
def _shell(module):
    """A new module object of the same class as `module`, sharing its attributes (config, rotary
    embedding, ...) but with registries of its own (children, parameters, buffers, hooks): children
    replaced on the shell stay in `module`, and the shell references only what it is left with."""
    shell = copy.copy(module)  # copies __dict__ shallowly: the registries would still be shared
    for name, value in vars(module).items():
        if isinstance(value, (dict, set)):
            shell.__dict__[name] = copy.copy(value)
    return shell


class StageModule(nn.Module):
    """Consecutive decoder layers of a training-form causal LM, with the embedding when first and the
    final norm and lm_head when last, under the model's own parameter names
    (`model.embed_tokens.weight`, `model.layers.<i>.…`, `model.norm.weight`, `lm_head.weight`), so
    optimizer state, checkpoints and gradients line up with the unsplit model. The stage shares the
    model's parameter objects; the model should not be used after it has been split.

    forward: input_ids [B, S] (first stage) or hidden [B, S, D] -> hidden [B, S, D], or float32
    logits [B, S, V] on the last stage (causal, no padding; document-masked for packed position_ids).
    With `head_loss` (the last stage only), the last stage returns instead the micro-batch's loss
    head_loss(final normed hidden [B, S, D], lm_head, labels [B, S]), e.g. the summed cross-entropy
    computed a chunk of positions at a time: the full logits never exist, and the head is used inside
    forward, so a wrapper hooking forward (FSDP gathering the weights) sees it used.

    A stage returns one tensor, so its MoE blocks inject their balance-loss gradient times
    `aux_loss_grad_scale` in their own backward; every forward appends the sum of its blocks'
    balance losses (detached, or None without any) to `aux_loss_per_forward`, for logging."""

    def __init__(self, causal_lm, layer_range, has_embed, has_head, aux_loss_grad_scale, head_loss=None):
        super().__init__()
        first, end = layer_range
        body = causal_lm.model
        if not 0 <= first <= end <= len(body.layers):
            raise ValueError(f"layer range {layer_range} outside the model's {len(body.layers)} layers")
        if first == end and not (has_embed or has_head):
            raise ValueError(f"stage with layer range {layer_range} would hold nothing")
        if getattr(causal_lm.config, "tie_word_embeddings", False) and has_embed != has_head:
            raise ValueError("tie_word_embeddings: the embedding and lm_head share one weight, so they must "
                             "be on the same stage; put the first and last layers on one stage or untie them")
        self.config = causal_lm.config
        self.has_embed, self.has_head = has_embed, has_head
        self.layer_range = (first, end)
        self.aux_loss_grad_scale = float(aux_loss_grad_scale)
        self.aux_loss_per_forward = []

        self.model = _shell(body)
        # A ModuleDict keyed by the original indices keeps the checkpoint names `model.layers.<i>`.
        self.model.layers = nn.ModuleDict({str(i): body.layers[i] for i in range(first, end)})
        self.model.embed_tokens = body.embed_tokens if has_embed else None
        self.model.norm = body.norm if has_head else None
        self.lm_head = causal_lm.lm_head if has_head else None
        if head_loss is not None and not has_head:
            raise ValueError("head_loss is the last stage's: this stage has no lm_head")
        self.head_loss = head_loss
        for block in moe_blocks(self):
            block.aux_loss_grad_scale = self.aux_loss_grad_scale

    def forward(self, x, position_ids=None, labels=None):
        """x: input_ids [B, S] (first stage) or the previous stage's hidden states [B, S, D].
        position_ids [B, S] (None: 0..S-1), given to every stage by the schedule (a keyword input of
        each rank's step, cut into micro-batches like the batch): the rotary positions, and, where
        they restart inside a row (packed documents), attention within each document. labels [B, S]:
        the targets head_loss takes (reaching the stages as position_ids do); a stage without
        head_loss ignores them."""
        blocks = moe_blocks(self)
        # A block leaves last_aux_loss as it was when it computes no balance loss (eval mode,
        # aux_loss_alpha 0): clear it so that a stale value is not counted again. Reading the values
        # here rather than in the blocks' hooks also ignores activation-checkpointing recomputes,
        # which run the blocks again during the backward.
        for block in blocks:
            block.last_aux_loss = None
        hidden_BSD = self.model.embed_tokens(x) if self.has_embed else x
        B, S = hidden_BSD.shape[:2]
        mask = attention_mask_for(None, position_ids)
        positions = position_ids
        if positions is None:
            positions = torch.arange(S, device=hidden_BSD.device).unsqueeze(0).expand(B, S)
        position_embeddings = self.model.rotary_emb(positions, hidden_BSD.dtype)
        for layer in self.model.layers.values():
            hidden_BSD, aux = layer(hidden_BSD, position_embeddings, mask)
            if aux is not None:
                # Would be silently dropped: the blocks must inject the balance loss themselves.
                raise RuntimeError("a MoE block returned its balance loss inside a pipeline stage; "
                                   "set its aux_loss_grad_scale")
        values = [block.last_aux_loss for block in blocks if block.last_aux_loss is not None]
        self.aux_loss_per_forward.append(torch.stack(values).sum() if values else None)
        if self.head_loss is not None:
            if labels is None:
                raise ValueError("this last stage computes its loss (head_loss) and needs the micro-batch's labels")
            return self.head_loss(self.model.norm(hidden_BSD), self.lm_head, labels)
        if self.has_head:
            # what the causal LM's forward computes after its layers: final norm, lm_head, float32
            return self.lm_head(self.model.norm(hidden_BSD)).float()
        return hidden_BSD


    def balance_loss_part(self):
        """J's balance-loss part held by this stage: its blocks' balance losses over the forwards
        since `aux_loss_per_forward` was last cleared, times aux_loss_grad_scale (float32)."""
        total = torch.zeros((), dtype=torch.float32)
        for aux in self.aux_loss_per_forward:
            if aux is not None:
                total = total.to(aux.device) + aux.float() * self.aux_loss_grad_scale
        return total


def num_layers(model):
    return len(model.model.layers)
