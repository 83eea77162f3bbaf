"""The speed options of the training step compute what the plain path computes (on the CPU; their
speed needs a GPU, bench/train_step.py): the chunked cross-entropy, the forced attention kernels,
torch.compile of the layers, deferred gradient reduction, fused AdamW, and their checks."""

import copy
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from modeling import build_model, load_config
from modeling.training_form import (
    ATTENTION_BACKENDS,
    COMPILE_SCOPES,
    apply_training_form,
    compile_layers,
    flash_attn_func,
)
from runtime.loss import chunked_lm_loss_sum, lm_loss_sum
from runtime.preflight import RunError, check_execution
from runtime.trainer import RunArgs
from tests.runtime_harness import REPO, gather_parameters, losses, make_plan, run_plan, write_random_rows

CONFIGS = os.path.join(REPO, "configs")


def _config(name="tiny-deepseek-v2"):
    return load_config(os.path.join(CONFIGS, name))


def _ids(config, batch=3, seq=40, seed=0):
    return torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


# ---- chunked cross-entropy --------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 7, 39, 64, 10_000])
def test_chunked_loss_equals_plain_loss_and_gradients(chunk):
    """float32 tiny DeepSeek-V2: the loss from hidden states in chunks (a chunk size that divides the
    positions, one that does not, one chunk, one row per chunk) against lm_loss_sum over full logits,
    and every parameter's gradient."""
    config = _config()
    plain = apply_training_form(build_model(config, seed=0)).train()
    chunked = copy.deepcopy(plain)
    ids = _ids(config)
    out = plain(input_ids=ids)
    plain_loss = lm_loss_sum(out.logits, ids) / 100 + out.aux_loss
    plain_loss.backward()
    ce_sum, aux = chunked.forward_with_head(ids, lambda h, head: chunked_lm_loss_sum(h, head, ids, chunk))
    chunked_loss = ce_sum / 100 + aux
    chunked_loss.backward()
    assert abs(chunked_loss.item() - plain_loss.item()) <= 1e-6 * abs(plain_loss.item())
    for (name, p), q in zip(plain.named_parameters(), chunked.parameters()):
        assert p.grad is not None and q.grad is not None, name
        assert _rel(q.grad, p.grad) < 1e-5, (name, _rel(q.grad, p.grad))


@pytest.mark.parametrize("targets_only,chunk,head_rows", [(False, 4, 16), (True, 4, 10), (True, 16, 12)])
def test_chunked_loss_ignores_minus_100_like_cross_entropy(targets_only, chunk, head_rows):
    """Ignored targets count for nothing, whether the head runs on every position or (targets_only,
    instruction rows) on the positions with a target alone, their count rounded up to a quarter
    chunk with ignored ones (10 -> 12 for chunks of 16): the same sum and gradients."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 9, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (2, 9), generator=g)
    targets[0, 3] = targets[1, 8] = -100
    targets[1, :5] = -100  # a prompt
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        loss = chunked_lm_loss_sum(hidden, weight, targets, chunk, targets_only=targets_only)
    # the hidden-state gradient the loss keeps for its backward: of the head's rows, the 10 positions
    # with a target (padded to a quarter chunk) or all 2 x 8 positions but the rows' last
    assert int((targets[:, 1:] != -100).sum()) == 10
    assert (head_rows, 16) in saved, saved
    assert not any(shape[0] != head_rows for shape in saved if len(shape) == 2 and shape[1] == 16 and shape[0] <= 16)
    loss.backward()
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    ref = F.cross_entropy((h2[:, :-1] @ w2.t()).reshape(-1, 50), targets[:, 1:].reshape(-1), reduction="sum",
                          ignore_index=-100)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(hidden.grad, h2.grad)
    torch.testing.assert_close(weight.grad, w2.grad)
    with pytest.raises(ValueError, match="chunk_tokens must be positive"):
        chunked_lm_loss_sum(hidden, weight, targets, 0)


def test_chunked_loss_of_a_frozen_head_gives_the_hidden_gradient_alone():
    """A LoRA run's lm_head is frozen: the chunked loss computes no weight gradient (no GEMM, no
    accumulator), and the hidden states' gradient is the plain loss's, over several chunks and one."""
    g = torch.Generator().manual_seed(2)
    targets = torch.randint(0, 50, (2, 9), generator=g)
    targets[1, 4] = -100
    hidden0, weight = torch.randn(2, 9, 16, generator=g), torch.randn(50, 16, generator=g)
    ref_hidden = hidden0.clone().requires_grad_()
    F.cross_entropy((ref_hidden[:, :-1] @ weight.t()).reshape(-1, 50), targets[:, 1:].reshape(-1), reduction="sum",
                    ignore_index=-100).backward()
    for chunk in (4, 64):
        hidden, frozen = hidden0.clone().requires_grad_(), weight.clone()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
            loss = chunked_lm_loss_sum(hidden, frozen, targets, chunk)
        assert tuple(weight.shape) not in saved  # no weight gradient was made and kept for the backward
        loss.backward()
        assert frozen.grad is None
        torch.testing.assert_close(hidden.grad, ref_hidden.grad)


def test_chunked_loss_in_bf16_stays_within_rounding_of_the_float32_loss():
    config = _config()
    model32 = apply_training_form(build_model(config, seed=0)).train()
    model16 = copy.deepcopy(model32).to(torch.bfloat16)
    ids = _ids(config)
    ref = lm_loss_sum(model32(input_ids=ids).logits, ids)
    got, _ = model16.forward_with_head(ids, lambda h, head: chunked_lm_loss_sum(h, head, ids, 16))
    assert got.dtype == torch.float32
    assert abs(got.item() - ref.item()) < 1e-2 * abs(ref.item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GEMM's own float32 accumulation is CUDA's (addmm out_dtype)")
def test_chunked_loss_on_cuda_accumulates_the_head_gradient_like_float32_sums():
    """bf16 on CUDA: the lm_head weight gradient summed over chunks by the GEMM into float32 (cuBLAS
    beta = 1) equals the float32 sum of the chunks' bf16 products, within bf16 rounding of one chunk."""
    g = torch.Generator(device="cuda").manual_seed(3)
    hidden = torch.randn(2, 257, 64, device="cuda", generator=g).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(300, 64, device="cuda", generator=g) / 8).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, 300, (2, 257), device="cuda", generator=g)
    chunked_lm_loss_sum(hidden, weight, targets, 64).backward()
    h = hidden.detach().float()
    logits = (hidden.detach()[:, :-1].reshape(-1, 64) @ weight.detach().t()).float()
    grad_logits = torch.softmax(logits, dim=-1)
    grad_logits[torch.arange(logits.shape[0], device="cuda"), targets[:, 1:].reshape(-1)] -= 1
    expected = grad_logits.to(torch.bfloat16).float().t() @ h[:, :-1].reshape(-1, 64)
    assert weight.grad.dtype == torch.bfloat16 and weight.grad.shape == weight.shape
    assert _rel(weight.grad, expected) < 1e-2, _rel(weight.grad, expected)


# ---- attention kernels ---------------------------------------------------------------------------------------
CUDA_ONLY = {"sdpa_efficient": "PyTorch's memory-efficient SDPA kernel has no CPU implementation",
             "sdpa_cudnn": "the cuDNN SDPA kernel needs CUDA"}


@pytest.mark.parametrize("name", ["tiny-deepseek-v2", "tiny-deepseek-moe"])
@pytest.mark.parametrize("backend", sorted(ATTENTION_BACKENDS))
def test_attention_backend_equals_sdpa(name, backend):
    """Each backend's model output and gradients equal sdpa's (MLA's 24/16 q-k/v heads on
    tiny-deepseek-v2, equal heads on tiny-deepseek-moe). A kernel that cannot run here must raise,
    not fall back silently to another one."""
    config = _config(name)
    reference = apply_training_form(build_model(config, seed=0), attention="sdpa").train()
    if backend == "flash" and flash_attn_func is None:
        with pytest.raises(ValueError, match="flash-attn package"):
            apply_training_form(build_model(config, device="meta"), attention="flash")
        pytest.skip("flash-attn is not installed (it needs CUDA); the refusal was checked instead")
    model = apply_training_form(build_model(config, seed=0), attention=backend).train()
    model.load_state_dict(reference.state_dict())
    ids = _ids(config, batch=2, seq=32)
    if backend in CUDA_ONLY:
        with pytest.raises(RuntimeError):
            model(input_ids=ids)
        pytest.skip(CUDA_ONLY[backend] + "; checked that it raises instead of falling back")
    ref_out = reference(input_ids=ids, labels=ids)
    out = model(input_ids=ids, labels=ids)
    assert _rel(out.logits, ref_out.logits) < 1e-5
    ref_out.loss.backward()
    out.loss.backward()
    for (n, p), q in zip(reference.named_parameters(), model.parameters()):
        assert _rel(q.grad, p.grad) < 1e-5, n


# ---- torch.compile of the layers ---------------------------------------------------------------------------
def _graphs():
    from torch._dynamo.utils import counters
    return sum(counters["stats"].get(k, 0) for k in ("unique_graphs",))


# layer_cudagraphs compiles the graphs of `layer` (CUDA graphs replay them on CUDA only): its wiring below
@pytest.mark.parametrize("scope", [s for s in COMPILE_SCOPES if s not in ("none", "layer_cudagraphs")])
def test_compiled_layers_equal_eager(scope):
    """bf16 (torch._grouped_mm compiles only for bf16), the aot_eager backend (the graphs torch.compile
    captures, run with eager kernels: no code generation on a CPU): forward and backward through
    the captured graphs equal eager, and graphs were really captured."""
    torch._dynamo.reset()
    config = _config()
    eager = apply_training_form(build_model(config, seed=0, dtype=torch.bfloat16)).train()
    compiled = copy.deepcopy(eager)
    compile_layers(compiled.model.layers, scope, backend="aot_eager", norms=[compiled.model.norm])
    ids = _ids(config, batch=2, seq=32)
    before = _graphs()
    out = compiled(input_ids=ids, labels=ids)
    out.loss.backward()
    captured = _graphs() - before
    ref = eager(input_ids=ids, labels=ids)
    ref.loss.backward()
    if scope == "norm_rope":
        assert captured >= 2  # the norm and the rotary embedding
    elif scope == "layer":
        assert captured >= 2  # the dense and the MoE layer
    else:
        assert captured >= 3  # the dense layer, the MoE layer before and after its eager experts
    assert _rel(out.logits, ref.logits) < 1e-2 and abs(out.loss.item() - ref.loss.item()) < 1e-2
    for (n, p), q in zip(eager.named_parameters(), compiled.parameters()):
        assert _rel(q.grad, p.grad) < 3e-2, n
    names = [n for n, _ in compiled.named_parameters()]
    assert names == [n for n, _ in eager.named_parameters()]  # checkpoint names unchanged
    torch._dynamo.reset()


def test_layer_cudagraphs_compiles_each_layer_in_reduce_overhead_mode(monkeypatch):
    """layer_cudagraphs: each decoder layer's forward compiled whole by inductor with CUDA graphs (its
    reduce-overhead mode, as an option) and combo kernels, where layer compiles it in the default mode;
    another backend is refused."""
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: calls.append(kw) or fn)
    for scope in ("layer", "layer_cudagraphs"):
        model = apply_training_form(build_model(_config(), device="meta"))
        compile_layers(model.model.layers, scope)
    layers = len(model.model.layers)
    assert calls == [{"backend": "inductor", "dynamic": False}] * layers + \
        [{"backend": "inductor", "dynamic": False,
          "options": {"triton.cudagraphs": True, "combo_kernels": True}}] * layers
    with pytest.raises(ValueError, match="layer_cudagraphs needs the inductor backend"):
        compile_layers(model.model.layers, "layer_cudagraphs", backend="aot_eager")


@pytest.mark.parametrize("devices,lora,backend,device,message", [
    (2, True, "inductor", "cuda", "runs on one device, not 2"),
    (1, False, "inductor", "cuda", "needs a LoRA run (--lora_rank)"),
    (1, True, "aot_eager", "cuda", "needs --compile_backend inductor"),
    (1, True, "inductor", "cpu", "needs --device cuda"),
    (1, True, "inductor", "cuda", None),
])
def test_layer_cudagraphs_is_refused_where_a_graph_cannot_replay(devices, lora, backend, device, message):
    from compiler.execution import cudagraph_refusal
    reason = cudagraph_refusal("layer_cudagraphs", devices, lora, backend, device)
    assert (reason is None) if message is None else (message in reason)
    assert all(cudagraph_refusal(scope, devices, lora, backend, device) is None
               for scope in COMPILE_SCOPES if scope != "layer_cudagraphs")


def test_layer_cudagraphs_is_refused_by_compile_and_run_with_the_fix(tmp_path):
    """compile refuses it for several devices or without LoRA; a run refuses it on a CPU; both in one
    line naming the flag."""
    from compiler.compile import compile_plan
    from compiler.plan import PlanError
    from options import CompileOptions
    model_dir = os.path.join(CONFIGS, "tiny-deepseek-v2")
    base = dict(model_id=model_dir, seq_len=32, micro_batch_size=2, global_batch_size=4, device_profile="cpu",
                compute_dtype="bf16", report=False, compile="layer_cudagraphs")
    with pytest.raises(PlanError, match="runs on one device, not 2"):
        compile_plan(CompileOptions(plan_ngpus=2, lora_rank=4, plan_out=str(tmp_path / "a.json"), **base))
    with pytest.raises(PlanError, match="needs a LoRA run"):
        compile_plan(CompileOptions(plan_ngpus=1, plan_out=str(tmp_path / "b.json"), **base))
    plan, _ = compile_plan(CompileOptions(plan_ngpus=1, lora_rank=4, plan_out=str(tmp_path / "p.json"), **base))
    assert plan.execution["compile"] == "layer_cudagraphs"
    # priced as compiled layers (the same kernels and memory) whose launches cost the h200 profile's
    # measured share of theirs; a profile without that figure prices them as compiled layers
    def predicted(scope, profile="h200"):
        p, _ = compile_plan(CompileOptions(plan_ngpus=1, lora_rank=4, plan_out=str(tmp_path / f"{scope}.json"),
                                           pinned=("compile",), **{**base, "compile": scope, "device_profile": profile}))
        assert p.execution.get("compile", "none") == scope  # (a plan records what differs from the plain path)
        return p.predicted["step_time_s"], p.predicted["peak_memory_gib"]
    (graphs_s, graphs_gib), (layer_s, layer_gib) = predicted("layer_cudagraphs"), predicted("layer")
    assert graphs_s < layer_s and graphs_gib == layer_gib and (layer_s, layer_gib) != predicted("none")
    assert predicted("layer_cudagraphs", "h100") == predicted("layer", "h100")
    r = subprocess.run([sys.executable, "train.py", "--device", "cpu", "--dtype", "bf16", "--max_steps", "1",
                        "--model_id", model_dir, "--plan", str(tmp_path / "p.json"), "--runtime_ngpus", "1",
                        "--dataset_path", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--compile layer_cudagraphs needs --device cuda" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_the_search_chooses_cuda_graphs_only_where_they_can_run(tmp_path):
    """On the h200 profile (which measured their gain) a one-device LoRA plan replays its layers as CUDA
    graphs unless --compile is pinned; a plan for two devices, one without LoRA, or one for the CPU
    profile never gets them (cudagraph_refusal), so what the search emits always runs."""
    from compiler.compile import compile_plan
    from options import CompileOptions
    base = dict(model_id=os.path.join(CONFIGS, "tiny-deepseek-v2"), seq_len=32, micro_batch_size=2, global_batch_size=4,
                report=False, device_profile="h200")

    def scope(**kw):
        plan, _ = compile_plan(CompileOptions(plan_out=str(tmp_path / f"{len(os.listdir(tmp_path))}.json"), **{**base, **kw}))
        return plan.execution.get("compile", "none")
    assert scope(plan_ngpus=1, lora_rank=4) == "layer_cudagraphs"
    assert scope(plan_ngpus=1, lora_rank=4, compile="layer", pinned=("compile",)) == "layer"
    assert scope(plan_ngpus=2, lora_rank=4) != "layer_cudagraphs"
    assert scope(plan_ngpus=1) != "layer_cudagraphs"
    assert scope(plan_ngpus=1, lora_rank=4, device_profile="cpu", compute_dtype="bf16") != "layer_cudagraphs"


def test_compile_layers_refuses_an_unknown_scope():
    model = apply_training_form(build_model(_config(), device="meta"))
    with pytest.raises(ValueError, match="compile scope"):
        compile_layers(model.model.layers, "everything")


# ---- the options in the trainer -------------------------------------------------------------------------------
def _plan(config, **kw):
    return make_plan(config, os.path.join(CONFIGS, "tiny-deepseek-v2"), seq_len=32, **kw)


@pytest.mark.parametrize("options,plan_kw,message", [
    ({"compile": "layer"}, {}, "needs bf16 compute"),
    ({"compile": "all"}, {}, "--compile all: choose one of"),
    ({"attention": "magic"}, {}, "--attention magic: choose one of"),
    ({"ce_chunk_tokens": -1}, {}, "must be 0"),
    ({"defer_grad_sync": True}, {"dp": 2, "zero": 3}, "--defer_grad_sync needs a plan with ZeRO 0"),
])
def test_speed_options_are_checked_before_any_work(options, plan_kw, message):
    args = RunArgs(model_id="m", dataset_path=None, plan_ngpus=1, runtime_ngpus=1, device="cpu", **options)
    with pytest.raises(RunError, match=re.escape(message)):
        check_execution(args, _plan(_config(), **plan_kw), "p.json")
    ok = RunArgs(model_id="m", dataset_path=None, plan_ngpus=1, runtime_ngpus=1, device="cpu", dtype="bf16",
                 compile="layer", ce_chunk_tokens=64, defer_grad_sync=True, attention="sdpa_flash_padded")
    check_execution(ok, _plan(_config()), "p.json")


def test_train_py_choices_are_the_modules_choices():
    import train
    actions = {a.dest: a for a in train.build_parser()._actions}
    assert set(actions["attention"].choices) == set(ATTENTION_BACKENDS)
    assert set(actions["compile"].choices) == set(COMPILE_SCOPES)


def test_train_py_refuses_compile_in_fp32_on_cpu(tmp_path):
    plan = _plan(_config())
    plan.save(str(tmp_path / "p.json"))
    r = subprocess.run([sys.executable, "train.py", "--device", "cpu", "--max_steps", "1", "--model_id",
                        os.path.join(CONFIGS, "tiny-deepseek-v2"), "--plan", str(tmp_path / "p.json"),
                        "--runtime_ngpus", "1", "--compile", "layer", "--dataset_path", str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "needs bf16 compute" in r.stderr and "Traceback" not in r.stderr


def test_fused_adamw_flag_reaches_the_optimizer():
    from runtime.step import build_optimizer
    params = [torch.nn.Parameter(torch.zeros(3))]
    base = RunArgs(model_id="m", dataset_path=None, plan_ngpus=1, runtime_ngpus=1)
    assert not build_optimizer(params, base)[0].defaults["fused"]
    fused = RunArgs(model_id="m", dataset_path=None, plan_ngpus=1, runtime_ngpus=1, fused_adamw=True)
    assert build_optimizer(params, fused)[0].defaults["fused"] is True


def test_fused_adamw_clips_in_its_kernel_as_the_foreach_path_clips_the_gradients():
    """With fused AdamW the clipping is the kernel's grad_scale (no pass over the gradients): steps
    equal scaling the gradients first, and the optimizer forgets the scale for the next step. Three
    steps, clipped, not clipped, clipped: Adam's first step hardly depends on the gradients' scale, so
    only a mix of scales tells a missed clip apart."""
    from runtime.step import build_optimizer, clip_gradients, end_clipping
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(40, 7, generator=g), torch.randn(5, generator=g)]
    steps = [(3.0, [torch.randn(40, 7, generator=g), torch.randn(5, generator=g)]) for _ in range(3)]
    steps[1] = (0.4, steps[1][1])
    after = []
    for fused in (False, True):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        args = RunArgs(model_id="m", dataset_path=None, plan_ngpus=1, runtime_ngpus=1, fused_adamw=fused, lr=0.1)
        optimizer, _ = build_optimizer(params, args)
        for norm, grads in steps:
            for p, grad in zip(params, grads):
                p.grad = grad.clone()
            local = [p.grad for p in params]
            clip_gradients(local, norm, 1.0, optimizer)
            assert torch.equal(local[0], grads[0]) == (fused or norm <= 1.0)  # fused: left to the kernel
            optimizer.step()
            end_clipping(optimizer)
            assert getattr(optimizer, "grad_scale", None) is None
        after.append([p.detach().clone() for p in params])
    for foreach_p, fused_p in zip(*after):
        torch.testing.assert_close(fused_p, foreach_p, rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("speed")
    write_random_rows(root / "data", 512, 32, 32)
    return root


@pytest.fixture(scope="module")
def reference(data):
    """One process, fp32, the plain path."""
    config = _config()
    return run_plan(_plan(config), 1, os.path.join(CONFIGS, "tiny-deepseek-v2"), str(data / "data"),
                    str(data / "reference"))


@pytest.fixture(scope="module")
def reference_bf16(data):
    config = _config()
    return run_plan(_plan(config), 1, os.path.join(CONFIGS, "tiny-deepseek-v2"), str(data / "data"),
                    str(data / "reference_bf16"), dtype="bf16")


def _same_training(results, ref, plan, loss_tol, param_tol, grad_norm_tol=None):
    assert len(losses(results)) == 3
    for got, want in zip(losses(results), losses(ref)):
        assert abs(got - want) <= loss_tol * abs(want), (losses(results), losses(ref))
    for got, want in zip(results[0]["records"], ref[0]["records"]):
        assert abs(got["grad_norm"] - want["grad_norm"]) <= (grad_norm_tol or loss_tol) * want["grad_norm"]
    params, ref_params = gather_parameters(results, plan), gather_parameters(ref, plan)
    for name, value in ref_params.items():
        assert _rel(params[name], value) < param_tol, name


@pytest.mark.parametrize("world,plan_kw,options", [
    (1, {}, {"ce_chunk_tokens": 13}),
    (1, {}, {"fused_adamw": True}),
    (2, {"dp": 2}, {"defer_grad_sync": True, "ce_chunk_tokens": 16}),
    (2, {"ep": 2}, {"ce_chunk_tokens": 16}),
])
def test_trainer_options_follow_the_plain_path(data, reference, world, plan_kw, options):
    """fp32: three optimizer steps with the option equal the single-process plain run (losses and
    gradient norms within 1e-5, parameters 1e-4)."""
    plan = _plan(_config(), **plan_kw)
    results = run_plan(plan, world, os.path.join(CONFIGS, "tiny-deepseek-v2"), str(data / "data"),
                       str(data / f"run_{world}_{'_'.join(sorted(options))}_{'_'.join(plan_kw)}"), **options)
    _same_training(results, reference, plan, 1e-5, 1e-4)


@pytest.mark.parametrize("options", [
    {"compile": "layer", "compile_backend": "aot_eager", "defer_grad_sync": True},
    {"compile": "layer_eager_experts", "compile_backend": "aot_eager", "ce_chunk_tokens": 16},
])
def test_trainer_compiled_bf16_follows_eager_bf16(data, reference_bf16, options):
    """bf16 on one rank (FSDP mixed precision wraps the model, as on a GPU): compiled layers (under
    FSDP's hooks), deferred reduction and the chunked loss follow the plain bf16 run."""
    plan = _plan(_config())
    results = run_plan(plan, 1, os.path.join(CONFIGS, "tiny-deepseek-v2"), str(data / "data"),
                       str(data / f"bf16_{'_'.join(sorted(options))}_{options['compile']}"), dtype="bf16",
                       **options)
    # bf16 rounding: the chunked loss rounds softmax - one-hot to bf16 before scaling it by 1 / tokens
    _same_training(results, reference_bf16, plan, 1e-3, 2e-2, grad_norm_tol=1e-2)


def test_deferred_sync_reduces_only_after_the_last_micro_batch(monkeypatch):
    """Under FSDP (bf16 mixed precision on one gloo rank) a deferred micro-batch leaves the reduced
    gradients untouched; the last one reduces the sum of both micro-batches."""
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from runtime.mesh import build_mesh
    from runtime.mesh import free_port
    from runtime.parallelize import apply_data_parallel
    from runtime.step import defer_grad_sync
    # a one-rank gloo group in this process; the variables are restored afterwards (a later
    # subprocess would otherwise inherit this port)
    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                           LOCAL_RANK="0").items():
        monkeypatch.setenv(key, value)
    dist.init_process_group("gloo")
    try:
        config = _config()
        plan = _plan(config)
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        models = []
        for deferred in (False, True):
            model = apply_training_form(build_model(config, seed=0)).train()
            apply_data_parallel(model, list(model.model.layers), plan, build_mesh(plan, "cpu"), mp, False)
            models.append(model)
        ids = _ids(config, batch=4, seq=16)
        for mb in ids.split(2):
            models[0](input_ids=mb, labels=mb).loss.backward()
        defer_grad_sync(models[1], last_microbatch=False)
        models[1](input_ids=ids[:2], labels=ids[:2]).loss.backward()
        assert all(p.grad is None for p in models[1].parameters())  # nothing reduced yet
        defer_grad_sync(models[1], last_microbatch=True)
        models[1](input_ids=ids[2:], labels=ids[2:]).loss.backward()
        for (n, p), q in zip(models[0].named_parameters(), models[1].parameters()):
            assert q.grad is not None, n
            assert _rel(q.grad.full_tensor(), p.grad.full_tensor()) < 1e-2, n
    finally:
        dist.destroy_process_group()
