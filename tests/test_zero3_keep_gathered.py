"""--zero3_keep_gathered K under ZeRO 3 (runtime/parallelize.py): the root FSDP unit (embedding, final norm,
head) and then the last K - 1 decoder layers keep their gathered weights from forward to backward
(FSDP2 reshard_after_forward=False); training follows one process exactly as plain ZeRO 3 does."""

import os

import pytest
import torch

from modeling import build_model, load_config
from modeling.training_form import apply_training_form
from tests.runtime_harness import REPO, gather_parameters, losses, make_plan, run_plan, write_random_rows

MODEL = os.path.join(REPO, "configs", "tiny-deepseek-v2")


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def test_the_kept_units_are_not_resharded_after_forward(monkeypatch):
    """On a one-rank gloo group with bf16 mixed precision (FSDP wraps the model, as on a GPU): with K = 2
    the root and the last decoder layer keep their weights gathered after forward, the others reshard."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy

    from runtime.mesh import build_mesh, free_port
    from runtime.parallelize import apply_data_parallel
    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                           LOCAL_RANK="0").items():
        monkeypatch.setenv(key, value)
    dist.init_process_group("gloo")
    try:
        config = load_config(MODEL)
        plan = make_plan(config, MODEL, zero=3, seq_len=16)
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        model = apply_training_form(build_model(config, seed=0)).train()
        layers = list(model.model.layers)
        apply_data_parallel(model, layers, plan, build_mesh(plan, "cpu"), mp, False, keep_gathered=2)

        def resharded(module):
            assert isinstance(module, FSDPModule)
            return module._get_fsdp_state()._fsdp_param_group.post_forward_mesh_info is not None
        assert [resharded(layer) for layer in layers] == [True, True, False]
        assert not resharded(model)
        ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
        model(input_ids=ids, labels=ids).loss.backward()  # runs, and every parameter gets its gradient
        assert all(p.grad is not None for p in model.parameters())
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("zero3_keep")
    write_random_rows(root / "data", 512, 32, 32)
    return root


@pytest.fixture(scope="module")
def reference(data):
    """One process, fp32, the plain path."""
    plan = make_plan(load_config(MODEL), MODEL, seq_len=32)
    return run_plan(plan, 1, MODEL, str(data / "data"), str(data / "reference"))


@pytest.mark.parametrize("plan_kw,keep", [({"dp": 2}, 2), ({"ep": 2}, 4)])
def test_zero3_with_units_kept_gathered_follows_one_process(data, reference, plan_kw, keep):
    """fp32, 2 gloo processes, ZeRO 3 (dp 2 with the root and the last layer kept; ep 2 with every unit
    kept, more than the layers): three optimizer steps equal the single-process run (losses and gradient
    norms within 1e-5, parameters 1e-4)."""
    config = load_config(MODEL)
    plan = make_plan(config, MODEL, zero=3, seq_len=32, **plan_kw)
    results = run_plan(plan, 2, MODEL, str(data / "data"), str(data / f"keep_{keep}_{'_'.join(plan_kw)}"),
                       zero3_keep_gathered=keep)
    assert len(losses(results)) == 3
    for got, want in zip(losses(results), losses(reference)):
        assert abs(got - want) <= 1e-5 * abs(want), (losses(results), losses(reference))
    for got, want in zip(results[0]["records"], reference[0]["records"]):
        assert abs(got["grad_norm"] - want["grad_norm"]) <= 1e-5 * want["grad_norm"]
    params, ref_params = gather_parameters(results, plan), gather_parameters(reference, plan)
    for name, value in ref_params.items():
        assert _rel(params[name], value) < 1e-4, name


def test_a_plan_that_cannot_keep_units_gathered_is_refused():
    """The one rule the search obeys (compiler/execution.py) refuses the option on another ZeRO level."""
    from runtime.preflight import RunError, check_execution
    from runtime.trainer import RunArgs
    args = RunArgs(model_id="m", dataset_path=None, plan_ngpus=2, runtime_ngpus=2, device="cpu", zero3_keep_gathered=1)
    with pytest.raises(RunError, match="applies to ZeRO 3 plans"):
        check_execution(args, make_plan(load_config(MODEL), MODEL, dp=2, zero=2), "p.json")
    check_execution(args, make_plan(load_config(MODEL), MODEL, dp=2, zero=3), "p.json")
