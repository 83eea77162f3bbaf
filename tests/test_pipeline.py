"""Pipeline parallelism on CPU (gloo, 2 processes) against a single-process reference.

Every process builds the same seeded tiny model and batch, so each one computes the single-process
reference itself (gradient accumulation over micro-batches with the explicit loss convention) and
compares its own stages' gradients with it, parameter by parameter under the same names.
"""

import gc
import os
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from modeling import build_model, load_config
from modeling.training_form import apply_training_form
from runtime.loss import pipeline_loss_fn
from runtime.mesh import free_port
from runtime.pipeline import build_pipeline, pipeline_aux_loss, split_into_stage

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                          "tiny-deepseek-v2")
GLOBAL_BATCH, SEQ_LEN, MICRO_BATCH = 8, 16, 2
MICROBATCHES = GLOBAL_BATCH // MICRO_BATCH
TOKENS = GLOBAL_BATCH * (SEQ_LEN - 1)
TOLERANCE = 1e-5


def _model(num_layers):
    config = load_config(CONFIG_DIR)
    config.num_hidden_layers = num_layers
    model = apply_training_form(build_model(config, seed=0), attention="sdpa")
    return model.train()  # the balance loss is only computed in training mode


def _batch(vocab_size):
    return torch.randint(0, vocab_size, (GLOBAL_BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(1))


def _reference(num_layers):
    """J's cross-entropy part, aux part and gradients, accumulated micro-batch by micro-batch."""
    model = _model(num_layers)
    input_ids = _batch(model.config.vocab_size)
    ce_total = aux_total = 0.0
    for mb in input_ids.split(MICRO_BATCH):
        out = model(input_ids=mb)
        ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, model.config.vocab_size), mb[:, 1:].reshape(-1),
                             reduction="sum") / TOKENS
        aux = out.aux_loss / MICROBATCHES
        (ce + aux).backward()
        ce_total += ce.item()
        aux_total += aux.item()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return ce_total, aux_total, grads


def _rel(a, b):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _check_step(rank, world_size, pipeline, ce, ref_ce, ref_aux, ref_grads):
    """One pipeline step against the reference: loss parts and every gradient."""
    # The cross-entropy part lives on the last rank, the aux part is spread over the ranks.
    if rank == world_size - 1:
        assert _rel(ce, ref_ce) < TOLERANCE, (ce.item(), ref_ce)
    else:
        assert ce is None
    aux = pipeline_aux_loss(pipeline.stage_modules)
    dist.all_reduce(aux)
    assert _rel(aux, ref_aux) < TOLERANCE, (aux.item(), ref_aux)

    # Gradients: every stage parameter, under the reference's name; together the ranks cover all.
    names = []
    for module in pipeline.stage_modules:
        for name, param in module.named_parameters():
            assert name in ref_grads, f"{name}: not a parameter name of the model"
            assert param.grad is not None, f"{name}: no gradient"
            assert _rel(param.grad, ref_grads[name]) < TOLERANCE, f"{name}: {_rel(param.grad, ref_grads[name])}"
            names.append(name)
    gathered = [None] * world_size
    dist.all_gather_object(gathered, names)
    all_names = [n for rank_names in gathered for n in rank_names]
    assert sorted(all_names) == sorted(ref_grads), "the stages must hold every parameter exactly once"


def _worker(rank, world_size, port, schedule_name, virtual_stages, layer_ranges, num_layers):
    torch.set_num_threads(1)  # two processes share two cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        ref_ce, ref_aux, ref_grads = _reference(num_layers)

        model = _model(num_layers)
        input_ids = _batch(model.config.vocab_size)
        pipeline = build_pipeline(model, layer_ranges, rank, world_size, dist.group.WORLD, schedule_name,
                                  n_microbatches=MICROBATCHES, virtual_stages=virtual_stages,
                                  loss_fn=pipeline_loss_fn(TOKENS), device="cpu")
        del model
        # Two steps: the first one also infers the stages' shapes (PipelineStage's dynamic mode runs
        # an extra forward then), the second one reuses them; both must give the reference.
        for _ in range(2):
            for module in pipeline.stage_modules:
                module.zero_grad()
            ce = pipeline.step(input_ids, input_ids)
            _check_step(rank, world_size, pipeline, ce, ref_ce, ref_aux, ref_grads)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("schedule_name, virtual_stages, layer_ranges, num_layers", [
    ("1F1B", 1, [(0, 2), (2, 3)], 3),
    ("Interleaved1F1B", 2, [(0, 1), (1, 2), (2, 3), (3, 4)], 4),
])
def test_pipeline_matches_single_process(schedule_name, virtual_stages, layer_ranges, num_layers):
    world_size = 2
    mp.spawn(_worker, args=(world_size, free_port(), schedule_name, virtual_stages, layer_ranges, num_layers),
             nprocs=world_size, join=True)


def test_stage_holds_only_its_parameters():
    model = _model(3)
    stage = split_into_stage(model, (1, 2), has_embed=False, has_head=True, total_microbatches=4)
    names = [name for name, _ in stage.named_parameters()]
    assert names and all(n.startswith(("model.layers.1.", "model.norm.", "lm_head.")) for n in names), names
    assert "lm_head.weight" in names and "model.norm.weight" in names
    assert stage.model.layers["1"].mlp.aux_loss_grad_scale == 0.25
    # Once the caller lets go of the model, the parameters of the other stages are freed: the stage
    # keeps no hidden reference to them.
    others = [weakref.ref(p) for n, p in model.named_parameters() if n not in names]
    del model
    gc.collect()
    assert all(ref() is None for ref in others)
    # The stage still runs on its own: hidden states in, float32 logits out.
    logits = stage(torch.randn(2, 5, stage.config.hidden_size))
    assert logits.shape == (2, 5, stage.config.vocab_size) and logits.dtype == torch.float32


def test_bad_arguments():
    model = _model(3)
    common = dict(pp_rank=0, pp_size=2, pp_group=None, n_microbatches=4, loss_fn=pipeline_loss_fn(TOKENS), device="cpu")
    with pytest.raises(ValueError, match="schedule"):
        build_pipeline(model, [(0, 2), (2, 3)], schedule_name="GPipe", virtual_stages=1, **common)
    with pytest.raises(ValueError, match="virtual_stages"):
        build_pipeline(model, [(0, 1), (1, 2), (2, 3), (3, 3)], schedule_name="1F1B", virtual_stages=2, **common)
    with pytest.raises(ValueError, match="consecutive"):
        build_pipeline(model, [(0, 1), (2, 3)], schedule_name="1F1B", virtual_stages=1, **common)
    with pytest.raises(ValueError, match="3 layers"):
        build_pipeline(model, [(0, 1), (1, 2)], schedule_name="1F1B", virtual_stages=1, **common)
    with pytest.raises(ValueError, match="2 layer ranges for 4 stages"):
        build_pipeline(model, [(0, 2), (2, 3)], schedule_name="Interleaved1F1B", virtual_stages=2, **common)
