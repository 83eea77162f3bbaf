"""The compiler chooses how a step runs: execution options and the micro-batch size are part of the
search, a flag given pins its choice, and what cannot run is never emitted."""

import dataclasses
import os
import subprocess
import sys
import time

import pytest

from compiler.compile import compile_plan, merge_results
from compiler.cost_model import CostModel, model_costs
from compiler.execution import LOSS_CHUNK_TOKENS, pinned_options, unsupported, variants
from compiler.profiles import load_profile
from compiler.search import search
from compiler.trace import build_traced_model, trace_training_step
from modeling import load_config
from options import CompileOptions, ExecutionOptions

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny-deepseek-v2")


def _compile(tmp_path, **overrides):
    options = dict(model_id=TINY, plan_ngpus=4, runtime_ngpus=4, seq_len=64, micro_batch_size=2, global_batch_size=32,
                   device_profile="h100", mem_limit_gib=64, plan_out=str(tmp_path / "p.json"), report=False)
    options.update(overrides)
    return compile_plan(CompileOptions(**options))[0]


def test_compile_without_flags_chooses_the_execution_and_says_what_each_option_buys(tmp_path):
    plan = _compile(tmp_path)
    chosen = plan.execution
    # the h100 profile prices compiled layers and fused AdamW as faster: the search takes them
    assert chosen.get("compile") == "layer" and chosen.get("fused_adamw") is True
    effects = plan.predicted["execution_effects"]
    assert set(effects) == set(chosen)
    for name, e in effects.items():
        assert e["value"] == chosen[name]
        # each chosen option is at least as fast as the plan without it, or saves memory
        assert e["step_time_s_without"] >= e["step_time_s"] or e["peak_memory_gib_without"] > e["peak_memory_gib"], name
    assert "what each option buys" in plan.explanation


def test_a_flag_given_pins_its_choice(tmp_path):
    plan = _compile(tmp_path, compile="none", pinned=("compile", "fused_adamw"))
    assert "compile" not in plan.execution and "fused_adamw" not in plan.execution
    r = subprocess.run([sys.executable, "train.py", "--run_mode", "compile", "--model_id", TINY, "--plan_ngpus", "1",
                        "--seq_len", "64", "--micro_batch_size", "2", "--global_batch_size", "4", "--device_profile",
                        "h100", "--fused_adamw", "off", "--compile", "none", "--plan_out", str(tmp_path / "f.json")],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "pinned: compile, fused_adamw" in r.stderr


def test_pinned_options_are_the_flags_given_and_the_non_default_values():
    given = ExecutionOptions(ce_chunk_tokens=128)
    assert pinned_options(given, ["fused_adamw", "attention"]) == ["ce_chunk_tokens", "fused_adamw"]
    searched = variants(given, pinned_options(given), "bf16")
    assert {v.ce_chunk_tokens for v in searched} == {128}
    assert {v.compile for v in searched} == {"none", "layer"}
    assert {v.compile for v in variants(ExecutionOptions(), [], "fp32")} == {"none"}  # compiled layers need bf16
    assert {v.ce_chunk_tokens for v in variants(ExecutionOptions(), [], "bf16")} == {0, LOSS_CHUNK_TOKENS}


def test_micro_batch_size_auto_is_searched_and_a_given_one_honoured(tmp_path):
    auto = _compile(tmp_path, micro_batch_size="auto", plan_ngpus=1, runtime_ngpus=1, global_batch_size=8)
    micro = auto.search_inputs["micro_batch_size"]
    assert micro in (1, 2, 4, 8) and auto.schedule["micro_batches"] == 8 // micro
    fixed = _compile(tmp_path, micro_batch_size=2, plan_ngpus=1, runtime_ngpus=1, global_batch_size=8)
    assert fixed.search_inputs["micro_batch_size"] == 2
    # auto is at least as fast as the given size, which was one of the sizes it searched
    assert auto.predicted["step_time_s"] <= fixed.predicted["step_time_s"] + 1e-12


def test_the_search_never_emits_an_execution_the_runtime_refuses():
    config = load_config(TINY)
    results = []
    for micro in (1, 2):
        costs = model_costs(trace_training_step(build_traced_model(config), micro, 64), config)
        model = CostModel(costs, load_profile("h100"), 64, runtime_replicas=1, dtype="bf16")
        results.append(search(model, 4, 4, 16, micro, variants(ExecutionOptions(), [], "bf16")))
    merged = merge_results(results)
    assert {s.micro_batch_size for s in merged.ranked} == {1, 2}
    seen = set()
    for scored in merged.ranked + [r for r, _ in merged.rejected]:
        c, e = scored.candidate, scored.execution
        assert unsupported(e, c.pp, c.zero, "bf16") is None, (c.describe(), e)
        seen.add((c.pp > 1, c.zero, bool(e.ce_chunk_tokens), e.defer_grad_sync))
    # pipelined candidates were scored, and none of them with the chunked loss or deferred sync
    assert any(pp for pp, *_ in seen) and not any(pp and (chunk or defer) for pp, _, chunk, defer in seen)
    assert not any(zero and defer for _, zero, _, defer in seen)


def test_unsupported_names_the_reason():
    assert "needs bf16" in unsupported(ExecutionOptions(compile="layer"), 1, 0, "fp32")
    assert "without pipeline" in unsupported(ExecutionOptions(ce_chunk_tokens=64), 2, 0, "bf16")
    assert "ZeRO 0" in unsupported(ExecutionOptions(defer_grad_sync=True), 1, 3, "bf16")
    assert unsupported(dataclasses.replace(ExecutionOptions(), fused_adamw=True), 4, 3, "fp32") is None


def test_an_absurd_device_count_is_refused_at_once(tmp_path):
    started = time.perf_counter()
    r = subprocess.run([sys.executable, "train.py", "--run_mode", "compile", "--model_id", TINY, "--plan_ngpus",
                        "100000", "--device_profile", "cpu", "--plan_out", str(tmp_path / "x.json")],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--plan_ngpus 100000" in r.stderr and "Traceback" not in r.stderr
    assert time.perf_counter() - started < 60


@pytest.mark.parametrize("devices", [1024, 4096])
def test_a_large_but_real_device_count_compiles_in_seconds(tmp_path, devices):
    started = time.perf_counter()
    plan = _compile(tmp_path, plan_ngpus=devices, runtime_ngpus=devices, global_batch_size=devices,
                    micro_batch_size=1, device_profile="cpu")
    assert plan.plan_ngpus == devices
    assert time.perf_counter() - started < 60
