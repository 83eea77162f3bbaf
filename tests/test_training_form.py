"""The training form equals the reference, forward and backward, and has the properties the
compiler and runtime rely on: one router op with an annotation, merged experts, meta tracing,
no host synchronisation, and bitwise expert merge/split."""

import copy
import os
import time

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from compiler.annotations import check_shapes, get_op_annotation
from modeling import build_model, load_config, spec
from modeling.training_form import (
    ROUTER_ANNOTATION,
    MoEBlock,
    apply_training_form,
)
from modeling.hf_adapter import from_hf, load_hf_weights, to_hf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")


class OpRecorder(TorchDispatchMode):
    """Records the name of every op that reaches the dispatcher, and the shapes of the router's calls."""

    def __init__(self):
        super().__init__()
        self.names = []
        self.router_shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket)
        self.names.append(name)
        if name == "deepseek.moe_route":
            shape = lambda t: tuple(t.shape) if isinstance(t, torch.Tensor) else None  # noqa: E731
            self.router_shapes.append(([shape(a) for a in args], [shape(o) for o in out]))
        return out


def _config(name, **overrides):
    config = load_config(os.path.join(CONFIGS, name))
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


VARIANTS = [
    ("tiny-deepseek-v2", {}),
    ("tiny-deepseek-moe", {}),
    ("tiny-deepseek-v2", {"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2}),
    ("tiny-deepseek-v2", {"norm_topk_prob": True, "routed_scaling_factor": 2.5}),
    ("tiny-deepseek-v2", {"seq_aux": False, "q_lora_rank": 24}),
    ("tiny-deepseek-moe", {"norm_topk_prob": True, "num_experts_per_tok": 3}),
]


@pytest.mark.parametrize("name,overrides", VARIANTS)
def test_training_form_equals_reference_forward_and_backward(name, overrides):
    config = _config(name, **overrides)
    reference = build_model(config, seed=0)
    training = apply_training_form(copy.deepcopy(reference))
    reference.train(), training.train()
    input_ids = torch.randint(0, config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1))

    # Every expert of every MoE layer must see tokens, or their gradients would be vacuous.
    chosen = []
    hooks = [m.gate.register_forward_hook(lambda mod, inp, out: chosen.append(out[0]))
             for m in reference.modules() if m.__class__.__name__ == "DeepseekMoE"]
    ref_out = reference(input_ids=input_ids, labels=input_ids)
    for h in hooks:
        h.remove()
    assert chosen and all(idx.unique().numel() == config.n_routed_experts for idx in chosen)

    out = training(input_ids=input_ids, labels=input_ids)
    assert _rel(out.logits, ref_out.logits) < 1e-5
    assert _rel(out.loss, ref_out.loss) < 1e-5
    assert _rel(out.aux_loss, ref_out.aux_loss) < 1e-5

    ref_out.loss.backward()
    out.loss.backward()
    ref_grads = {n: p.grad for n, p in reference.named_parameters()}
    grads = to_hf({n: p.grad for n, p in training.named_parameters()}, config.n_routed_experts)
    assert grads.keys() == ref_grads.keys()
    for key, ref_grad in ref_grads.items():
        assert ref_grad is not None and ref_grad.abs().sum() > 0, key
        assert _rel(grads[key], ref_grad) < 1e-4, key


def test_eval_mode_has_no_balance_loss_and_same_logits():
    config = _config("tiny-deepseek-v2")
    reference = build_model(config, seed=2).eval()
    training = apply_training_form(copy.deepcopy(reference)).eval()
    ids = torch.randint(0, config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref, out = reference(input_ids=ids, labels=ids), training(input_ids=ids, labels=ids)
    assert out.aux_loss is None
    assert _rel(out.logits, ref.logits) < 1e-5


def test_padding_mask_in_training_form():
    config = _config("tiny-deepseek-v2")
    reference = build_model(config, seed=3).eval()
    training = apply_training_form(copy.deepcopy(reference)).eval()
    ids = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0
    with torch.no_grad():
        ref = reference(input_ids=ids, attention_mask=mask).logits
        out = training(input_ids=ids, attention_mask=mask).logits
    assert _rel(out[0], ref[0]) < 1e-5 and _rel(out[1, :9], ref[1, :9]) < 1e-5


def test_experts_are_merged_into_stacked_parameters():
    config = _config("tiny-deepseek-v2")
    training = apply_training_form(build_model(config, seed=0))
    names = dict(training.named_parameters())
    E, F, D = config.n_routed_experts, config.moe_intermediate_size, config.hidden_size
    assert names["model.layers.1.mlp.experts.gate_up_proj_E2FD"].shape == (E, 2, F, D)
    assert names["model.layers.1.mlp.experts.down_proj_EDF"].shape == (E, D, F)
    assert "model.layers.1.mlp.gate.weight" in names
    assert not any(".experts.0." in n for n in names)
    assert isinstance(training.model.layers[1].mlp, MoEBlock)


# ---- merge / split ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-deepseek-v2", "tiny-deepseek-moe"])
def test_split_of_merge_is_bitwise_identity(name):
    config = _config(name)
    state = build_model(config, seed=4, dtype=torch.bfloat16).state_dict()
    merged = from_hf(state, config.n_routed_experts)
    assert "model.layers.1.mlp.experts.gate_up_proj_E2FD" in merged
    assert not any(".experts.3." in k for k in merged)
    back = to_hf(merged, config.n_routed_experts)
    assert back.keys() == state.keys()
    for key, value in state.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
    # and merge(split(merged)) == merged
    again = from_hf(back, config.n_routed_experts)
    assert all(torch.equal(again[k], merged[k]) for k in merged)


def test_merge_names_the_missing_expert():
    config = _config("tiny-deepseek-v2")
    state = build_model(config, seed=0).state_dict()
    del state["model.layers.2.mlp.experts.5.up_proj.weight"]
    with pytest.raises(ValueError, match=r"model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight missing"):
        from_hf(state, config.n_routed_experts)


@pytest.mark.parametrize("max_shard_size", ["1GB", "60KB"])
def test_training_form_loads_a_hf_checkpoint_directory(tmp_path, max_shard_size):
    config = _config("tiny-deepseek-v2")
    reference = build_model(config, seed=5)
    reference.save_pretrained(tmp_path, safe_serialization=True, max_shard_size=max_shard_size)
    if max_shard_size == "60KB":
        assert (tmp_path / "model.safetensors.index.json").exists()
    # Built on the meta device, so no memory goes to a random initialisation first.
    training = apply_training_form(build_model(config, device="meta"))
    load_hf_weights(training, str(tmp_path))
    assert all(p.device.type == "cpu" for p in training.parameters())
    merged = from_hf(reference.state_dict(), config.n_routed_experts)
    for key, value in training.state_dict().items():
        assert torch.equal(value, merged[key]), key
    ids = torch.randint(0, config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(5))
    reference.eval(), training.eval()
    with torch.no_grad():
        assert _rel(training(input_ids=ids).logits, reference(input_ids=ids).logits) < 1e-5


# ---- meta tracing, the router op, host synchronisation --------------------------------------------
def test_coder_v2_lite_training_form_runs_on_meta_with_one_router_op():
    config = _config("deepseek-coder-v2-lite")
    start = time.perf_counter()
    model = apply_training_form(build_model(config, device="meta", dtype=torch.bfloat16)).train()
    ids = torch.zeros(2, 2048, dtype=torch.long, device="meta")
    recorder = OpRecorder()
    with recorder:
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
    elapsed = time.perf_counter() - start
    assert elapsed < 60, f"meta forward+backward took {elapsed:.0f}s"
    assert out.loss.device.type == "meta"
    assert all(p.device.type == "meta" and p.grad is not None and p.grad.device.type == "meta"
               for p in model.parameters())
    moe_layers = config.num_hidden_layers - config.first_k_dense_replace
    # The router is one op per MoE layer: its top-k and softmax never show up separately.
    assert recorder.names.count("deepseek.moe_route") == moe_layers
    assert "aten.topk" not in recorder.names
    assert recorder.names.count("aten._grouped_mm") >= 2 * moe_layers
    # The annotation agrees with the traced shapes of every call.
    annotation = get_op_annotation("deepseek::moe_route")
    assert annotation is not None and annotation.text == ROUTER_ANNOTATION
    for in_shapes, out_shapes in recorder.router_shapes:
        sizes = check_shapes(annotation, in_shapes, out_shapes, "deepseek::moe_route")
        assert (sizes["n"], sizes["l"], sizes["h"], sizes["e"], sizes["k"]) == (2, 2048, 2048, 64, 6)


def test_no_host_synchronisation_in_forward_and_backward():
    """No op whose output size or value must be read by the host: .item() (_local_scalar_dense),
    nonzero, boolean-mask indexing, bincount, unique."""
    config = _config("tiny-deepseek-v2")
    model = apply_training_form(build_model(config, seed=0)).train()
    ids = torch.randint(0, config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    recorder = OpRecorder()
    with recorder:
        model(input_ids=ids, labels=ids).loss.backward()
    syncing = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.bincount",
               "aten._unique2", "aten.unique_consecutive", "aten.masked_scatter"}
    assert not syncing & set(recorder.names)
    assert "deepseek.moe_route" in recorder.names


def test_router_gradient_reaches_gate_weight_through_weights_and_balance_loss():
    config = _config("tiny-deepseek-v2")
    model = apply_training_form(build_model(config, seed=0)).train()
    gate = model.model.layers[1].mlp.gate
    hidden = torch.randn(2, 8, config.hidden_size, requires_grad=True)
    idx, weight, aux = gate(hidden)
    (weight.sum() * 0 + aux).backward()  # balance loss alone
    assert gate.weight.grad.abs().sum() > 0 and hidden.grad.abs().sum() > 0
    gate.weight.grad = None
    hidden.grad = None
    idx, weight, aux = gate(hidden)
    weight.pow(2).sum().backward()  # routing weights alone
    assert gate.weight.grad.abs().sum() > 0


def test_router_op_checks_with_torch_library_opcheck():
    config = _config("tiny-deepseek-v2")
    hidden = torch.randn(2, 4, config.hidden_size, requires_grad=True)
    weight = torch.randn(config.n_routed_experts, config.hidden_size, requires_grad=True)
    args = (hidden, weight, 2, "greedy", 1, 1, False, 1.0, 0.001, True, True)
    # (test_aot_dispatch_dynamic is left out: its harness sums all outputs into the first one's
    # dtype, which fails for an integer first output; torch.compile is checked below instead.)
    torch.library.opcheck(torch.ops.deepseek.moe_route.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_moe_block_under_torch_compile_matches_eager():
    # bf16, the training dtype: torch._grouped_mm's compile-time (fake) kernel accepts only bf16.
    config = _config("tiny-deepseek-v2")
    model = apply_training_form(build_model(config, seed=0, dtype=torch.bfloat16)).train()
    block = model.model.layers[1].mlp
    hidden = torch.randn(2, 16, config.hidden_size, generator=torch.Generator().manual_seed(0)).bfloat16()
    x_eager = hidden.clone().requires_grad_()
    y_eager, aux_eager = block(x_eager)
    (y_eager.square().mean() + aux_eager).backward()
    eager_grads = [p.grad.clone() for p in block.parameters()]
    block.zero_grad()
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    x_compiled = hidden.clone().requires_grad_()
    y_compiled, aux_compiled = compiled(x_compiled)
    (y_compiled.square().mean() + aux_compiled).backward()
    # aot_eager runs the same kernels; only the order of a few float ops may differ.
    assert _rel(y_compiled.float(), y_eager.float()) < 1e-2 and _rel(aux_compiled, aux_eager) < 1e-5
    assert _rel(x_compiled.grad.float(), x_eager.grad.float()) < 2e-2
    for p, g in zip(block.parameters(), eager_grads):
        assert _rel(p.grad.float(), g.float()) < 2e-2


def test_annotation_registry_holds_the_router():
    annotation = get_op_annotation("deepseek::moe_route")
    assert "n" in annotation.splittable_names() and "h" not in annotation.splittable_names()


def test_apply_training_form_refuses_twice_and_bad_backend():
    config = _config("tiny-deepseek-moe")
    model = apply_training_form(build_model(config, device="meta"))
    with pytest.raises(ValueError, match="already"):
        apply_training_form(model)
    with pytest.raises(ValueError, match="attention backend"):
        apply_training_form(build_model(config, device="meta"), attention="magic")


def test_injected_balance_loss_gradient_equals_adding_it_to_the_loss():
    """What a pipeline stage does (inject the balance-loss gradient where it is computed) gives the
    gradients of adding the balance loss to the returned loss."""
    config = _config("tiny-deepseek-v2")
    added = apply_training_form(build_model(config, seed=7)).train()
    injected = copy.deepcopy(added)
    # the whole model as one pipeline stage: its blocks inject the balance-loss gradient (scale 0.5)
    stage = spec.StageModule(injected, (0, config.num_hidden_layers), has_embed=True, has_head=True,
                             aux_loss_grad_scale=0.5)
    ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(7))
    out = added(input_ids=ids, labels=ids)
    (out.lm_loss + 0.5 * out.aux_loss).backward()
    logits = stage(ids)
    torch.testing.assert_close(logits, out.logits)
    lm = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, config.vocab_size), ids[:, 1:].reshape(-1))
    lm.backward()
    logged = sum(m.last_aux_loss for m in injected.modules() if isinstance(m, MoEBlock))
    torch.testing.assert_close(logged, out.aux_loss.detach())
    for (name, p), q in zip(added.named_parameters(), injected.parameters()):
        assert _rel(q.grad, p.grad) < 1e-5, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the half-precision gate GEMM is taken on CUDA only")
def test_router_scores_on_tensor_cores_equal_the_float32_gate_forward_and_backward():
    """The training form's router GEMM (bf16 inputs, float32 accumulation) computes the public float32
    gate's scores, and its gradients are the float32 ones (modeling_deepseek.gate_scores)."""
    from modeling.modeling_deepseek import gate_scores
    from modeling.training_form import router_scores
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4096, 2048, device="cuda", generator=g).bfloat16()
    w = (torch.randn(64, 2048, device="cuda", generator=g) * 0.02).bfloat16()
    grad = torch.randn(4096, 64, device="cuda", generator=g)
    results = []
    for fn in (router_scores, gate_scores):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        scores = fn(xi, wi, True)
        scores.backward(grad)
        results.append((scores.detach(), xi.grad, wi.grad))
    (s, gx, gw), (s_ref, gx_ref, gw_ref) = results
    assert s.dtype == torch.float32
    # the logits differ in the order of their 2048-term sums alone (1.6e-6 at most seen on an H100)
    assert (s - s_ref).abs().max().item() < 1e-5
    # so the gradients agree to float32 rounding (x's gradient then rounded to bf16 in both)
    for got, ref in ((gx, gx_ref), (gw, gw_ref)):
        assert ((got.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-3
