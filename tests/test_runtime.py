"""The runtime executes each plan family on CPU processes (gloo) and matches a single-process run:
three optimizer steps from the same weights and data, per-step losses within 1e-5 relative and
final parameters within 1e-4 relative."""

import json
import os
import subprocess
import sys

import pytest
import torch

from modeling import load_config
from tests.runtime_harness import REPO, gather_parameters, losses, make_plan, run_plan, write_random_rows, write_tiny_v2

SEQ, MICRO, GLOBAL = 32, 2, 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 4-layer tiny DeepSeek-V2 (so that 2 stages x 2 chunks is possible) and a random-token dataset."""
    root = tmp_path_factory.mktemp("runtime")
    model_dir, fields = write_tiny_v2(root, 4)
    data_dir = write_random_rows(root / "data", fields["vocab_size"], 64, SEQ)
    config = load_config(str(model_dir))
    reference = run_plan(make_plan(config, str(model_dir), seq_len=SEQ, micro_batch_size=MICRO,
                                   global_batch_size=GLOBAL), 1, str(model_dir), data_dir, str(root / "reference"))
    return {"root": root, "model_dir": str(model_dir), "data_dir": data_dir, "config": config,
            "reference": reference}


FAMILIES = {
    "data_parallel": (dict(dp=2, zero=0), 2),
    "zero3": (dict(dp=2, zero=3), 2),
    "expert_parallel": (dict(ep=2, zero=0), 2),
    "pipeline_1f1b": (dict(pp=2, schedule="1F1B"), 2),
    "pipeline_interleaved": (dict(pp=2, schedule="Interleaved1F1B", virtual_stages=2), 2),
    "pipeline_x_expert": (dict(pp=2, ep=2, schedule="1F1B"), 4),
    # 8 data-parallel ranks share the 8 sequences: one sequence per micro-batch
    "plan4_replicated_on_8": (dict(dp=2, ep=2, zero=3, over_replicas=True, runtime_ngpus=8, micro_batch_size=1), 8),
    "recompute": (dict(dp=2, zero=2, recompute="full"), 2),
    "tensor_parallel": (dict(tp=2), 2),
    "tensor_x_data_parallel": (dict(tp=2, dp=2, zero=0), 4),
}


@pytest.fixture(scope="module")
def cost_model_inputs(setup):
    from compiler.cost_model import model_costs
    from compiler.trace import build_traced_model, trace_training_step
    graph = trace_training_step(build_traced_model(setup["config"], dtype=torch.float32), MICRO, SEQ)
    return model_costs(graph, setup["config"])


def predicted_peak_gib(costs, plan, world):
    """The cost model's peak memory for the plan (cpu profile), to report beside the measured one."""
    from compiler.cost_model import Candidate, CostModel
    from compiler.profiles import load_profile
    model = CostModel(costs, load_profile("cpu"), mem_limit_gib=1e9, runtime_replicas=world // plan.plan_ngpus,
                      dtype="fp32")
    cand = Candidate(pp=plan.mesh["pp"], dp=plan.mesh["dp"], ep=plan.mesh["ep"], tp=plan.mesh["tp"],
                     zero=plan.zero["level"], zero_over_replicas=plan.zero["shard_over_replicas"],
                     schedule=plan.schedule["name"], splits=tuple(s.layers[0] for s in plan.stages[1:]),
                     recompute=tuple(s.recompute for s in plan.stages), micro_batches=plan.schedule["micro_batches"],
                     virtual_stages=plan.schedule.get("virtual_stages", 1))
    return model.evaluate(cand).max_peak_gib


@pytest.mark.parametrize("family", list(FAMILIES))
def test_plan_family_matches_single_process(setup, cost_model_inputs, family, record_property):
    overrides, world = FAMILIES[family]
    plan = make_plan(setup["config"], setup["model_dir"], **{"seq_len": SEQ, "micro_batch_size": MICRO,
                                                             "global_batch_size": GLOBAL, **overrides})
    results = run_plan(plan, world, setup["model_dir"], setup["data_dir"], str(setup["root"] / family))
    # Peak memory, predicted (cost model, cpu profile) beside measured (the largest resident set of the
    # ranks, which on a CPU includes the interpreter and libraries: a report, not a check)
    predicted = predicted_peak_gib(cost_model_inputs, plan, world)
    measured = max(r["records"][-1]["peak_memory_gib"] for r in results)
    record_property("predicted_peak_gib", round(predicted, 3))
    record_property("measured_peak_gib", round(measured, 3))
    print(f"{family}: predicted peak {predicted:.3f} GiB, measured {measured:.3f} GiB")
    # On a CPU both include the process itself (interpreter, torch, transformers: the cost model's
    # CPU_PROCESS_GIB), which dominates for the tiny model: about 0.41 GiB predicted against 0.44 GiB
    # measured on the dev machine (measured / predicted 1.07-1.10 over the families). The band
    # 0.8x..1.6x holds with margin (also for a heavier torch build's larger resident set) yet fails on
    # a unit error in either figure (KiB / MiB / GiB are 1024x apart), on a prediction that leaves out
    # the process (~90x low) and on one off by a factor of 2 either way.
    ratio = measured / predicted
    assert 0.8 <= ratio <= 1.6, (f"{family}: measured peak {measured:.3f} GiB is {ratio:.2f}x the predicted "
                                 f"{predicted:.3f} GiB, outside 0.8x..1.6x")
    ref_losses = losses(setup["reference"])
    got_losses = losses(results)
    assert len(got_losses) == 3
    for step, (got, ref) in enumerate(zip(got_losses, ref_losses), 1):
        assert abs(got - ref) / abs(ref) < 1e-5, f"step {step}: {got} vs {ref}"
    # AdamW hides a wrong gradient scale from the losses; the gradient norm does not
    for got, ref in zip(results[0]["records"], setup["reference"][0]["records"]):
        assert abs(got["grad_norm"] - ref["grad_norm"]) / ref["grad_norm"] < 1e-5, (got["step"], got, ref)
    ref_params = gather_parameters(setup["reference"], make_plan(setup["config"], setup["model_dir"]))
    params = gather_parameters(results, plan)
    assert params.keys() == ref_params.keys()
    for name, ref in ref_params.items():
        # relative in norm: ||p - p_ref|| / ||p_ref|| per tensor
        rel = ((params[name] - ref).norm() / ref.norm().clamp_min(1e-12)).item()
        assert rel < 1e-4, f"{name}: {rel:.2e}"


# ---- refusals --------------------------------------------------------------------------------------------
def _run(*args):
    return subprocess.run([sys.executable, "train.py", "--device", "cpu", "--max_steps", "1", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_plan_for_another_model_is_refused(setup, tmp_path):
    plan = make_plan(load_config(os.path.join(REPO, "configs", "tiny-deepseek-moe")),
                     "configs/tiny-deepseek-moe", seq_len=SEQ)
    plan.save(str(tmp_path / "moe.json"))
    r = _run("--model_id", setup["model_dir"], "--dataset_path", setup["data_dir"], "--plan", str(tmp_path / "moe.json"),
             "--runtime_ngpus", "1")
    assert r.returncode == 2 and "was made for another model" in r.stderr and "model_type" in r.stderr
    assert "Traceback" not in r.stderr


def test_world_size_that_differs_from_runtime_ngpus_is_refused(setup, tmp_path):
    plan = make_plan(setup["config"], setup["model_dir"], dp=2, seq_len=SEQ, runtime_ngpus=4)
    plan.save(str(tmp_path / "p.json"))
    r = _run("--model_id", setup["model_dir"], "--dataset_path", setup["data_dir"], "--plan", str(tmp_path / "p.json"),
             "--runtime_ngpus", "4")
    assert r.returncode == 2
    assert "1 processes were started but --runtime_ngpus is 4" in r.stderr and "torchrun --nproc_per_node 4" in r.stderr


def test_missing_dataset_is_refused(setup, tmp_path):
    plan = make_plan(setup["config"], setup["model_dir"], seq_len=SEQ)
    plan.save(str(tmp_path / "p.json"))
    r = _run("--model_id", setup["model_dir"], "--dataset_path", str(tmp_path / "nope"), "--plan",
             str(tmp_path / "p.json"), "--runtime_ngpus", "1")
    assert r.returncode == 2 and "--dataset_path" in r.stderr and "no such directory" in r.stderr
    assert "bookcorpus.py" in r.stderr


def test_a_plan_the_runtime_cannot_execute_is_refused_not_run_differently(setup, tmp_path):
    plan = make_plan(setup["config"], setup["model_dir"], tp=2, ep=2, seq_len=SEQ, runtime_ngpus=4)
    plan.save(str(tmp_path / "tpep.json"))
    r = _run("--model_id", setup["model_dir"], "--dataset_path", setup["data_dir"], "--plan",
             str(tmp_path / "tpep.json"), "--runtime_ngpus", "1")
    assert r.returncode == 2 and "tensor and expert parallelism together" in r.stderr


def test_non_finite_loss_stops_before_the_optimizer_step(setup, tmp_path):
    with open(os.path.join(setup["model_dir"], "config.json")) as f:
        fields = json.load(f)
    fields["initializer_range"] = 1e30  # logits overflow: the very first loss is not finite
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(fields))
    plan = make_plan(load_config(str(tmp_path / "m")), str(tmp_path / "m"), seq_len=SEQ)
    plan.save(str(tmp_path / "p.json"))
    r = _run("--model_id", str(tmp_path / "m"), "--dataset_path", setup["data_dir"], "--plan", str(tmp_path / "p.json"),
             "--runtime_ngpus", "1", "--save_dir", str(tmp_path / "save"))
    assert r.returncode == 3
    assert "step 1: loss" in r.stderr and "stopped before the optimizer step" in r.stderr
    assert not (tmp_path / "save" / "metrics.jsonl").exists()  # no step was recorded


@pytest.mark.parametrize("overrides,world,safetensors", [(dict(ep=2), 2, True), (dict(tp=2), 2, True),
                                                         (dict(ep=2), 2, False)])
def test_hf_checkpoint_is_loaded_into_each_ranks_share(setup, tmp_path, overrides, world, safetensors):
    """A directory with HF weights (sharded safetensors, or sharded pytorch_model-*.bin read with
    weights_only): each rank fills its own share (experts merged as read, sliced by expert or tensor
    parallelism); with lr 0 the final parameters are the checkpoint's."""
    from modeling import build_model
    from modeling.hf_adapter import from_hf
    hf_dir = tmp_path / "hf"
    reference = build_model(setup["config"], seed=11)
    reference.save_pretrained(str(hf_dir), safe_serialization=safetensors, max_shard_size="200KB")
    assert any(n.endswith(".safetensors" if safetensors else ".bin") for n in os.listdir(hf_dir))
    plan = make_plan(setup["config"], str(hf_dir), seq_len=SEQ, micro_batch_size=MICRO, global_batch_size=GLOBAL,
                     **overrides)
    results = run_plan(plan, world, str(hf_dir), setup["data_dir"], str(tmp_path / "run"), max_steps=1, lr=0.0)
    params = gather_parameters(results, plan)
    expected = from_hf(reference.state_dict(), setup["config"].n_routed_experts)
    assert params.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(params[name], value), name


def test_expert_parallel_runs_in_bf16_when_no_data_rank_shares_the_experts(setup, tmp_path):
    """ep=2 on 2 ranks: each rank's experts are its own (no ZeRO group to shard them over), yet they
    must still be cast to the compute dtype like every other parameter. The losses follow a single
    bf16 process's to bf16 rounding."""
    def run(overrides, world, name):
        plan = make_plan(setup["config"], setup["model_dir"], seq_len=SEQ, micro_batch_size=MICRO,
                         global_batch_size=GLOBAL, **overrides)
        return losses(run_plan(plan, world, setup["model_dir"], setup["data_dir"], str(tmp_path / name),
                               dtype="bf16"))
    single, expert = run({}, 1, "single"), run(dict(ep=2), 2, "ep2")
    assert expert == pytest.approx(single, rel=2e-3)


@pytest.mark.parametrize("partition", ["expert", "replicate"])
def test_the_plans_ops_decide_how_the_experts_are_split(setup, tmp_path, partition):
    """A plan with an ep axis of 2 whose `ops.experts.partition` is edited: "expert" gives each rank
    half of the experts (all-to-all dispatch), "replicate" keeps every expert on every rank (the ep
    axis then only splits the data). Either way the run matches one process."""
    plan = make_plan(setup["config"], setup["model_dir"], ep=2, seq_len=SEQ, micro_batch_size=MICRO,
                     global_batch_size=GLOBAL)
    plan.ops["experts"]["partition"] = partition
    results = run_plan(plan, 2, setup["model_dir"], setup["data_dir"], str(tmp_path / partition))
    E = setup["config"].n_routed_experts
    held = [r["params"]["model.layers.1.mlp.experts.gate_up_proj_E2FD"].shape[0] for r in results]
    assert held == ([E // 2, E // 2] if partition == "expert" else [E, E])
    for got, ref in zip(losses(results), losses(setup["reference"])):
        assert abs(got - ref) / abs(ref) < 1e-5
    params, ref_params = gather_parameters(results, plan), gather_parameters(setup["reference"], make_plan(
        setup["config"], setup["model_dir"]))
    for name, ref in ref_params.items():
        assert ((params[name] - ref).norm() / ref.norm()).item() < 1e-4, name


def test_a_plan_whose_ops_do_not_fit_its_mesh_is_refused(setup, tmp_path):
    plan = make_plan(setup["config"], setup["model_dir"], seq_len=SEQ)
    plan.ops["experts"]["partition"] = "expert"  # but mesh.ep is 1
    path = str(tmp_path / "p.json")
    with open(path, "w") as f:  # (Plan.save would refuse it already)
        f.write(plan.to_json())
    r = _run("--model_id", setup["model_dir"], "--dataset_path", setup["data_dir"], "--plan", path,
             "--runtime_ngpus", "1")
    assert r.returncode == 2 and "ops.experts.partition" in r.stderr and "Traceback" not in r.stderr
