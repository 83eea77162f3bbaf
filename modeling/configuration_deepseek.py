"""Configurations of the DeepSeek MoE families.

`DeepseekV2Config` ("deepseek_v2": DeepSeek-V2, DeepSeek-V2-Lite, DeepSeek-Coder-V2-Lite) and
`DeepseekConfig` ("deepseek": DeepSeekMoE v1, e.g. deepseek-moe-16b) read the published
`config.json` files unchanged: every field of those files is a constructor argument here, with the
public remote code's defaults.

This file is exported next to merged checkpoints and loaded by transformers' remote-code loader, so
it imports nothing but transformers.
"""

from transformers.configuration_utils import PretrainedConfig

_TOPK_METHODS = ("greedy", "group_limited_greedy")
_SCORING_FUNCS = ("softmax",)
_ROPE_SCALING_TYPES = ("linear", "dynamic", "yarn")


def _config_error(cls_name, field, value, fix):
    return ValueError(f"{cls_name}: config field `{field}` = {value!r} is invalid: {fix}")


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    import math
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_int(config, field, low=1, optional=False):
    value = getattr(config, field)
    if optional and value is None:
        return
    if not _is_int(value) or value < low:
        raise _config_error(type(config).__name__, field, value,
                            f"use an integer >= {low}{' or null' if optional else ''}")


def _check_number(config, field, low=0.0, strict=False, high=None):
    value = getattr(config, field)
    if not _is_number(value) or value < low or (strict and value == low) or (high is not None and value >= high):
        bound = f"> {low}" if strict else f">= {low}"
        raise _config_error(type(config).__name__, field, value,
                            f"use a finite number {bound}{f' and < {high}' if high is not None else ''}")


def _check_bool(config, field):
    value = getattr(config, field)
    if not isinstance(value, bool):
        raise _config_error(type(config).__name__, field, value, "use true or false")


def _check_common_fields(config):
    """Types and ranges of the fields both families read (checked before anything compares them)."""
    name = type(config).__name__
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "max_position_embeddings", "pretraining_tp"):
        _check_int(config, field)
    _check_number(config, "rms_norm_eps", strict=True)
    _check_number(config, "initializer_range")
    _check_number(config, "rope_theta", strict=True)
    _check_number(config, "aux_loss_alpha")
    _check_number(config, "attention_dropout", high=1.0)
    for field in ("tie_word_embeddings", "attention_bias", "norm_topk_prob", "seq_aux"):
        _check_bool(config, field)
    from transformers.activations import ACT2FN
    if not isinstance(config.hidden_act, str) or config.hidden_act not in ACT2FN:
        raise _config_error(name, "hidden_act", config.hidden_act, "use an activation such as silu or gelu")
    if config.n_routed_experts is None:
        return
    _check_int(config, "n_routed_experts")
    _check_int(config, "moe_intermediate_size")
    _check_int(config, "n_shared_experts", optional=True)
    _check_int(config, "first_k_dense_replace", low=0)
    if config.first_k_dense_replace > config.num_hidden_layers:
        raise _config_error(name, "first_k_dense_replace", config.first_k_dense_replace,
                            f"set it between 0 and num_hidden_layers ({config.num_hidden_layers})")
    if not _is_int(config.moe_layer_freq):
        raise _config_error(name, "moe_layer_freq", config.moe_layer_freq, "use an integer >= 1")
    if not (_is_int(config.num_experts_per_tok) or config.num_experts_per_tok is None):
        raise _config_error(name, "num_experts_per_tok", config.num_experts_per_tok,
                            f"set it between 1 and n_routed_experts ({config.n_routed_experts})")


def _check_moe_fields(config):
    """Checks shared by both families; errors name the field and the fix."""
    name = type(config).__name__
    _check_common_fields(config)
    if config.n_routed_experts is None:
        return
    if config.num_experts_per_tok is None or not (1 <= config.num_experts_per_tok <= config.n_routed_experts):
        raise _config_error(name, "num_experts_per_tok", config.num_experts_per_tok,
                            f"set it between 1 and n_routed_experts ({config.n_routed_experts})")
    if config.scoring_func not in _SCORING_FUNCS:
        raise _config_error(name, "scoring_func", config.scoring_func, f"use one of {_SCORING_FUNCS}")
    if config.moe_layer_freq is None or config.moe_layer_freq < 1:
        raise _config_error(name, "moe_layer_freq", config.moe_layer_freq, "use an integer >= 1")


def _check_rope_scaling(config):
    rs = config.rope_scaling
    if rs is None:
        return
    name = type(config).__name__
    if not isinstance(rs, dict) or "type" not in rs or "factor" not in rs:
        raise _config_error(name, "rope_scaling", rs, "give a dict with at least `type` and `factor`, or null")
    if not isinstance(rs["type"], str) or rs["type"] not in _ROPE_SCALING_TYPES:
        raise _config_error(name, "rope_scaling.type", rs["type"], f"use one of {_ROPE_SCALING_TYPES}")
    if not _is_number(rs["factor"]) or rs["factor"] <= 0:
        raise _config_error(name, "rope_scaling.factor", rs["factor"], "use a finite number > 0")
    for key in ("mscale", "mscale_all_dim", "beta_fast", "beta_slow"):
        if key in rs and not _is_number(rs[key]):
            raise _config_error(name, f"rope_scaling.{key}", rs[key], "use a finite number")
    if "original_max_position_embeddings" in rs and (not _is_int(rs["original_max_position_embeddings"])
                                                     or rs["original_max_position_embeddings"] < 1):
        raise _config_error(name, "rope_scaling.original_max_position_embeddings",
                            rs["original_max_position_embeddings"], "use an integer >= 1")


class DeepseekV2Config(PretrainedConfig):
    """DeepSeek-V2: multi-head latent attention (MLA) with YaRN RoPE, DeepSeekMoE feed-forward."""

    model_type = "deepseek_v2"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size=102400,
        hidden_size=4096,
        intermediate_size=11008,
        moe_intermediate_size=1407,
        num_hidden_layers=30,
        num_attention_heads=32,
        num_key_value_heads=32,
        n_shared_experts=None,
        n_routed_experts=None,
        ep_size=1,
        routed_scaling_factor=1.0,
        kv_lora_rank=512,
        q_lora_rank=1536,
        qk_rope_head_dim=64,
        v_head_dim=128,
        qk_nope_head_dim=128,
        topk_method="greedy",
        n_group=None,
        topk_group=None,
        num_experts_per_tok=None,
        moe_layer_freq=1,
        first_k_dense_replace=0,
        norm_topk_prob=False,
        scoring_func="softmax",
        aux_loss_alpha=0.001,
        seq_aux=True,
        hidden_act="silu",
        max_position_embeddings=2048,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        use_cache=True,
        pad_token_id=None,
        bos_token_id=100000,
        eos_token_id=100001,
        pretraining_tp=1,
        tie_word_embeddings=False,
        rope_theta=10000.0,
        rope_scaling=None,
        attention_bias=False,
        attention_dropout=0.0,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.moe_intermediate_size = moe_intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.n_shared_experts = n_shared_experts
        self.n_routed_experts = n_routed_experts
        self.ep_size = ep_size
        self.routed_scaling_factor = routed_scaling_factor
        self.kv_lora_rank = kv_lora_rank
        self.q_lora_rank = q_lora_rank
        self.qk_rope_head_dim = qk_rope_head_dim
        self.v_head_dim = v_head_dim
        self.qk_nope_head_dim = qk_nope_head_dim
        self.topk_method = topk_method
        self.n_group = n_group
        self.topk_group = topk_group
        self.num_experts_per_tok = num_experts_per_tok
        self.moe_layer_freq = moe_layer_freq
        self.first_k_dense_replace = first_k_dense_replace
        self.norm_topk_prob = norm_topk_prob
        self.scoring_func = scoring_func
        self.aux_loss_alpha = aux_loss_alpha
        self.seq_aux = seq_aux
        # MLA has no grouped-query sharing; the field exists in the published files and is kept.
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.hidden_act = hidden_act
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.pretraining_tp = pretraining_tp
        self.use_cache = use_cache
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self._check_fields()

    def _check_fields(self):
        _check_moe_fields(self)
        _check_rope_scaling(self)
        name = type(self).__name__
        # multi-head latent attention: every rank and head dimension is a size; RoPE rotates pairs
        for field in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            _check_int(self, field)
        _check_int(self, "q_lora_rank", optional=True)
        if self.qk_rope_head_dim % 2:
            raise _config_error(name, "qk_rope_head_dim", self.qk_rope_head_dim, "RoPE needs an even dimension")
        _check_int(self, "ep_size")
        if self.n_routed_experts is None:
            return
        _check_number(self, "routed_scaling_factor", strict=True)
        if not isinstance(self.topk_method, str) or self.topk_method not in _TOPK_METHODS:
            raise _config_error(name, "topk_method", self.topk_method, f"use one of {_TOPK_METHODS}")
        _check_int(self, "n_group", optional=True)
        _check_int(self, "topk_group", optional=True)
        if self.topk_method == "group_limited_greedy":
            if not self.n_group or self.n_routed_experts % self.n_group:
                raise _config_error(name, "n_group", self.n_group,
                                    f"it must divide n_routed_experts ({self.n_routed_experts})")
            if not self.topk_group or not (1 <= self.topk_group <= self.n_group):
                raise _config_error(name, "topk_group", self.topk_group, f"set it between 1 and n_group ({self.n_group})")
            reachable = self.topk_group * (self.n_routed_experts // self.n_group)
            if self.num_experts_per_tok > reachable:
                raise _config_error(name, "num_experts_per_tok", self.num_experts_per_tok,
                                    f"the topk_group ({self.topk_group}) best of n_group ({self.n_group}) groups hold "
                                    f"only {reachable} experts; choose at most that many, or more groups")


class DeepseekConfig(PretrainedConfig):
    """DeepSeekMoE v1: LLaMA-style multi-head attention, fine-grained and shared experts."""

    model_type = "deepseek"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size=102400,
        hidden_size=4096,
        intermediate_size=11008,
        moe_intermediate_size=1407,
        num_hidden_layers=30,
        num_attention_heads=32,
        num_key_value_heads=32,
        n_shared_experts=None,
        n_routed_experts=None,
        num_experts_per_tok=None,
        moe_layer_freq=1,
        first_k_dense_replace=0,
        norm_topk_prob=False,
        scoring_func="softmax",
        aux_loss_alpha=0.001,
        seq_aux=True,
        hidden_act="silu",
        max_position_embeddings=2048,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        use_cache=True,
        pad_token_id=None,
        bos_token_id=100000,
        eos_token_id=100001,
        pretraining_tp=1,
        tie_word_embeddings=False,
        rope_theta=10000.0,
        rope_scaling=None,
        attention_bias=False,
        attention_dropout=0.0,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.moe_intermediate_size = moe_intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.n_shared_experts = n_shared_experts
        self.n_routed_experts = n_routed_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.moe_layer_freq = moe_layer_freq
        self.first_k_dense_replace = first_k_dense_replace
        self.norm_topk_prob = norm_topk_prob
        self.scoring_func = scoring_func
        self.aux_loss_alpha = aux_loss_alpha
        self.seq_aux = seq_aux
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.hidden_act = hidden_act
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.pretraining_tp = pretraining_tp
        self.use_cache = use_cache
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self._check_fields()

    def _check_fields(self):
        _check_moe_fields(self)
        _check_rope_scaling(self)
        if self.rope_scaling is not None and self.rope_scaling["type"] == "yarn":
            raise _config_error(type(self).__name__, "rope_scaling.type", "yarn",
                                "DeepSeekMoE v1 supports `linear` and `dynamic` RoPE scaling only")
        if self.num_attention_heads % self.num_key_value_heads:
            raise _config_error(type(self).__name__, "num_key_value_heads", self.num_key_value_heads,
                                f"it must divide num_attention_heads ({self.num_attention_heads})")
        if self.hidden_size % self.num_attention_heads or (self.hidden_size // self.num_attention_heads) % 2:
            raise _config_error(type(self).__name__, "num_attention_heads", self.num_attention_heads,
                                f"it must divide hidden_size ({self.hidden_size}) into heads of an even size (RoPE)")
