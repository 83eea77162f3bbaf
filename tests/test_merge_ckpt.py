"""merge_ckpt.py: sharded training checkpoints -> Hugging Face checkpoint directories.

Checkpoints come from the real trainer (tests/runtime_harness.run_plan, gloo CPU processes):
* `roundtrip`: HF weights -> 0 steps -> save (zero3 over 2 ranks, so every tensor is split over
  two DCP files) -> merge must give the input tensors bitwise;
* `trained_v2`: HF weights + the demo tokenizer -> 2 steps of a 2-stage pipeline -> save;
* `trained_v1`: DeepSeekMoE v1 from its config.json only -> 2 steps of 2-way expert parallelism -> save
  (each rank holds half the experts under the same names: the checkpoint must hold them all).
The merged directories must load with AutoModelForCausalLM.from_pretrained(trust_remote_code=True)
and give the logits of the training run's final parameters.
"""

import ast
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import merge_ckpt
from merge_ckpt import merge_checkpoint
from modeling import build_model, load_config
from modeling.hf_adapter import read_hf_state_dict, to_hf, training_source
from modeling.training_form import apply_training_form
from tests.runtime_harness import REPO, gather_parameters, make_plan, run_plan

SEQ, MICRO, GLOBAL = 32, 2, 8
V2 = os.path.join(REPO, "configs", "tiny-deepseek-v2")
V1 = os.path.join(REPO, "configs", "tiny-deepseek-moe")


# ---- fixtures: real checkpoints ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("merge")


@pytest.fixture(scope="module")
def data_dir(root):
    import datasets
    ids = torch.randint(0, 512, (64, SEQ), generator=torch.Generator().manual_seed(0))
    datasets.Dataset.from_dict({"input_ids": ids.tolist()}).save_to_disk(str(root / "data"))
    return str(root / "data")


@pytest.fixture(scope="module")
def hf_model_dir(root):
    """The tiny DeepSeek-V2 with random weights, saved as a Hugging Face checkpoint, with a generation
    config of its own (to check that merging copies it rather than writing a default)."""
    model = build_model(load_config(V2), seed=123)
    model.generation_config.max_length = 77
    path = str(root / "hf_model")
    model.save_pretrained(path)
    return path


def _train(root, name, model_dir, data_dir, world, max_steps, **plan_overrides):
    config = load_config(model_dir)
    run_args = plan_overrides.pop("run_args", {})
    plan = make_plan(config, model_dir, seq_len=SEQ, micro_batch_size=MICRO, global_batch_size=GLOBAL,
                     **plan_overrides)
    out = str(root / name)
    results = run_plan(plan, world, model_dir, data_dir, out, max_steps=max_steps, final_save=True, **run_args)
    return {"config": config, "plan": plan, "results": results, "save_dir": os.path.join(out, "save"),
            "ckpt": os.path.join(out, "save", f"step_{max_steps:08d}")}


@pytest.fixture(scope="module")
def trained_v2(root, hf_model_dir, data_dir, demo_tokenizer_dir):
    return _train(root, "trained_v2", hf_model_dir, data_dir, world=2, max_steps=2, pp=2, schedule="1F1B",
                  run_args={"tokenizer_path": str(demo_tokenizer_dir)})


@pytest.fixture(scope="module")
def trained_v1(root, data_dir):
    return _train(root, "trained_v1", V1, data_dir, world=2, max_steps=2, ep=2)


@pytest.fixture(scope="module")
def merged_v2(root, trained_v2):
    return merge_checkpoint(trained_v2["ckpt"], str(root / "merged_v2"), progress=False)


def _merge_error(argv, capsys):
    """Runs the command line, which must refuse: returns its one-line message."""
    assert merge_ckpt.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]  # after any progress bar
    assert last.startswith("merge_ckpt.py: error: ")
    return last


def _safetensors_dir(path):
    """{name: tensor} of every shard that the index lists; checks the index against the files."""
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        index = json.load(f)
    tensors = {}
    for file in sorted(set(index["weight_map"].values())):
        part = load_file(os.path.join(path, file))
        assert {k for k, v in index["weight_map"].items() if v == file} == set(part), file
        tensors.update(part)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    return tensors


def _expected_hf_weights(run):
    return to_hf(gather_parameters(run["results"], run["plan"]), run["config"].n_routed_experts)


# ---- names ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_dir", [V2, V1], ids=["deepseek_v2", "deepseek"])
def test_every_hf_tensor_maps_to_its_slice_of_the_training_form(model_dir):
    config = load_config(model_dir)
    reference = build_model(config, seed=0)
    reference_state = reference.state_dict()
    training_state = apply_training_form(reference).state_dict()  # experts stacked from the reference's
    shapes = merge_ckpt.hf_parameter_shapes(config)
    assert list(shapes) == list(reference_state)  # the order save_pretrained writes
    assert set(to_hf(training_state, config.n_routed_experts)) == set(shapes)
    for name, shape in shapes.items():
        source, index = training_source(name)
        assert torch.equal(training_state[source][index], reference_state[name]), name
        assert tuple(reference_state[name].shape) == shape


# ---- 1. a bitwise round trip --------------------------------------------------------------------------------
def test_hf_weights_survive_a_save_and_merge_bitwise(root, hf_model_dir, data_dir):
    # max_steps=0 saves the weights as loaded (step_00000000)
    run = _train(root, "roundtrip", hf_model_dir, data_dir, world=2, max_steps=0, dp=2, zero=3)
    out = merge_checkpoint(run["ckpt"], str(root / "merged_roundtrip"), progress=False)
    merged, original = _safetensors_dir(out), read_hf_state_dict(hf_model_dir)
    assert merged.keys() == original.keys()
    for name, tensor in original.items():
        assert merged[name].dtype == torch.float32 and torch.equal(merged[name], tensor), name


# ---- 2. the merged model is the trained model -----------------------------------------------------------------
@pytest.mark.parametrize("run_name", ["trained_v2", "trained_v1"])
def test_merged_model_loads_with_transformers_and_gives_the_trained_logits(request, root, run_name):
    from transformers import AutoModelForCausalLM
    run = request.getfixturevalue(run_name)
    out = request.getfixturevalue("merged_v2") if run_name == "trained_v2" else \
        merge_checkpoint(run["ckpt"], str(root / "merged_v1"), progress=False)
    expected_weights = _expected_hf_weights(run)
    expected = build_model(run["config"])
    expected.load_state_dict(expected_weights)
    merged = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert type(merged).__module__.startswith("transformers_modules.")  # the copied code, not the repo's
    assert type(merged).__name__ == type(expected).__name__
    state = merged.state_dict()
    assert state.keys() == expected_weights.keys()
    for name, value in expected_weights.items():
        assert torch.equal(state[name], value), name
    input_ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = merged.eval()(input_ids=input_ids).logits
        want = expected.eval()(input_ids=input_ids).logits
    assert (got - want).abs().max().item() <= 1e-5


# ---- 3. the output directory ------------------------------------------------------------------------------
def test_output_directory_has_index_config_code_generation_config_and_tokenizer(merged_v2, trained_v2, hf_model_dir,
                                                                            demo_tokenizer_dir):
    files = set(os.listdir(merged_v2))
    assert "model.safetensors" not in files  # always shards + index, even for one shard
    assert "model-00001-of-00001.safetensors" in files
    tensors = _safetensors_dir(merged_v2)
    assert set(tensors) == set(merge_ckpt.hf_parameter_shapes(trained_v2["config"]))
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in tensors
    assert not any("E2FD" in k or "EDF" in k for k in tensors)
    with safe_open(os.path.join(merged_v2, "model-00001-of-00001.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}  # transformers refuses safetensors files without it
    # the shards are as readable as config.json (safetensors alone would make them owner-only)
    assert len({os.stat(os.path.join(merged_v2, name)).st_mode for name in files}) == 1

    with open(os.path.join(merged_v2, "config.json")) as f:
        config = json.load(f)
    assert config["auto_map"] == {"AutoConfig": "configuration_deepseek.DeepseekV2Config",
                                  "AutoModel": "modeling_deepseek.DeepseekV2Model",
                                  "AutoModelForCausalLM": "modeling_deepseek.DeepseekV2ForCausalLM"}
    assert config["torch_dtype"] == "float32" and config["architectures"] == ["DeepseekV2ForCausalLM"]
    assert config["model_type"] == "deepseek_v2" and config["hidden_size"] == 64

    # The run's generation config, byte for byte (not one rebuilt from the token ids)
    with open(os.path.join(hf_model_dir, "generation_config.json"), "rb") as a, \
            open(os.path.join(merged_v2, "generation_config.json"), "rb") as b:
        assert a.read() == b.read()

    # The tokenizer of --tokenizer_path came along and loads
    from transformers import AutoTokenizer
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert name in files
    text = "def merge(a, b): return a + b"
    assert AutoTokenizer.from_pretrained(merged_v2)(text)["input_ids"] == \
        AutoTokenizer.from_pretrained(str(demo_tokenizer_dir))(text)["input_ids"]


def test_copied_modeling_code_imports_only_torch_transformers_and_itself(merged_v2):
    """trust_remote_code copies these files alone: an import of the repo would fail on another machine."""
    copied = set(merge_ckpt.MODELING_FILES)
    for name in copied:
        with open(os.path.join(merged_v2, name)) as f:
            tree = ast.parse(f.read())
        with open(os.path.join(REPO, "modeling", name)) as f:
            assert ast.dump(tree) == ast.dump(ast.parse(f.read()))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                assert f"{node.module}.py" in copied, f"{name}: from .{node.module} import ..."
                continue
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) else []
            for module in modules:
                top = module.split(".")[0]
                assert top in ("torch", "transformers") or top in sys.stdlib_module_names, f"{name}: import {module}"


def test_generation_config_comes_from_the_token_ids_when_the_run_had_none(root, trained_v1):
    out = merge_checkpoint(trained_v1["ckpt"], str(root / "merged_v1_generation"), progress=False)
    with open(os.path.join(out, "generation_config.json")) as f:
        generation = json.load(f)
    assert generation["bos_token_id"] == 0 and generation["eos_token_id"] == 1
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["auto_map"]["AutoModelForCausalLM"] == "modeling_deepseek.DeepseekForCausalLM"
    assert not any(n.startswith("tokenizer") for n in os.listdir(out))  # configs/ has no tokenizer


def test_command_line_small_shards_and_bf16_from_the_save_dir(root, trained_v2, merged_v2):
    """The real command line, given the save dir (its `last` pointer names the checkpoint)."""
    out = str(root / "merged_bf16")
    r = subprocess.run([sys.executable, os.path.join(REPO, "merge_ckpt.py"), "--ckpt_dir", trained_v2["save_dir"],
                        "--output_dir", out, "--max_shard_size", "100KB", "--dtype", "bf16"],
                       cwd=str(root), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    shard_files = sorted(set(weight_map.values()))
    assert len(shard_files) > 3
    assert shard_files == [f"model-{i:05d}-of-{len(shard_files):05d}.safetensors" for i in range(1, len(shard_files) + 1)]
    for file in shard_files:
        part = load_file(os.path.join(out, file))
        size = sum(t.numel() * t.element_size() for t in part.values())
        assert size <= 100_000 or len(part) == 1, f"{file}: {size} bytes in {len(part)} tensors"
    tensors = _safetensors_dir(out)
    fp32 = _safetensors_dir(merged_v2)
    assert tensors.keys() == fp32.keys()
    for name, value in tensors.items():
        assert value.dtype == torch.bfloat16 and torch.equal(value, fp32[name].to(torch.bfloat16)), name
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"


# ---- 4. refusals ----------------------------------------------------------------------------------------------
@pytest.fixture
def ckpt_copy(trained_v2, tmp_path):
    """A copy of the v2 checkpoint that a test may damage."""
    path = str(tmp_path / "step_00000002")
    shutil.copytree(trained_v2["ckpt"], path)
    return path


def test_missing_checkpoint_dir_is_refused(tmp_path, capsys):
    message = _merge_error(["--ckpt_dir", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "out")], capsys)
    assert str(tmp_path / "nope") in message and "no such directory" in message
    assert not os.path.exists(tmp_path / "out")


def test_checkpoint_without_commit_marker_is_refused(ckpt_copy, tmp_path, capsys):
    os.remove(os.path.join(ckpt_copy, "COMMITTED"))
    message = _merge_error(["--ckpt_dir", ckpt_copy, "--output_dir", str(tmp_path / "out")], capsys)
    assert ckpt_copy in message and "no COMMITTED marker" in message and "earlier checkpoint" in message
    assert "`last`" in message


def test_missing_shard_is_named(ckpt_copy, tmp_path, capsys):
    os.remove(os.path.join(ckpt_copy, "__1_0.distcp"))
    message = _merge_error(["--ckpt_dir", ckpt_copy, "--output_dir", str(tmp_path / "out")], capsys)
    assert "__1_0.distcp" in message and "missing" in message
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "out.partial")


@pytest.mark.parametrize("damage", ["flip_a_byte", "truncate"])
def test_corrupt_shard_is_named(ckpt_copy, tmp_path, capsys, damage):
    shard = os.path.join(ckpt_copy, "__0_0.distcp")
    with open(shard, "r+b") as f:
        if damage == "truncate":
            f.truncate(os.path.getsize(shard) - 10)
        else:
            f.seek(os.path.getsize(shard) // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0x01]))
    message = _merge_error(["--ckpt_dir", ckpt_copy, "--output_dir", str(tmp_path / "out")], capsys)
    assert shard in message and "corrupt" in message
    assert not os.path.exists(tmp_path / "out")


def test_non_empty_output_needs_overwrite(trained_v2, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    message = _merge_error(["--ckpt_dir", trained_v2["ckpt"], "--output_dir", str(out)], capsys)
    assert str(out) in message and "--overwrite" in message
    assert (out / "old.txt").read_text() == "keep me"
    assert merge_ckpt.main(["--ckpt_dir", trained_v2["ckpt"], "--output_dir", str(out), "--overwrite"]) == 0
    assert not (out / "old.txt").exists() and (out / "model.safetensors.index.json").is_file()
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no .partial or .replaced left behind


@pytest.mark.parametrize("flag,value,expected", [("--max_shard_size", "5 gigs", "--max_shard_size '5 gigs'"),
                                                 ("--max_shard_size", "0", "larger than 0"),
                                                 ("--dtype", "fp16", "--dtype 'fp16'")])
def test_bad_flag_values_are_refused(trained_v2, tmp_path, capsys, flag, value, expected):
    message = _merge_error(["--ckpt_dir", trained_v2["ckpt"], "--output_dir", str(tmp_path / "out"), flag, value],
                           capsys)
    assert expected in message
    assert not os.path.exists(tmp_path / "out")


def test_sizes_read_like_hugging_face():
    assert merge_ckpt.parse_size("5GB") == 5 * 10 ** 9
    assert merge_ckpt.parse_size("100KB") == 100_000
    assert merge_ckpt.parse_size("4GiB") == 4 * 2 ** 30
    assert merge_ckpt.parse_size("1.5mb") == 1_500_000
    assert merge_ckpt.parse_size("2048") == 2048


def test_a_failed_merge_leaves_no_output(trained_v2, tmp_path, monkeypatch):
    """Interrupted after the first shard: no OUT (it would look complete), no OUT.partial."""
    import safetensors.torch
    real_save, calls = safetensors.torch.save_file, []

    def save_then_fail(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", save_then_fail)
    with pytest.raises(OSError, match="disk full"):
        merge_checkpoint(trained_v2["ckpt"], str(tmp_path / "out"), max_shard_size="100KB", progress=False)
    assert os.listdir(tmp_path) == []


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        merge_ckpt.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--ckpt_dir", "--output_dir", "--dtype", "--max_shard_size", "--overwrite", "--optimizer"):
        assert flag in text
    assert "exp_avg_sq" in text  # the optimizer layout


# ---- 5. the optimizer state ------------------------------------------------------------------------------------
def test_optimizer_state_is_written_per_hf_parameter_with_experts_split(root, trained_v2, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    out = merge_checkpoint(trained_v2["ckpt"], str(root / "merged_v2_optimizer"), optimizer=True,
                           max_shard_size="200KB", progress=False)
    with open(os.path.join(out, "optimizer.safetensors.index.json")) as f:
        index = json.load(f)
    state = {}
    for file in sorted(set(index["weight_map"].values())):
        state.update(load_file(os.path.join(out, file)))
    assert set(state) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())

    # Expected values from DCP's own whole-checkpoint conversion (an independent reader)
    dcp_to_torch_save(trained_v2["ckpt"], str(tmp_path / "full.pt"))
    saved = torch.load(str(tmp_path / "full.pt"), weights_only=False)["optim"]  # "state.<name>.<moment>"
    config = trained_v2["config"]
    hf_names = list(merge_ckpt.hf_parameter_shapes(config))
    for moment in ("exp_avg", "exp_avg_sq"):
        suffix = f".{moment}"
        expected = to_hf({k[len("state."):-len(suffix)]: v for k, v in saved.items()
                                  if k.startswith("state.") and k.endswith(suffix)}, config.n_routed_experts)
        assert set(expected) == set(hf_names)
        for name in hf_names:
            assert state[f"{name}.{moment}"].dtype == torch.float32
            assert torch.equal(state[f"{name}.{moment}"], expected[name]), f"{name}.{moment}"
    assert state["model.layers.2.mlp.experts.5.up_proj.weight.exp_avg"].shape == (32, 64)
    assert all(state[f"{name}.step"].item() == 2 for name in hf_names)
    assert set(state) == {f"{n}.{s}" for n in hf_names for s in ("exp_avg", "exp_avg_sq", "step")}

    assert index["metadata"]["step"] == 2
    groups = index["metadata"]["param_groups"]
    assert sorted(n for g in groups for n in g["params"]) == sorted(hf_names)  # each parameter once
    assert all(g["betas"] == [0.9, 0.95] and g["weight_decay"] == 0.1 for g in groups)
    # the weights are unchanged by --optimizer
    assert _safetensors_dir(out).keys() == set(hf_names)
