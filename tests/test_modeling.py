"""The reference models: checkpoint names and shapes, configs, and the math that is easy to get wrong,
checked against values derived by hand or computed independently in float64."""

import json
import math
import os

import pytest
import torch

from modeling import DeepseekConfig, DeepseekV2Config, build_model, load_config
from modeling.loading import ModelDirError
from modeling.modeling_deepseek import (
    DeepseekRotaryEmbedding,
    apply_rotary_pos_emb,
    load_balance_loss,
    scale_topk_weights,
    select_topk_experts,
    yarn_find_correction_range,
    yarn_get_mscale,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")
SHIPPED = ["deepseek-coder-v2-lite", "deepseek-v2-lite", "deepseek-moe-16b", "tiny-deepseek-v2", "tiny-deepseek-moe"]


# ---- configs -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SHIPPED)
def test_published_config_fields_read_unchanged(name):
    with open(os.path.join(CONFIGS, name, "config.json")) as f:
        fields = json.load(f)
    config = load_config(os.path.join(CONFIGS, name))
    expected_cls = DeepseekV2Config if fields["model_type"] == "deepseek_v2" else DeepseekConfig
    assert type(config) is expected_cls
    exported = config.to_dict()
    for key, value in fields.items():
        if key == "transformers_version":
            continue  # to_dict stamps the running version
        assert exported[key] == value, key


def test_v2_lite_config_has_the_fields_that_matter():
    config = load_config(os.path.join(CONFIGS, "deepseek-v2-lite"))
    assert config.q_lora_rank is None
    assert config.rope_scaling == {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707,
                                   "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096,
                                   "type": "yarn"}
    assert (config.topk_method, config.n_group, config.topk_group) == ("greedy", 1, 1)
    assert (config.norm_topk_prob, config.routed_scaling_factor, config.scoring_func) == (False, 1.0, "softmax")
    assert (config.aux_loss_alpha, config.seq_aux) == (0.001, True)
    assert (config.first_k_dense_replace, config.moe_layer_freq) == (1, 1)


@pytest.mark.parametrize("field,value,needle", [
    ("topk_method", "best", "topk_method"),
    ("scoring_func", "sigmoid", "scoring_func"),
    ("num_experts_per_tok", 0, "num_experts_per_tok"),
])
def test_invalid_config_field_is_named(field, value, needle):
    with open(os.path.join(CONFIGS, "tiny-deepseek-v2", "config.json")) as f:
        fields = json.load(f)
    fields[field] = value
    with pytest.raises(ValueError, match=needle):
        DeepseekV2Config.from_dict(fields)


def test_group_limited_needs_dividing_groups():
    with pytest.raises(ValueError, match="n_group"):
        DeepseekV2Config(n_routed_experts=8, num_experts_per_tok=2, topk_method="group_limited_greedy",
                         n_group=3, topk_group=1)


def test_bad_model_dir_messages(tmp_path):
    with pytest.raises(ModelDirError, match="config.json"):
        load_config(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelDirError, match="not valid JSON"):
        load_config(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelDirError, match="model_type"):
        load_config(str(tmp_path))
    with pytest.raises(ModelDirError, match="no such directory"):
        load_config("./does/not/exist")


# ---- checkpoint names, shapes and parameter counts ------------------------------------------------
def test_deepseek_v2_lite_on_meta_pins_checkpoint_names_and_shapes():
    model = build_model(load_config(os.path.join(CONFIGS, "deepseek-v2-lite")), device="meta")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert all(p.device.type == "meta" for p in model.parameters())
    expected = {
        "model.embed_tokens.weight": (102400, 2048),
        "model.layers.0.self_attn.q_proj.weight": (3072, 2048),
        "model.layers.0.self_attn.kv_a_proj_with_mqa.weight": (576, 2048),
        "model.layers.0.self_attn.kv_a_layernorm.weight": (512,),
        "model.layers.0.self_attn.kv_b_proj.weight": (4096, 512),
        "model.layers.0.self_attn.o_proj.weight": (2048, 2048),
        "model.layers.0.mlp.gate_proj.weight": (10944, 2048),
        "model.layers.0.mlp.up_proj.weight": (10944, 2048),
        "model.layers.0.mlp.down_proj.weight": (2048, 10944),
        "model.layers.0.input_layernorm.weight": (2048,),
        "model.layers.0.post_attention_layernorm.weight": (2048,),
        "model.layers.1.mlp.gate.weight": (64, 2048),
        "model.layers.1.mlp.experts.0.gate_proj.weight": (1408, 2048),
        "model.layers.1.mlp.experts.63.down_proj.weight": (2048, 1408),
        "model.layers.26.mlp.experts.63.up_proj.weight": (1408, 2048),
        "model.layers.1.mlp.shared_experts.gate_proj.weight": (2816, 2048),
        "model.layers.1.mlp.shared_experts.down_proj.weight": (2048, 2816),
        "model.norm.weight": (2048,),
        "lm_head.weight": (102400, 2048),
    }
    for name, shape in expected.items():
        assert shapes[name] == shape, name
    assert "model.layers.0.mlp.gate.weight" not in shapes  # the first layer is dense
    assert "model.layers.27.input_layernorm.weight" not in shapes
    assert not any("q_a_proj" in k for k in shapes)  # q_lora_rank is null
    # 64 experts x 3 projections x 26 MoE layers
    assert sum(".mlp.experts." in k for k in shapes) == 64 * 3 * 26
    assert sum(p.numel() for p in model.parameters()) == 15_706_484_224


def test_deepseek_moe_16b_on_meta_parameter_count_and_names():
    model = build_model(load_config(os.path.join(CONFIGS, "deepseek-moe-16b")), device="meta")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert shapes[f"model.layers.0.self_attn.{proj}.weight"] == (2048, 2048)
    assert shapes["model.layers.27.mlp.experts.63.down_proj.weight"] == (2048, 1408)
    assert sum(p.numel() for p in model.parameters()) == 16_375_728_128


def test_q_lora_names():
    config = load_config(os.path.join(CONFIGS, "tiny-deepseek-v2"))
    config.q_lora_rank = 24
    shapes = {k: tuple(v.shape) for k, v in build_model(config, device="meta").state_dict().items()}
    assert shapes["model.layers.0.self_attn.q_a_proj.weight"] == (24, 64)
    assert shapes["model.layers.0.self_attn.q_a_layernorm.weight"] == (24,)
    assert shapes["model.layers.0.self_attn.q_b_proj.weight"] == (4 * 24, 24)


# ---- YaRN -----------------------------------------------------------------------------------------
def test_yarn_correction_range_and_frequencies_by_hand():
    # DeepSeek-V2-Lite: rotary dim 64, base 1e4, factor 40, original context 4096, beta 32 / 1.
    # Correction dim for r rotations: dim * ln(L / (2 pi r)) / (2 ln base)
    #   r = 32: 64 * ln(4096 / 201.06) / 18.4207 = 10.47 -> floor 10
    #   r = 1:  64 * ln(4096 / 6.2832) / 18.4207 = 22.51 -> ceil 23
    assert yarn_find_correction_range(32, 1, 64, 10000, 4096) == (10, 23)
    rope = DeepseekRotaryEmbedding(64, 163840, 10000, {"type": "yarn", "factor": 40, "beta_fast": 32,
                                                       "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707,
                                                       "original_max_position_embeddings": 4096})
    inv_freq = rope.inv_freq().double()
    for i in range(32):
        original = 10000.0 ** (-2 * i / 64)
        ramp = min(max((i - 10) / (23 - 10), 0.0), 1.0)  # 0 keeps the original frequency, 1 divides by 40
        expected = original * (1 - ramp) + original / 40 * ramp
        assert inv_freq[i].item() == pytest.approx(expected, rel=1e-6), i
    assert inv_freq[0].item() == 1.0
    assert inv_freq[31].item() == pytest.approx(10000.0 ** (-62 / 64) / 40, rel=1e-6)
    # mscale == mscale_all_dim: cos and sin are not rescaled
    assert rope.cos_sin_scale == 1.0


def test_yarn_mscale_and_mla_softmax_scale_by_hand():
    # 0.1 * 0.707 * ln 40 + 1 = 1.2608038
    assert yarn_get_mscale(40, 0.707) == pytest.approx(1.2608038, rel=1e-7)
    assert yarn_get_mscale(1.0, 0.707) == 1.0
    config = load_config(os.path.join(CONFIGS, "deepseek-v2-lite"))
    model = build_model(config, device="meta")
    attn = model.model.layers[0].self_attn
    # (128 + 64) ** -0.5 * 1.2608038 ** 2 = 0.0721688 * 1.5896262 = 0.1147214
    assert attn.softmax_scale == pytest.approx(0.1147214, rel=1e-6)


def test_yarn_cos_sin_scale_when_mscales_differ():
    rope = DeepseekRotaryEmbedding(8, 4096, 10000, {"type": "yarn", "factor": 4, "mscale": 1.0,
                                                    "mscale_all_dim": 0.5,
                                                    "original_max_position_embeddings": 256})
    expected = (0.1 * 1.0 * math.log(4) + 1) / (0.1 * 0.5 * math.log(4) + 1)
    cos, sin = rope(torch.tensor([[0, 3]]), torch.float64)
    assert cos[0, 0, 0].item() == pytest.approx(expected, rel=1e-6)  # position 0: cos = 1 * scale
    assert (cos ** 2 + sin ** 2)[0, 1].sub(expected ** 2).abs().max().item() < 1e-5


# ---- RoPE layout ----------------------------------------------------------------------------------
def test_interleaved_rope_rotates_adjacent_pairs():
    """DeepSeek-V2 stores a rotary pair as adjacent features (x[2i], x[2i+1]); the result is the
    complex product (x[2i] + j x[2i+1]) * exp(j * pos * theta_i), laid out halves-first."""
    torch.manual_seed(0)
    d, S = 8, 5
    rope = DeepseekRotaryEmbedding(d, 4096, 10000, None)
    positions = torch.arange(S).unsqueeze(0)
    cos, sin = rope(positions, torch.float64)
    q = torch.randn(1, 2, S, d, dtype=torch.float64)
    k = torch.randn(1, 1, S, d, dtype=torch.float64)
    q_rot, k_rot = apply_rotary_pos_emb(q, k, cos, sin, interleaved=True)
    theta = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = positions[0].double().unsqueeze(-1) * theta  # [S, d/2]
    for x, x_rot in ((q, q_rot), (k, k_rot)):
        z = torch.complex(x[..., 0::2], x[..., 1::2]) * torch.polar(torch.ones_like(angle), angle)
        expected = torch.cat([z.real, z.imag], dim=-1)
        torch.testing.assert_close(x_rot, expected, rtol=1e-6, atol=1e-6)


def test_half_split_rope_for_v1():
    """DeepSeekMoE v1 (LLaMA layout): feature i pairs with feature i + d/2."""
    d = 8
    rope = DeepseekRotaryEmbedding(d, 4096, 10000, None)
    positions = torch.tensor([[0, 7]])
    cos, sin = rope(positions, torch.float64)
    q = torch.randn(1, 1, 2, d, dtype=torch.float64)
    q_rot, _ = apply_rotary_pos_emb(q, q, cos, sin, interleaved=False)
    theta = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    z = torch.complex(q[..., : d // 2], q[..., d // 2:]) * torch.polar(torch.ones(2, d // 2, dtype=torch.float64),
                                                                        positions[0].double().unsqueeze(-1) * theta)
    torch.testing.assert_close(q_rot, torch.cat([z.real, z.imag], -1), rtol=1e-6, atol=1e-6)


def test_rope_is_relative():
    """Attention scores depend only on position differences (a property that fails with a wrong layout)."""
    torch.manual_seed(1)
    d = 16
    rope = DeepseekRotaryEmbedding(d, 4096, 10000, {"type": "yarn", "factor": 4, "mscale": 0.707,
                                                    "mscale_all_dim": 0.707, "original_max_position_embeddings": 64})
    q = torch.randn(1, 1, 1, d, dtype=torch.float64)
    k = torch.randn(1, 1, 1, d, dtype=torch.float64)

    def score(pq, pk):
        cq, sq = rope(torch.tensor([[pq]]), torch.float64)
        ck, sk = rope(torch.tensor([[pk]]), torch.float64)
        qr, _ = apply_rotary_pos_emb(q, q, cq, sq, interleaved=True)
        _, kr = apply_rotary_pos_emb(k, k, ck, sk, interleaved=True)
        return (qr * kr).sum().item()

    assert score(10, 3) == pytest.approx(score(107, 100), rel=1e-6)


# ---- routing --------------------------------------------------------------------------------------
SCORES = torch.tensor([[0.10, 0.40, 0.05, 0.25, 0.20],
                       [0.30, 0.05, 0.35, 0.10, 0.20]], dtype=torch.float64)


def _sorted_choice(weights, idx):
    order = idx.argsort(dim=-1)
    return weights.gather(-1, order), idx.gather(-1, order)


def test_greedy_topk_with_and_without_norm_topk_prob():
    w, idx = _sorted_choice(*select_topk_experts(SCORES, 2, "greedy"))
    assert idx.tolist() == [[1, 3], [0, 2]]
    torch.testing.assert_close(scale_topk_weights(w, False, 1.0), torch.tensor([[0.40, 0.25], [0.30, 0.35]],
                                                                              dtype=torch.float64))
    # norm_topk_prob: 0.40 / 0.65, 0.25 / 0.65; then routed_scaling_factor
    torch.testing.assert_close(scale_topk_weights(w, True, 1.0),
                               torch.tensor([[0.40 / 0.65, 0.25 / 0.65], [0.30 / 0.65, 0.35 / 0.65]],
                                            dtype=torch.float64))
    # As in the public DeepSeek-V2 code, renormalised weights are not scaled by routed_scaling_factor.
    torch.testing.assert_close(scale_topk_weights(w, True, 16.0), scale_topk_weights(w, True, 1.0))
    torch.testing.assert_close(scale_topk_weights(w, False, 2.5), 2.5 * w)


def test_group_limited_topk_keeps_to_the_best_groups():
    # 8 experts in 4 groups of 2; group maxima: g0 0.30, g1 0.05, g2 0.28, g3 0.12.
    scores = torch.tensor([[0.30, 0.01, 0.05, 0.04, 0.10, 0.28, 0.12, 0.10]], dtype=torch.float64)
    # topk_group=2 keeps groups 0 and 2 -> experts {0, 1, 4, 5}; the top-3 among them are 0, 5, 4.
    # Plain greedy would pick 6 (0.12) over 4 (0.10).
    _, idx = _sorted_choice(*select_topk_experts(scores, 3, "group_limited_greedy", n_group=4, topk_group=2))
    assert idx.tolist() == [[0, 4, 5]]
    _, greedy_idx = _sorted_choice(*select_topk_experts(scores, 3, "greedy"))
    assert greedy_idx.tolist() == [[0, 5, 6]]


def test_sequence_level_aux_loss_by_hand():
    # 2 sequences x 2 tokens, 4 experts, top-1.
    scores = torch.tensor([[0.7, 0.1, 0.1, 0.1],
                           [0.1, 0.6, 0.2, 0.1],
                           [0.25, 0.25, 0.25, 0.25],
                           [0.1, 0.1, 0.1, 0.7]], dtype=torch.float64)
    idx = torch.tensor([[0], [1], [0], [3]])
    # Sequence 0: f = counts / (S*K/E) = [1, 1, 0, 0] / 0.5 = [2, 2, 0, 0]; P = [0.4, 0.35, 0.15, 0.1]
    #   sum f*P = 0.8 + 0.7 = 1.5
    # Sequence 1: f = [2, 0, 0, 2]; P = [0.175, 0.175, 0.175, 0.475] -> 0.35 + 0.95 = 1.3
    # mean 1.4, times alpha 0.01 -> 0.014
    assert load_balance_loss(scores, idx, batch_size=2, alpha=0.01, seq_aux=True).item() == pytest.approx(0.014)
    # Batch level: f = one-hot mean * E = [2, 1, 0, 1]; P = column means = [0.2875, 0.2625, 0.1625, 0.2875]
    # sum = 0.575 + 0.2625 + 0.2875 = 1.125 -> 0.01125
    assert load_balance_loss(scores, idx, batch_size=2, alpha=0.01, seq_aux=False).item() == pytest.approx(0.01125)


# ---- whole model ----------------------------------------------------------------------------------
def _tiny(name, seed=0):
    config = load_config(os.path.join(CONFIGS, name))
    return config, build_model(config, seed=seed)


@pytest.mark.parametrize("name", ["tiny-deepseek-v2", "tiny-deepseek-moe"])
def test_training_loss_includes_balance_loss_and_backward_reaches_every_parameter(name):
    config, model = _tiny(name)
    input_ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    model.train()
    out = model(input_ids=input_ids, labels=input_ids)
    assert out.aux_loss is not None and out.aux_loss.item() > 0
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss)
    # The cross-entropy of a freshly initialised model is close to ln(vocab).
    assert abs(out.lm_loss.item() - math.log(config.vocab_size)) < 0.5
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None and ".experts." not in n]
    assert not missing
    # gate weights get gradient only through the routing weights and the balance loss
    assert model.model.layers[1].mlp.gate.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        eval_out = model(input_ids=input_ids, labels=input_ids)
    assert eval_out.aux_loss is None
    torch.testing.assert_close(eval_out.loss, out.lm_loss)


def test_padding_mask_hides_padded_keys():
    config, model = _tiny("tiny-deepseek-v2")
    model.eval()
    ids = torch.randint(2, config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        short = model(input_ids=ids[:, :5]).logits
        padded_ids = torch.cat([ids[:, :5], torch.zeros(1, 3, dtype=torch.long)], dim=1)
        mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]])
        padded = model(input_ids=padded_ids, attention_mask=mask).logits
    torch.testing.assert_close(padded[:, :5], short, rtol=1e-5, atol=1e-5)


def test_causality():
    config, model = _tiny("tiny-deepseek-moe")
    model.eval()
    ids = torch.randint(0, config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(4))
    changed = ids.clone()
    changed[0, 7:] = (changed[0, 7:] + 1) % config.vocab_size
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, model(input_ids=changed).logits
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


@pytest.mark.parametrize("name", ["tiny-deepseek-v2", "tiny-deepseek-moe"])
def test_save_pretrained_from_pretrained_round_trip_is_bitwise(name, tmp_path):
    config, model = _tiny(name, seed=5)
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "model.safetensors").exists()
    cls = type(model)
    loaded = cls.from_pretrained(tmp_path)
    original, reloaded = model.state_dict(), loaded.state_dict()
    assert original.keys() == reloaded.keys()
    for key in original:
        assert torch.equal(original[key], reloaded[key]), key
    saved_config, original_config = loaded.config.to_dict(), model.config.to_dict()
    saved_config.pop("_name_or_path"), original_config.pop("_name_or_path")
    assert saved_config == original_config
    ids = torch.randint(0, config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(6))
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)


@pytest.mark.parametrize("name,weight_dtype", [("tiny-deepseek-v2", torch.float32),
                                               ("tiny-deepseek-moe", torch.bfloat16)])
def test_gate_precision_follows_each_public_model(name, weight_dtype):
    """DeepSeek-V2 scores in float32 whatever the compute dtype; DeepSeekMoE v1 in the compute dtype."""
    config, model = _tiny(name)
    gate = model.to(torch.bfloat16).model.layers[1].mlp.gate
    _, weights, _ = gate(torch.randn(1, 4, config.hidden_size, dtype=torch.bfloat16))
    assert weights.dtype == weight_dtype
