"""The compiler: tracing, cost model, search, plan files, and the compile / inspect command line."""

import itertools
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from compiler.annotations import AnnotationShapeError, register_op_annotation
from compiler.compile import CompileRequest, compile_plan
from compiler.cost_model import Candidate, CostModel, model_costs
from compiler.plan import Plan, PlanError
from compiler.profiles import load_profile
from compiler.search import Scored, _schedules, mesh_shapes, search
from compiler.trace import build_traced_model, trace_training_step
from modeling import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")


def _config(name, **overrides):
    config = load_config(os.path.join(CONFIGS, name))
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def _run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "train.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


# ---- tracing ----------------------------------------------------------------------------------------
def analytic_flops(config, B, S):
    """Forward + backward FLOPs of a DeepSeek-V2 training step, counted by hand.

    Weight GEMMs: 2 x rows x in x out forward, twice that backward (input and weight gradients).
    Attention core per head: forward QK^T (d_qk) and PV (d_v); backward recomputes QK^T and computes
    dV, dP, dQ, dK: 2 B S^2 (3 d_qk + 2 d_v). The router recomputes its GEMM in the backward (3x).
    """
    T, D, H = B * S, config.hidden_size, config.num_attention_heads
    d_qk = config.qk_nope_head_dim + config.qk_rope_head_dim
    d_v = config.v_head_dim
    attn_weights = (D * H * d_qk + D * (config.kv_lora_rank + config.qk_rope_head_dim)
                    + config.kv_lora_rank * H * (config.qk_nope_head_dim + d_v) + H * d_v * D)
    core_fwd = 2 * B * H * S * S * (d_qk + d_v)
    core_bwd = 2 * B * H * S * S * (3 * d_qk + 2 * d_v)
    total = 0
    for layer in range(config.num_hidden_layers):
        total += 3 * 2 * T * attn_weights + core_fwd + core_bwd
        if layer >= config.first_k_dense_replace:
            F_, E, K = config.moe_intermediate_size, config.n_routed_experts, config.num_experts_per_tok
            total += 3 * 2 * T * K * 3 * D * F_                       # routed experts
            total += 3 * 2 * T * 3 * D * F_ * config.n_shared_experts  # shared experts
            total += 3 * 2 * T * D * E                                # router (GEMM recomputed)
        else:
            total += 3 * 2 * T * 3 * D * config.intermediate_size
    total += 3 * 2 * T * D * config.vocab_size                        # lm_head
    return total


def test_traced_flops_match_an_analytic_count():
    config = _config("deepseek-coder-v2-lite", num_hidden_layers=3)  # full widths, fewer layers
    graph = trace_training_step(build_traced_model(config), batch_size=2, seq_len=512)
    expected = analytic_flops(config, 2, 512)
    assert abs(graph.total_flops() - expected) / expected < 0.01
    # forward alone: the backward is about twice the forward
    ratio = graph.total_flops("bwd") / graph.total_flops("fwd")
    assert 1.9 < ratio < 2.3


def test_trace_records_module_paths_phases_and_saved_bytes():
    config = _config("tiny-deepseek-v2")
    graph = trace_training_step(build_traced_model(config), batch_size=2, seq_len=32)
    categories = {(op.category, op.phase) for op in graph.ops}
    for family in ("attention", "experts", "router", "dense_mlp", "shared_experts", "head"):
        assert (family, "fwd") in categories and (family, "bwd") in categories, family
    router_calls = [op for op in graph.custom_ops() if op.name == "deepseek.moe_route"]
    assert len(router_calls) == config.num_hidden_layers - config.first_k_dense_replace
    assert all(op.layer is not None and op.module_path.endswith("mlp.gate") for op in router_calls)
    assert router_calls[0].out_shapes[:2] == [(64, 2), (64, 2)]
    assert graph.saved_bytes[(1, "attention")] > 0
    assert graph.param_counts[(1, "experts")] == 8 * 3 * 64 * 32


def test_annotation_that_disagrees_with_traced_shapes_names_the_op():
    @torch.library.custom_op("compiler_test::scale_rows", mutates_args=())
    def scale_rows(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @scale_rows.register_fake
    def _(x):
        return torch.empty_like(x)

    register_op_annotation("compiler_test::scale_rows", "n h -> n h k^")  # wrong: output is 2-D

    class Tiny(torch.nn.Module):
        def forward(self, x):
            return torch.ops.compiler_test.scale_rows(x)

    from compiler.trace import _Recorder
    with pytest.raises(AnnotationShapeError, match="compiler_test::scale_rows"):
        with _Recorder([]):
            Tiny()(torch.empty(3, 4, device="meta"))


# ---- search ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_costs():
    config = _config("tiny-deepseek-v2")
    graph = trace_training_step(build_traced_model(config), batch_size=2, seq_len=64)
    return config, model_costs(graph, config)


def test_search_choice_equals_brute_force_under_the_same_cost_model(tiny_costs):
    config, costs = tiny_costs
    profile = load_profile("cpu")
    plan_ngpus, runtime_ngpus, global_batch, micro = 4, 8, 32, 2
    # a limit between the smallest and largest peaks, so that memory decides some of the choices
    probe = CostModel(costs, profile, mem_limit_gib=1e9, runtime_replicas=2)
    everything = search(probe, plan_ngpus, runtime_ngpus, global_batch, micro).ranked
    peaks = sorted(s.prediction.max_peak_gib for s in everything)
    limit = peaks[len(peaks) // 3]
    model = CostModel(costs, profile, mem_limit_gib=limit, runtime_replicas=2)
    result = search(model, plan_ngpus, runtime_ngpus, global_batch, micro)

    layers = config.num_hidden_layers
    best = None
    for pp, dp, ep, tp in mesh_shapes(plan_ngpus, layers, config.num_attention_heads, config.n_routed_experts, True):
        data_parallel = dp * ep * 2
        if global_batch % (micro * data_parallel):
            continue
        m = global_batch // (micro * data_parallel)
        if pp > 1 and m < pp:
            continue
        zeros = [(0, False)] + ([(lvl, True) for lvl in (2, 3)] if tp == 1 else [])
        for (zero, over), (schedule, v) in itertools.product(zeros, _schedules(pp, m, layers)):
            for splits in itertools.combinations(range(1, layers), pp - 1):
                for recompute in itertools.product(("none", "full"), repeat=pp):
                    cand = Candidate(pp, dp, ep, tp, zero, over, schedule, splits, recompute, m, v)
                    scored = Scored(cand, model.evaluate(cand))
                    if scored.prediction.fits and (best is None or scored.sort_key() < best.sort_key()):
                        best = scored
    assert best is not None
    assert result.best.candidate == best.candidate
    assert result.best.prediction.step_time_s == pytest.approx(best.prediction.step_time_s)
    assert len(result.ranked) >= 6  # the winner and at least five runners-up


def test_search_is_deterministic(tiny_costs):
    _, costs = tiny_costs
    model = CostModel(costs, load_profile("cpu"), mem_limit_gib=8, runtime_replicas=1)
    a = search(model, 4, 4, 16, 2)
    b = search(model, 4, 4, 16, 2)
    assert [s.candidate for s in a.ranked] == [s.candidate for s in b.ranked]


# ---- plan files ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_plan(tmp_path_factory):
    out = tmp_path_factory.mktemp("plans") / "tiny.json"
    plan, path = compile_plan(CompileRequest(model_id=os.path.join(CONFIGS, "tiny-deepseek-v2"), plan_ngpus=4,
                                             runtime_ngpus=8, seq_len=64, micro_batch_size=2, global_batch_size=32,
                                             mem_limit_gib=4, device_profile="cpu", plan_out=str(out)))
    return plan, path


def test_plan_rank_writes_the_runner_up_the_best_plan_lists(tiny_plan, tmp_path):
    best, _ = tiny_plan
    second, _ = compile_plan(CompileRequest(model_id=os.path.join(CONFIGS, "tiny-deepseek-v2"), plan_ngpus=4,
                                            runtime_ngpus=8, seq_len=64, micro_batch_size=2, global_batch_size=32,
                                            mem_limit_gib=4, device_profile="cpu", plan_out=str(tmp_path / "2.json"),
                                            report=False, plan_rank=2))
    runner_up = best.alternatives[0]
    assert second.predicted["step_time_s"] == runner_up["predicted"]["step_time_s"]
    assert second.alternatives[0]["predicted"]["step_time_s"] == best.predicted["step_time_s"]
    with pytest.raises(PlanError, match="--plan_rank 100000: only"):
        compile_plan(CompileRequest(model_id=os.path.join(CONFIGS, "tiny-deepseek-v2"), plan_ngpus=4, seq_len=64,
                                    micro_batch_size=2, global_batch_size=32, mem_limit_gib=4, device_profile="cpu",
                                    plan_out=str(tmp_path / "x.json"), report=False, plan_rank=100000))


def test_plan_json_round_trip_and_required_keys(tiny_plan):
    plan, path = tiny_plan
    with open(path) as f:
        doc = json.load(f)
    for key in ("version", "model", "search_inputs", "plan_ngpus", "mesh", "stages", "ops", "recompute", "zero",
                "schedule", "predicted", "alternatives"):
        assert key in doc, key
    for key in ("step_time_s", "peak_memory_gib", "mfu"):
        assert key in doc["predicted"]
    assert len(doc["predicted"]["peak_memory_gib"]) == 4
    assert len(doc["alternatives"]) >= 5
    assert "deepseek::moe_route" in doc["ops"]
    again = Plan.load(path)
    assert again.to_dict() == plan.to_dict()
    assert os.path.exists(path[:-5] + ".md") and os.path.exists(path[:-5] + ".png")


@pytest.mark.parametrize("mutate,needle", [
    (lambda d: d["mesh"].update(dp=d["mesh"]["dp"] * 3), "mesh"),
    (lambda d: d["stages"][-1]["layers"].__setitem__(1, 99), "layers"),
    (lambda d: d.update(zero={"level": 1, "shard_over_replicas": False}), "zero.level"),
    (lambda d: d["schedule"].update(name="GPipe"), "schedule.name"),
    (lambda d: d.update(version=99), "version"),
    (lambda d: d.pop("ops"), "ops"),
])
def test_plan_validation_names_the_field(tiny_plan, mutate, needle):
    doc = tiny_plan[0].to_dict()
    doc = json.loads(json.dumps(doc))
    mutate(doc)
    with pytest.raises(PlanError, match=needle):
        Plan.from_dict(doc, source="x.json")


def test_plan_for_another_model_names_the_differing_fields(tiny_plan):
    plan, path = tiny_plan
    with pytest.raises(PlanError, match="model_type: plan 'deepseek_v2' vs model 'deepseek'"):
        plan.check_model(_config("tiny-deepseek-moe"), source=path)
    result = _run_cli("--run_mode", "inspect", "--plan", path, "--model_id", "configs/tiny-deepseek-moe")
    assert result.returncode != 0
    assert "differing config fields" in result.stderr and "model_type" in result.stderr
    ok = _run_cli("--run_mode", "inspect", "--plan", path, "--model_id", "configs/tiny-deepseek-v2")
    assert ok.returncode == 0, ok.stderr
    assert "matches the model" in ok.stdout and "runners-up" in ok.stdout


# ---- command-line errors ----------------------------------------------------------------------------
def test_runtime_not_a_multiple_of_plan_is_refused():
    r = _run_cli("--run_mode", "compile", "--model_id", "configs/tiny-deepseek-v2", "--plan_ngpus", "4",
                 "--runtime_ngpus", "6", "--device_profile", "cpu")
    assert r.returncode == 2
    assert "--runtime_ngpus 6 is not a multiple of --plan_ngpus 4" in r.stderr
    assert "Traceback" not in r.stderr


def test_no_plan_fits_gives_the_smallest_peak_and_the_flag(tmp_path):
    r = _run_cli("--run_mode", "compile", "--model_id", "configs/tiny-deepseek-v2", "--plan_ngpus", "2",
                 "--seq_len", "64", "--micro_batch_size", "2", "--global_batch_size", "8",
                 "--device_profile", "cpu", "--mem_limit_gib", "0.01", "--plan_out", str(tmp_path / "p.json"))
    assert r.returncode == 2
    assert "no plan fits 0.01 GiB per device: the smallest predicted peak is" in r.stderr
    assert "--mem_limit_gib" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "p.json").exists()


def test_unknown_profile_is_refused():
    r = _run_cli("--run_mode", "compile", "--model_id", "configs/tiny-deepseek-v2", "--plan_ngpus", "2",
                 "--device_profile", "tpu-v9")
    assert r.returncode == 2
    assert "unknown device profile 'tpu-v9'" in r.stderr and "h100" in r.stderr


# ---- the real model ------------------------------------------------------------------------------------
def test_coder_v2_lite_compiles_in_under_a_minute_within_the_memory_limit(tmp_path):
    out = tmp_path / "coder.json"
    started = time.perf_counter()
    r = _run_cli("--run_mode", "compile", "--model_id", "configs/deepseek-coder-v2-lite", "--plan_ngpus", "4",
                 "--runtime_ngpus", "8", "--device_profile", "h100", "--plan_out", str(out))
    elapsed = time.perf_counter() - started
    assert r.returncode == 0, r.stderr[-2000:]
    assert elapsed < 60, f"compile took {elapsed:.0f}s"
    plan = Plan.load(str(out))
    assert max(plan.predicted["peak_memory_gib"]) < plan.search_inputs["mem_limit_gib"] == 64
    assert plan.plan_ngpus == 4 and plan.search_inputs["runtime_ngpus"] == 8


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(os.path.join(REPO, "plans")) if f.endswith(".json")))
def test_committed_plans_load_and_match_their_models(name):
    plan = Plan.load(os.path.join(REPO, "plans", name))
    plan.check_model(load_config(os.path.join(REPO, plan.model["model_id"])))
    assert max(plan.predicted["peak_memory_gib"]) <= plan.search_inputs["mem_limit_gib"]
    assert os.path.exists(os.path.join(REPO, "plans", name[:-5] + ".md"))


def test_weight_gradient_grouped_gemm_is_costed_by_tokens_per_expert(tiny_costs):
    """The expert weight gradient is a grouped GEMM along the token rows ([out, rows] x [rows, in]); it
    must be looked up at tokens per expert, like the forward, not at out / experts."""
    config, costs = tiny_costs
    moe = costs.kinds["moe"]
    forward_rows = {rows for _, rows in moe.fwd["experts"].grouped}
    backward_rows = {rows for _, rows in moe.bwd["experts"].grouped}
    tokens_per_expert = 2 * 64 * config.num_experts_per_tok / config.n_routed_experts
    assert forward_rows == {tokens_per_expert}
    assert backward_rows == {tokens_per_expert}


def test_speed_options_are_costed_and_recorded_in_the_plan(tmp_path):
    """--compile layer and --ce_chunk_tokens change the prediction by the profile's measured factors,
    and the plan records them for the run to adopt."""
    import copy

    from compiler.cost_model import Candidate, CostModel, Execution
    from compiler.profiles import load_profile
    from runtime.trainer import RunArgs, adopt_plan_execution
    config = _config("deepseek-coder-v2-lite")
    config.num_hidden_layers = 2
    costs = model_costs(trace_training_step(build_traced_model(config), batch_size=1, seq_len=512), config)
    profile = copy.deepcopy(load_profile("h100"))
    profile.execution = {"compiled_layer_bytes": 0.5, "compiled_layer_saved": 0.5, "foreach_adamw": 2.0}
    cand = Candidate(pp=1, dp=1, ep=1, tp=1, zero=0, zero_over_replicas=True, schedule="GradAccum", splits=(),
                     recompute=("none",), micro_batches=2)

    def predict(**options):
        return CostModel(costs, profile, 80, execution=Execution(**options)).evaluate(cand)
    plain, fused_adamw = predict(), predict(fused_adamw=True)
    compiled, chunked = predict(compiled_layers=True), predict(loss_chunk_tokens=128)
    deferred = predict(deferred_grad_sync=True)
    assert fused_adamw.breakdown_s["optimizer step"] == pytest.approx(plain.breakdown_s["optimizer step"] / 2)
    assert compiled.step_time_s < plain.step_time_s
    eager = CostModel(costs, profile, 80)
    layer_saved = sum(eager._saved(costs.kinds[k], 1) for k in costs.layer_kinds) / 2 ** 30
    assert compiled.memory_breakdown_gib[0]["activations"] == pytest.approx(  # layers halved, the head not
        plain.memory_breakdown_gib[0]["activations"] - 0.5 * layer_saved, rel=1e-3)
    assert chunked.step_time_s < plain.step_time_s
    assert chunked.peak_memory_gib[0] < plain.peak_memory_gib[0]
    assert deferred.breakdown_s["mixed-precision casts"] == pytest.approx(plain.breakdown_s["mixed-precision casts"] / 2)

    plan, _ = compile_plan(CompileRequest(model_id=os.path.join(CONFIGS, "tiny-deepseek-v2"), plan_ngpus=1, seq_len=64,
                                          micro_batch_size=2, global_batch_size=4, device_profile="h100",
                                          plan_out=str(tmp_path / "p.json"), report=False,
                                          execution={"compile": "layer", "ce_chunk_tokens": 64, "fused_adamw": False}))
    assert plan.execution == {"compile": "layer", "ce_chunk_tokens": 64}
    args = RunArgs(model_id="m", dataset_path="d", plan_ngpus=1, runtime_ngpus=1, ce_chunk_tokens=32)
    adopt_plan_execution(args, plan)
    assert (args.compile, args.ce_chunk_tokens) == ("layer", 32)  # the run's own flag wins
