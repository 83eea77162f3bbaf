"""LoRA (modeling/lora.py) on every projection, routed experts included: the math against PEFT on the
reference model, the runtime's plans against one process, checkpoints (resume, reshard), the compiler's
memory model (the full DeepSeek-Coder-V2-Lite on one GPU), and the refusals.

Everything runs in fp32 on CPU with the tiny configs. The runtime tests spawn two worlds of gloo
processes (one process, then two) and run several short trainings in each, so that the processes'
start-up (most of the time on a CPU) is paid twice, not once per run.
"""

import copy
import dataclasses
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from modeling import build_model, hf_adapter, load_config, spec
from modeling.lora import LoraLinear, adapt_experts, lora_initial_value
from modeling.training_form import MergedExperts
from tests.runtime_harness import REPO, make_plan

CONFIGS = os.path.join(REPO, "configs")
TINY_V2 = os.path.join(CONFIGS, "tiny-deepseek-v2")
TINY_MOE = os.path.join(CONFIGS, "tiny-deepseek-moe")
ALL_TARGETS = list(spec.LORA_TARGETS)


def _rel(a, b):
    """||a - b|| / ||b|| (0 when both are 0)."""
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item() if b.norm() > 0 else a.norm().item()


def _same_after_adamw(got, want, lr):
    """Adapters trained by two implementations agree: within 1e-5 of the reference's norm, or
    elementwise within 1 % of one step (lr). AdamW normalises each step by the gradient's running
    size, so where an element's gradients nearly cancel across steps the float rounding of the
    gradients (1e-6 here) is amplified into its update (1.2e-3 lr measured on one CPU); an adapter
    started at zero (B) is made of such steps alone. The losses and gradient norms, which AdamW's
    normalisation does not hide, are compared at every step within 1e-5 beside this."""
    return _rel(got, want) < 1e-5 or bool(((got - want).abs() <= 1e-2 * lr).all())


def _adapters(model):
    return {n: p for n, p in model.named_parameters() if spec.is_lora_parameter(n)}


def _lora_model(model_dir, rank=4, alpha=8.0, targets=ALL_TARGETS, seed=0):
    """(reference HF model, training form with adapters) on the same base weights."""
    config = load_config(model_dir)
    reference = build_model(config, seed=seed)
    training = spec.apply_training_form(copy.deepcopy(reference))
    spec.apply_lora(training, rank, alpha, 0.0, targets)
    return config, reference, training


# ---- the adapters on the model ---------------------------------------------------------------------------------
@pytest.mark.parametrize("model_dir", [TINY_V2, TINY_MOE])
def test_fresh_adapters_leave_the_output_unchanged_and_only_they_get_gradients(model_dir):
    config, reference, training = _lora_model(model_dir)
    base = spec.apply_training_form(copy.deepcopy(reference))
    ids = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    training.train(), base.train()
    out = training(input_ids=ids, labels=ids)
    assert torch.equal(out.logits, base(input_ids=ids, labels=ids).logits)  # B = 0: exactly the base model
    out.loss.backward()
    adapters = _adapters(training)
    # every projection of every target family: attention and MLP linears, and the stacked experts
    linears = [m for m in training.modules() if isinstance(m, LoraLinear)]
    experts = [m for m in training.modules() if getattr(m, "lora", None) is not None]
    assert len(experts) == sum(k == "moe" for k in spec.layer_kinds(config))
    assert len(adapters) == 2 * len(linears) + 4 * len(experts)
    for name, param in training.named_parameters():
        if name in adapters:
            assert param.requires_grad and param.grad is not None, name
        else:
            assert not param.requires_grad and param.grad is None, name
    # B starts at zero, so only B's gradients are non-zero at the first step
    assert all(adapters[n].grad.abs().sum() > 0 for n in adapters if ".lora_B" in n)
    # the base names are untouched: the Hugging Face mapping of the base weights does not change
    assert {n for n, _ in training.named_parameters()} - set(adapters) == {n for n, _ in base.named_parameters()}
    # the router, embedding, norms and head are never adapted
    assert not any(spec.family_of_path(n) in ("router", "embed", "norm", "head") for n in adapters)


def test_targets_choose_the_families():
    _, _, training = _lora_model(TINY_V2, targets=["experts"])
    assert {spec.family_of_path(n) for n in _adapters(training)} == {"experts"}
    _, _, training = _lora_model(TINY_V2, targets="attention,shared_experts")
    assert {spec.family_of_path(n) for n in _adapters(training)} == {"attention", "shared_experts"}


@pytest.mark.parametrize("rank", [4, 8])  # 4: zero-padded to the grouped GEMM's alignment of 8
def test_grouped_expert_adapters_equal_a_loop_over_experts(rank):
    E, D, F_, K, T = 8, 64, 32, 2, 40
    g = torch.Generator().manual_seed(3)
    merged = MergedExperts(E, D, F_)
    with torch.no_grad():
        merged.gate_up_proj_E2FD.normal_(std=0.1, generator=g)
        merged.down_proj_EDF.normal_(std=0.1, generator=g)
    scaling = 16.0 / rank
    adapt_experts(merged, rank, scaling, 0.0)
    with torch.no_grad():
        for name in spec.EXPERT_LORA_PARAMETERS:
            getattr(merged, name).normal_(std=0.2, generator=g)
    x = torch.randn(T, D, generator=g, requires_grad=True)
    idx = torch.rand(T, E, generator=g).topk(K, dim=-1).indices
    idx[:, 0] = idx[:, 0].clamp(max=E - 2)  # expert E - 1 gets fewer tokens, and never a first choice
    weight = torch.rand(T, K, generator=g).softmax(-1).requires_grad_()
    grad_out = torch.randn(T, D, generator=g)

    y = merged(x, idx, weight)
    y.backward(grad_out)
    got = [x.grad, weight.grad] + [getattr(merged, n).grad for n in spec.expert_parameter_names(merged)]

    # The reference: each expert a SwiGLU MLP with PEFT-style adapters on gate, up and down, token by token.
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight)] + \
        [getattr(merged, n).detach().clone().requires_grad_() for n in spec.expert_parameter_names(merged)]
    xr, wr, gate_up, down, a_gu, b_gu, a_d, b_d = leaves

    def linear(v, w, a, b):
        return v @ w.T + scaling * (v @ a.T) @ b.T

    y_ref = torch.zeros(T, D)
    for t in range(T):
        for k in range(K):
            e = int(idx[t, k])
            gate = linear(xr[t], gate_up[e, 0], a_gu[e, 0], b_gu[e, 0])
            up = linear(xr[t], gate_up[e, 1], a_gu[e, 1], b_gu[e, 1])
            y_ref[t] = y_ref[t] + wr[t, k] * linear(torch.nn.functional.silu(gate) * up, down[e], a_d[e], b_d[e])
    y_ref.backward(grad_out)
    assert _rel(y.detach(), y_ref.detach()) < 1e-6
    for name, a, b in zip(["x", "weight"] + list(spec.expert_parameter_names(merged)), got, [t.grad for t in leaves]):
        assert _rel(a, b) < 1e-5, name
    # a frozen base: its weight gradients are not computed at all
    merged.zero_grad(set_to_none=True)
    for name in spec.EXPERT_PARAMETERS:
        getattr(merged, name).requires_grad_(False)
    merged(x, idx, weight).sum().backward()
    assert all(getattr(merged, n).grad is None for n in spec.EXPERT_PARAMETERS)
    assert all(getattr(merged, n).grad is not None for n in spec.EXPERT_LORA_PARAMETERS)


# ---- against PEFT on the reference model ------------------------------------------------------------------------------
def _peft_reference(reference, training, config, rank, alpha):
    """The reference model with PEFT adapters on exactly the modules `training` adapts, holding the same
    values (the stacked expert adapters split per expert, hf_adapter's mapping)."""
    import peft
    adapters = {n: p.detach().clone() for n, p in _adapters(training).items()}
    modules = hf_adapter.lora_modules(list(adapters), config.n_routed_experts)
    model = peft.get_peft_model(reference, peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                                                           target_modules=modules))
    result = peft.set_peft_model_state_dict(model, hf_adapter.lora_to_peft(adapters, config.n_routed_experts))
    assert not [k for k in result.unexpected_keys if "lora" in k]
    return model


def _peft_adapters(model, config):
    """The PEFT model's adapters in the training form's names (experts stacked)."""
    import peft
    return hf_adapter.lora_from_peft(peft.get_peft_model_state_dict(model), config.n_routed_experts)


def _adamw(params, lr=1e-4):
    # The runtime's AdamW (runtime/step.py build_optimizer), with its clipping at 1.0 done by the caller.
    # The learning rate is small because fp32 AdamW magnifies rounding: an element whose gradient is
    # near eps (1e-8) moves by up to lr whatever its last bits, so the adapters of two correct
    # implementations can differ by lr / ||adapter|| (5e-4 at lr 1e-2 on the tiny model). The gradients
    # are compared before every step, where no such magnification happens.
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8)


@pytest.mark.parametrize("model_dir", [TINY_V2, TINY_MOE])
def test_lora_training_matches_peft_on_the_reference_model(model_dir):
    """Three AdamW steps of our LoRA model and of PEFT's on the reference model: the same losses and
    adapter gradients (1e-5) at every step, from the same adapters, and the same adapters after the
    last step."""
    import peft
    rank, alpha = 4, 8.0
    config, reference, training = _lora_model(model_dir, rank, alpha)
    with torch.no_grad():  # B off zero so that the first steps already move every adapter
        for name, p in _adapters(training).items():
            if ".lora_B" in name:
                p.normal_(std=0.05, generator=torch.Generator().manual_seed(len(name)))
    peft_model = _peft_reference(reference, training, config, rank, alpha)
    ids = torch.randint(0, config.vocab_size, (3, 4, 24), generator=torch.Generator().manual_seed(2))
    ours, theirs = _adapters(training), [p for p in peft_model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in ours.values()) == sum(p.numel() for p in theirs)
    opt_ours, opt_theirs = _adamw(list(ours.values())), _adamw(theirs)
    training.train(), peft_model.train()
    pairs = ((training, opt_ours, list(ours.values())), (peft_model, opt_theirs, theirs))
    for step in range(3):
        if step:
            # each step's forward from the same adapters: AdamW's first step moves an element by +-lr
            # whatever its gradient's size, so an element whose gradient is rounding noise in both
            # models moves by opposite lr's in the two, and the next gradients would differ by more than
            # the rounding of either implementation (1.8e-5 at step 1 on some CPUs)
            result = peft.set_peft_model_state_dict(
                peft_model, hf_adapter.lora_to_peft({n: p.detach() for n, p in ours.items()}, config.n_routed_experts))
            assert not [k for k in result.unexpected_keys if "lora" in k]
        losses = [model(input_ids=ids[step], labels=ids[step]).loss for model, _, _ in pairs]
        for loss in losses:
            loss.backward()
        assert abs(losses[0].item() - losses[1].item()) <= 1e-5 * abs(losses[1].item()), (step, losses)
        # the same gradients, adapter by adapter
        grads = hf_adapter.lora_from_peft({n.replace(".default", ""): p.grad for n, p in peft_model.named_parameters()
                                           if p.requires_grad}, config.n_routed_experts)
        for name, grad in grads.items():
            assert _rel(ours[name].grad, grad) < 1e-5, (step, name)
        for _, opt, params in pairs:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    trained = _peft_adapters(peft_model, config)
    assert trained.keys() == ours.keys()
    for name, value in trained.items():
        assert _rel(ours[name].detach(), value) < 1e-5, name


# ---- the runtime: plans, checkpoints, against one process and against PEFT ------------------------------------------
SEQ, MICRO, GLOBAL, STEPS, LR = 32, 2, 8, 4, 1e-4
LORA = {"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": ALL_TARGETS}
# LoRA plans on two processes, each compared with the one-process run `one` (see `runs` below)
TWO_PROCESS_PLANS = {"dp2": dict(dp=2), "zero3": dict(dp=2, zero=3), "ep2": dict(ep=2), "tp2": dict(tp=2),
                     "pp2": dict(pp=2)}


def _lora_plan(config, model_dir, lora=LORA, **mesh):
    kw = {"seq_len": SEQ, "micro_batch_size": MICRO, "global_batch_size": GLOBAL, **mesh}
    plan = make_plan(config, model_dir, **kw)
    plan.lora = dict(lora)
    return plan


def _worker(rank, world, port, runs):
    """Every run of `runs` ((name, RunArgs fields, out_dir)) one after the other in this world;
    each rank saves its records and the full value of every parameter it holds."""
    from tests.runtime_harness import _full
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from runtime.preflight import release_save_dirs
    from runtime.trainer import RunArgs, train
    dist.init_process_group("gloo")
    try:
        for name, kwargs, out_dir in runs:
            records, params = train(RunArgs(**kwargs))
            release_save_dirs()
            values = {n: _full(p.detach()).clone() for n, p in params.items()}
            torch.save({"records": records, "params": values, "dtypes": {n: p.dtype for n, p in params.items()}},
                       os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _run_world(world, runs):
    from runtime.mesh import free_port
    mp.spawn(_worker, args=(world, free_port(), runs), nprocs=world, join=True)
    return {name: [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]
            for name, _, out_dir in runs}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One world of 1 process, then one of 2, each running several trainings of the tiny DeepSeek-V2
    with LoRA on the same 8 rows (so every step's global batch is all of them, in some order):

        peft       1 process, micro-batch = global batch: the loss is the reference model's
        one        1 process, micro-batch 2, saving at steps 2 and 4: the plans' reference
        resumed    `one` resumed from its step 2 under the same plan
        dp2 ...    TWO_PROCESS_PLANS from scratch; ep2_resharded: `one`'s step 2 resumed under ep 2
    """
    import datasets
    from tests.runtime_harness import _full  # noqa: F401 - importable before spawning
    root = tmp_path_factory.mktemp("lora_runtime")
    config = load_config(TINY_V2)
    ids = torch.randint(0, config.vocab_size, (GLOBAL, SEQ), generator=torch.Generator().manual_seed(0))
    data_dir = str(root / "data")
    datasets.Dataset.from_dict({"input_ids": ids.tolist()}).save_to_disk(data_dir)

    def run(name, plan, world, **extra):
        out_dir = str(root / name)
        os.makedirs(out_dir, exist_ok=True)
        plan_path = os.path.join(out_dir, "plan.json")
        plan.save(plan_path)
        kwargs = dict(model_id=TINY_V2, dataset_path=data_dir, plan_ngpus=plan.plan_ngpus, runtime_ngpus=world,
                      plan=plan_path, max_steps=STEPS, lr=LR, warmup_steps=1, seed=0, device="cpu",
                      save_dir=os.path.join(out_dir, "save"), progress=False, final_save=False)
        kwargs.update(extra)
        return (name, kwargs, out_dir), plan

    one_save = str(root / "one" / "save")
    step2 = os.path.join(one_save, "step_00000002")
    first = [run("peft", _lora_plan(config, TINY_V2, micro_batch_size=GLOBAL), 1, max_steps=3),
             run("one", _lora_plan(config, TINY_V2), 1, save_every=2),
             run("resumed", _lora_plan(config, TINY_V2), 1, resume_path=step2)]
    second = [run(name, _lora_plan(config, TINY_V2, **mesh), 2) for name, mesh in TWO_PROCESS_PLANS.items()]
    second.append(run("ep2_resharded", _lora_plan(config, TINY_V2, ep=2), 2, resume_path=step2))
    # bf16 compute: the frozen base in bf16, the adapters fp32 masters, sharded together by ZeRO 3
    second.append(run("zero3_bf16", _lora_plan(config, TINY_V2, dp=2, zero=3), 2, dtype="bf16"))
    results = _run_world(1, [r for r, _ in first])
    results.update(_run_world(2, [r for r, _ in second]))
    plans = {r[0]: plan for r, plan in first + second}
    return {"root": root, "config": config, "data": ids, "results": results, "plans": plans,
            "one_save": one_save}


def _losses(result):
    return [r["loss"] for r in result[0]["records"]]


def _gathered(runs, name):
    from tests.runtime_harness import gather_parameters
    return gather_parameters(runs["results"][name], runs["plans"][name])


def test_frozen_base_and_trainable_adapters_in_the_run(runs):
    params = _gathered(runs, "one")
    adapters = {n for n in params if spec.is_lora_parameter(n)}
    assert adapters and len(adapters) < len(params)
    initial = {}
    for name, value in params.items():  # the base weights did not move; the adapters did
        if name not in adapters:
            from modeling.loading import initial_value
            initial[name] = initial_value(name, tuple(value.shape), runs["config"], 0)
            assert torch.equal(value, initial[name]), name
    moved = [n for n in adapters if not torch.equal(params[n], lora_initial_value(n, tuple(params[n].shape), 0))]
    assert set(moved) == adapters


@pytest.mark.parametrize("name", list(TWO_PROCESS_PLANS))
def test_lora_plans_match_one_process(runs, name):
    got, ref = runs["results"][name], runs["results"]["one"]
    for a, b in zip(got[0]["records"], ref[0]["records"]):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(b["loss"]), (name, a["step"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * b["grad_norm"], (name, a["step"])
    # Parameters within 1e-4, as tests/test_runtime.py has them: B starts at zero and AdamW moves each
    # element by about lr whatever its gradient's size, so an element whose gradient is near AdamW's eps
    # carries the plans' rounding differences into B at lr / ||B||, ~1e-5 here (see _adamw)
    params, ref_params = _gathered(runs, name), _gathered(runs, "one")
    assert params.keys() == ref_params.keys()
    for n, value in ref_params.items():
        assert _rel(params[n], value) < 1e-4, (name, n)


def test_resume_is_exact_and_reshards_to_expert_parallel(runs):
    one = runs["results"]["one"][0]["records"]
    resumed = runs["results"]["resumed"][0]["records"]
    assert [r["step"] for r in resumed] == [3, 4]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in one[2:]]  # bitwise: same plan
    ref_params = _gathered(runs, "one")
    for n, value in _gathered(runs, "resumed").items():
        assert torch.equal(value, ref_params[n]), n
    resharded = runs["results"]["ep2_resharded"][0]["records"]
    for a, b in zip(resharded, one[2:]):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(b["loss"]) and \
            abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * b["grad_norm"], a["step"]
    for n, value in _gathered(runs, "ep2_resharded").items():
        assert _rel(value, ref_params[n]) < 1e-4, n  # as in test_lora_plans_match_one_process


def test_a_lora_checkpoint_holds_the_adapters_their_optimizer_state_and_lora_json(runs):
    from runtime.checkpoint import LORA_FILE, SafeReader, read_commit
    ckpt = os.path.join(runs["one_save"], "step_00000004")
    keys = SafeReader(ckpt).read_metadata().state_dict_metadata
    model_keys = [k[len("model."):] for k in keys if k.startswith("model.")]
    adapters = sorted(n for n in _gathered(runs, "one") if spec.is_lora_parameter(n))
    assert sorted(model_keys) == adapters  # no base weight: they come from --model_id
    for n in adapters:
        assert f"optim.state.{n}.exp_avg" in keys and f"optim.state.{n}.exp_avg_sq" in keys
    assert not any(k.startswith("optim.state.") and not spec.is_lora_parameter(k.split(".", 2)[2].rsplit(".", 1)[0])
                   for k in keys)
    assert LORA_FILE in read_commit(ckpt)["files"]  # checksummed with the shards
    with open(os.path.join(ckpt, LORA_FILE)) as f:
        lora = json.load(f)
    assert {k: lora[k] for k in LORA} == LORA
    assert lora["modules"] == hf_adapter.lora_modules(adapters, runs["config"].n_routed_experts)
    assert "model.layers.1.mlp.experts.7.down_proj" in lora["modules"]


def test_the_run_matches_peft_on_the_reference_model(runs):
    """The run's first steps against the reference model (modeling_deepseek) with PEFT adapters, built
    from the same initial values (the seeded base weights, the seeded adapters), trained on the same
    rows with the same AdamW and clipping."""
    import peft
    from modeling.loading import initial_value
    config = runs["config"]
    shapes = spec.build_training_model(config)  # on meta: the names and shapes of the training form
    base = {n: initial_value(n, tuple(p.shape), config, 0) for n, p in shapes.named_parameters()}
    reference = build_model(config, seed=0)
    reference.load_state_dict(hf_adapter.to_hf(base, config.n_routed_experts))
    spec.apply_lora(shapes, LORA["rank"], LORA["alpha"], LORA["dropout"], LORA["targets"])
    adapters = {n: lora_initial_value(n, tuple(p.shape), 0) for n, p in shapes.named_parameters()
                if spec.is_lora_parameter(n)}
    model = peft.get_peft_model(reference, peft.LoraConfig(
        r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
        target_modules=hf_adapter.lora_modules(list(adapters), config.n_routed_experts)))
    peft.set_peft_model_state_dict(model, hf_adapter.lora_to_peft(adapters, config.n_routed_experts))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _adamw(params, LR)
    model.train()
    records = runs["results"]["peft"][0]["records"]
    for record in records:
        loss = model(input_ids=runs["data"], labels=runs["data"]).loss  # the global batch: all 8 rows
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        assert abs(record["loss"] - loss.item()) <= 1e-5 * loss.item(), record["step"]
        assert abs(record["grad_norm"] - norm) <= 1e-5 * norm, record["step"]
    trained = hf_adapter.lora_from_peft(peft.get_peft_model_state_dict(model), config.n_routed_experts)
    got = _gathered(runs, "peft")
    for n, value in trained.items():
        assert _same_after_adamw(got[n], value, LR), (n, _rel(got[n], value), (got[n] - value).abs().max().item())


def test_bf16_compute_keeps_the_frozen_base_in_bf16_and_fp32_adapters(runs):
    result = runs["results"]["zero3_bf16"]
    for rank in result:
        for name, dtype in rank["dtypes"].items():
            assert dtype == (torch.float32 if spec.is_lora_parameter(name) else torch.bfloat16), name
    # the same training to bf16 rounding
    for a, b in zip(result[0]["records"], runs["results"]["one"][0]["records"]):
        assert abs(a["loss"] - b["loss"]) <= 1e-2 * b["loss"], a["step"]


# ---- the compiler: trace, memory model, search, plan -------------------------------------------------------------
def _trace(lora, batch=1, seq=7):
    from compiler.trace import build_traced_model, trace_training_step
    config = load_config(TINY_V2)
    model = build_traced_model(config, dtype=torch.float32, lora=lora)
    return config, model, trace_training_step(model, batch, seq)


def test_the_trace_of_a_lora_model_has_no_weight_gradient_of_the_frozen_base():
    _, model, graph = _trace(LORA)
    frozen = {tuple(p.shape) for p in model.parameters() if not p.requires_grad}
    trained = {tuple(p.shape) for p in model.parameters() if p.requires_grad}
    # 7 tokens: no activation or its gradient has a weight's [out, in] shape, so a backward GEMM
    # writing one is a weight gradient (dense: mm; experts: the grouped GEMM over the token rows)
    written = {tuple(op.out_shapes[0]) for op in graph.ops
               if op.phase == "bwd" and op.name in ("aten.mm", "aten._grouped_mm") and op.out_shapes[0]}
    assert not written & frozen, sorted(written & frozen)
    assert {s for s in trained if len(s) == 2} <= written  # the adapters' gradients are computed
    # every GEMM of the forward that multiplies by a frozen weight is marked, and only those
    marked = [op for op in graph.ops if op.frozen_weight]
    assert marked and all(op.phase == "fwd" and op.flops > 0 for op in marked)
    assert sum(graph.trainable_counts.values()) == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_lora_is_priced_as_frozen_base_and_trainable_adapters():
    from compiler.cost_model import STATE_BYTES_PER_PARAM, Candidate, CostModel, model_costs
    from compiler.profiles import load_profile
    config, model, graph = _trace(LORA, batch=2, seq=32)
    _, _, full_graph = _trace(None, batch=2, seq=32)
    lora_costs, full_costs = model_costs(graph, config), model_costs(full_graph, config)
    cand = Candidate(pp=1, dp=1, ep=1, tp=1, zero=0, zero_over_replicas=True, schedule="GradAccum", splits=(),
                     recompute=("none",), micro_batches=1)
    profile = load_profile("cpu")
    lora_model, full_model = (CostModel(c, profile, 100.0, dtype="fp32") for c in (lora_costs, full_costs))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    lora_state = lora_model.stage_memory(cand, 0, "none")["params_and_optimizer"] * 2 ** 30
    full_state = full_model.stage_memory(cand, 0, "none")["params_and_optimizer"] * 2 ** 30
    # master, gradient and AdamW moments for the adapters; the frozen weights at the compute dtype
    assert lora_state == pytest.approx(STATE_BYTES_PER_PARAM * trainable + 4 * frozen)
    assert full_state == pytest.approx(STATE_BYTES_PER_PARAM * frozen)
    # MFU counts full training's FLOPs (the bench's definition): the skipped weight gradients included
    lora_pred, full_pred = lora_model.evaluate(cand), full_model.evaluate(cand)
    assert full_pred.model_flops < lora_pred.model_flops < 1.25 * full_pred.model_flops
    # while the time model prices the work the LoRA step does: no weight gradients for the base
    assert graph.total_flops("bwd") < 0.75 * full_graph.total_flops("bwd")


def test_the_full_coder_v2_lite_plans_on_one_gpu_with_lora_and_not_without(tmp_path):
    import subprocess
    import sys
    from compiler.compile import compile_plan
    from compiler.plan import Plan
    from compiler.search import NoPlanFits
    from options import CompileOptions
    out = tmp_path / "coder-lora.json"
    r = subprocess.run([sys.executable, "train.py", "--run_mode", "compile", "--model_id", "configs/deepseek-coder-v2-lite",
                        "--plan_ngpus", "1", "--device_profile", "h200", "--mem_limit_gib", "80", "--lora_rank", "64",
                        "--seq_len", "1024", "--global_batch_size", "8", "--micro_batch_size", "auto",
                        "--plan_out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    plan = Plan.load(str(out))
    assert plan.lora == {"rank": 64, "alpha": 16.0, "dropout": 0.0, "targets": ALL_TARGETS}
    assert plan.plan_ngpus == 1 and max(plan.predicted["peak_memory_gib"]) <= 80
    # what fits: the 15.7 B frozen weights in bf16 (2 bytes each) and the 1.2 B adapters' fp32 state
    config = load_config(os.path.join(CONFIGS, "deepseek-coder-v2-lite"))
    meta = spec.apply_lora(spec.build_training_model(config), 64)
    trainable = sum(p.numel() for p in meta.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in meta.parameters() if not p.requires_grad)
    state = plan.predicted["memory_breakdown_gib"][0]["params_and_optimizer"]
    assert state == pytest.approx((2 * frozen + 16 * trainable) / 2 ** 30, abs=2e-3)
    # training every weight needs 16 bytes per parameter: no single-GPU plan
    with pytest.raises(NoPlanFits, match="no plan fits 80 GiB"):
        compile_plan(CompileOptions(model_id=os.path.join(CONFIGS, "deepseek-coder-v2-lite"), plan_ngpus=1,
                                    device_profile="h200", mem_limit_gib=80, seq_len=1024, global_batch_size=8,
                                    micro_batch_size=1, plan_out=str(tmp_path / "full.json"), report=False))


def test_the_search_leaves_out_tensor_parallelism_only_for_lora_dropout():
    from compiler.cost_model import CostModel, model_costs
    from compiler.profiles import load_profile
    from compiler.search import search
    config, _, graph = _trace(LORA, batch=2, seq=32)
    shapes = {}
    for dropout in (0.0, 0.1):
        costs = dataclasses.replace(model_costs(graph, config), lora={**LORA, "dropout": dropout})
        result = search(CostModel(costs, load_profile("cpu"), 100.0, dtype="fp32"), 2, 2, 8, 2)
        shapes[dropout] = {s.candidate.tp for s in result.ranked}
    assert shapes[0.0] == {1, 2} and shapes[0.1] == {1}


def test_the_plan_records_lora_and_refuses_a_malformed_record(tmp_path):
    from compiler.plan import Plan, PlanError
    config = load_config(TINY_V2)
    plan = _lora_plan(config, TINY_V2)
    d = plan.to_dict()
    assert d["lora"] == LORA and Plan.from_dict(json.loads(json.dumps(d))).lora == LORA
    plan.lora = None
    assert "lora" not in plan.to_dict()  # a plan that trains every weight has no lora field
    for mutate, needle in [(lambda l: l.update(rank=0), "lora.rank"), (lambda l: l.update(alpha=-1), "lora.alpha"),
                           (lambda l: l.update(dropout=1.0), "lora.dropout"),
                           (lambda l: l.update(targets=["router"]), "lora.targets"),
                           (lambda l: l.update(targets=["experts", "attention"]), "lora.targets"),
                           (lambda l: l.update(scale=2), "lora.scale")]:
        bad = copy.deepcopy(d)
        mutate(bad["lora"])
        with pytest.raises(PlanError, match=needle.replace(".", r"\.")) as e:
            Plan.from_dict(bad, source="p.json")
        assert "p.json" in str(e.value) and "\n" not in str(e.value)


# ---- refusals ------------------------------------------------------------------------------------------------------
def test_a_run_takes_the_plans_lora_options_and_refuses_others():
    from options import RunOptions
    from runtime.preflight import RunError, adopt_plan_lora
    config = load_config(TINY_V2)
    plan = _lora_plan(config, TINY_V2, lora={**LORA, "alpha": 32.0})
    args = RunOptions(model_id=TINY_V2)
    adopt_plan_lora(args, plan, "p.json")
    assert args.lora_record() == {**LORA, "alpha": 32.0}
    adopt_plan_lora(RunOptions(model_id=TINY_V2, lora_rank=4, lora_targets="experts,attention,dense_mlp,"
                                                                          "shared_experts"), plan, "p.json")
    for given, needle in [({"lora_alpha": 8.0}, "--lora_alpha 8.0 differs from the 32.0 the plan p.json"),
                          ({"lora_rank": 8}, "--lora_rank 8 differs from the 4"),
                          ({"lora_targets": "experts"}, "--lora_targets experts differs")]:
        with pytest.raises(RunError, match=needle):
            adopt_plan_lora(RunOptions(model_id=TINY_V2, **given), plan, "p.json")
    plan.lora = None
    with pytest.raises(RunError, match="compiled without LoRA.*recompile it with --lora_rank 4"):
        adopt_plan_lora(RunOptions(model_id=TINY_V2, lora_rank=4), plan, "p.json")
    tp_plan = _lora_plan(config, TINY_V2, lora={**LORA, "dropout": 0.1}, tp=2)
    with pytest.raises(RunError, match="--lora_dropout 0.1 with tensor parallelism"):
        adopt_plan_lora(RunOptions(model_id=TINY_V2), tp_plan, "p.json")


def test_a_resume_must_continue_the_same_adapters(tmp_path):
    from runtime.checkpoint import LORA_FILE, CheckpointError, check_lora
    full, lora = tmp_path / "full", tmp_path / "lora"
    full.mkdir(), lora.mkdir()
    (lora / LORA_FILE).write_text(json.dumps({**LORA, "modules": []}))
    check_lora(str(lora), dict(LORA))
    check_lora(str(full), None)
    cases = [(full, dict(LORA), "holds a full model, not LoRA adapters"),
             (lora, None, "is a LoRA checkpoint .* but this run trains every weight"),
             (lora, {**LORA, "rank": 8}, r"rank 4 \(this run: 8\)")]
    for path, record, needle in cases:
        with pytest.raises(CheckpointError, match=needle) as e:
            check_lora(str(path), record)
        assert "\n" not in str(e.value)
    (lora / LORA_FILE).write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="is damaged"):
        check_lora(str(lora), dict(LORA))


def test_lora_flags_out_of_range_are_one_line_errors():
    import subprocess
    import sys
    from options import OptionError, RunOptions
    for given, needle in [({"lora_rank": -1}, "--lora_rank -1: must be >= 0"),
                          ({"lora_alpha": 0.0}, "--lora_alpha 0.0: must be > 0.0"),
                          ({"lora_dropout": 1.0}, "--lora_dropout 1.0: must be from 0 to below 1"),
                          ({"lora_targets": "attention,router"}, r"unknown LoRA target\(s\) \['router'\]")]:
        with pytest.raises(OptionError, match=needle):
            RunOptions(**given).validate()
    r = subprocess.run([sys.executable, "train.py", "--run_mode", "compile", "--model_id", TINY_V2, "--plan_ngpus", "1",
                        "--lora_rank", "4", "--lora_targets", "embed"], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: --lora_targets embed: unknown LoRA target(s)")


def test_the_plan_lookup_keeps_lora_and_full_training_apart(tmp_path):
    from compiler.plan import default_plan_path
    from options import RunOptions
    from runtime.preflight import RunError, find_plan
    config = load_config(TINY_V2)
    full, lora = make_plan(config, TINY_V2), _lora_plan(config, TINY_V2)
    assert default_plan_path("m", 1, "plans", lora=True) == os.path.join("plans", "m-1gpu-lora.json")
    lora.save(default_plan_path("tiny-deepseek-v2", 1, str(tmp_path), lora=True))
    with pytest.raises(RunError, match="no plan in .* --plan_ngpus 1"):  # a LoRA plan is no full-training plan
        find_plan(RunOptions(model_id=TINY_V2, plan_ngpus=1, plans_dir=str(tmp_path)), config)
    full.save(default_plan_path("tiny-deepseek-v2", 1, str(tmp_path)))
    assert find_plan(RunOptions(model_id=TINY_V2, plan_ngpus=1, plans_dir=str(tmp_path)), config)[0].lora is None
    found, path = find_plan(RunOptions(model_id=TINY_V2, plan_ngpus=1, plans_dir=str(tmp_path), lora_rank=4), config)
    assert found.lora == LORA and path.endswith("-lora.json")
