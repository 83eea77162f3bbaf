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
    assert pinned_options(given, ["fused_adamw", "attention"]) == ["attention", "ce_chunk_tokens", "fused_adamw"]
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
        seen.add((c.pp > 1, c.zero, bool(e.ce_chunk_tokens), e.defer_grad_sync, e.zero3_keep_gathered))
    # pipelined candidates were scored; what the rule refuses never was (deferred sync under ZeRO 2 / 3,
    # units kept gathered outside ZeRO 3 or with pipeline stages)
    assert any(pp for pp, *_ in seen)
    assert not any(zero and defer for _, zero, _, defer, _ in seen)
    assert not any(keep and (zero != 3 or pp) for pp, zero, _, _, keep in seen)


def test_unsupported_names_the_reason():
    assert "needs bf16" in unsupported(ExecutionOptions(compile="layer"), 1, 0, "fp32")
    assert "without pipeline" in unsupported(ExecutionOptions(zero3_keep_gathered=2), 2, 3, "bf16")
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


# ---- the attention kernel, document masking, expert imbalance, ZeRO-3 resharding (issue 13) ----------
CODER = os.path.join(REPO, "configs", "deepseek-coder-v2-lite")


def _profile_file(tmp_path, name="h200", **changes):
    """A copy of a shipped profile with top-level fields replaced (None: removed)."""
    import json
    from compiler.profiles import profile_path
    with open(profile_path(name)) as f:
        doc = json.load(f)
    for key, value in changes.items():
        if value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    path = tmp_path / f"{name}-changed.json"
    path.write_text(json.dumps(doc))
    return str(path)


def _cost_model(config_dir=TINY, profile="h200", micro=2, seq=64, dtype="bf16", **kw):
    config = load_config(config_dir)
    graph = trace_training_step(build_traced_model(config), micro, seq)
    return CostModel(model_costs(graph, config), load_profile(profile), 128, dtype=dtype, **kw)


def _candidate(**kw):
    from compiler.cost_model import Candidate
    fields = dict(pp=1, dp=1, ep=1, tp=1, zero=0, zero_over_replicas=True, schedule="GradAccum", splits=(),
                  recompute=("none",), micro_batches=2)
    fields.update(kw)
    return Candidate(**fields)


def _kernel_time(model, kernel):
    """Seconds of the traced SDPA calls (forward and backward, every layer) priced as `kernel`."""
    priced = model.with_execution(ExecutionOptions(attention=kernel))
    return sum(priced._attention_call_time(flops, shape, forward, 1)
               for name in model.costs.layer_kinds for phase in ("fwd", "bwd")
               for flops, shape, forward in getattr(model.costs.kinds[name], phase)["attention"].attention)


def test_the_attention_kernel_is_searched_among_the_profiles_and_a_flag_pins_it(tmp_path):
    """h200 lists sdpa (cuDNN there), sdpa_cudnn, sdpa_flash_padded and sdpa_efficient: unpinned, the
    search records the fastest (PyTorch's own sdpa; cuDNN ties it and loses the tie); pinned to the
    padded flash kernel, the plan records it and is predicted slower, as the profile's throughputs say."""
    searched = _compile(tmp_path, device_profile="h200", mem_limit_gib=128)
    assert searched.execution["attention"] == "sdpa"
    pinned = _compile(tmp_path, device_profile="h200", mem_limit_gib=128, attention="sdpa_flash_padded",
                      pinned=("attention",))
    assert pinned.execution["attention"] == "sdpa_flash_padded"
    assert pinned.predicted["step_time_s"] > searched.predicted["step_time_s"]
    # the chosen kernel's effect is listed; without it the run would get the runtime's default (sdpa here)
    assert searched.predicted["execution_effects"]["attention"]["step_time_s_without"] == \
        searched.predicted["execution_effects"]["attention"]["step_time_s"]


def test_the_cost_model_prices_the_kernel_the_run_executes():
    """One H200 layer of Coder-V2-Lite's attention at micro-batch 8 (the bench's kernel check shape):
    cuDNN (sdpa's pick) 1.8 ms forward + backward, the efficient kernel 10.2 ms; the padded flash
    kernel computes 384 / 320 of the FLOPs and keeps wider values."""
    import copy
    one = copy.deepcopy(load_config(CODER))
    one.num_hidden_layers, one.first_k_dense_replace = 1, 1  # one dense layer: its attention is every layer's
    graph = trace_training_step(build_traced_model(one), 8, 2048)
    costs = model_costs(graph, one)
    model = CostModel(costs, load_profile("h200"), 128)
    times = {k: _kernel_time(model, k) for k in ("sdpa", "sdpa_cudnn", "sdpa_efficient", "sdpa_flash_padded")}
    assert times["sdpa"] == pytest.approx(1.8e-3, rel=0.02) and times["sdpa_cudnn"] == times["sdpa"]
    assert times["sdpa_efficient"] == pytest.approx(10.2e-3, rel=0.02)
    assert times["sdpa"] < times["sdpa_flash_padded"] < times["sdpa_efficient"]
    assert model.attention_cost("sdpa_flash_padded")[1] > model.attention_cost("sdpa")[1]  # padded v and output
    # unset: the runtime's default, flash-attn only where the profile lists it as installed
    assert CostModel(costs, load_profile("h200"), 128).attention == "sdpa"


def test_a_profile_that_does_not_list_a_kernel_cannot_choose_it(tmp_path):
    """The search considers only the kernels the profile lists (flash-attn included, when the profile says
    it is installed by listing it), less those another listed kernel beats on time and memory."""
    from compiler.execution import attention_choices
    model = _cost_model()
    assert attention_choices(load_profile("h200").attention, model.attention_cost) == ["sdpa"]
    assert set(attention_choices(load_profile("cpu").attention, _cost_model(profile="cpu", dtype="fp32")
                                 .attention_cost)) <= {"sdpa", "sdpa_flash_padded"}
    only_slow = _profile_file(tmp_path, attention={"kernels": {"sdpa_efficient": [[1e9, 50.0]]}})
    plan = _compile(tmp_path, device_profile=only_slow, mem_limit_gib=128)
    assert plan.execution["attention"] == "sdpa_efficient"
    with_flash = _profile_file(tmp_path, attention={"kernels": {"sdpa": [[1e9, 200.0]], "flash": [[1e9, 400.0]]}})
    assert _compile(tmp_path, device_profile=with_flash, mem_limit_gib=128).execution["attention"] == "flash"
    none = _profile_file(tmp_path, attention=None)
    assert "attention" not in _compile(tmp_path, device_profile=none, mem_limit_gib=128).execution
    assert {v.attention for v in variants(ExecutionOptions(), [], "bf16", ["sdpa", "flash"])} == {"sdpa", "flash"}


def test_document_masking_prices_the_regrouped_documents_and_is_recorded(tmp_path):
    """Packed rows: the SDPA kernels run the documents regrouped for their causal path
    (kernels.attention_by_document): the causal work plus the gathers' traffic, the regrouping's
    per-call cost (the profile's document_regroup_ms) and the windows' padding kept for the backward,
    so slower and larger than plain causal attention; FlexAttention takes the documents as they lie
    (no regrouping: cheaper than the regrouped kernels, no extra memory); the eager kernel computes
    an explicit S x S mask, dearer than plain causal attention."""
    plain, packed = _cost_model(seq=256), _cost_model(seq=256, document_masking=True)
    masked = _kernel_time(packed, "eager")
    assert masked > _kernel_time(plain, "eager")
    for kernel in ("sdpa", "sdpa_flash_padded"):
        assert _kernel_time(plain, kernel) < _kernel_time(packed, kernel)
        assert _kernel_time(packed, "flex") < _kernel_time(packed, kernel)
        assert packed.attention_cost(kernel)[1] > plain.attention_cost(kernel)[1]
    assert packed.attention_cost("flex")[1] == plain.attention_cost("flex")[1]
    # whole rows: flex runs sdpa's causal kernel, priced as sdpa
    assert _kernel_time(plain, "flex") == pytest.approx(_kernel_time(plain, "sdpa"))
    assert packed.with_execution(ExecutionOptions(attention="eager"))._attention_kernel()[1]
    assert not packed._attention_kernel()[1]
    masked = packed
    cand = _candidate()
    assert masked.evaluate(cand).step_time_s > plain.evaluate(cand).step_time_s
    assert masked.evaluate(cand).max_peak_gib > plain.evaluate(cand).max_peak_gib
    plan = _compile(tmp_path, document_masking=True)
    assert plan.search_inputs["document_masking"] is True
    assert _compile(tmp_path).search_inputs["document_masking"] is False
    r = subprocess.run([sys.executable, "train.py", "--run_mode", "compile", "--model_id", TINY, "--plan_ngpus", "1",
                        "--seq_len", "64", "--micro_batch_size", "2", "--global_batch_size", "4", "--device_profile",
                        "cpu", "--document_masking", "on", "--plan_out", str(tmp_path / "m.json")],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    from compiler.plan import Plan
    assert Plan.load(str(tmp_path / "m.json")).search_inputs["document_masking"] is True


def test_the_load_imbalance_factor_scales_the_expert_parallel_cost(tmp_path):
    """The busiest expert rank sets the pace: its routed GEMMs and all-to-all volume scale with the factor
    (the profile's by ep, or --expert_load_imbalance); without expert parallelism nothing changes.
    The forward also pays the split sizes' exchange and host synchronisation."""
    even, skewed = _cost_model(expert_load_imbalance=1.0), _cost_model(expert_load_imbalance=2.0)
    ep2, dp2 = _candidate(ep=2, micro_batches=1), _candidate(dp=2, micro_batches=1)
    moe = even.costs.kinds["moe"]
    assert skewed.kind_time(moe, 1, 2)[0] > even.kind_time(moe, 1, 2)[0]
    # the backward's two all-to-alls: twice the volume, the same latency
    latency = 2 * load_profile("h200").collective_entry("all_to_all", 2)["latency_us"] * 1e-6
    skewed_bwd, even_bwd = skewed._block_comm(moe, 1, 2)[1], even._block_comm(moe, 1, 2)[1]
    assert skewed_bwd - even_bwd == pytest.approx(even_bwd - latency) and skewed_bwd > even_bwd
    assert skewed.evaluate(ep2).step_time_s > even.evaluate(ep2).step_time_s
    assert skewed.evaluate(dp2).step_time_s == even.evaluate(dp2).step_time_s
    assert _cost_model().load_imbalance(2) == load_profile("h200").load_imbalance(2) > 1.0
    fwd, bwd = even._block_comm(moe, 1, 2)
    assert fwd - bwd == pytest.approx(even._split_sizes_time(2)) and even._split_sizes_time(2) > 20e-6
    plan = _compile(tmp_path, expert_load_imbalance=1.3)
    assert plan.search_inputs["expert_load_imbalance"] == 1.3
    assert _compile(tmp_path).search_inputs["expert_load_imbalance"] == {"2": 1.124, "4": 1.446, "8": 1.846}
    with pytest.raises(Exception, match="expert_load_imbalance"):
        _compile(tmp_path, expert_load_imbalance=0.5)


def test_zero3_units_kept_gathered_trade_an_all_gather_for_memory():
    """--zero3_keep_gathered K: the model's own parameters, then the last decoder layers, keep their
    gathered weights until their backward: one all-gather fewer each per micro-batch, their weights
    held in between; the search scores K only for ZeRO-3 plans without pipeline stages."""
    model = _cost_model()
    cand = _candidate(dp=4, zero=3, micro_batches=1)
    keep = {k: model.with_execution(ExecutionOptions(zero3_keep_gathered=k)) for k in (0, 1, 2, 4)}
    comm = {k: m._zero_comm(cand, 0)[0] for k, m in keep.items()}
    memory = {k: m.stage_memory(cand, 0, "none")["gathered_params_and_grads"] for k, m in keep.items()}
    assert comm[0] > comm[1] > comm[2] > comm[4] and memory[0] < memory[1] < memory[2] < memory[4]
    assert keep[4].evaluate(cand).step_time_s <= keep[0].evaluate(cand).step_time_s
    assert "ZeRO 3" in unsupported(ExecutionOptions(zero3_keep_gathered=1), 1, 2, "bf16")
    assert "pipeline" in unsupported(ExecutionOptions(zero3_keep_gathered=1), 2, 3, "bf16")
    assert unsupported(ExecutionOptions(zero3_keep_gathered=2), 1, 3, "bf16") is None
    searched = {v.zero3_keep_gathered for v in variants(ExecutionOptions(), [], "bf16")}
    assert searched == {0, 1, 2, 4}
    assert {v.zero3_keep_gathered for v in variants(ExecutionOptions(), ["zero3_keep_gathered"], "bf16")} == {0}


@pytest.mark.parametrize("changes,message", [
    ({"attention": {"kernels": {"magic": [[1e9, 1.0]]}}}, "attention.kernels.magic"),
    ({"attention": {"kernels": {"sdpa": [[1e9, 1.0]]}, "masked": "sdpa_efficient"}}, "attention.masked"),
    ({"attention": {"kernels": {}}}, "field 'attention'"),
    ({"expert_load_imbalance": {"4": 0.9}}, "expert_load_imbalance.4"),
    ({"host_sync_us": -1}, "host_sync_us"),
])
def test_a_profile_with_wrong_attention_or_imbalance_figures_is_refused(tmp_path, changes, message):
    from compiler.profiles import ProfileError
    with pytest.raises(ProfileError, match=message):
        load_profile(_profile_file(tmp_path, **changes))


def test_the_attention_figures_need_a_source(tmp_path):
    import json
    from compiler.profiles import ProfileError, profile_path
    doc = json.load(open(profile_path("h200")))
    del doc["sources"]["attention"]
    (tmp_path / "p.json").write_text(json.dumps(doc))
    with pytest.raises(ProfileError, match="sources.attention"):
        load_profile(str(tmp_path / "p.json"))
    # the figures survive a round trip through the profile's JSON form
    profile = load_profile("h200")
    again = type(profile).from_json(json.loads(json.dumps(profile.to_json())))
    assert again.attention == profile.attention and again.expert_load_imbalance == profile.expert_load_imbalance
    assert again.attention_masked == "sdpa_efficient" and again.host_sync_us == profile.host_sync_us
