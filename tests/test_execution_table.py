"""Every plan family the search can emit runs every execution option the search can give it, and
matches one process (issue 13: loss within 1e-5 relative, parameters within 1e-4), on gloo CPU
processes.

How the table is built (`test_the_table_covers_every_combination_the_search_can_emit`), from the code
rather than by hand:

* the families: every candidate `compiler.search.search` scores for the 4-layer tiny DeepSeek-V2 on
  2, 4 and 8 devices (cpu profile, bf16, so that compiled layers are among the options), each
  described by the plan features an execution option can meet (`family_features`): its ZeRO level,
  its pipeline schedule, whether it has tensor-parallel ranks, expert-parallel ranks, data ranks
  (dp x ep > 1) and activation recompute (the search gives a stage recompute wherever the stage would
  not fit without it, so any candidate may come with or without it);
* the options: `compiler.execution.variants` with the cpu profile's attention choices, every
  combination of values; a (family, variant) pair is in the table when `unsupported()` (the rule the
  search and the run share) admits it;
* covered: for each option a variant sets away from the plain path, and each plan feature that
  option's code path meets (`MEETS`, with the reason), some run below sets the option to that value
  on a family with that feature's value and checks it against one process (`exercises`: a compiled
  run, checked against its eager twin, counts for compilation only; deferred sync only where FSDP
  reduces over real data ranks). Why that is everything: an option acts only where its code path
  meets the plan (MEETS), and each run turns on several options at once, so their interactions
  within a family are checked too. The plain values are the family table's (tests/test_runtime.py);
  what changed there, the pipeline's reduction in each micro-batch (runtime/pipeline.py
  ReducingStage), runs here under ZeRO 3 with data ranks (`pp_interleaved_x_ep_z3`), in the family
  table's `pipeline_x_expert` under ZeRO 0, and is counted by
  `test_a_pipeline_stage_reduces_each_micro_batch_unless_deferred`.

An option added to ExecutionOptions.COSTED, a value added to `variants`, a feature value of a family
the search starts to emit (a new schedule, say) or a combination `unsupported()` starts to admit fails
the table until a run covers it. Every run of one world size is one multi-process launch
(`_batch_worker` trains the runs one after another), so the table costs three launches.

The comparison: float32 runs against one float32 process on the plain path (the options change how a
step computes, not what). Compiled layers need bf16 compute (`unsupported`), where a sharded, tensor-
or expert-parallel run differs from one process by bf16 rounding (sums in another order, rounded to
8 bits), far above 1e-5; so each compiled run is compared with the same family run eagerly in bf16
with the same other options (its twin), which the aot_eager backend must reproduce to float rounding:
the compiled layers change nothing of the family's result, and the family follows one process in
float32. tests/test_speed_options.py compares compiled with eager layers on one process.
"""

import dataclasses
import itertools
import os
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from compiler.execution import LOSS_CHUNK_TOKENS, attention_choices, unsupported, variants
from modeling import load_config
from options import ExecutionOptions
from runtime.mesh import free_port
from tests.runtime_harness import REPO, gather_parameters, losses, make_plan, write_random_rows, write_tiny_v2

SEQ, MICRO, GLOBAL, STEPS = 32, 2, 8, 3
# 13 positions per chunk split a micro-batch's 2 x 31 predicting positions into several chunks with a
# remainder; LOSS_CHUNK_TOKENS (what the search emits) holds all of them in one, the other code path
SMALL_CHUNK = 13
# the compiled runs' backend: the graphs torch.compile captures, run with eager kernels (no code
# generation on a CPU)
COMPILED = {"compile": "layer", "compile_backend": "aot_eager"}


@dataclass
class Run:
    """One row of the table: a plan family (make_plan's arguments), its world size, the execution
    options and the compute dtype; `twin`: the eager run a compiled one is compared with."""
    world: int
    plan: dict
    options: dict
    dtype: str = "fp32"
    twin: str = None

    def execution(self):
        return ExecutionOptions(**{k: v for k, v in self.options.items() if k in ExecutionOptions.COSTED})


def _options(attention, chunk=0, fused=False, defer=False, keep=0):
    return {"attention": attention, "ce_chunk_tokens": chunk, "fused_adamw": fused, "defer_grad_sync": defer,
            "zero3_keep_gathered": keep}


PP_1F1B = dict(pp=2, schedule="1F1B")
PP_INTERLEAVED = dict(pp=2, schedule="Interleaved1F1B", virtual_stages=2)
FLASH = "sdpa_flash_padded"

RUNS = {
    # ---- float32, against one float32 process ----
    # ZeRO 3: every number of units kept gathered, with and without expert parallelism and recompute
    "dp_z3_keep4": Run(2, dict(dp=2, zero=3), _options(FLASH, SMALL_CHUNK, True, keep=4)),
    "dp_z3_keep1_recompute": Run(2, dict(dp=2, zero=3, recompute="full"), _options("sdpa", keep=1)),
    "dp_z3_keep2": Run(2, dict(dp=2, zero=3), _options("sdpa", LOSS_CHUNK_TOKENS, keep=2)),
    "ep_z3_keep1": Run(2, dict(ep=2, zero=3), _options(FLASH, SMALL_CHUNK, True, keep=1)),
    "ep_z3_keep2_recompute": Run(2, dict(ep=2, zero=3, recompute="full"), _options("sdpa", keep=2)),
    "ep_z3_keep4_recompute": Run(2, dict(ep=2, zero=3, recompute="full"), _options(FLASH, keep=4)),
    "ep_z2": Run(2, dict(ep=2, zero=2), _options(FLASH, SMALL_CHUNK, True)),
    "ep_z0_defer": Run(2, dict(ep=2), _options("sdpa", LOSS_CHUNK_TOKENS, True, defer=True)),
    "tp": Run(2, dict(tp=2), _options(FLASH, SMALL_CHUNK, True)),
    "pp_1f1b": Run(2, PP_1F1B, _options(FLASH, SMALL_CHUNK, True)),
    "pp_interleaved": Run(2, PP_INTERLEAVED, _options("sdpa", LOSS_CHUNK_TOKENS, True)),
    # four processes: deferred sync over real data ranks in both schedules and with tensor
    # parallelism; the pipeline's per-micro-batch reduce-scatter under ZeRO 3 with expert parallelism
    "pp_1f1b_x_dp_defer": Run(4, dict(dp=2, **PP_1F1B), _options(FLASH, SMALL_CHUNK, True, defer=True)),
    "pp_interleaved_x_dp_defer": Run(4, dict(dp=2, **PP_INTERLEAVED), _options("sdpa", SMALL_CHUNK, True, defer=True)),
    "pp_interleaved_x_ep_z3": Run(4, dict(ep=2, zero=3, **PP_INTERLEAVED), _options(FLASH, LOSS_CHUNK_TOKENS, True)),
    "tp_x_dp_defer": Run(4, dict(tp=2, dp=2), _options("sdpa", SMALL_CHUNK, True, defer=True)),
}
# ---- bf16 with compiled layers, each against its eager twin: every ZeRO level, both schedules, tensor
# and expert parallelism, recompute; the other options on with them ----
COMPILED_RUNS = {
    "compiled_dp_z3_recompute": Run(2, dict(dp=2, zero=3, recompute="full"),
                                    _options(FLASH, SMALL_CHUNK, True, keep=2)),
    "compiled_ep_z2": Run(2, dict(ep=2, zero=2), _options("sdpa", SMALL_CHUNK, True)),
    "compiled_tp": Run(2, dict(tp=2), _options(FLASH, LOSS_CHUNK_TOKENS, True, defer=True)),
    "compiled_pp_1f1b": Run(2, PP_1F1B, _options("sdpa", SMALL_CHUNK, True, defer=True)),
    "compiled_pp_interleaved": Run(2, PP_INTERLEAVED, _options(FLASH, SMALL_CHUNK, True, defer=True)),
}
for _name, _run in COMPILED_RUNS.items():
    RUNS[_name] = dataclasses.replace(_run, options={**_run.options, **COMPILED}, dtype="bf16",
                                      twin=_name + "_eager")
    RUNS[_name + "_eager"] = dataclasses.replace(_run, dtype="bf16")
REFERENCE = "one_process"


# ---- the plan features an option meets ----------------------------------------------------------------------
def family_features(pp, dp, ep, tp, zero, schedule, recompute):
    return {"zero": zero, "pipeline": schedule if pp > 1 else "none", "tp": tp > 1, "ep": ep > 1,
            "data": dp * ep > 1, "recompute": recompute}


def run_features(run: Run):
    p = run.plan
    pp = p.get("pp", 1)
    return family_features(pp, p.get("dp", 1), p.get("ep", 1), p.get("tp", 1), p.get("zero", 0),
                           p.get("schedule", "1F1B"), p.get("recompute", "none") == "full")


# Which plan features each option's code path meets; the rest of a plan acts outside it.
MEETS = {
    # the kernel computes each rank's heads: tensor parallelism splits them; nothing else of a plan
    # reaches inside attention
    "attention": ("tp",),
    # a compiled layer runs under FSDP's hooks for the ZeRO level, inside a pipeline stage, on tensor
    # parallelism's DTensors, around expert parallelism's all-to-all, and again under recompute
    "compile": ("zero", "pipeline", "tp", "ep", "recompute"),
    # the loss from the head: gathered by FSDP (ZeRO level, data ranks), on the last pipeline stage,
    # after tensor parallelism's last all-reduce
    "ce_chunk_tokens": ("zero", "pipeline", "tp", "data"),
    # one kernel per parameter group: DTensor shards (ZeRO 2 / 3, tensor parallelism), the experts'
    # own mesh (expert parallelism)
    "fused_adamw": ("zero", "tp", "ep"),
    # when FSDP reduces: in a pipeline stage (ReducingStage) or the plain loop, the experts' own FSDP
    # units (expert parallelism), tensor parallelism's DTensor gradients
    "defer_grad_sync": ("pipeline", "ep", "tp"),
    # which FSDP units keep their weights: the experts' own units inside a layer (expert parallelism),
    # a recomputed forward running with the kept weights
    "zero3_keep_gathered": ("ep", "recompute"),
}


def exercises(run: Run, option):
    """Whether `run` checks `option` against one process (not only sets it): a bf16 run is compared with
    its eager twin, so it checks only what the two differ in (compiled layers); deferred sync needs FSDP
    reducing over data ranks, which one data rank in float32 does not wrap at all."""
    if run.dtype != "fp32":
        return option == "compile" and run.twin is not None
    if option == "defer_grad_sync":
        return run_features(run)["data"]
    return True


def same_value(option, wanted, given):
    # a chunk size only sets how many chunks; the runs take one chunk and several
    if option == "ce_chunk_tokens":
        return bool(wanted) == bool(given)
    return wanted == given


def emitted_families():
    """{features (sorted items): a candidate's description} of every candidate the search scores
    for the tiny model on 2, 4 and 8 devices, with and without recompute."""
    from compiler.cost_model import CostModel, model_costs
    from compiler.profiles import load_profile
    from compiler.search import search
    from compiler.trace import build_traced_model, trace_training_step
    config = _config()
    costs = model_costs(trace_training_step(build_traced_model(config), MICRO, SEQ), config)
    model = CostModel(costs, load_profile("cpu"), 64, runtime_replicas=1, dtype="bf16")
    executions = emitted_variants(model)
    families = {}
    for devices in (2, 4, 8):
        result = search(model, devices, devices, GLOBAL * devices, MICRO, executions)
        for scored in result.ranked + [r for r, _ in result.rejected]:
            c = scored.candidate
            for recompute in (False, True):
                key = tuple(sorted(family_features(c.pp, c.dp, c.ep, c.tp, c.zero, c.schedule, recompute).items()))
                families.setdefault(key, (c.describe(), c.pp, c.zero))
    return families


def emitted_variants(model):
    attention = attention_choices(model.profile.attention, model.attention_cost)
    return variants(ExecutionOptions(), [], "bf16", attention)


# ---- the runs --------------------------------------------------------------------------------------------
def _config():
    config = load_config(os.path.join(REPO, "configs", "tiny-deepseek-v2"))
    config.num_hidden_layers = 4  # two stages of two chunks for the interleaved schedule
    return config


def _full(tensor):
    from torch.distributed.tensor import DTensor
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _batch_worker(rank, world, port, cases, out_dir):
    """Trains each (name, run arguments) of `cases` in turn in this process group, keeping each one's
    records, full parameters and the graphs torch.compile captured for it."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from torch._dynamo.utils import counters
    from runtime.preflight import release_save_dirs
    from runtime.trainer import RunArgs, train
    dist.init_process_group("gloo")
    out = {}
    try:
        for name, run_kwargs in cases:
            torch._dynamo.reset()  # a run compiles its own layers; none reuses another's graphs
            before = counters["stats"].get("unique_graphs", 0)
            try:
                records, params = train(RunArgs(**run_kwargs))
            except Exception as e:
                raise RuntimeError(f"run {name} failed on rank {rank}: {e}") from e
            finally:
                release_save_dirs()
            out[name] = {"records": records, "params": {n: _full(p.detach()).clone() for n, p in params.items()},
                         "graphs": counters["stats"].get("unique_graphs", 0) - before}
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _run_batch(runs, world, model_dir, data_dir, out_dir):
    """{name: [rank results]} of `runs` (name -> Run, all of `world` processes), one launch."""
    os.makedirs(out_dir, exist_ok=True)
    cases, plans = [], {}
    for name, run in runs.items():
        plan = make_plan(load_config(model_dir), model_dir, seq_len=SEQ, micro_batch_size=MICRO,
                         global_batch_size=GLOBAL, **run.plan)
        plan_path = os.path.join(out_dir, f"{name}.json")
        plan.save(plan_path)
        plans[name] = plan
        cases.append((name, dict(model_id=model_dir, dataset_path=data_dir, plan_ngpus=plan.plan_ngpus,
                                 runtime_ngpus=world, plan=plan_path, max_steps=STEPS, lr=1e-3, warmup_steps=1,
                                 seed=0, device="cpu", save_dir=os.path.join(out_dir, name), progress=False,
                                 final_save=False, dtype=run.dtype, **run.options)))
    mp.spawn(_batch_worker, args=(world, free_port(), cases, out_dir), nprocs=world, join=True)
    per_rank = [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]
    return {name: ([ranks[name] for ranks in per_rank], plans[name]) for name in runs}


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """Every run of RUNS and the one-process reference: one launch per world size."""
    root = tmp_path_factory.mktemp("execution_table")
    model_dir, fields = write_tiny_v2(root, 4)
    data_dir = write_random_rows(root / "data", fields["vocab_size"], 64, SEQ)
    results = _run_batch({REFERENCE: Run(1, {}, {})}, 1, str(model_dir), data_dir, str(root / "world1"))
    for world in sorted({run.world for run in RUNS.values()}):
        batch = {name: run for name, run in RUNS.items() if run.world == world}
        results.update(_run_batch(batch, world, str(model_dir), data_dir, str(root / f"world{world}")))
    return results


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("name", [n for n, run in RUNS.items() if not n.endswith("_eager")])
def test_run_matches_one_process(table, name):
    """Per-step losses and gradient norms within 1e-5 relative, final parameters within 1e-4 (relative
    in norm, per tensor) of one float32 process, or for a compiled run of its eager bf16 twin."""
    run = RUNS[name]
    results, plan = table[name]
    reference, reference_plan = table[run.twin or REFERENCE]
    if run.twin:
        assert all(r["graphs"] > 0 for r in results), f"{name}: torch.compile captured no graph"
        assert all(r["graphs"] == 0 for r in reference), f"{run.twin}: the eager twin compiled something"
    got, want = losses(results), losses(reference)
    assert len(got) == STEPS
    for step, (g, w) in enumerate(zip(got, want), 1):
        assert abs(g - w) <= 1e-5 * abs(w), f"{name} step {step}: loss {g} vs {w}"
    for g, w in zip(results[0]["records"], reference[0]["records"]):
        assert abs(g["grad_norm"] - w["grad_norm"]) <= 1e-5 * w["grad_norm"], (name, g["step"], g, w)
    params, ref_params = gather_parameters(results, plan), gather_parameters(reference, reference_plan)
    assert params.keys() == ref_params.keys()
    for param_name, ref in ref_params.items():
        assert _rel(params[param_name], ref) < 1e-4, f"{name}: {param_name} {_rel(params[param_name], ref):.2e}"


def test_the_table_covers_every_combination_the_search_can_emit():
    assert set(MEETS) == set(ExecutionOptions.COSTED), "say which plan features a new option meets (MEETS)"
    for name, run in RUNS.items():  # the runs themselves are admitted combinations
        assert unsupported(run.execution(), run.plan.get("pp", 1), run.plan.get("zero", 0), run.dtype) is None, name
    families = emitted_families()
    assert len({dict(k)["pipeline"] for k in families}) == 3 and any(dict(k)["tp"] for k in families)
    from compiler.cost_model import CostModel, model_costs
    from compiler.profiles import load_profile
    from compiler.trace import build_traced_model, trace_training_step
    config = _config()
    model = CostModel(model_costs(trace_training_step(build_traced_model(config), MICRO, SEQ), config),
                      load_profile("cpu"), 64, dtype="bf16")
    executions = emitted_variants(model)
    plain = ExecutionOptions()
    missing, admitted = {}, 0
    for (key, (described, pp, zero)), execution in itertools.product(families.items(), executions):
        if unsupported(execution, pp, zero, "bf16"):
            continue
        admitted += 1
        features = dict(key)
        for option in ExecutionOptions.COSTED:
            value = getattr(execution, option)
            if value == getattr(plain, option):
                continue  # the plain path: the family table's
            for feature in MEETS[option]:
                if not any(same_value(option, value, run.options.get(option, getattr(plain, option)))
                           and exercises(run, option) and run_features(run)[feature] == features[feature]
                           for run in RUNS.values()):
                    missing.setdefault(f"{option}={value} with {feature}={features[feature]}", described)
    assert admitted > 1000  # the product really was enumerated
    assert not missing, "no run covers: " + "; ".join(f"{k} (e.g. {v})" for k, v in sorted(missing.items()))


# ---- the deferred sync in a pipeline, counted ------------------------------------------------------------------
def _one_rank_group(monkeypatch):
    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                           LOCAL_RANK="0").items():
        monkeypatch.setenv(key, value)
    dist.init_process_group("gloo")


@pytest.mark.parametrize("zero", [0, 2])
def test_a_pipeline_stage_reduces_each_micro_batch_unless_deferred(monkeypatch, zero):
    """A one-stage pipeline on a one-rank gloo group, FSDP with bf16 mixed precision (as on a GPU):
    without --defer_grad_sync each FSDP unit reduces in each of the 4 micro-batches' backwards, with it
    once per step (ZeRO 0), and the gradients are the same."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group
    from modeling import build_model
    from modeling.training_form import apply_training_form
    from runtime.loss import pipeline_loss_fn
    from runtime.mesh import build_mesh
    from runtime.parallelize import apply_data_parallel
    from runtime.pipeline import build_pipeline
    calls = []
    original = _fsdp_param_group.foreach_reduce

    def counting_reduce(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)
    monkeypatch.setattr(_fsdp_param_group, "foreach_reduce", counting_reduce)
    _one_rank_group(monkeypatch)
    try:
        config = load_config(os.path.join(REPO, "configs", "tiny-deepseek-v2"))
        plan = make_plan(config, "m", zero=zero, seq_len=16)
        mesh = build_mesh(plan, "cpu")
        mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        ids = torch.randint(0, config.vocab_size, (8, 16), generator=torch.Generator().manual_seed(0))
        grads, counts = {}, {}
        for defer in ((False, True) if zero == 0 else (False,)):
            model = apply_training_form(build_model(config, seed=0)).train()

            def wrap(stage):
                apply_data_parallel(stage, list(stage.model.layers.values()), plan, mesh, mp_policy, False)
                return stage
            pipeline = build_pipeline(model, [(0, config.num_hidden_layers)], 0, 1, dist.group.WORLD, "1F1B", 4, 1,
                                      pipeline_loss_fn(8 * 15), "cpu", wrap_stage=wrap, defer_grad_sync=defer)
            units = sum(1 for m in pipeline.stage_modules[0].modules() if hasattr(m, "set_requires_gradient_sync"))
            pipeline.step(ids, ids)  # the first step also infers the stage's shapes
            for p in pipeline.stage_modules[0].parameters():
                p.grad = None
            calls.clear()
            pipeline.step(ids, ids)
            counts[defer] = (len(calls), units)
            grads[defer] = {n: _full(p.grad).clone() for n, p in pipeline.stage_modules[0].named_parameters()}
        assert counts[False] == (4 * counts[False][1], counts[False][1])  # every unit, every micro-batch
        if zero == 0:
            assert counts[True] == (counts[True][1], counts[True][1])  # every unit, once
            for n, g in grads[False].items():
                assert _rel(grads[True][n], g) < 1e-6, n
    finally:
        dist.destroy_process_group()


# ---- the cost model prices what the pipeline does ----------------------------------------------------------
def test_the_cost_model_prices_the_pipeline_sync_the_run_chooses():
    """pp 2 x dp 2, ZeRO 0: deferred, one all-reduce after the step's micro-batches (exposed), one
    cast per step; otherwise an all-reduce in each micro-batch's backward (mostly hidden behind it) and
    a cast per micro-batch. The chunked loss lowers the last stage's peak only."""
    from compiler.cost_model import Candidate, CostModel, model_costs
    from compiler.profiles import load_profile
    from compiler.trace import build_traced_model, trace_training_step
    config = _config()
    costs = model_costs(trace_training_step(build_traced_model(config), MICRO, SEQ), config)
    cand = Candidate(pp=2, dp=2, ep=1, tp=1, zero=0, zero_over_replicas=True, schedule="1F1B", splits=(2,),
                     recompute=("none", "none"), micro_batches=4, virtual_stages=1)

    def evaluate(**options):
        return CostModel(costs, load_profile("h100"), 80, dtype="bf16",
                         execution=ExecutionOptions(**options)).evaluate(cand)
    per_micro_batch, deferred = evaluate(), evaluate(defer_grad_sync=True)
    assert per_micro_batch.breakdown_s["gradient sync at the end of the step"] == 0.0
    assert deferred.breakdown_s["gradient sync at the end of the step"] > 0.0
    assert per_micro_batch.breakdown_s["ZeRO collectives not hidden by compute (included above)"] > \
        deferred.breakdown_s["ZeRO collectives not hidden by compute (included above)"]
    assert per_micro_batch.breakdown_s["mixed-precision casts"] == \
        pytest.approx(4 * deferred.breakdown_s["mixed-precision casts"])
    chunked = evaluate(ce_chunk_tokens=LOSS_CHUNK_TOKENS)
    assert chunked.peak_memory_gib[-1] < per_micro_batch.peak_memory_gib[-1]
    assert chunked.peak_memory_gib[0] == per_micro_batch.peak_memory_gib[0]
