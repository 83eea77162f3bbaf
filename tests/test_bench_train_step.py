"""bench/train_step.py runs end to end on the CPU (tiny model), and its FLOP count is the documented one."""

import json
import os
import subprocess
import sys

import pytest

from modeling import load_config
from tests.runtime_harness import REPO

sys.path.insert(0, os.path.join(REPO, "bench"))
import train_step  # noqa: E402


def test_bench_runs_every_kind_of_variant_on_cpu(tmp_path):
    variants = ["base", "plan", "ce_chunk=16", "recompute=full", "micro=4", "sync=step+dtype=bf16",
                "compile=layer+dtype=bf16+ce_chunk=16", "attention=sdpa_cudnn"]
    r = subprocess.run(
        [sys.executable, "bench/train_step.py", "--device", "cpu", "--model_dir", "configs/tiny-deepseek-v2",
         "--layers", "0", "--seq_len", "64", "--micro_batch_size", "2", "--global_batch_size", "8", "--steps", "3",
         "--warmup", "1", "--compile_backend", "aot_eager", "--variants", ",".join(variants),
         "--out_dir", str(tmp_path / "out"), "--json", str(tmp_path / "r.json")],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert "| variant | mb | recompute | step s |" in r.stdout, r.stdout + r.stderr
    results = {x["variant"]: x for x in json.load(open(tmp_path / "r.json"))["results"]}
    assert list(results) == variants
    # the cuDNN kernel does not exist on a CPU: reported as a failed variant, the others still ran
    assert r.returncode == 1 and "error" in results["attention=sdpa_cudnn"]
    for name in variants[:-1]:
        x = results[name]
        assert "error" not in x, (name, x)
        assert x["steps"] == 4 and x["timed_steps"] == 3 and x["step_time_s"] > 0 and x["tokens_per_s"] > 0
        assert x["predicted_step_time_s"] > 0 and x["predicted_peak_memory_gib"] > 0 and x["peak_memory_gib"] > 0
        assert "| " + name + " |" in r.stdout
    assert results["recompute=full"]["recompute"] == "full" and results["base"]["recompute"] == "none"
    assert results["micro=4"]["micro_batch_size"] == 4 and results["micro=4"]["micro_batches"] == 2
    # the compiler's own plan: micro-batch and execution searched, then run as chosen
    plan = results["plan"]
    assert plan["micro_batch_size"] in (1, 2, 4, 8) and plan["micro_batches"] * plan["micro_batch_size"] == 8
    # hand-written variants pin their options: the base's is its attention kernel, PyTorch's own sdpa
    assert results["base"]["plan_execution"] == {"attention": "sdpa"}
    # a recompute the compiler did not choose is re-costed, not copied from the plan
    assert results["recompute=full"]["predicted_step_time_s"] > results["base"]["predicted_step_time_s"]
    # every fp32 variant trains the same model on the same data (the techniques change speed only)
    for name in ("ce_chunk=16", "recompute=full", "micro=4"):
        for a, b in zip(results[name]["losses"], results["base"]["losses"]):
            assert abs(a - b) < 1e-4 * abs(b), name
    for name in ("sync=step+dtype=bf16", "compile=layer+dtype=bf16+ce_chunk=16"):
        for a, b in zip(results[name]["losses"], results["base"]["losses"]):
            assert abs(a - b) < 1e-2 * abs(b), name


def test_active_parameters_of_coder_v2_lite_with_4_layers():
    """Counted on the meta model, checked against the formula written out from the config."""
    config = load_config(os.path.join(REPO, "configs", "deepseek-coder-v2-lite"))
    config.num_hidden_layers = 4
    c = config
    D, H, V = c.hidden_size, c.num_attention_heads, c.vocab_size
    attention = (D * H * (c.qk_nope_head_dim + c.qk_rope_head_dim) + D * (c.kv_lora_rank + c.qk_rope_head_dim)
                 + c.kv_lora_rank + c.kv_lora_rank * H * (c.qk_nope_head_dim + c.v_head_dim)
                 + H * c.v_head_dim * D)
    dense = attention + 2 * D + 3 * D * c.intermediate_size
    moe = (attention + 2 * D + c.n_routed_experts * D + 3 * D * c.moe_intermediate_size * c.n_shared_experts
           + c.num_experts_per_tok * 3 * D * c.moe_intermediate_size)
    expected = V * D + D + dense + 3 * moe  # lm_head, final norm, 1 dense + 3 MoE layers; no embedding
    active, total = train_step.active_parameters(config)
    assert active == expected
    assert round(active / 1e6, 1) == 540.0 and round(total / 1e9, 2) == 2.25
    # attention: 3 x 2048 x 16 heads x (192 + 128) x 4 layers per token
    assert train_step.attention_flops_per_token(config, 2048) == 3 * 2048 * 16 * 320 * 4
    per_token = train_step.flops_per_token(config, 2048)
    assert round(per_token / 1e9, 3) == 3.366
    assert round(0.3 * 989e12 / per_token / 1e3, 1) == 88.1  # the docstring's 30 % MFU figure


@pytest.mark.parametrize("text,message", [("compile=fast", "compile must be one of"), ("micro=0", "whole number"),
                                          ("speed=1", "is not KEY=VALUE")])
def test_bad_variants_are_named(text, message):
    with pytest.raises(ValueError, match=message):
        train_step.parse_variant(text)


def test_presets_expand_to_valid_variants():
    for preset in train_step.PRESETS:
        for name in train_step.expand_variants(preset):
            train_step.parse_variant(name)
