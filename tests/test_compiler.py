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
from compiler.compile import compile_plan
from compiler.cost_model import Candidate, CostModel, model_costs
from compiler.plan import Plan, PlanError
from compiler.profiles import load_profile
from compiler.search import search
from compiler.trace import build_traced_model, trace_training_step
from modeling import load_config
from options import CompileOptions

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


def _moe_layers(config):
    """The decoder layers with routed experts, from the config's own fields (DeepSeek's rule)."""
    if not config.n_routed_experts:
        return []
    return [i for i in range(config.num_hidden_layers)
            if i >= config.first_k_dense_replace and i % config.moe_layer_freq == 0]


def _every_candidate(config, plan_ngpus, runtime_ngpus, global_batch, micro):
    """The space compiler/search.py says it covers, enumerated here from the model config and the
    search's stated rules, without any of the search's helpers:

    - mesh: pp x dp x ep x tp == plan_ngpus; each stage holds at least one layer (pp <= layers);
      tp divides the attention heads and is at most 8; ep > 1 only with routed experts, dividing
      them, and not together with tp (not executed yet);
    - micro-batches: global batch / (micro batch x dp x ep x runtime replicas), a whole number, and
      at least pp when pipelined;
    - ZeRO 0, or ZeRO 2 / 3 with the shards over the replicas (FSDP) when there are data-parallel
      ranks and tp == 1 (HSDP and tp with ZeRO are not executed yet);
    - schedule: GradAccum without a pipeline; 1F1B, and Interleaved1F1B with 2 chunks per stage
      when every chunk has a layer (layers >= 2 pp) and the micro-batches are a multiple of pp;
    - every contiguous layer split into pp non-empty stages, and every recompute choice per stage
      (the search decides recompute by rule; here all 2^pp choices are scored).
    """
    layers, heads, experts = config.num_hidden_layers, config.num_attention_heads, config.n_routed_experts or 0
    has_moe = bool(_moe_layers(config))
    replicas = runtime_ngpus // plan_ngpus
    for pp, dp, ep, tp in itertools.product(range(1, plan_ngpus + 1), repeat=4):
        if pp * dp * ep * tp != plan_ngpus or pp > layers:
            continue
        if tp > 8 or heads % tp:
            continue
        if ep > 1 and (not has_moe or experts % ep or tp > 1):
            continue
        data_ranks = dp * ep * replicas
        if global_batch % (micro * data_ranks):
            continue
        micro_batches = global_batch // (micro * data_ranks)
        if pp > 1 and micro_batches < pp:
            continue
        zeros = [(0, False)]
        if data_ranks > 1 and tp == 1:
            zeros += [(2, True), (3, True)]
        if pp == 1:
            schedules = [("GradAccum", 1)]
        else:
            schedules = [("1F1B", 1)]
            if layers >= 2 * pp and micro_batches % pp == 0:
                schedules.append(("Interleaved1F1B", 2))
        for sizes in itertools.product(range(1, layers + 1), repeat=pp):  # layers per stage
            if sum(sizes) != layers:
                continue
            splits = tuple(sum(sizes[:s]) for s in range(1, pp))
            for (zero, over), (schedule, virtual), recompute in itertools.product(
                    zeros, schedules, itertools.product(("none", "full"), repeat=pp)):
                yield Candidate(pp=pp, dp=dp, ep=ep, tp=tp, zero=zero, zero_over_replicas=over, schedule=schedule,
                                splits=splits, recompute=recompute, micro_batches=micro_batches,
                                virtual_stages=virtual)


@pytest.fixture(scope="module")
def tiny8_costs():
    """The tiny DeepSeek-V2 with 8 layers: pipelines of 4 and 8 stages, interleaving at pp=4."""
    config = _config("tiny-deepseek-v2", num_hidden_layers=8)
    graph = trace_training_step(build_traced_model(config), batch_size=2, seq_len=64)
    return config, model_costs(graph, config)


@pytest.mark.parametrize("costs_fixture,plan_ngpus,runtime_ngpus,global_batch", [
    ("tiny_costs", 4, 8, 32),    # 3 layers, replicated twice at run time
    ("tiny_costs", 4, 4, 16),
    ("tiny8_costs", 8, 8, 64),   # 8 layers: pp up to 8, Interleaved1F1B at pp 2 and 4
])
def test_search_choice_equals_brute_force_under_the_same_cost_model(request, costs_fixture, plan_ngpus,
                                                                     runtime_ngpus, global_batch):
    import compiler.search as search_module
    # the test's space assumes what the search says it leaves out today; revisit both together
    assert search_module.HSDP is False and search_module.MAX_TP == 8
    config, costs = request.getfixturevalue(costs_fixture)
    micro = costs.batch_size  # the costs are per traced micro-batch
    profile = load_profile("cpu")
    replicas = runtime_ngpus // plan_ngpus
    everything = list(_every_candidate(config, plan_ngpus, runtime_ngpus, global_batch, micro))
    assert len(set(everything)) == len(everything)
    # a limit between the smallest and largest peaks (of the brute-force space, not the search's), so
    # that memory decides some of the choices: recompute, ZeRO level, the mesh
    unlimited = CostModel(costs, profile, mem_limit_gib=1e9, runtime_replicas=replicas)
    peaks = sorted(unlimited.evaluate(c).max_peak_gib for c in everything)
    limit = peaks[len(peaks) // 3]
    model = CostModel(costs, profile, mem_limit_gib=limit, runtime_replicas=replicas)
    predictions = {c: model.evaluate(c) for c in everything}
    fitting = {c: p for c, p in predictions.items() if p.fits}
    assert fitting and len(fitting) < len(everything)
    fastest = min(p.step_time_s for p in fitting.values())
    # memory matters here: the fastest candidate of all does not fit
    assert min(p.step_time_s for p in predictions.values()) < fastest

    result = search(model, plan_ngpus, runtime_ngpus, global_batch, micro)
    best = result.best
    assert best.candidate in fitting, best.candidate.describe()
    assert best.prediction.step_time_s == pytest.approx(fastest, rel=1e-9, abs=0)
    equally_fast = [c for c, p in fitting.items() if p.step_time_s == pytest.approx(fastest, rel=1e-9, abs=0)]
    assert best.candidate in equally_fast
    # the search scores each (mesh, ZeRO, schedule, split) of the space once, with its own recompute
    # choice, and nothing outside the space
    def key(c):
        return (c.pp, c.dp, c.ep, c.tp, c.zero, c.zero_over_replicas, c.schedule, c.splits, c.micro_batches,
                c.virtual_stages)
    searched = [s.candidate for s in result.ranked] + [s.candidate for s, _ in result.rejected]
    assert sorted(map(key, searched)) == sorted({key(c) for c in everything})
    assert result.considered == len(searched)
    assert all(c in predictions for c in searched)
    assert len(result.ranked) >= 6  # the winner and at least five runners-up


_SEARCH_IN_A_FRESH_PROCESS = r"""
import dataclasses, json, os, sys
sys.path.insert(0, os.getcwd())
import train
from compiler.cost_model import CostModel, model_costs
from compiler.profiles import load_profile
from compiler.search import search
from compiler.trace import build_traced_model, trace_training_step
from modeling import load_config

model_id, plan_out, result_out = sys.argv[1:4]
status = train.main(["--run_mode", "compile", "--model_id", model_id, "--plan_ngpus", "4", "--runtime_ngpus", "8",
                     "--seq_len", "64", "--micro_batch_size", "2", "--global_batch_size", "32",
                     "--mem_limit_gib", "4", "--device_profile", "cpu", "--plan_out", plan_out])
assert status == 0, status
config = load_config(model_id)
costs = model_costs(trace_training_step(build_traced_model(config), batch_size=2, seq_len=64), config)
unlimited = search(CostModel(costs, load_profile("cpu"), mem_limit_gib=1e9, runtime_replicas=2), 4, 8, 32, 2)
peaks = sorted(s.prediction.max_peak_gib for s in unlimited.ranked)
# a limit that rejects some candidates, so that the rejected list and recompute take part
result = search(CostModel(costs, load_profile("cpu"), mem_limit_gib=peaks[len(peaks) // 3], runtime_replicas=2),
                4, 8, 32, 2)
def row(scored):
    return [dataclasses.asdict(scored.candidate), scored.prediction.step_time_s, scored.prediction.peak_memory_gib]
with open(result_out, "w") as f:
    json.dump({"considered": result.considered, "ranked": [row(s) for s in result.ranked],
               "rejected": [row(s) + [why] for s, why in result.rejected]}, f)
"""


def test_search_is_deterministic_across_processes_and_hash_seeds(tmp_path):
    """`train.py --run_mode compile` and the search in two fresh interpreters with different string-hash
    seeds (set and str-keyed dict orders differ between them) give the same plan file and the same
    ranking, bit for bit (full-precision predictions, not the plan's rounded ones). The plan holds no
    wall-clock timings (the trace time is only logged), so it is compared whole."""
    model_id = os.path.join(CONFIGS, "tiny-deepseek-v2")
    procs = {}
    for seed in ("0", "12345"):
        (tmp_path / seed).mkdir()  # same file names in both, as the report names its figure
        env = {**os.environ, "PYTHONHASHSEED": seed, "OMP_NUM_THREADS": "1"}
        procs[seed] = subprocess.Popen([sys.executable, "-c", _SEARCH_IN_A_FRESH_PROCESS, model_id,
                                        str(tmp_path / seed / "plan.json"), str(tmp_path / seed / "search.json")],
                                       cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for seed, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    for name in ("plan.json", "plan.md"):
        assert (tmp_path / "0" / name).read_text() == (tmp_path / "12345" / name).read_text(), name
    a, b = (json.loads((tmp_path / seed / "search.json").read_text()) for seed in ("0", "12345"))
    assert a["ranked"] and a["rejected"]  # the limit leaves both lists non-empty
    assert a["considered"] == b["considered"]
    assert a["ranked"] == b["ranked"]
    assert a["rejected"] == b["rejected"]


# ---- plan files ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_plan(tmp_path_factory):
    out = tmp_path_factory.mktemp("plans") / "tiny.json"
    plan, path = compile_plan(CompileOptions(model_id=os.path.join(CONFIGS, "tiny-deepseek-v2"), plan_ngpus=4,
                                             runtime_ngpus=8, seq_len=64, micro_batch_size=2, global_batch_size=32,
                                             mem_limit_gib=4, device_profile="cpu", plan_out=str(out)))
    return plan, path


def test_plan_rank_writes_the_runner_up_the_best_plan_lists(tiny_plan, tmp_path):
    best, _ = tiny_plan
    second, _ = compile_plan(CompileOptions(model_id=os.path.join(CONFIGS, "tiny-deepseek-v2"), plan_ngpus=4,
                                            runtime_ngpus=8, seq_len=64, micro_batch_size=2, global_batch_size=32,
                                            mem_limit_gib=4, device_profile="cpu", plan_out=str(tmp_path / "2.json"),
                                            report=False, plan_rank=2))
    runner_up = best.alternatives[0]
    assert second.predicted["step_time_s"] == runner_up["predicted"]["step_time_s"]
    assert second.alternatives[0]["predicted"]["step_time_s"] == best.predicted["step_time_s"]
    with pytest.raises(PlanError, match="--plan_rank 100000: only"):
        compile_plan(CompileOptions(model_id=os.path.join(CONFIGS, "tiny-deepseek-v2"), plan_ngpus=4, seq_len=64,
                                    micro_batch_size=2, global_batch_size=32, mem_limit_gib=4, device_profile="cpu",
                                    plan_out=str(tmp_path / "x.json"), report=False, plan_rank=100000))


def test_plan_json_round_trip_and_required_keys(tiny_plan):
    plan, path = tiny_plan
    with open(path) as f:
        doc = json.load(f)
    for key in ("version", "model", "search_inputs", "plan_ngpus", "mesh", "stages", "ops", "zero",
                "schedule", "predicted", "alternatives"):
        assert key in doc, key
    assert all(stage["recompute"] in ("none", "full") for stage in doc["stages"])  # recompute is per stage
    for key in ("step_time_s", "peak_memory_gib", "mfu"):
        assert key in doc["predicted"]
    assert len(doc["predicted"]["peak_memory_gib"]) == 4
    assert len(doc["alternatives"]) >= 5
    assert "deepseek::moe_route" in doc["ops"]
    # one entry per op family of the spec, keyed by its name, with its annotation and partition
    from modeling import spec
    assert [k for k in doc["ops"] if "::" not in k] == list(spec.OP_FAMILIES)
    for name, family in spec.OP_FAMILIES.items():
        assert doc["ops"][name]["annotation"] == family.annotation
        assert doc["ops"][name]["partition"] == spec.partitions_for_mesh(plan.mesh["tp"], plan.mesh["ep"])[name]
    assert doc["ops"]["experts"]["dispatch"] == ("all_to_all" if plan.mesh["ep"] > 1 else "local")
    assert plan.op_partitions() == {name: entry["partition"] for name, entry in doc["ops"].items() if "::" not in name}
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

    from compiler.cost_model import Candidate, CostModel
    from options import ExecutionOptions
    from compiler.profiles import load_profile
    from runtime.preflight import adopt_plan_execution
    from runtime.trainer import RunArgs
    config = _config("deepseek-coder-v2-lite")
    config.num_hidden_layers = 2
    costs = model_costs(trace_training_step(build_traced_model(config), batch_size=2, seq_len=1024), config)
    profile = copy.deepcopy(load_profile("h100"))
    profile.execution = {"compiled_layer_bytes": 0.5, "compiled_layer_saved": 0.5, "foreach_adamw": 2.0}
    cand = Candidate(pp=1, dp=1, ep=1, tp=1, zero=0, zero_over_replicas=True, schedule="GradAccum", splits=(),
                     recompute=("none",), micro_batches=2)

    def predict(**options):
        return CostModel(costs, profile, 80, execution=ExecutionOptions(**options)).evaluate(cand)
    plain, fused_adamw = predict(), predict(fused_adamw=True)
    # chunks of 512 positions: smaller ones pay more for the float32 accumulation of the head's weight
    # gradient (V x D per chunk) than they save on the logits
    compiled, chunked = predict(compile="layer"), predict(ce_chunk_tokens=512)
    deferred = predict(defer_grad_sync=True)
    assert fused_adamw.breakdown_s["optimizer step"] == pytest.approx(plain.breakdown_s["optimizer step"] / 2)
    assert compiled.step_time_s < plain.step_time_s
    eager = CostModel(costs, profile, 80)
    layer_saved = sum(eager._saved(costs.kinds[k], 1) for k in costs.layer_kinds) / 2 ** 30
    assert compiled.memory_breakdown_gib[0]["activations"] == pytest.approx(  # layers halved, the head not
        plain.memory_breakdown_gib[0]["activations"] - 0.5 * layer_saved, rel=1e-3)
    assert chunked.step_time_s < plain.step_time_s
    assert chunked.peak_memory_gib[0] < plain.peak_memory_gib[0]
    assert deferred.breakdown_s["mixed-precision casts"] == pytest.approx(plain.breakdown_s["mixed-precision casts"] / 2)

    plan, _ = compile_plan(CompileOptions(model_id=os.path.join(CONFIGS, "tiny-deepseek-v2"), plan_ngpus=1, seq_len=64,
                                          micro_batch_size=2, global_batch_size=4, device_profile="h100",
                                          plan_out=str(tmp_path / "p.json"), report=False,
                                          compile="layer", ce_chunk_tokens=64, fused_adamw=False,
                                          pinned=("fused_adamw", "defer_grad_sync")))
    # (the attention kernel, not pinned, is searched: on the h100 PyTorch's own sdpa is the fastest listed)
    assert plan.execution == {"attention": "sdpa", "compile": "layer", "ce_chunk_tokens": 64}
    args = RunArgs(model_id="m", dataset_path="d", plan_ngpus=1, runtime_ngpus=1, ce_chunk_tokens=32)
    adopt_plan_execution(args, plan)
    assert (args.compile, args.ce_chunk_tokens) == ("layer", 32)  # the run's own flag wins
