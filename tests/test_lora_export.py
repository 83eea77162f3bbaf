"""merge_ckpt.py on LoRA runs: a PEFT adapter directory, or (--merge_lora) the merged weights.

Most tests build LoRA checkpoints by hand, as the trainer lays them out (DCP "model.<adapter>" entries
only, lora.json, hf/ with the run's config.json, a COMMITTED marker): the base is the tiny model's
Hugging Face weights, the adapters random, one (A, B) pair per adapted nn.Linear, stacked into the
training form's expert names by this file itself (not by modeling.hf_adapter, which is under test).
The references are computed here too: the base model with W + (alpha / r) * B @ A put in by hand.
The last test trains a real LoRA run and checks that its export gives the trained model's logits.
"""

import json
import os
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file

import merge_ckpt
from merge_ckpt import merge_checkpoint
from modeling import build_model, load_config
from modeling.hf_adapter import (lora_from_peft, lora_modules, lora_peft_sources, lora_to_peft, lora_training_source,
                                 read_hf_state_dict)
from tests.runtime_harness import REPO

V2 = os.path.join(REPO, "configs", "tiny-deepseek-v2")
V1 = os.path.join(REPO, "configs", "tiny-deepseek-moe")
RANK, ALPHA = 4, 8.0
ALL_TARGETS = ["attention", "dense_mlp", "shared_experts", "experts"]


# ---- building LoRA checkpoints by hand ---------------------------------------------------------------------
def target_of(module_name):
    """Which --lora_targets entry adapts Hugging Face module `module_name` (None: never adapted)."""
    if ".self_attn." in module_name:
        return "attention"
    if ".mlp.experts." in module_name:
        return "experts"
    if ".mlp.shared_experts." in module_name:
        return "shared_experts"
    if ".mlp." in module_name and module_name.rsplit(".", 1)[1] in ("gate_proj", "up_proj", "down_proj"):
        return "dense_mlp"
    return None  # the router (not a Linear anyway), lm_head


def random_adapters(model, targets, seed=0):
    """{module name: (A [r, in], B [out, r])} for every nn.Linear of `model` a target adapts. B is
    not zero (unlike a fresh adapter) so that the adapters change the logits."""
    generator = torch.Generator().manual_seed(seed)
    adapters = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and target_of(name) in targets:
            adapters[name] = (torch.randn(RANK, module.in_features, generator=generator) * 0.3,
                              torch.randn(module.out_features, RANK, generator=generator) * 0.3)
    return adapters


def training_form_adapters(adapters, num_experts):
    """The contract's training-form names: `<module>.lora_A/B`, and for the routed experts the stacked
    lora_A_gate_up_E2RD [E, 2, r, D], lora_B_gate_up_E2FR [E, 2, F, r], lora_A_down_ERF [E, r, F],
    lora_B_down_EDR [E, D, r]."""
    state, layers = {}, sorted({name.split(".mlp.experts.")[0] for name in adapters if ".mlp.experts." in name})
    for name, (a, b) in adapters.items():
        if ".mlp.experts." not in name:
            state[f"{name}.lora_A"], state[f"{name}.lora_B"] = a, b
    for layer in layers:
        experts = f"{layer}.mlp.experts"

        def half(proj, which, e):
            return adapters[f"{experts}.{e}.{proj}"][which]
        state[f"{experts}.lora_A_gate_up_E2RD"] = torch.stack(
            [torch.stack([half("gate_proj", 0, e), half("up_proj", 0, e)]) for e in range(num_experts)])
        state[f"{experts}.lora_B_gate_up_E2FR"] = torch.stack(
            [torch.stack([half("gate_proj", 1, e), half("up_proj", 1, e)]) for e in range(num_experts)])
        state[f"{experts}.lora_A_down_ERF"] = torch.stack([half("down_proj", 0, e) for e in range(num_experts)])
        state[f"{experts}.lora_B_down_EDR"] = torch.stack([half("down_proj", 1, e) for e in range(num_experts)])
    return state


def write_checkpoint(path, model_state, hf_dir_files, lora_doc=None, optim_state=None, step=5):
    """A committed checkpoint laid out as runtime/checkpoint.py writes one: DCP entries "model.<name>"
    (and "optim.<...>"), lora.json, hf/ with the run's files, COMMITTED with sizes and CRC-32s."""
    import torch.distributed.checkpoint as dcp
    from runtime.checkpoint import file_checksum
    os.makedirs(path)
    state = {"model": dict(model_state)}
    if optim_state:
        state["optim"] = dict(optim_state)
    with warnings.catch_warnings():  # DCP notes that it saves from one process: that is the intent
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, checkpoint_id=path, no_dist=True)
    os.makedirs(os.path.join(path, "hf"))
    for name, source in hf_dir_files.items():
        shutil.copyfile(source, os.path.join(path, "hf", name))
    if lora_doc is not None:
        with open(os.path.join(path, "lora.json"), "w") as f:
            f.write(lora_doc if isinstance(lora_doc, str) else json.dumps(lora_doc))
    files = {}
    for root, _, names in os.walk(path):
        for name in names:
            relative = os.path.relpath(os.path.join(root, name), path)
            files[relative] = file_checksum(os.path.join(root, name))
    with open(os.path.join(path, "COMMITTED"), "w") as f:
        json.dump({"step": step, "world_size": 1, "parent": None, "files": files}, f)
    return path


def lora_json(adapters, targets=ALL_TARGETS, **overrides):
    return {"rank": RANK, "alpha": ALPHA, "dropout": 0.0, "targets": targets, "modules": sorted(adapters),
            **overrides}


def merged_by_hand(base_state, adapters):
    """{HF name: weight} of the base with every adapted weight replaced by W + (alpha / r) * B @ A."""
    state = dict(base_state)
    for name, (a, b) in adapters.items():
        state[f"{name}.weight"] = base_state[f"{name}.weight"] + (b @ a) * (ALPHA / RANK)
    return state


def logits_of(model, input_ids):
    with torch.no_grad():
        return model.eval()(input_ids=input_ids).logits


INPUT_IDS = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))


def make_lora_run(root, model_dir):
    """A base model directory (HF weights + the modeling code, as trust_remote_code loads it), random
    adapters on every target, and the LoRA checkpoint of a run that started from that base."""
    config = load_config(model_dir)
    base = build_model(config, seed=11)
    base_dir = str(root / "base")
    base.save_pretrained(base_dir)
    for name in merge_ckpt.MODELING_FILES:
        shutil.copyfile(os.path.join(REPO, "modeling", name), os.path.join(base_dir, name))
    adapters = random_adapters(base, ALL_TARGETS)
    training = training_form_adapters(adapters, config.n_routed_experts)
    optim = {}
    for name, value in training.items():
        optim[f"state.{name}.exp_avg"] = value * 0.5
        optim[f"state.{name}.exp_avg_sq"] = value * value
        optim[f"state.{name}.step"] = torch.tensor(5.0)
        optim[f"param_groups.{name}.lr"] = 1e-4
        optim[f"param_groups.{name}.weight_decay"] = 0.0
    ckpt = write_checkpoint(str(root / "save" / "step_00000005"), training,
                            {"config.json": os.path.join(base_dir, "config.json")}, lora_json(adapters), optim)
    return {"root": root, "config": config, "base_dir": base_dir, "adapters": adapters, "training": training,
            "ckpt": ckpt, "base_state": read_hf_state_dict(base_dir)}


@pytest.fixture(scope="module", params=[V2, V1], ids=["deepseek_v2", "deepseek"])
def lora_run(request, tmp_path_factory):
    return make_lora_run(tmp_path_factory.mktemp("lora_export"), request.param)


@pytest.fixture(scope="module")
def lora_run_v2(tmp_path_factory):
    """For the refusals: one model is enough."""
    return make_lora_run(tmp_path_factory.mktemp("lora_refusals"), V2)


def _merge_error(argv, capsys):
    """Runs the command line, which must refuse: returns its one-line message."""
    assert merge_ckpt.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("merge_ckpt.py: error: ")
    return last


# ---- the name mapping ---------------------------------------------------------------------------------------
def test_training_form_adapter_names_map_to_peft_keys_and_back():
    config = load_config(V2)
    adapters = random_adapters(build_model(config, seed=0), ALL_TARGETS)
    training = training_form_adapters(adapters, config.n_routed_experts)
    peft = lora_to_peft(training, config.n_routed_experts)
    # exactly one lora_A / lora_B pair per adapted module, bitwise the module's own
    assert set(peft) == {f"base_model.model.{m}.lora_{h}.weight" for m in adapters for h in "AB"}
    for module, (a, b) in adapters.items():
        assert torch.equal(peft[f"base_model.model.{module}.lora_A.weight"], a), module
        assert torch.equal(peft[f"base_model.model.{module}.lora_B.weight"], b), module
    back = lora_from_peft(peft, config.n_routed_experts)
    assert back.keys() == training.keys() and all(torch.equal(back[k], training[k]) for k in training)
    assert lora_modules(training, config.n_routed_experts) == sorted(
        adapters, key=lambda n: [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in n.split(".")])
    # a few names spelled out
    assert lora_training_source("base_model.model.model.layers.2.mlp.experts.5.up_proj.lora_B.weight") == \
        ("model.layers.2.mlp.experts.lora_B_gate_up_E2FR", (5, 1))
    assert lora_training_source("base_model.model.model.layers.1.mlp.experts.7.down_proj.lora_A.weight") == \
        ("model.layers.1.mlp.experts.lora_A_down_ERF", (7,))
    assert lora_training_source("base_model.model.model.layers.0.self_attn.kv_b_proj.lora_A.weight") == \
        ("model.layers.0.self_attn.kv_b_proj.lora_A", ())
    assert lora_peft_sources("model.layers.1.mlp.experts.lora_A_gate_up_E2RD", 2) == [
        ("base_model.model.model.layers.1.mlp.experts.0.gate_proj.lora_A.weight", (0, 0)),
        ("base_model.model.model.layers.1.mlp.experts.0.up_proj.lora_A.weight", (0, 1)),
        ("base_model.model.model.layers.1.mlp.experts.1.gate_proj.lora_A.weight", (1, 0)),
        ("base_model.model.model.layers.1.mlp.experts.1.up_proj.lora_A.weight", (1, 1))]


def test_peft_adapters_missing_an_expert_are_named():
    from modeling.hf_adapter import WeightsError
    config = load_config(V2)
    adapters = random_adapters(build_model(config, seed=0), ["experts"])
    peft = lora_to_peft(training_form_adapters(adapters, config.n_routed_experts), config.n_routed_experts)
    del peft["base_model.model.model.layers.1.mlp.experts.3.down_proj.lora_B.weight"]
    with pytest.raises(WeightsError, match="experts.3.down_proj.lora_B"):
        lora_from_peft(peft, config.n_routed_experts)


# ---- the PEFT adapter directory -------------------------------------------------------------------------
def test_adapter_directory_loads_with_peft_and_gives_the_merged_models_logits(lora_run):
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM
    out = merge_checkpoint(lora_run["ckpt"], str(lora_run["root"] / "adapter"), base_model=lora_run["base_dir"],
                           progress=False)
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    with open(os.path.join(out, "adapter_config.json")) as f:
        adapter_config = json.load(f)
    assert adapter_config["r"] == RANK and adapter_config["lora_alpha"] == ALPHA
    assert adapter_config["base_model_name_or_path"] == lora_run["base_dir"]

    base = AutoModelForCausalLM.from_pretrained(lora_run["base_dir"], trust_remote_code=True)
    assert type(base).__module__.startswith("transformers_modules.")
    base_logits = logits_of(base, INPUT_IDS)  # before PEFT puts its layers into `base`
    peft_model = PeftModel.from_pretrained(base, out)
    # adapters on exactly the adapted modules, holding exactly their A and B
    adapted = {name.removeprefix("base_model.model."): module for name, module in peft_model.named_modules()
               if isinstance(module, LoraLayer)}
    assert set(adapted) == set(lora_run["adapters"])
    for name, (a, b) in lora_run["adapters"].items():
        assert torch.equal(adapted[name].lora_A["default"].weight, a), name
        assert torch.equal(adapted[name].lora_B["default"].weight, b), name
        assert adapted[name].scaling["default"] == ALPHA / RANK

    expected = build_model(lora_run["config"])
    expected.load_state_dict(merged_by_hand(lora_run["base_state"], lora_run["adapters"]))
    want = logits_of(expected, INPUT_IDS)
    got = logits_of(peft_model, INPUT_IDS)
    # PEFT computes W x + s * B (A x) where the reference multiplies by the merged W: fp32 rounding of
    # two summation orders, through three layers (the A and B themselves were compared bitwise above)
    assert (got - want).abs().max().item() <= 1e-4
    # the adapters matter: the base alone is far from it
    assert (base_logits - want).abs().max().item() > 1e-2


def test_merge_lora_writes_w_plus_scaled_ba_that_transformers_loads(lora_run):
    from transformers import AutoModelForCausalLM
    out = merge_checkpoint(lora_run["ckpt"], str(lora_run["root"] / "merged"), merge_lora=True,
                           base_model=lora_run["base_dir"], max_shard_size="200KB", progress=False)
    merged = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert type(merged).__module__.startswith("transformers_modules.")
    expected_state = merged_by_hand(lora_run["base_state"], lora_run["adapters"])
    state = merged.state_dict()
    assert state.keys() == expected_state.keys()
    for name, value in expected_state.items():
        assert state[name].dtype == torch.float32
        assert (state[name] - value).abs().max().item() <= 1e-6, name
        if name.removesuffix(".weight") not in lora_run["adapters"]:
            assert torch.equal(state[name], value), name  # an unadapted weight is the base's, bitwise
    expected = build_model(lora_run["config"])
    expected.load_state_dict(expected_state)
    assert (logits_of(merged, INPUT_IDS) - logits_of(expected, INPUT_IDS)).abs().max().item() <= 1e-5
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        assert len(set(json.load(f)["weight_map"].values())) > 1  # --max_shard_size applies


def test_merge_lora_in_bf16_and_from_the_command_line(lora_run, capsys):
    out = str(lora_run["root"] / "merged_bf16")
    assert merge_ckpt.main(["--ckpt_dir", lora_run["ckpt"], "--output_dir", out,
                            "--merge_lora", "--base_model", lora_run["base_dir"], "--dtype", "bf16"]) == 0
    assert "merged onto" in capsys.readouterr().err
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        files = set(json.load(f)["weight_map"].values())
    tensors = {k: v for file in files for k, v in load_file(os.path.join(out, file)).items()}
    expected = merged_by_hand(lora_run["base_state"], lora_run["adapters"])
    assert tensors.keys() == expected.keys()
    for name, value in expected.items():
        assert tensors[name].dtype == torch.bfloat16 and torch.equal(tensors[name], value.to(torch.bfloat16)), name


def test_adapter_optimizer_state_is_written_under_peft_names(lora_run):
    out = merge_checkpoint(lora_run["ckpt"], str(lora_run["root"] / "adapter_optimizer"), optimizer=True,
                           progress=False)
    with open(os.path.join(out, "optimizer.safetensors.index.json")) as f:
        index = json.load(f)
    state = {k: v for file in set(index["weight_map"].values()) for k, v in load_file(os.path.join(out, file)).items()}
    for module, (a, b) in lora_run["adapters"].items():
        for half, value in (("A", a), ("B", b)):
            key = f"base_model.model.{module}.lora_{half}.weight"
            assert torch.equal(state[f"{key}.exp_avg"], value * 0.5), key
            assert torch.equal(state[f"{key}.exp_avg_sq"], value * value), key
            assert state[f"{key}.step"].item() == 5
    assert len(state) == 3 * 2 * len(lora_run["adapters"])
    assert index["metadata"]["step"] == 5
    (group,) = index["metadata"]["param_groups"]
    assert group["lr"] == 1e-4 and len(group["params"]) == 2 * len(lora_run["adapters"])
    assert "exp_avg" not in str(load_file(os.path.join(out, "adapter_model.safetensors")).keys())


def test_only_the_targets_the_run_adapted_get_adapters(tmp_path):
    """A run on attention and the routed experts only: PEFT puts adapters on exactly those modules,
    not on the dense MLP or shared experts whose projections have the same names."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM
    config = load_config(V2)
    base = build_model(config, seed=3)
    base.save_pretrained(str(tmp_path / "base"))
    for name in merge_ckpt.MODELING_FILES:
        shutil.copyfile(os.path.join(REPO, "modeling", name), str(tmp_path / "base" / name))
    targets = ["attention", "experts"]
    adapters = random_adapters(base, targets)
    ckpt = write_checkpoint(str(tmp_path / "step_00000001"), training_form_adapters(adapters, config.n_routed_experts),
                            {"config.json": str(tmp_path / "base" / "config.json")}, lora_json(adapters, targets))
    out = merge_checkpoint(ckpt, str(tmp_path / "adapter"), progress=False)
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), trust_remote_code=True), out)
    adapted = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}
    assert adapted == set(adapters)
    assert not any(".shared_experts." in n or n.startswith("model.layers.0.mlp.") for n in adapted)
    expected = build_model(config)
    expected.load_state_dict(merged_by_hand(read_hf_state_dict(str(tmp_path / "base")), adapters))
    assert (logits_of(peft_model, INPUT_IDS) - logits_of(expected, INPUT_IDS)).abs().max().item() <= 1e-4


# ---- refusals -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def full_checkpoint(tmp_path_factory):
    """A plain (not LoRA) checkpoint: every weight of the tiny model, no lora.json."""
    from modeling.hf_adapter import from_hf
    root = tmp_path_factory.mktemp("full")
    config = load_config(V2)
    model = build_model(config, seed=2)
    model.save_pretrained(str(root / "base"))
    state = from_hf(model.state_dict(), config.n_routed_experts)
    return write_checkpoint(str(root / "step_00000001"), state, {"config.json": str(root / "base" / "config.json")})


@pytest.mark.parametrize("flags", [["--merge_lora"], ["--base_model", "somewhere"]])
def test_lora_flags_on_a_full_checkpoint_are_refused(full_checkpoint, tmp_path, capsys, flags):
    message = _merge_error(["--ckpt_dir", full_checkpoint, "--output_dir", str(tmp_path / "out")] + flags, capsys)
    assert f"{flags[0]}: {full_checkpoint} is not a LoRA checkpoint" in message and f"without {flags[0]}" in message
    assert not os.path.exists(tmp_path / "out")
    # and the same checkpoint merges without them
    assert merge_ckpt.main(["--ckpt_dir", full_checkpoint, "--output_dir", str(tmp_path / "out")]) == 0


def _broken_copy(lora_run, tmp_path, lora_doc):
    """A copy of the LoRA run's checkpoint with lora.json replaced (None: removed), COMMITTED rewritten
    to match, so that only lora.json is at fault."""
    return write_checkpoint(str(tmp_path / "step_00000005"), lora_run["training"],
                            {"config.json": os.path.join(lora_run["base_dir"], "config.json")}, lora_doc)


@pytest.mark.parametrize("change,expected", [
    (None, "holds LoRA adapters (model."),
    ("{not json", "is not valid JSON"),
    ([1, 2], "holds a list, not the JSON object"),
    ({"rank": 0}, "field `rank` is 0; it must be an integer >= 1"),
    ({"rank": "4"}, "field `rank` is '4'"),
    ({"rank": 8}, "of a rank-8 adapter"),
    ({"alpha": None}, "field `alpha` is None; it must be a number > 0"),
    ({"dropout": 1.5}, "field `dropout` is 1.5"),
    ({"targets": ["attention", "router"]}, "field `targets`"),
    ({"modules": "all"}, "field `modules` is 'all'"),
    ({"modules": ["model.layers.0.self_attn.o_proj"]}, "`modules` does not match the checkpoint's adapters"),
])
def test_missing_or_malformed_lora_json_is_refused(lora_run_v2, tmp_path, capsys, change, expected):
    doc = {**lora_json(lora_run_v2["adapters"]), **change} if isinstance(change, dict) else change
    ckpt = _broken_copy(lora_run_v2, tmp_path, doc)
    message = _merge_error(["--ckpt_dir", ckpt, "--output_dir", str(tmp_path / "out")], capsys)
    assert expected in message
    assert "lora.json" in message
    assert not os.path.exists(tmp_path / "out")


def test_merge_lora_needs_the_base_weights(lora_run_v2, tmp_path, capsys):
    lora_run = lora_run_v2
    argv = ["--ckpt_dir", lora_run["ckpt"], "--output_dir", str(tmp_path / "out"), "--merge_lora"]
    assert "pass --base_model DIR" in _merge_error(argv, capsys)
    assert "no such directory" in _merge_error(argv + ["--base_model", str(tmp_path / "nope")], capsys)
    # config.json only: the seeded start of such a run is not saved anywhere
    message = _merge_error(argv + ["--base_model", V2], capsys)
    assert "holds no weights" in message and "leave out --merge_lora" in message
    # another model's weights
    other = build_model(load_config(V1), seed=0)
    other.save_pretrained(str(tmp_path / "other"))
    assert "another model than the run's" in _merge_error(argv + ["--base_model", str(tmp_path / "other")], capsys)
    message = _merge_error(argv + ["--base_model", lora_run["base_dir"], "--optimizer"], capsys)
    assert "--optimizer with --merge_lora" in message
    assert not os.path.exists(tmp_path / "out")


def test_help_explains_the_lora_export(capsys):
    with pytest.raises(SystemExit):
        merge_ckpt.main(["--help"])
    text = capsys.readouterr().out
    for words in ("--merge_lora", "--base_model", "adapter_config.json", "adapter_model.safetensors",
                  "W + (alpha / rank) * B @ A", "PeftModel.from_pretrained"):
        assert words in text


# ---- end to end: a real LoRA run ------------------------------------------------------------------------------
SEQ, MICRO, GLOBAL = 32, 2, 8


def test_a_trained_lora_run_exports_to_peft_and_merged_weights_with_its_logits(tmp_path):
    """2 CPU processes train LoRA adapters (rank 4, every target) for 3 steps over the tiny model's HF
    weights, 2-way expert parallel (each rank holds half of every stacked expert adapter, saved as one
    [E, ...] tensor), and save; the PEFT export over the base, and the --merge_lora output alone, give
    the logits of the trained training-form model, and the merged weights are W + (alpha / r) B A of
    the trained adapters."""
    import datasets
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from modeling import spec
    from modeling.hf_adapter import from_hf
    from tests.runtime_harness import gather_parameters, make_plan, run_plan
    config = load_config(V2)
    base_dir = str(tmp_path / "base")
    build_model(config, seed=5).save_pretrained(base_dir)
    for name in merge_ckpt.MODELING_FILES:
        shutil.copyfile(os.path.join(REPO, "modeling", name), os.path.join(base_dir, name))
    ids = torch.randint(0, 512, (32, SEQ), generator=torch.Generator().manual_seed(0))
    datasets.Dataset.from_dict({"input_ids": ids.tolist()}).save_to_disk(str(tmp_path / "data"))
    plan = make_plan(config, base_dir, seq_len=SEQ, micro_batch_size=MICRO, global_batch_size=GLOBAL, ep=2)
    plan.lora = {"rank": RANK, "alpha": ALPHA, "dropout": 0.0, "targets": ALL_TARGETS}
    plan.validate()
    results = run_plan(plan, 2, base_dir, str(tmp_path / "data"), str(tmp_path / "run"), max_steps=3, lr=2e-2,
                       final_save=True)
    ckpt = str(tmp_path / "run" / "save" / "step_00000003")

    # the trained model: the training form with adapters, the base weights and the trained adapters in it
    trained = spec.build_training_model(config, device="cpu")
    spec.apply_lora(trained, RANK, ALPHA, 0.0, ALL_TARGETS)
    gathered = gather_parameters(results, plan)
    adapters = {k: v for k, v in gathered.items() if spec.is_lora_parameter(k)}
    assert adapters and all(v.abs().max() > 0 for k, v in adapters.items() if ".lora_B" in k)  # the B moved off 0
    base_state = read_hf_state_dict(base_dir)
    missing, unexpected = trained.load_state_dict({**from_hf(base_state, config.n_routed_experts), **adapters},
                                                  strict=False)
    assert not missing and not unexpected
    want = logits_of(trained, INPUT_IDS)

    adapter_dir = merge_checkpoint(ckpt, str(tmp_path / "adapter"), progress=False)
    base = AutoModelForCausalLM.from_pretrained(base_dir, trust_remote_code=True)
    base_logits = logits_of(base, INPUT_IDS)
    peft_model = PeftModel.from_pretrained(base, adapter_dir)
    got = logits_of(peft_model, INPUT_IDS)
    assert (got - want).abs().max().item() <= 1e-4  # grouped GEMMs vs per-expert Linears: fp32 rounding
    assert (base_logits - want).abs().max().item() > 1e-3  # the training moved the logits

    merged_dir = merge_checkpoint(ckpt, str(tmp_path / "merged"), merge_lora=True, base_model=base_dir,
                                  progress=False)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, trust_remote_code=True)
    assert (logits_of(merged, INPUT_IDS) - want).abs().max().item() <= 1e-4
    peft_state = lora_to_peft(adapters, config.n_routed_experts)
    merged_state = merged.state_dict()
    for key in peft_state:
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[len("base_model.model."):-len(".lora_A.weight")]
        a, b = peft_state[key], peft_state[key.replace(".lora_A.", ".lora_B.")]
        expected = base_state[f"{module}.weight"] + (b @ a) * (ALPHA / RANK)
        assert (merged_state[f"{module}.weight"] - expected).abs().max().item() <= 1e-6, module
