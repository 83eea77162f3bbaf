"""Training on instruction data: response-only loss, packed rows with document-masked attention,
the learning-rate schedules, evaluation, and the refusals.

Each result is checked against an independent computation on the Hugging Face reference model
(eager attention, per-expert loops, float32): the loss a mean over the targets (labels that are not
-100) of the whole global batch, whatever the micro-batches, data ranks or pipeline stages.
"""

import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import datasets
import pytest
import torch
import torch.nn.functional as F

from modeling import IGNORE_INDEX, build_model, load_config, spec
from modeling.hf_adapter import from_hf, to_hf
from modeling.training_form import apply_training_form
from runtime.data import Batch, DataError, GlobalBatches, evaluation_batches, load_rows
from runtime.loss import lm_loss_sum
from runtime.step import StepShape, build_optimizer, forward_backward_step, lr_factor, micro_batch_loss
from runtime.trainer import RunArgs
from runtime.weights import materialize
from tests.runtime_harness import REPO, gather_parameters, losses, make_plan, run_plan

SEQ, GLOBAL = 32, 8
TINY_V2 = os.path.join(REPO, "configs", "tiny-deepseek-v2")


# ---- data ------------------------------------------------------------------------------------------------
def example(generator, vocab, length, prompt):
    """(input_ids, labels) of one instruction example: BOS (id 0), `prompt` - 1 prompt tokens, then the
    response; labels -100 on the BOS and the prompt, the token itself on the response."""
    ids = [0] + torch.randint(3, vocab, (length - 1,), generator=generator).tolist()
    return ids, [IGNORE_INDEX] * prompt + ids[prompt:]


def packed_rows(n_rows, vocab, seed, responses=None):
    """Rows of SEQ tokens packing examples of random lengths. responses[r] (optional) is the response
    length of every example of row r, so rows can hold very different target counts."""
    g = torch.Generator().manual_seed(seed)
    columns = {"input_ids": [], "labels": [], "position_ids": []}
    for r in range(n_rows):
        ids, labels, positions = [], [], []
        while len(ids) < SEQ:
            length = min(int(torch.randint(4, 15, (1,), generator=g)), SEQ - len(ids))
            wanted = responses[r] if responses is not None else int(torch.randint(0, length, (1,), generator=g))
            e_ids, e_labels = example(g, vocab, length, prompt=max(1, length - wanted))
            ids, labels, positions = ids + e_ids, labels + e_labels, positions + list(range(length))
        for name, values in zip(columns, (ids, labels, positions)):
            columns[name].append(values)
    return columns


def as_batch(columns):
    return Batch(*(torch.tensor(columns[name]) for name in ("input_ids", "labels", "position_ids")))


def save(columns, path):
    datasets.Dataset.from_dict(columns).save_to_disk(str(path))
    return str(path)


# ---- the reference ---------------------------------------------------------------------------------------
def reference_ce(model, batch):
    """(summed cross-entropy over the targets, target count), float64, from the reference model's logits:
    position s predicts labels[s + 1] where that label is not -100."""
    logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids).logits[:, :-1].double()
    targets = batch.targets()[:, 1:]
    keep = targets != IGNORE_INDEX
    logp = F.log_softmax(logits, dim=-1).gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return -(logp * keep).sum(), int(keep.sum())


def no_balance_loss(name="tiny-deepseek-v2"):
    """A tiny config without the balance loss, whose per-sequence statistics would make packed rows
    and single examples differ for a reason that is no part of these tests."""
    config = load_config(os.path.join(REPO, "configs", name))
    config.aux_loss_alpha = 0.0
    return config


def grads_by_training_name(model, num_experts):
    return from_hf({n: p.grad for n, p in model.named_parameters()}, num_experts)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


# ---- (a) response-only loss: the prompt's labels count for nothing ---------------------------------------
@pytest.mark.parametrize("ce_chunk_tokens", [0, 5])
def test_gradient_is_that_of_the_mean_over_response_targets(ce_chunk_tokens):
    """The runtime's step (micro-batches of 2 rows, plain or chunked loss) against the reference model's
    masked mean over the response targets: loss and every gradient. With the prompt's labels set to
    the prompt's tokens instead of -100 the gradient changes: the -100 labels are what leaves them out."""
    config = no_balance_loss()
    reference = build_model(config, seed=1)
    batch = as_batch(packed_rows(4, config.vocab_size, seed=2))
    ce_sum, count = reference_ce(reference, batch)
    (ce_sum / count).backward()
    expected = grads_by_training_name(reference, config.n_routed_experts)

    def runtime_gradient(batch):
        training = apply_training_form(build_model(config, seed=1), attention="sdpa")
        shape = StepShape(tokens=batch.target_count(), microbatches=2, micro_batch_size=2)
        args = SimpleNamespace(defer_grad_sync=False, ce_chunk_tokens=ce_chunk_tokens, compile="none")
        ce, aux = forward_backward_step(training, batch, shape, args)
        return float(ce), {n: p.grad for n, p in training.named_parameters()}

    assert batch.target_count() == count
    ce, got = runtime_gradient(batch)
    assert abs(ce - (ce_sum / count).item()) < 1e-6 * abs(ce)
    assert got.keys() == expected.keys()
    for name, grad in expected.items():
        assert rel(got[name], grad) < 1e-5, name
    unmasked = Batch(batch.input_ids, torch.where(batch.position_ids == 0, IGNORE_INDEX, batch.input_ids),
                     batch.position_ids)
    _, changed = runtime_gradient(unmasked)
    assert rel(changed["lm_head.weight"], expected["lm_head.weight"]) > 1e-2


# ---- (b) a packed row is its examples, each alone --------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-deepseek-v2", "tiny-deepseek-moe"])
@pytest.mark.parametrize("kernel", ["reference", "eager", "sdpa"])
def test_a_packed_row_gives_the_loss_and_gradients_of_its_examples_alone(name, kernel):
    """One row packing three examples (position ids restarting at each) against the three run one
    by one without position ids: the sum of their cross-entropy sums over the total target count,
    and its gradient. The reference model, and the training form with either attention kernel."""
    config = no_balance_loss(name)
    g = torch.Generator().manual_seed(3)
    parts = [example(g, config.vocab_size, length, prompt) for length, prompt in ((9, 4), (14, 3), (9, 8))]
    ids = [t for p in parts for t in p[0]]
    labels = [t for p in parts for t in p[1]]
    positions = [i for p in parts for i in range(len(p[0]))]
    packed = Batch(torch.tensor([ids]), torch.tensor([labels]), torch.tensor([positions]))

    def model():
        m = build_model(config, seed=4)
        return m if kernel == "reference" else apply_training_form(m, attention=kernel)

    alone_model = model()
    alone_sum = sum(reference_ce(alone_model, Batch(torch.tensor([p[0]]), torch.tensor([p[1]])))[0] for p in parts)
    total = sum(sum(t != IGNORE_INDEX for t in p[1][1:]) for p in parts)
    (alone_sum / total).backward()
    packed_model = model()
    packed_sum, packed_count = reference_ce(packed_model, packed)
    (packed_sum / packed_count).backward()
    assert packed_count == total == packed.target_count()
    assert abs(packed_sum.item() - alone_sum.item()) < 1e-5 * abs(alone_sum.item())
    for (n, p), q in zip(packed_model.named_parameters(), alone_model.parameters()):
        if q.grad is None:  # an expert no token chose, in both
            assert p.grad is None or not p.grad.any(), n
            continue
        assert rel(p.grad, q.grad) < 1e-5, n
    # the runtime's loss function on the packed row: the same sum
    if kernel != "reference":
        with torch.no_grad():
            runtime_sum, _ = micro_batch_loss(model(), packed, ce_chunk_tokens=0)
        assert abs(runtime_sum.item() - alone_sum.item()) < 1e-5 * abs(alone_sum.item())


def test_pretraining_rows_take_the_plain_path_bitwise():
    """Rows without labels and position ids, and the same rows with labels = input ids and positions
    0..S-1 (no restart), give bitwise the loss of the plain call on the input ids."""
    config = load_config(TINY_V2)
    model = apply_training_form(build_model(config, seed=0), attention="sdpa").train()
    ids = torch.randint(0, config.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(5))
    plain = Batch(ids)
    explicit = Batch(ids, ids.clone(), torch.arange(SEQ).expand(2, SEQ).clone())
    assert plain.target_count() == explicit.target_count() == 2 * (SEQ - 1) and not explicit.has_restarts()
    with torch.no_grad():
        out = model(input_ids=ids)
        direct = lm_loss_sum(out.logits, ids)
        for batch in (plain, explicit):
            ce_sum, aux = micro_batch_loss(model, batch, ce_chunk_tokens=0)
            assert torch.equal(ce_sum, direct) and torch.equal(aux, out.aux_loss)


# ---- (c) + (e): the mean is exact across micro-batches, data ranks and pipeline stages; eval ---------------
RUN = dict(max_steps=4, lr=3e-3, lr_scheduler="cosine", warmup_steps=2, min_lr=3e-4, eval_every=2)


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    """An SFT dataset whose rows hold from 1 to 40 odd targets (responses of 1 to 12 tokens per
    example), an eval set of 11 rows (not a multiple of the global batch), and the reference run:
    one process, the whole global batch as one micro-batch."""
    root = tmp_path_factory.mktemp("sft")
    vocab = load_config(TINY_V2).vocab_size
    responses = [1, 12, 2, 9, 1, 6, 12, 3, 1, 10, 2, 7, 1, 12, 4, 5]
    data = save(packed_rows(16, vocab, seed=6, responses=responses), root / "data")
    eval_data = save(packed_rows(11, vocab, seed=7), root / "eval")
    config = load_config(TINY_V2)
    reference = run(config, root / "reference", data, eval_data, 1, micro_batch_size=GLOBAL)
    return {"root": root, "data": data, "eval": eval_data, "config": config, "reference": reference}


def run(config, out, data, eval_data, world, micro_batch_size=2, run_args=None, **plan_args):
    plan = make_plan(config, TINY_V2, seq_len=SEQ, micro_batch_size=micro_batch_size, global_batch_size=GLOBAL,
                     **plan_args)
    plan.search_inputs["document_masking"] = True
    return run_plan(plan, world, TINY_V2, data, str(out), eval_dataset_path=eval_data, **{**RUN, **(run_args or {})})


def reference_model_with(config, params):
    model = build_model(config, seed=0)
    model.load_state_dict(to_hf(params, config.n_routed_experts))
    return model.train()


def initial_params(config, seed=0):
    """The seeded initial weights every run starts from (runtime.weights), in one process."""
    model = materialize(spec.build_training_model(config, device="meta"), config, torch.device("cpu"), seed)
    return {n: p.detach() for n, p in model.named_parameters()}


def test_reference_run_is_the_mean_over_response_targets(sft):
    """Step 1's cross-entropy is the reference model's mean over the targets of the first global batch
    (initial weights); the last eval_loss its mean over every target of the eval set (final weights),
    every row counted once though 11 rows do not fill two global batches."""
    config, records = sft["config"], sft["reference"][0]["records"]
    batch = GlobalBatches(load_rows(sft["data"]), GLOBAL, seed=0).batch(0)
    with torch.no_grad():
        ce_sum, count = reference_ce(reference_model_with(config, initial_params(config)), batch)
    assert records[0]["targets"] == count
    assert abs(records[0]["lm_loss"] - float(ce_sum / count)) < 1e-5 * float(ce_sum / count)
    eval_rows = load_rows(sft["eval"])
    final = reference_model_with(config, gather_parameters(sft["reference"], make_plan(config, TINY_V2))).eval()
    with torch.no_grad():
        parts = [reference_ce(final, eval_rows.rows(slice(i, i + 4))) for i in range(0, len(eval_rows), 4)]
    expected = float(sum(s for s, _ in parts) / sum(c for _, c in parts))
    assert [r["step"] for r in records if "eval_loss" in r] == [2, 4]
    assert abs(records[-1]["eval_loss"] - expected) < 1e-5 * expected
    logged = [json.loads(line) for line in open(os.path.join(sft["root"], "reference", "save", "metrics.jsonl"))]
    assert [r.get("eval_loss") for r in logged] == [r.get("eval_loss") for r in records]


@pytest.mark.parametrize("family,world,overrides", [
    ("dp2_micro1", 2, dict(dp=2, micro_batch_size=1)),     # 4 micro-batches of 1 row on each of 2 ranks
    ("pp2_1f1b", 2, dict(pp=2, schedule="1F1B")),          # 4 micro-batches of 2 rows through 2 stages
])
def test_plans_match_one_process_on_instruction_data(sft, family, world, overrides):
    """Losses, gradient norms, eval losses and final weights of each plan against the one-process run
    of the whole batch (rows of very different target counts: a mean of per-micro-batch or per-rank
    means would differ). The pipeline evaluates between training steps with the schedule's eval."""
    results = run(sft["config"], sft["root"] / family, sft["data"], sft["eval"], world, **overrides)
    ref = sft["reference"][0]["records"]
    got = results[-1]["records"]  # the last rank holds the pipeline's last stage
    assert [r["targets"] for r in got] == [r["targets"] for r in ref]
    for key in ("loss", "lm_loss", "grad_norm", "eval_loss"):
        for g_r, r_r in zip(got, ref):
            if key in r_r:
                assert abs(g_r[key] - r_r[key]) <= 1e-5 * abs(r_r[key]), (family, key, g_r["step"], g_r[key], r_r[key])
    plan = make_plan(sft["config"], TINY_V2, **{k: v for k, v in overrides.items() if k != "micro_batch_size"})
    params, ref_params = gather_parameters(results, plan), gather_parameters(sft["reference"], make_plan(
        sft["config"], TINY_V2))
    assert params.keys() == ref_params.keys()
    for name, value in ref_params.items():
        assert rel(params[name], value) < 1e-4, name


# ---- (d) the learning-rate schedules ---------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["constant", "cosine", "linear"])
def test_schedule_values(kind):
    """lr at step s: warmup (s + 1) / 3 up to step 2, then constant, or a cosine or linear decay from
    --lr at step 2 to --min_lr at the last step (12): progress (s - 2) / 10. Through AdamW's LambdaLR as the run
    uses it, step by step."""
    lr, min_lr = 1e-3, 1e-4
    args = RunArgs(model_id="m", lr=lr, min_lr=min_lr, warmup_steps=3, max_steps=13, lr_scheduler=kind)
    optimizer, scheduler = build_optimizer([torch.nn.Parameter(torch.zeros(2))], args)
    used = []
    for _ in range(13):
        used.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    for step, value in enumerate(used):
        if step < 3:
            expected = lr * (step + 1) / 3
        elif kind == "constant":
            expected = lr
        else:
            progress = (step - 2) / 10
            remaining = 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1 - progress
            expected = min_lr + (lr - min_lr) * remaining
        assert value == pytest.approx(expected, rel=1e-12), (kind, step)
    if kind != "constant":
        assert used[2] == pytest.approx(lr) and used[12] == pytest.approx(min_lr)
        assert lr_factor(args)(100) == pytest.approx(min_lr / lr)  # held at --min_lr past --max_steps


def test_constant_schedule_is_the_warmup_of_before():
    args = RunArgs(model_id="m", lr=1e-3, warmup_steps=4, max_steps=10)
    assert args.lr_scheduler == "constant"
    factor = lr_factor(args)
    assert [factor(s) for s in range(8)] == [min(1.0, (s + 1) / 4) for s in range(8)]


def test_resume_continues_the_cosine_schedule_at_its_step(sft):
    """4 steps straight (the reference run) against 2 steps, saved, then resumed to 4: bitwise the same
    losses and learning rates (the first 2 steps are the warmup, which does not depend on
    --max_steps; the resumed steps are the cosine decay of the 4-step run)."""
    save_dir = str(sft["root"] / "resume" / "save")
    first = run(sft["config"], sft["root"] / "resume" / "a", sft["data"], sft["eval"], 1, micro_batch_size=GLOBAL,
                run_args=dict(max_steps=2, save_every=2, save_dir=save_dir))
    rest = run(sft["config"], sft["root"] / "resume" / "b", sft["data"], sft["eval"], 1, micro_batch_size=GLOBAL,
               run_args=dict(resume_path="last", save_dir=save_dir))
    straight = sft["reference"][0]["records"]
    assert losses(first) + losses(rest) == [r["loss"] for r in straight]
    assert [r["lr"] for r in rest[0]["records"]] == [r["lr"] for r in straight[2:]]
    assert straight[-1]["lr"] == pytest.approx(RUN["min_lr"]) and straight[1]["lr"] == pytest.approx(RUN["lr"])


# ---- (f) refusals ----------------------------------------------------------------------------------------
def _faulty(fault, vocab):
    columns = packed_rows(4, vocab, seed=8)
    labels, positions = columns["labels"], columns["position_ids"]
    starts = [i for i, p in enumerate(positions[2]) if p == 0 and i > 0]
    if fault == "label_outside_vocabulary":
        labels[1][5] = vocab
    elif fault == "label_negative":
        labels[1][5] = -1
    elif fault == "labels_float":
        columns["labels"] = [[float(t) for t in row] for row in labels]
        columns["labels"][0][3] = 2.5
    elif fault == "labels_shorter":
        columns["labels"] = [row[:-1] for row in labels]
    elif fault == "position_negative":
        positions[3][0] = -2
    elif fault == "position_jump":
        positions[2][starts[0] + 1] += 1
    elif fault == "document_start_is_a_target":
        labels[2][starts[0]] = columns["input_ids"][2][starts[0]]
    elif fault == "no_targets":
        columns["labels"] = [[IGNORE_INDEX] * SEQ for _ in labels]
    return columns, starts


@pytest.mark.parametrize("fault,expected", [
    ("label_outside_vocabulary", "row 1 of field labels holds 512 (position 5); a label is -100 (not a target) or "
                                 "a token id in 0..511"),
    ("label_negative", "row 1 of field labels holds -1 (position 5)"),
    ("labels_float", "row 0 of field labels holds double values (e.g. 2.5), not integer values"),
    ("labels_shorter", "the rows of field labels have 31 values but those of input_ids 32"),
    ("position_negative", "row 3 of field position_ids holds -2 (position 0); position ids are >= 0"),
    ("position_jump", "row 2 of field position_ids goes from 0 to 2 at position {jump}"),
    ("document_start_is_a_target", "row 2 position {start} starts a document (position_ids 0) but its label"),
    ("no_targets", "no row holds a target"),
])
def test_bad_labels_or_position_ids_are_refused_in_one_line(tmp_path, fault, expected):
    vocab = 512
    columns, starts = _faulty(fault, vocab)
    path = save(columns, tmp_path / fault)
    with pytest.raises(DataError) as raised:
        load_rows(path, SEQ, vocab)
    message = str(raised.value)
    assert expected.format(start=starts[0], jump=starts[0] + 1) in message, message
    assert "\n" not in message and message.startswith(f"--dataset_path {path}") and "bookcorpus.py" in message


def test_a_global_batch_without_targets_is_refused_naming_the_step():
    rows = as_batch(packed_rows(16, 512, seed=9))
    rows.labels[:] = IGNORE_INDEX
    data = GlobalBatches(rows, GLOBAL, seed=0, source="--dataset_path DIR")
    with pytest.raises(DataError) as raised:
        data.target_count(data.batch(4), 4)
    message = str(raised.value)
    assert message.startswith("step 5: its global batch of 8 rows from --dataset_path DIR holds no targets")
    assert "--global_batch_size" in message and "\n" not in message


def test_options_of_the_schedule_and_eval_are_checked_before_any_work():
    from options import OptionError
    from runtime.preflight import RunError
    from runtime.trainer import train
    with pytest.raises(OptionError, match=r"--min_lr 0.01 is above --lr 0.001"):
        train(RunArgs(model_id="m", lr=1e-3, min_lr=1e-2, lr_scheduler="cosine"))
    with pytest.raises(RunError, match=r"--eval_every 5 needs --eval_dataset_path"):
        train(RunArgs(model_id="m", eval_every=5))
    with pytest.raises(OptionError, match=r"--eval_every -1: must be >= 0"):
        RunArgs(model_id="m", eval_every=-1).validate()


def _train_cli(*args):
    return subprocess.run([sys.executable, "train.py", "--device", "cpu", "--runtime_ngpus", "1", "--max_steps", "2",
                           "--model_id", TINY_V2, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_packed_rows_under_a_plan_without_document_masking_are_refused(sft, tmp_path):
    plan = make_plan(sft["config"], TINY_V2, seq_len=SEQ, micro_batch_size=2, global_batch_size=GLOBAL)
    plan.save(str(tmp_path / "plan.json"))
    r = _train_cli("--dataset_path", sft["data"], "--plan", str(tmp_path / "plan.json"),
                   "--save_dir", str(tmp_path / "save"))
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if "document" in line]
    assert len(lines) == 1 and "position_ids restart at 0 inside rows" in lines[0]
    assert "recompile the plan with --document_masking on" in lines[0] and "Traceback" not in r.stderr


def test_a_document_masking_flag_that_disagrees_with_the_plan_is_refused(sft, tmp_path):
    """--document_masking at run time is the plan's, like --seq_len: a different value is one line."""
    plan = make_plan(sft["config"], TINY_V2, seq_len=SEQ, micro_batch_size=2, global_batch_size=GLOBAL)
    plan.save(str(tmp_path / "plan.json"))
    r = _train_cli("--dataset_path", sft["data"], "--plan", str(tmp_path / "plan.json"),
                   "--save_dir", str(tmp_path / "save"), "--document_masking", "on")
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if "--document_masking on differs" in line]
    assert len(lines) == 1 and "compiled with it off" in lines[0] and "Traceback" not in r.stderr


def test_a_step_whose_batch_has_no_target_is_refused_on_the_command_line(sft, tmp_path):
    """16 rows: only those of the second step's global batch hold targets, so step 1 is refused."""
    columns = packed_rows(16, 512, seed=10)
    order = torch.randperm(16, generator=torch.Generator().manual_seed(0))  # GlobalBatches' first pass
    for row in order[:GLOBAL].tolist():
        columns["labels"][row] = [IGNORE_INDEX] * SEQ
    plan = make_plan(sft["config"], TINY_V2, seq_len=SEQ, micro_batch_size=2, global_batch_size=GLOBAL)
    plan.search_inputs["document_masking"] = True
    plan.save(str(tmp_path / "plan.json"))
    data = save(columns, tmp_path / "data")
    r = _train_cli("--dataset_path", data, "--plan", str(tmp_path / "plan.json"), "--save_dir", str(tmp_path / "save"),
                   "--seed", "0")
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"step 1: its global batch of 8 rows from --dataset_path {data} holds no targets" in r.stderr
    assert "Traceback" not in r.stderr


def test_evaluation_batches_pad_the_last_batch_with_rows_without_targets():
    rows = as_batch(packed_rows(11, 512, seed=11))
    batches = evaluation_batches(rows, GLOBAL)
    assert [len(b) for b in batches] == [GLOBAL, GLOBAL]
    assert sum(b.target_count() for b in batches) == rows.target_count()
    assert torch.equal(batches[1].input_ids[:3], rows.input_ids[8:]) and (batches[1].labels[3:] == IGNORE_INDEX).all()


def test_packed_sequences_are_the_documents_flash_attn_varlen_takes():
    """The varlen form of a document mask (what `--attention flash` hands flash-attn; not installable
    here): cu_seqlens over the flattened rows, a row's end ending its last document. Causal attention
    run on each of those sequences alone equals the block-causal masked SDPA of the rows."""
    from modeling.kernels import sdpa_attention
    from modeling.modeling_deepseek import attention_mask_for
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3, 4], [3, 4, 0, 1, 2, 3, 0, 1, 2, 0]])
    mask = attention_mask_for(None, positions)
    cu_seqlens, max_seqlen = mask.packed_sequences()
    assert cu_seqlens.tolist() == [0, 3, 5, 10, 12, 16, 19, 20] and cu_seqlens.dtype == torch.int32
    assert max_seqlen == 5
    g = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(2, 3, 10, 8, generator=g) for _ in range(3))
    masked = sdpa_attention(q, k, v, mask, 0.3, 0.0, False)
    flat = [t.transpose(1, 2).reshape(20, 3, 8) for t in (q, k, v)]  # [tokens, H, d], as flash-attn takes them
    pieces = []
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in flat)
        pieces.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=0.3).transpose(0, 1))
    varlen = torch.cat(pieces).view(2, 10, 3, 8).transpose(1, 2)
    torch.testing.assert_close(varlen, masked)
    assert attention_mask_for(None, torch.arange(10).expand(2, 10)) is None  # no restart: the plain path


@pytest.mark.parametrize("kernel", ["sdpa", "sdpa_flash_padded"])
def test_documents_regrouped_for_the_causal_kernel_equal_the_masked_attention(kernel):
    """Packed documents of many lengths (several window widths, a document cut by the row's end, one of
    a single token) through the regrouping path (kernels.attention_by_document) give the outputs and the
    q / k / v gradients of SDPA with the explicit block-causal mask; MLA's narrower value head too."""
    from modeling.kernels import ATTENTION_BACKENDS, DOCUMENT_MIN_WINDOW
    from modeling.modeling_deepseek import attention_allowed, attention_mask_for
    S = 80
    lengths = [[1, 5, 33, 17, 24], [40, 2, 38], [80]]
    positions = torch.tensor([[i for n in row for i in range(n)] for row in lengths])
    mask = attention_mask_for(None, positions)
    assert mask is not None
    g = torch.Generator().manual_seed(21)
    B, H, d_qk, d_v = len(lengths), 3, 24, 16
    q, k = (torch.randn(B, H, S, d_qk, generator=g, requires_grad=True) for _ in range(2))
    v = torch.randn(B, H, S, d_v, generator=g, requires_grad=True)
    grad_out = torch.randn(B, H, S, d_v, generator=g)
    out = ATTENTION_BACKENDS[kernel](q, k, v, mask, 0.2, 0.0, True)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    allowed = attention_allowed(mask, B, S, q.device)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=0.2)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    windows = mask.kernel_cache["document_groups"][0]
    widths = [width for _, _, width in windows]
    assert widths == sorted(set(widths)) and min(widths) == DOCUMENT_MIN_WINDOW and max(widths) == 128


def test_document_block_mask_is_flexattentions_own():
    """The BlockMask built from the tiles' document ranges (kernels.document_block_mask) equals the one
    FlexAttention's create_block_mask computes from the mask at every score, field by field (the key
    and query tiles, partial and full, in its order), for random packings, tile sizes and lengths
    that cut the last tile."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    from modeling.kernels import document_block_mask
    from modeling.modeling_deepseek import document_ids
    g = torch.Generator().manual_seed(5)
    for _ in range(60):
        B, S = int(torch.randint(1, 4, (1,), generator=g)), int(torch.randint(2, 70, (1,), generator=g))
        block = 4 * int(torch.randint(1, 5, (1,), generator=g))
        rows = []
        for _ in range(B):
            row = []
            while len(row) < S:
                row += list(range(int(torch.randint(1, S // 2 + 2, (1,), generator=g))))
            rows.append(row[:S])
        positions = torch.tensor(rows)
        positions[0, S // 2] = 0  # at least one restart, so document_ids gives documents
        docs = document_ids(positions)

        def same_document_causal(b, h, q, kv):
            return (q >= kv) & (docs[b, q] == docs[b, kv])
        want = flex.create_block_mask(same_document_causal, B, None, S, S, device="cpu", BLOCK_SIZE=block)
        got = document_block_mask(docs, block)
        for field in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks",
                      "q_indices", "full_q_num_blocks", "full_q_indices"):
            assert torch.equal(getattr(got, field), getattr(want, field)), (field, S, block, rows)
        assert (got.seq_lengths, got.BLOCK_SIZE) == (want.seq_lengths, want.BLOCK_SIZE)


def test_flex_documents_equal_the_masked_attention():
    """The flex kernel's FlexAttention path (CUDA's; its unfused reference here, forward only, as
    FlexAttention has no CPU backward) gives the outputs of SDPA with the explicit block-causal mask
    for documents of many lengths, and builds its BlockMask once per mask. On a CPU the flex kernel
    runs packed documents regrouped, with their gradients (the regrouping test covers that path)."""
    from modeling.kernels import ATTENTION_BACKENDS, flex_documents
    from modeling.modeling_deepseek import attention_allowed, attention_mask_for
    if "flex" not in ATTENTION_BACKENDS:
        pytest.skip("this torch has no FlexAttention")
    S = 80
    lengths = [[1, 5, 33, 17, 24], [40, 2, 38], [80]]
    positions = torch.tensor([[i for n in row for i in range(n)] for row in lengths])
    mask = attention_mask_for(None, positions)
    g = torch.Generator().manual_seed(22)
    B, H, d_qk, d_v = len(lengths), 3, 24, 16
    q, k = (torch.randn(B, H, S, d_qk, generator=g) for _ in range(2))
    v = torch.randn(B, H, S, d_v, generator=g)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_allowed(mask, B, S, q.device), scale=0.2)
    with torch.no_grad():
        out = flex_documents(q, k, v, mask, 0.2, compiled=False)
        block_mask = mask.kernel_cache["flex_block_mask"]
        again = flex_documents(q, k, v, mask, 0.2, compiled=False)
    assert mask.kernel_cache["flex_block_mask"] is block_mask
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(again, ref, rtol=1e-5, atol=1e-6)
    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
    regrouped = ATTENTION_BACKENDS["flex"](qg, kg, vg, attention_mask_for(None, positions), 0.2, 0.0, True)
    torch.testing.assert_close(regrouped, ref, rtol=1e-5, atol=1e-6)
