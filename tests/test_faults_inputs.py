"""Faults in what the user gives: a --model_id, a plan file, a config.json, a corpus.

Every user error ends with exit status 2 and one line naming the file, flag or field and the fix,
never a traceback, and nothing silently wrong: a mistyped local path never goes to the hub, no code
from the hub runs without --trust_remote_code, a malformed plan or config.json is refused before any
work, a long document is tokenized in bounded memory.

The many variants run in-process through `train.main` / `bookcorpus.main` (what the command line
runs, minus the interpreter start); a few run as subprocesses to show the command line prints no
traceback. Nothing here touches the network: subprocesses run with HF_HUB_OFFLINE=1 and an empty
hub cache, and in-process hub calls are replaced by fakes.
"""

import copy
import json
import math
import os
import shutil
import subprocess
import sys

import pytest

import bookcorpus
import train
from compiler.plan import Plan, PlanError
from modeling import load_config
from modeling.loading import ModelDirError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")
GOOD_PLAN = os.path.join(REPO, "plans", "tiny-deepseek-v2-4gpu.json")
COMPILE_ARGS = ["--run_mode", "compile", "--plan_ngpus", "1", "--device_profile", "cpu", "--seq_len", "16",
                "--micro_batch_size", "1", "--global_batch_size", "1"]


@pytest.fixture(scope="module")
def offline_env(tmp_path_factory):
    """Environment of a subprocess that cannot reach the hub: offline, with an empty hub cache."""
    home = tmp_path_factory.mktemp("hf_home")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_HOME=str(home), HF_DATASETS_CACHE=str(home / "datasets"), PYTHONWARNINGS="ignore")
    env.pop("HF_HUB_CACHE", None)
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    return env


def run_script(env, script, *args, timeout=300):
    return subprocess.run([sys.executable, script, *args], cwd=REPO, capture_output=True, text=True, env=env,
                          timeout=timeout)


def assert_one_line_error(stderr, *needles):
    """stderr is exactly one `error: ...` line holding every needle, and no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(("error:", "train.py: error:", "bookcorpus.py: error:")), stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def run_main(main, argv, capsys):
    """(status, the one stderr line) of an in-process run of a CLI main that must fail as a user error."""
    capsys.readouterr()
    status = main(argv)
    err = capsys.readouterr().err
    assert status == 2, err
    return assert_one_line_error(err)


# =====================================================================================================
# 6. --model_id: a mistyped local path never goes to the hub; no remote code without --trust_remote_code
# =====================================================================================================
@pytest.fixture
def no_hub(monkeypatch):
    """Any attempt to reach the hub (config download or AutoConfig) fails the test."""
    import huggingface_hub
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError(f"the hub was contacted for {args[:1]} {kwargs}")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", refuse)


@pytest.mark.parametrize("model_id,needle", [
    ("configs/tiny-deepseek-v3", "did you mean configs/tiny-deepseek-v2"),  # first component exists
    ("configs/", "config.json not found"),                                  # exists, but no config.json
    ("./tiny-deepseek-v2", "no such directory"),
    ("../no-such-model-dir", "no such directory"),
    ("/no/such/model", "no such directory"),
    ("~/no-such-model-dir-xyz", "no such directory"),
    ("configs/tiny-deepseek-v2/config.json", "is a file"),
    ("deepseek-ai/DeepSeek-V2-Lite/extra", "no such directory"),            # a hub id has one slash at most
    ("tiny-deepseek-v2/", "no such directory"),                             # a trailing slash means a directory
])
def test_a_local_looking_model_id_that_does_not_exist_never_goes_to_the_hub(model_id, needle, no_hub):
    with pytest.raises(ModelDirError) as info:
        load_config(model_id)
    message = str(info.value)
    assert needle in message and "\n" not in message
    if needle == "no such directory":
        assert model_id in message and "config.json" in message


def test_mistyped_local_path_is_one_line_not_six_tracebacks(offline_env):
    r = run_script(offline_env, "train.py", *COMPILE_ARGS, "--model_id", "configs/tiny-deepseek-v3",
                   "--plan_out", os.devnull)
    assert r.returncode == 2
    assert_one_line_error(r.stderr, "--model_id configs/tiny-deepseek-v3: no such directory",
                          "did you mean configs/tiny-deepseek-v2")


def test_a_hub_id_that_cannot_be_fetched_is_one_line_naming_the_id_and_offline(offline_env):
    r = run_script(offline_env, "train.py", *COMPILE_ARGS, "--model_id", "someone/no-such-model",
                   "--plan_out", os.devnull)
    assert r.returncode == 2
    assert_one_line_error(r.stderr, "--model_id someone/no-such-model", "offline", "local directory")


@pytest.mark.parametrize("model_id", ["no-such-model", "someone/no-such-model"])
def test_an_unreachable_hub_is_one_model_dir_error(model_id, monkeypatch):
    """What hf_hub_download raises offline (or on a network error) becomes one line, chain dropped."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("Cannot find the requested files in the disk cache and outgoing traffic "
                                      "has been disabled.\nTo enable hf.co look-ups, set HF_HUB_OFFLINE=0.")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(ModelDirError) as info:
        load_config(model_id)
    message = str(info.value)
    assert "\n" not in message and f"--model_id {model_id}:" in message and "offline" in message
    assert info.value.__suppress_context__ and info.value.__cause__ is None  # no chained tracebacks


def test_an_invalid_hub_id_is_one_model_dir_error():
    with pytest.raises(ModelDirError, match=r"--model_id bad id!: not a local directory, nor a valid hub id"):
        load_config("bad id!")


def test_a_hub_config_is_read_as_data_without_remote_code(monkeypatch, tmp_path):
    """Without --trust_remote_code only config.json is fetched (hf_hub_download) and parsed; transformers'
    remote-code loader is never asked. With it, AutoConfig runs with trust_remote_code=True."""
    import huggingface_hub
    import transformers
    shutil.copy(os.path.join(CONFIGS, "tiny-deepseek-v2", "config.json"), tmp_path / "config.json")
    fetched, auto_calls = [], []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo_id, filename, **kw: fetched.append((repo_id, filename)) or str(tmp_path / filename))

    class FakeAutoConfig:
        def to_dict(self):
            return json.loads((tmp_path / "config.json").read_text())

    def auto_config(name, **kwargs):
        auto_calls.append(kwargs)
        return FakeAutoConfig()
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", auto_config)

    config = load_config("some-org/tiny-model")
    assert config.hidden_size == 64 and config.model_type == "deepseek_v2"
    assert fetched == [("some-org/tiny-model", "config.json")]
    assert auto_calls == [], "remote code was trusted without --trust_remote_code"
    assert load_config("some-org/tiny-model", trust_remote_code=True).hidden_size == 64
    assert auto_calls == [{"trust_remote_code": True}]


def test_trust_remote_code_is_an_option_off_by_default():
    from options import CompileOptions, RunOptions, from_flags
    parser = train.build_parser()
    assert from_flags(parser.parse_args(["--model_id", "m"]), RunOptions).trust_remote_code is False
    assert from_flags(parser.parse_args(["--model_id", "m", "--trust_remote_code"]), CompileOptions).trust_remote_code
    assert bookcorpus.build_parser().parse_args(["--data_path_or_name", "d", "--tokenizer_path_or_name", "t",
                                                 "--save_path", "s", "--sequence_length", "8"]).trust_remote_code is False


def test_bookcorpus_tokenizer_never_trusts_remote_code_unless_asked(monkeypatch, demo_tokenizer_dir):
    """transformers asks on the terminal (and may run the code) when trust_remote_code is left unset; we
    always pass it, False unless --trust_remote_code."""
    import transformers
    calls = []
    real = transformers.AutoTokenizer.from_pretrained

    def spy(name, **kwargs):
        calls.append(kwargs.get("trust_remote_code", "unset"))
        return real(name, **kwargs)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy)
    bookcorpus.load_tokenizer(str(demo_tokenizer_dir))
    bookcorpus.load_tokenizer(str(demo_tokenizer_dir), trust_remote_code=True)
    assert calls == [False, True]


# =====================================================================================================
# 8b. Malformed plan files: PlanError / exit 2 with one line, and a bad file never breaks the lookup
# =====================================================================================================
def _good_plan():
    with open(GOOD_PLAN) as f:
        return json.load(f)


def _delete(*path):
    def mutate(d):
        node = d
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
    return mutate


def _set(value, *path):
    def mutate(d):
        node = d
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = copy.deepcopy(value)
    return mutate


REQUIRED_PLAN_FIELDS = [
    ("version",), ("model",), ("search_inputs",), ("plan_ngpus",), ("mesh",), ("stages",), ("ops",), ("zero",),
    ("schedule",), ("predicted",),
    ("model", "name"), ("model", "fingerprint"), ("model", "fingerprint_sha"), ("model", "fingerprint", "num_hidden_layers"),
    ("search_inputs", "seq_len"), ("search_inputs", "micro_batch_size"), ("search_inputs", "global_batch_size"),
    ("search_inputs", "runtime_ngpus"), ("search_inputs", "device_profile"), ("search_inputs", "mem_limit_gib"),
    ("mesh", "pp"), ("mesh", "dp"), ("mesh", "ep"), ("mesh", "tp"),
    ("stages", 0, "index"), ("stages", 0, "layers"), ("stages", 0, "devices"),
    ("zero", "level"), ("zero", "shard_over_replicas"), ("schedule", "name"), ("schedule", "micro_batches"),
    ("predicted", "step_time_s"), ("predicted", "peak_memory_gib"),
    ("alternatives", 0, "summary"), ("alternatives", 0, "predicted"),
]

# (id, mutation of the good plan's document, a needle the one-line message must hold)
PLAN_VARIANTS = [(f"delete-{'.'.join(map(str, path))}", _delete(*path),
                  str(path[-1]) if path[-1] != "fingerprint" else "fingerprint") for path in REQUIRED_PLAN_FIELDS] + [
    # wrong types
    ("plan_ngpus-string", _set("4", "plan_ngpus"), "plan_ngpus"),
    ("plan_ngpus-bool", _set(True, "plan_ngpus"), "plan_ngpus"),
    ("mesh-dp-float", _set(4.0, "mesh", "dp"), "mesh.dp"),
    ("mesh-list", _set([1, 4, 1, 1], "mesh"), "mesh"),
    ("seq_len-string", _set("128", "search_inputs", "seq_len"), "search_inputs.seq_len"),
    ("micro_batch_size-null", _set(None, "search_inputs", "micro_batch_size"), "search_inputs.micro_batch_size"),
    ("device_profile-number", _set(5, "search_inputs", "device_profile"), "search_inputs.device_profile"),
    ("model-string", _set("tiny", "model"), "model"),
    ("stages-object", _set({"0": {}}, "stages"), "stages"),
    ("stage-number", _set(5, "stages", 0), "stages[0]"),
    ("layers-string", _set("0-3", "stages", 0, "layers"), "stages[0].layers"),
    ("devices-string-entry", _set([0, 1, 2, "3"], "stages", 0, "devices"), "stages[0].devices"),
    ("embed-string", _set("yes", "stages", 0, "embed"), "stages[0].embed"),
    ("recompute-unknown", _set("some", "stages", 0, "recompute"), "stages[0].recompute"),
    ("chunks-string", _set("all", "stages", 0, "chunks"), "stages[0].chunks"),
    ("zero-level-bool", _set(False, "zero", "level"), "zero.level"),
    ("zero-over-string", _set("false", "zero", "shard_over_replicas"), "zero.shard_over_replicas"),
    ("micro_batches-float", _set(2.0, "schedule", "micro_batches"), "schedule.micro_batches"),
    ("virtual_stages-zero", _set(0, "schedule", "virtual_stages"), "schedule.virtual_stages"),
    ("virtual_stages-without-interleaving", _set(2, "schedule", "virtual_stages"), "schedule.virtual_stages"),
    ("peaks-string", _set("0.4", "predicted", "peak_memory_gib"), "predicted.peak_memory_gib"),
    ("step_time-string", _set("fast", "predicted", "step_time_s"), "predicted.step_time_s"),
    ("mfu-string", _set("high", "predicted", "mfu"), "predicted.mfu"),
    ("ops-list", _set([], "ops"), "ops"),
    ("ops-entry-string", _set("replicate", "ops", "experts"), "ops.experts"),
    ("ops-partition-unknown", _set({"partition": "rows"}, "ops", "experts"), "ops.experts.partition"),
    ("execution-list", _set([], "execution"), "execution"),
    ("execution-unknown", _set({"turbo": True}, "execution"), "execution.turbo"),
    ("execution-compile-bad", _set({"compile": "always"}, "execution"), "execution.compile"),
    ("execution-chunk-negative", _set({"ce_chunk_tokens": -1}, "execution"), "execution.ce_chunk_tokens"),
    ("alternatives-object", _set({}, "alternatives"), "alternatives"),
    ("alternative-peaks-empty", _set([], "alternatives", 0, "predicted", "peak_memory_gib"),
     "alternatives[0].predicted.peak_memory_gib"),
    ("explanation-number", _set(3, "explanation"), "explanation"),
    ("version-string", _set("1", "version"), "version"),
    ("version-2", _set(2, "version"), "version"),
    # zero, negative, huge values
    ("micro-0", _set(0, "search_inputs", "micro_batch_size"), "search_inputs.micro_batch_size"),
    ("micro-negative", _set(-2, "search_inputs", "micro_batch_size"), "search_inputs.micro_batch_size"),
    ("micro-above-global", _set(64, "search_inputs", "micro_batch_size"), "exceeds global_batch_size"),
    ("micro-not-dividing", _set(3, "search_inputs", "micro_batch_size"), "search_inputs.global_batch_size"),
    ("global-0", _set(0, "search_inputs", "global_batch_size"), "search_inputs.global_batch_size"),
    ("global-huge", _set(10 ** 12, "search_inputs", "global_batch_size"), "search_inputs.global_batch_size"),
    ("global-inconsistent", _set(64, "search_inputs", "global_batch_size"), "schedule.micro_batches"),
    ("seq_len-1", _set(1, "search_inputs", "seq_len"), "search_inputs.seq_len"),
    ("seq_len-negative", _set(-128, "search_inputs", "seq_len"), "search_inputs.seq_len"),
    ("runtime-0", _set(0, "search_inputs", "runtime_ngpus"), "search_inputs.runtime_ngpus"),
    ("runtime-not-multiple", _set(6, "search_inputs", "runtime_ngpus"), "search_inputs.runtime_ngpus"),
    ("mem-limit-0", _set(0, "search_inputs", "mem_limit_gib"), "search_inputs.mem_limit_gib"),
    ("dtype-unknown", _set("fp8", "search_inputs", "dtype"), "search_inputs.dtype"),
    ("plan_ngpus-0", _set(0, "plan_ngpus"), "plan_ngpus"),
    ("plan_ngpus-huge", _set(10 ** 30, "plan_ngpus"), "plan_ngpus"),
    ("mesh-dp-0", _set(0, "mesh", "dp"), "mesh.dp"),
    ("mesh-dp-negative", _set(-4, "mesh", "dp"), "mesh.dp"),
    ("mesh-dp-product", _set(8, "mesh", "dp"), "mesh"),
    ("micro_batches-0", _set(0, "schedule", "micro_batches"), "schedule.micro_batches"),
    ("micro_batches-inconsistent", _set(3, "schedule", "micro_batches"), "schedule.micro_batches"),
    ("step_time-nan", _set(float("nan"), "predicted", "step_time_s"), "predicted.step_time_s"),
    ("step_time-negative", _set(-1.0, "predicted", "step_time_s"), "predicted.step_time_s"),
    ("stage-index-1", _set(1, "stages", 0, "index"), "stages[0].index"),
    ("layers-past-the-model", _set([0, 99], "stages", 0, "layers"), "layers"),
    ("num_layers-0", _set(0, "model", "fingerprint", "num_hidden_layers"), "num_hidden_layers"),
    ("fingerprint-edited", _set(4, "model", "fingerprint", "num_hidden_layers"), "model.fingerprint_sha"),
    ("zero-level-1", _set(1, "zero", "level"), "zero.level"),
    ("schedule-unknown", _set("GPipe", "schedule", "name"), "schedule.name"),
    # lists of the wrong length
    ("peaks-too-few", _set([0.4, 0.4, 0.4], "predicted", "peak_memory_gib"), "predicted.peak_memory_gib"),
    ("layers-one", _set([0], "stages", 0, "layers"), "stages[0].layers"),
    ("layers-three", _set([0, 1, 3], "stages", 0, "layers"), "stages[0].layers"),
    ("devices-too-few", _set([0, 1, 2], "stages", 0, "devices"), "stages[0].devices"),
    ("devices-repeated", _set([0, 1, 2, 2], "stages", 0, "devices"), "stages[0].devices"),
    ("devices-outside", _set([0, 1, 2, 9], "stages", 0, "devices"), "stages[0].devices"),
    ("stages-none", _set([], "stages"), "stages"),
    ("mesh-extra-axis", lambda d: d["mesh"].update(cp=1), "mesh"),
]

# whole-file faults: (id, the file's bytes, a needle)
PLAN_FILES = [
    ("json-list", b"[1, 2, 3]\n", "JSON object"),
    ("json-number", b"5\n", "JSON object"),
    ("json-string", b'"plan"\n', "JSON object"),
    ("json-null", b"null\n", "JSON object"),
    ("empty-file", b"", "not valid JSON"),
    ("truncated", json.dumps(_good_plan()).encode()[:500], "not valid JSON"),
    ("binary-garbage", bytes(range(256)) * 4, "not valid JSON"),
]


def _write_plan(tmp_path, name, doc_or_bytes):
    path = tmp_path / f"{name}.json"
    if isinstance(doc_or_bytes, bytes):
        path.write_bytes(doc_or_bytes)
    else:
        path.write_text(json.dumps(doc_or_bytes))  # NaN is written as NaN, which json.load reads back
    return str(path)


def test_the_good_plan_loads_and_inspects(capsys):
    plan = Plan.load(GOOD_PLAN)
    assert plan.search_inputs["micro_batch_size"] == 2
    assert train.main(["--run_mode", "inspect", "--plan", GOOD_PLAN]) == 0


def test_there_are_at_least_40_malformed_plans():
    assert len(PLAN_VARIANTS) + len(PLAN_FILES) >= 40


@pytest.mark.parametrize("name,mutate,needle", PLAN_VARIANTS, ids=[v[0] for v in PLAN_VARIANTS])
def test_malformed_plan_is_one_line_plan_error(name, mutate, needle, tmp_path, capsys):
    doc = _good_plan()
    mutate(doc)
    path = _write_plan(tmp_path, name, doc)
    with pytest.raises(PlanError) as info:
        Plan.load(path)
    message = str(info.value)
    assert "\n" not in message and path in message and needle in message, message
    assert "recompile" in message  # the fix
    line = run_main(train.main, ["--run_mode", "inspect", "--plan", path], capsys)
    assert path in line and needle in line


@pytest.mark.parametrize("name,data,needle", PLAN_FILES, ids=[v[0] for v in PLAN_FILES])
def test_a_plan_file_that_is_not_a_plan_document_is_one_line(name, data, needle, tmp_path, capsys):
    path = _write_plan(tmp_path, name, data)
    line = run_main(train.main, ["--run_mode", "inspect", "--plan", path], capsys)
    assert path in line and needle in line


@pytest.mark.parametrize("name", ["micro-above-global", "json-number"])
def test_malformed_plans_print_no_traceback_from_the_command_line(name, tmp_path, offline_env):
    variants = {v[0]: v for v in PLAN_VARIANTS}
    if name in variants:
        doc = _good_plan()
        variants[name][1](doc)
        path = _write_plan(tmp_path, name, doc)
    else:
        path = _write_plan(tmp_path, name, dict((f[0], f[1]) for f in PLAN_FILES)[name])
    r = run_script(offline_env, "train.py", "--run_mode", "inspect", "--plan", path)
    assert r.returncode == 2
    assert_one_line_error(r.stderr, path)


def _find(plans_dir, plan_ngpus=4):
    from options import RunOptions
    from runtime.preflight import find_plan
    model_id = os.path.join(CONFIGS, "tiny-deepseek-v2")
    args = RunOptions(model_id=model_id, plan_ngpus=plan_ngpus, plans_dir=str(plans_dir))
    return find_plan(args, load_config(model_id))


GARBAGE = [b"5", b"null", b'"x"', b"[1]", b'{"version": 1, "stages": 5}', b'{"version": 1, "stages": [7]}',
           b"\xff\xfe garbage", b""]


def test_a_bad_file_in_plans_does_not_break_the_lookup_of_a_good_plan(tmp_path):
    # the garbage sits where the lookup looks first (plans/<model>-<P>gpu.json) and sorts before the good one
    (tmp_path / "tiny-deepseek-v2-4gpu.json").write_bytes(b"5")
    for i, data in enumerate(GARBAGE):
        (tmp_path / f"a{i}.json").write_bytes(data)
    broken = _good_plan()
    broken["search_inputs"]["micro_batch_size"] = 0
    (tmp_path / "b-broken.json").write_text(json.dumps(broken))
    shutil.copy(GOOD_PLAN, tmp_path / "z-good.json")
    plan, path = _find(tmp_path)
    assert path == str(tmp_path / "z-good.json") and plan.plan_ngpus == 4


def test_no_plan_found_names_the_files_passed_over(tmp_path):
    from runtime.preflight import RunError
    (tmp_path / "tiny-deepseek-v2-4gpu.json").write_bytes(b"5")
    with pytest.raises(RunError) as info:
        _find(tmp_path)
    message = str(info.value)
    assert "\n" not in message and "tiny-deepseek-v2-4gpu.json" in message and "--run_mode compile" in message


# =====================================================================================================
# 8c. Odd config.json files: shape fields required, types and ranges checked, one line each
# =====================================================================================================
def _config_fields(name):
    with open(os.path.join(CONFIGS, name, "config.json")) as f:
        return json.load(f)


V2, V1 = "tiny-deepseek-v2", "tiny-deepseek-moe"

# (id, base config, mutation, needle)
CONFIG_VARIANTS = [
    *[(f"missing-{field}", V2, _delete(field), field) for field in
      ("hidden_size", "vocab_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
       "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "n_routed_experts", "num_experts_per_tok",
       "moe_intermediate_size")],
    ("missing-num_key_value_heads-v1", V1, _delete("num_key_value_heads"), "num_key_value_heads"),
    ("missing-model_type", V2, _delete("model_type"), "model_type"),
    ("hidden_size-string", V2, _set("64", "hidden_size"), "hidden_size"),
    ("hidden_size-float", V2, _set(64.5, "hidden_size"), "hidden_size"),
    ("hidden_size-0", V2, _set(0, "hidden_size"), "hidden_size"),
    ("hidden_size-negative", V2, _set(-64, "hidden_size"), "hidden_size"),
    ("hidden_size-null", V2, _set(None, "hidden_size"), "hidden_size"),
    ("vocab_size-bool", V2, _set(True, "vocab_size"), "vocab_size"),
    ("num_layers-0", V2, _set(0, "num_hidden_layers"), "num_hidden_layers"),
    ("heads-0-v1", V1, _set(0, "num_attention_heads"), "num_attention_heads"),
    ("kv-heads-0-v1", V1, _set(0, "num_key_value_heads"), "num_key_value_heads"),
    ("kv-heads-not-dividing-v1", V1, _set(3, "num_key_value_heads"), "num_key_value_heads"),
    ("hidden-not-divisible-by-heads-v1", V1, _set(66, "hidden_size"), "num_attention_heads"),
    ("experts-per-token-above-experts", V2, _set(9, "num_experts_per_tok"), "num_experts_per_tok"),
    ("experts-per-token-string", V2, _set("2", "num_experts_per_tok"), "num_experts_per_tok"),
    ("n_routed_experts-0", V2, _set(0, "n_routed_experts"), "n_routed_experts"),
    ("n_shared_experts-negative", V2, _set(-1, "n_shared_experts"), "n_shared_experts"),
    ("moe_layer_freq-0", V2, _set(0, "moe_layer_freq"), "moe_layer_freq"),
    ("first_k_dense-past-the-layers", V2, _set(10, "first_k_dense_replace"), "first_k_dense_replace"),
    ("n_group-not-dividing", V2, lambda d: d.update(topk_method="group_limited_greedy", n_group=3), "n_group"),
    ("topk_group-above-n_group", V2, lambda d: d.update(topk_method="group_limited_greedy", n_group=2, topk_group=3),
     "topk_group"),
    ("groups-hold-too-few-experts", V2,
     lambda d: d.update(topk_method="group_limited_greedy", n_group=8, topk_group=1), "num_experts_per_tok"),
    ("rope-dim-odd", V2, _set(7, "qk_rope_head_dim"), "qk_rope_head_dim"),
    ("v_head_dim-0", V2, _set(0, "v_head_dim"), "v_head_dim"),
    ("q_lora_rank-string", V2, _set("none", "q_lora_rank"), "q_lora_rank"),
    ("rope_scaling-string", V2, _set("yarn", "rope_scaling"), "rope_scaling"),
    ("rope_scaling-factor-string", V2, _set("4", "rope_scaling", "factor"), "rope_scaling.factor"),
    ("rope_scaling-type-unknown", V2, _set("ntk", "rope_scaling", "type"), "rope_scaling.type"),
    ("hidden_act-unknown", V2, _set("swish2", "hidden_act"), "hidden_act"),
    ("rms_norm_eps-0", V2, _set(0, "rms_norm_eps"), "rms_norm_eps"),
    ("max_position-0", V2, _set(0, "max_position_embeddings"), "max_position_embeddings"),
    ("tie-embeddings-string", V2, _set("no", "tie_word_embeddings"), "tie_word_embeddings"),
]

CONFIG_FILES = [  # (id, the file's bytes, needle)
    ("json-list", b"[]", "JSON object"),
    ("json-null", b"null", "JSON object"),
    ("empty", b"", "not valid JSON"),
    ("binary", bytes(range(256)), "not valid JSON"),
]


def _model_dir(tmp_path, name, base, mutate):
    fields = _config_fields(base)
    mutate(fields)
    directory = tmp_path / name
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(fields))
    return str(directory)


def test_the_published_configs_still_load():
    for name in sorted(os.listdir(CONFIGS)):
        fields = _config_fields(name)
        config = load_config(os.path.join(CONFIGS, name))
        for field in ("hidden_size", "vocab_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                      "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size"):
            assert getattr(config, field) == fields[field], (name, field)


def test_there_are_at_least_20_odd_configs():
    assert len(CONFIG_VARIANTS) + len(CONFIG_FILES) >= 20


@pytest.mark.parametrize("name,base,mutate,needle", CONFIG_VARIANTS, ids=[v[0] for v in CONFIG_VARIANTS])
def test_odd_config_is_one_line_model_dir_error(name, base, mutate, needle, tmp_path, capsys):
    model_dir = _model_dir(tmp_path, name, base, mutate)
    with pytest.raises(ModelDirError) as info:
        load_config(model_dir)
    message = str(info.value)
    assert "\n" not in message and os.path.join(model_dir, "config.json") in message and needle in message, message
    line = run_main(train.main, [*COMPILE_ARGS, "--model_id", model_dir, "--plan_out", str(tmp_path / "p.json")],
                    capsys)
    assert needle in line and "config.json" in line
    assert not (tmp_path / "p.json").exists()


@pytest.mark.parametrize("name,data,needle", CONFIG_FILES, ids=[v[0] for v in CONFIG_FILES])
def test_a_config_json_that_is_not_an_object_is_one_line(name, data, needle, tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_bytes(data)
    line = run_main(train.main, [*COMPILE_ARGS, "--model_id", str(tmp_path / "m"), "--plan_out",
                                 str(tmp_path / "p.json")], capsys)
    assert needle in line and "config.json" in line


@pytest.mark.parametrize("name", ["kv-heads-0-v1"])
def test_odd_configs_print_no_traceback_from_the_command_line(name, tmp_path, offline_env):
    _, base, mutate, needle = {v[0]: v for v in CONFIG_VARIANTS}[name]
    model_dir = _model_dir(tmp_path, name, base, mutate)
    r = run_script(offline_env, "train.py", *COMPILE_ARGS, "--model_id", model_dir, "--plan_out",
                   str(tmp_path / "p.json"))
    assert r.returncode == 2
    assert_one_line_error(r.stderr, needle, "config.json")


# =====================================================================================================
# 9. bookcorpus.py: long documents in bounded memory; invalid UTF-8 and a file as --save_path in one line
# =====================================================================================================
@pytest.fixture
def hf_datasets_cache(tmp_path, monkeypatch):
    import datasets
    cache = tmp_path / "hf_datasets_cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    return cache


def _docstring_text(corpus_path, chars):
    texts = [" ".join(json.loads(line)["text"].split()) for line in open(corpus_path, encoding="utf-8")]
    text = " ".join(texts)
    return (text * (chars // len(text) + 1))[:chars]


def test_a_long_document_is_tokenized_in_pieces_to_the_same_ids(demo_corpus_path, demo_tokenizer):
    """Pieces cut before a space between words give byte-level BPE the same pre-tokens, so the ids
    equal those of the whole document."""
    text = _docstring_text(demo_corpus_path, 120_000)
    whole = demo_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(bookcorpus._pieces(text, 4096)) > 20
    assert "".join(bookcorpus._pieces(text, 4096)) == text
    for piece_chars, call_chars in ((4096, 10_000), (bookcorpus.PIECE_CHARS, bookcorpus.CALL_CHARS)):
        ids = bookcorpus.encode_bounded(demo_tokenizer, [text, "", "short one"], piece_chars, call_chars)
        assert ids[0].tolist() == whole
        assert ids[1].tolist() == [] and ids[2].tolist() == demo_tokenizer("short one", add_special_tokens=False)["input_ids"]
    # a run without any whitespace is cut at the limit, and still joins back to the text
    assert [len(p) for p in bookcorpus._pieces("x" * 10_000, 4096)] == [4096, 4096, 1808]


RSS_CHILD = r"""
import os, sys
sys.path.insert(0, os.getcwd())
import bookcorpus
# VmHWM, not ru_maxrss: the latter keeps the high-water mark of the (large) test runner this child was forked from
from runtime.metrics import resident_high_water_kib
tok_dir, data, out = sys.argv[1:4]
bookcorpus.load_tokenizer(tok_dir)("warm up", add_special_tokens=False)
before = resident_high_water_kib()
status = bookcorpus.main(["--data_path_or_name", data, "--tokenizer_path_or_name", tok_dir, "--save_path", out,
                          "--sequence_length", "2"])
after = resident_high_water_kib()
print("RESULT", status, (after - before) / 1024)
"""
LONG_LINE_MIB = 20
RSS_GROWTH_LIMIT_MIB = 500  # measured: ~180 MiB with pieces; 1.3 GiB at once (and 9.5 GB for 54 MB with BPE)


def test_a_20_mib_single_line_document_stays_in_bounded_memory(tmp_path, offline_env, demo_corpus_path):
    """Peak RSS growth of bookcorpus.main over a 20 MiB one-line document stays under 500 MiB.

    The tokenizer is a one-token word-level model without a pre-tokenizer: it keeps the per-character
    memory of encoding (the normalized string and its byte alignments, ~16 bytes per byte) while it
    runs in seconds; a real BPE adds ~100 bytes per token on top when a document is encoded at once."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    tokenizer = Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "[UNK]": 2}, unk_token="[UNK]"))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                            unk_token="[UNK]").save_pretrained(tmp_path / "tok")
    data = tmp_path / "long.txt"
    data.write_text(_docstring_text(demo_corpus_path, LONG_LINE_MIB * 2 ** 20) + "\n", encoding="utf-8")
    (tmp_path / "child.py").write_text(RSS_CHILD)
    r = run_script(offline_env, str(tmp_path / "child.py"), str(tmp_path / "tok"), str(data), str(tmp_path / "out"),
                   timeout=600)
    result = [line for line in r.stdout.splitlines() if line.startswith("RESULT")]
    assert r.returncode == 0 and result, r.stderr[-2000:]
    _, status, growth = result[0].split()
    assert status == "0"
    assert float(growth) < RSS_GROWTH_LIMIT_MIB, f"peak RSS grew by {float(growth):.0f} MiB"


@pytest.mark.parametrize("suffix,content", [
    (".txt", b"first line\nsecond line caf\xe9 au lait\nthird\n"),
    (".jsonl", b'{"text": "first"}\n{"text": "caf\xe9"}\n'),
])
def test_invalid_utf8_names_the_file_the_line_and_the_encoding(suffix, content, tmp_path, capsys, hf_datasets_cache,
                                                                demo_tokenizer_dir):
    data = tmp_path / f"corpus{suffix}"
    data.write_bytes(content)
    line = run_main(bookcorpus.main, ["--data_path_or_name", str(data), "--tokenizer_path_or_name",
                                      str(demo_tokenizer_dir), "--save_path", str(tmp_path / "out"),
                                      "--sequence_length", "4"], capsys)
    assert str(data) in line and "line 2" in line and "UTF-8" in line
    assert not (tmp_path / "out").exists()


def test_a_file_as_save_path_is_one_line(tmp_path, capsys, hf_datasets_cache, demo_corpus_path, demo_tokenizer_dir):
    (tmp_path / "taken").write_text("not a directory")
    for save_path in (tmp_path / "taken", tmp_path / "taken" / "below"):
        line = run_main(bookcorpus.main, ["--data_path_or_name", str(demo_corpus_path), "--tokenizer_path_or_name",
                                          str(demo_tokenizer_dir), "--save_path", str(save_path),
                                          "--sequence_length", "64"], capsys)
        assert "--save_path" in line and str(tmp_path / "taken") in line
    assert (tmp_path / "taken").read_text() == "not a directory"


def test_a_file_as_save_path_prints_no_traceback_from_the_command_line(tmp_path, offline_env, demo_corpus_path,
                                                                        demo_tokenizer_dir):
    (tmp_path / "taken").write_text("x")
    r = run_script(offline_env, "bookcorpus.py", "--data_path_or_name", str(demo_corpus_path),
                   "--tokenizer_path_or_name", str(demo_tokenizer_dir), "--save_path", str(tmp_path / "taken"),
                   "--sequence_length", "64")
    assert r.returncode == 2
    assert_one_line_error(r.stderr, "--save_path")
