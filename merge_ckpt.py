"""Merge a sharded training checkpoint into a Hugging Face checkpoint directory, on a CPU.

    python merge_ckpt.py --ckpt_dir SAVE/step_00000020 --output_dir OUT \\
        [--dtype bf16|fp32] [--max_shard_size 5GB] [--overwrite] [--optimizer]

Flow:

1. Resolve --ckpt_dir: a committed checkpoint (`step_N/`), or a save dir whose `last` pointer names
   one. A directory without the COMMITTED marker is refused (its save did not finish).
2. Verify every file COMMITTED lists (size and CRC-32) before reading any tensor, so a missing,
   truncated or altered shard is named instead of surfacing as a DCP read error or, worse, as
   silently wrong weights (runtime.checkpoint.verify: the check a resume makes too). DCP's metadata
   and non-tensor entries are read without running code (runtime.checkpoint.SafeReader, read_state).
3. Build the reference model of hf/config.json on the meta device (no memory): its state_dict gives
   the Hugging Face tensor names, shapes and order. Map each name to where the checkpoint holds it:
   "model.<name>" for every tensor except the routed experts, which the training form stacks
   (`...mlp.experts.gate_up_proj_E2FD` [E, 2, F, D], `...mlp.experts.down_proj_EDF` [E, D, F]) and
   which are sliced back to `...mlp.experts.<i>.{gate,up,down}_proj.weight`.
4. Cut the tensors into output shards of at most --max_shard_size bytes (in the output dtype), then
   for each shard read only the checkpoint tensors it needs (torch.distributed.checkpoint, no
   process group), slice, cast and write `model-0000i-of-0000K.safetensors`; memory peaks at about
   one output shard plus the stacked experts of a layer.
5. Write `model.safetensors.index.json` (always, even for one shard), config.json (auto_map for
   trust_remote_code, torch_dtype), the modeling and configuration files, generation_config.json and
   the tokenizer files the run kept in hf/.
6. With --optimizer, the AdamW state the same way (see OPTIMIZER_LAYOUT below).

Everything is written into OUT.partial and renamed to OUT at the end: an interrupted merge never
leaves a directory named OUT that looks complete.

A LoRA run (its checkpoint holds `lora.json` and, as model state, only the adapters: see LORA_LAYOUT
below) is exported as a PEFT adapter directory, or with --merge_lora as the full merged weights
`W + (alpha / rank) * B @ A`, the base weights W read from --base_model (the run's --model_id).

User errors (bad flags, missing or corrupt checkpoint, occupied output) raise MergeError; the command
line prints its one-line message (which names the path and the fix) and exits with status 2.
"""

import argparse
import json
import math
import os
import re
import shutil
import sys
import warnings
from collections import Counter
from dataclasses import dataclass

import torch

from errors import UserError, read_json, run_cli
from modeling.hf_adapter import (PEFT_PREFIX, is_lora_name, lora_module_sources, lora_modules, lora_peft_sources,
                                 training_source)
from modeling.lora import LORA_TARGETS

REPO = os.path.dirname(os.path.abspath(__file__))
MODELING_FILES = ("modeling_deepseek.py", "configuration_deepseek.py")
MODEL_PREFIX = "model"  # model-00001-of-0000K.safetensors, model.safetensors.index.json
OPTIMIZER_PREFIX = "optimizer"

OPTIMIZER_LAYOUT = """\
--optimizer writes the optimizer state beside the weights, as safetensors in the stored dtype (fp32;
--dtype applies to the weights only): optimizer-0000i-of-0000K.safetensors shards (--max_shard_size)
and optimizer.safetensors.index.json. Tensors are named after the Hugging Face parameter they belong
to, routed experts split like the weights: "<name>.exp_avg", "<name>.exp_avg_sq" and "<name>.step"
(AdamW's per-parameter step, a 0-d tensor). The index is {"metadata": {"total_size", "step" (the
checkpoint's training step), "param_groups": [{hyperparameters..., "params": [names]}]},
"weight_map": {tensor name: file}}."""

LORA_LAYOUT = """\
A LoRA run's checkpoint holds lora.json ({"rank", "alpha", "dropout", "targets", "modules": the Hugging
Face modules adapted}) and only the adapters. Without --merge_lora, OUT is a PEFT adapter directory:
adapter_config.json (target_modules: the exact list of adapted modules) and adapter_model.safetensors
(one file, as PEFT reads it: --max_shard_size does not apply), keys
base_model.model.<module>.lora_A.weight / .lora_B.weight, the routed experts' stacked adapters split per
expert (model.layers.L.mlp.experts.<i>.{gate,up,down}_proj), plus the run's tokenizer files. Load it with
peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE, trust_remote_code=True), OUT).
With --merge_lora (needs --base_model, the run's --model_id with its weights), OUT is a full Hugging Face
checkpoint as above whose adapted weights are W + (alpha / rank) * B @ A, computed in fp32 (the output
dtype defaults to fp32). --optimizer with an adapter export writes the adapters' AdamW state under their
PEFT names."""

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
LORA_FILE = "lora.json"  # beside the DCP files of a LoRA run's checkpoint (runtime.checkpoint.LORA_FILE)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # the one file name PEFT's from_pretrained reads
# files the run kept in hf/ that are not tokenizer files
NON_TOKENIZER_FILES = ("config.json", "generation_config.json")


class MergeError(UserError):
    """A merge that cannot be done as asked; the message names the path or flag and the fix."""


# ---- flags ------------------------------------------------------------------------------------------------
def parse_size(text):
    """"5GB" -> 5 * 10**9, "100KiB" -> 102400, "2048" -> 2048 (bytes), as Hugging Face reads sizes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([KMGT]?I?B)?\s*", str(text), flags=re.IGNORECASE)
    if match is None:
        raise MergeError(f"--max_shard_size {text!r} is not a size; give a number of bytes or one like 5GB, "
                         "500MB, 100KB (powers of 1000) or 4GiB (powers of 1024)")
    number, unit = float(match[1]), (match[2] or "B").upper()
    powers = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}
    base = 1024 if unit.endswith("IB") else 1000
    size = int(number * base ** powers[unit[0]])
    if size <= 0:
        raise MergeError(f"--max_shard_size {text!r} must be larger than 0 bytes, e.g. 5GB")
    return size


def parse_dtype(text):
    if text not in DTYPES:
        raise MergeError(f"--dtype {text!r} is not supported; use bf16 or fp32 (or leave it out to keep the "
                         "checkpoint's dtype)")
    return DTYPES[text]


def dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


# ---- the checkpoint: find, verify, read -------------------------------------------------------------------
def resolve_checkpoint(ckpt_dir):
    """--ckpt_dir -> a committed checkpoint directory and its COMMITTED record."""
    from runtime.checkpoint import COMMIT_MARKER, LAST_POINTER, last_pointer_target, read_commit
    if not os.path.isdir(ckpt_dir):
        raise MergeError(f"--ckpt_dir {ckpt_dir}: no such directory; pass a checkpoint such as "
                         "SAVE_DIR/step_00000020, or the save dir to merge the one its `last` pointer names")
    pointer = os.path.join(ckpt_dir, LAST_POINTER)
    target = last_pointer_target(ckpt_dir)
    if not os.path.isfile(os.path.join(ckpt_dir, COMMIT_MARKER)) and target is not None:
        ckpt_dir = target
        if not os.path.isdir(ckpt_dir):
            raise MergeError(f"{pointer} names {ckpt_dir}, which does not exist (deleted by hand?); pass a "
                             "step_N directory that exists as --ckpt_dir")
    marker = os.path.join(ckpt_dir, COMMIT_MARKER)
    if not os.path.isfile(marker):
        raise MergeError(f"--ckpt_dir {ckpt_dir} has no {COMMIT_MARKER} marker: its save did not finish; use an "
                         "earlier checkpoint, or pass the save dir to merge the one its `last` pointer names")
    return ckpt_dir, read_commit(ckpt_dir, MergeError)


def verify_files(ckpt_dir, committed, progress=True):
    """Every file COMMITTED lists exists with the recorded size and CRC-32: the one check the trainer
    also makes before it resumes (runtime.checkpoint.verify)."""
    from runtime.checkpoint import verify
    verify(ckpt_dir, committed, MergeError, progress)


class CheckpointTensors:
    """Reads chosen entries of a DCP checkpoint as full tensors, in one process without a process group."""

    def __init__(self, ckpt_dir):
        # DCP's metadata is unpickled admitting only the classes it is made of: a checkpoint runs no code
        from runtime.checkpoint import SafeReader
        self.path = ckpt_dir
        self.reader = SafeReader(ckpt_dir)
        self.entries = self.reader.read_metadata().state_dict_metadata  # key -> Tensor/BytesStorageMetadata

    def shape(self, key):
        return tuple(self.entries[key].size)

    def dtype(self, key):
        return self.entries[key].properties.dtype

    def is_tensor(self, key):
        return hasattr(self.entries.get(key), "size")

    def read(self, keys):
        """{key: full tensor (or the saved object, for non-tensor entries)}."""
        from runtime.checkpoint import read_state
        state = {k: torch.empty(self.shape(k), dtype=self.dtype(k)) if self.is_tensor(k) else None for k in keys}
        if state:
            with warnings.catch_warnings():  # DCP notes that it is loading in one process: that is the intent
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                read_state(state, self.reader, no_dist=True)  # non-tensor entries with weights_only=True
        return state


@dataclass
class OutputTensor:
    name: str       # name in the written files
    source: str     # checkpoint (DCP) key holding it
    index: tuple    # where in that tensor
    nbytes: int     # size as written


def hf_parameter_shapes(config):
    """Hugging Face names -> shapes, in the order save_pretrained writes them (meta device: no memory)."""
    from modeling import build_model
    state = build_model(config, device="meta").state_dict()
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied to the embedding: from_pretrained restores it, as for HF files
    return {name: tuple(t.shape) for name, t in state.items()}


def model_tensors(checkpoint, config, dtype):
    """The Hugging Face tensors to write, each mapped to its checkpoint source; checks that the
    checkpoint holds exactly the parameters of hf/config.json's model, with matching shapes."""
    shapes = hf_parameter_shapes(config)
    needed = {training_source(name)[0] for name in shapes}
    saved = {k[len("model."):] for k in checkpoint.entries if k.startswith("model.")}
    if getattr(config, "tie_word_embeddings", False):
        saved.discard("lm_head.weight")
    missing, unexpected = sorted(needed - saved), sorted(saved - needed)
    if missing or unexpected:
        raise MergeError(f"{checkpoint.path}: its model tensors do not match hf/config.json's model (missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]}); was hf/config.json replaced after the run?")
    out = []
    for name, shape in shapes.items():
        train_name, index = training_source(name)
        source = f"model.{train_name}"
        _check_shape(checkpoint, source, index, shape, name)
        out.append(OutputTensor(name, source, index, _numel(shape) * dtype.itemsize))
    return out


def parameter_layout(config):
    """[(Hugging Face name, training-form name, index into it, shape)] of every parameter of the model."""
    return [(name, *training_source(name), shape) for name, shape in hf_parameter_shapes(config).items()]


def optimizer_tensors(checkpoint, layout):
    """exp_avg, exp_avg_sq and step of every parameter of `layout` (parameter_layout, or
    lora_layout for an adapter export) that has optimizer state, experts split."""
    out = []
    for name, train_name, index, shape in layout:
        for state_name in ("exp_avg", "exp_avg_sq", "step"):
            source = f"optim.state.{train_name}.{state_name}"
            if not checkpoint.is_tensor(source):
                continue
            if state_name == "step":  # one step count for the whole stacked parameter: each expert gets it
                state_index, state_shape = (), ()
            else:
                state_index, state_shape = index, shape
            _check_shape(checkpoint, source, state_index, state_shape, f"{name}.{state_name}")
            out.append(OutputTensor(f"{name}.{state_name}", source, state_index,
                                    _numel(state_shape) * checkpoint.dtype(source).itemsize))
    if not out:
        raise MergeError(f"--optimizer: {checkpoint.path} holds no optimizer state (saved before the first "
                         "optimizer step); merge without --optimizer")
    return out


def optimizer_param_groups(checkpoint, layout):
    """AdamW hyperparameters as torch's param_groups: [{lr, betas, ..., "params": [names of `layout`]}]."""
    keys = [k for k in checkpoint.entries if k.startswith("optim.param_groups.")]
    values = checkpoint.read(keys)
    per_param = {}
    for key, value in values.items():
        train_name, _, hyper = key[len("optim.param_groups."):].rpartition(".")
        per_param.setdefault(train_name, {})[hyper] = value.item() if isinstance(value, torch.Tensor) else value
    groups = {}
    for name, train_name, _, _ in layout:
        hypers = per_param.get(train_name)
        if hypers is None:
            continue
        signature = json.dumps(hypers, sort_keys=True, default=str)
        groups.setdefault(signature, {**json.loads(signature), "params": []})["params"].append(name)
    return list(groups.values())


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def _check_shape(checkpoint, source, index, expected, name):
    if not checkpoint.is_tensor(source):
        raise MergeError(f"{checkpoint.path}: no tensor {source} for {name}; the checkpoint does not match "
                         "hf/config.json's model")
    stored = checkpoint.shape(source)
    if len(index) > len(stored) or any(i >= s for i, s in zip(index, stored)) or stored[len(index):] != expected:
        raise MergeError(f"{checkpoint.path}: {source} has shape {list(stored)}, which does not hold {name} "
                         f"of shape {list(expected)}; the checkpoint does not match hf/config.json's model")


# ---- LoRA runs ---------------------------------------------------------------------------------------------
@dataclass
class LoraRun:
    """A LoRA run's adapters as its checkpoint describes them (lora.json, checked against the tensors)."""
    path: str           # the lora.json read
    rank: int
    alpha: float
    dropout: float
    targets: list
    modules: list       # the Hugging Face nn.Linear modules adapted, in model order
    adapters: list      # the training-form adapter tensors the checkpoint holds (without "model.")
    model_id: object    # the run's --model_id when lora.json records it, else None

    @property
    def scaling(self):
        return self.alpha / self.rank


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def hf_linear_shapes(config):
    """{module name: weight shape [out, in]} of every nn.Linear of the Hugging Face model (meta device):
    the modules PEFT can put a LoRA adapter on."""
    from modeling import build_model
    model = build_model(config, device="meta")
    return {name: tuple(m.weight.shape) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def read_lora(ckpt_dir, checkpoint, config):
    """The LoraRun of a LoRA checkpoint, or None for a full one. Each field of lora.json is checked, and
    `modules` and `rank` against the adapter tensors the checkpoint holds and the model's layers."""
    adapters = sorted(k[len("model."):] for k in checkpoint.entries
                      if k.startswith("model.") and is_lora_name(k[len("model."):]))
    path = os.path.join(ckpt_dir, LORA_FILE)
    fix = "copy the checkpoint again in full from where the run saved it"
    if not os.path.isfile(path):
        if adapters:
            raise MergeError(f"{ckpt_dir} holds LoRA adapters (model.{adapters[0]}, ...) but no {LORA_FILE} giving "
                             f"their rank, alpha and modules; {fix}")
        return None
    doc = read_json(path, MergeError, fix)
    if not isinstance(doc, dict):
        raise MergeError(f"{path} holds a {type(doc).__name__}, not the JSON object train.py writes (rank, alpha, "
                         f"dropout, targets, modules); {fix}")

    def bad(field, wanted):
        shown = repr(doc[field]) if field in doc else "missing"
        return MergeError(f"{path}: field `{field}` is {shown[:80]}; it must be {wanted} (as train.py writes it); {fix}")

    rank, alpha, dropout = doc.get("rank"), doc.get("alpha"), doc.get("dropout")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise bad("rank", "an integer >= 1")
    if not _is_number(alpha) or alpha <= 0:
        raise bad("alpha", "a number > 0")
    if not _is_number(dropout) or not 0 <= dropout < 1:
        raise bad("dropout", "a number in [0, 1)")
    targets = doc.get("targets")
    if isinstance(targets, str):  # the flag's comma list
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    if not isinstance(targets, list) or not targets or not all(t in LORA_TARGETS for t in targets):
        raise bad("targets", f"a list of {', '.join(LORA_TARGETS)}")
    modules = doc.get("modules")
    if not isinstance(modules, list) or not modules or not all(isinstance(m, str) for m in modules):
        raise bad("modules", "the list of Hugging Face module names adapted")
    if not adapters:
        raise MergeError(f"{path} describes a LoRA run, but {ckpt_dir} holds no adapter tensors (model.*.lora_A, "
                         f"...); {fix}")
    held = lora_modules(adapters, config.n_routed_experts or 0)
    differ = sorted(set(held) ^ set(modules))
    if differ:
        side = "has no adapters in the checkpoint" if differ[0] in modules else "is adapted but not listed"
        raise MergeError(f"{path}: `modules` does not match the checkpoint's adapters ({differ[0]} {side}, "
                         f"{len(differ)} module(s) differ); {fix}")
    model_id = doc.get("model_id") if isinstance(doc.get("model_id"), str) else None
    lora = LoraRun(path, rank, float(alpha), float(dropout), targets, held, adapters, model_id)
    _check_adapter_shapes(checkpoint, lora, config)
    return lora


def lora_layout(checkpoint, lora, config):
    """[(PEFT key, training-form adapter name, index into it, shape of that slice)] of every adapter
    tensor: the layout of an adapter export (and of its optimizer state)."""
    num_experts = config.n_routed_experts or 0
    out = []
    for name in lora.adapters:
        stored = checkpoint.shape(f"model.{name}")
        for key, index in lora_peft_sources(name, num_experts):
            out.append((key, name, index, stored[len(index):]))
    return out


def _check_adapter_shapes(checkpoint, lora, config):
    """Each adapter holds, for every module it adapts (out x in), A [rank, in] and B [out, rank]; the
    stacked expert adapters hold exactly n_routed_experts of them."""
    linears = hf_linear_shapes(config)
    num_experts = config.n_routed_experts or 0
    for name in lora.adapters:
        stored = checkpoint.shape(f"model.{name}")
        for key, index in lora_peft_sources(name, num_experts):
            module, half, _ = key[len(PEFT_PREFIX):].rsplit(".", 2)
            if module not in linears:
                raise MergeError(f"{checkpoint.path}: adapter model.{name} is for {module}, which is not a linear layer "
                                 "of hf/config.json's model; the checkpoint does not match hf/config.json")
            out_features, in_features = linears[module]
            expected = (lora.rank, in_features) if half == "lora_A" else (out_features, lora.rank)
            if len(stored) != len(index) + 2 or (index and stored[0] != num_experts) or stored[len(index):] != expected:
                raise MergeError(f"{checkpoint.path}: adapter model.{name} has shape {list(stored)}, which does not hold "
                                 f"the {half} {list(expected)} of a rank-{lora.rank} adapter of {module}; the checkpoint "
                                 f"does not match hf/config.json's model or {lora.path}'s rank")


def peft_adapter_config(lora, base_model):
    """adapter_config.json: PEFT's LoraConfig fields. target_modules lists the adapted modules by full
    name (PEFT matches an entry equal to a module's name), so exactly those get adapters; PEFT's
    scaling lora_alpha / r is ours."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "revision": None,
            "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "target_modules": lora.modules,
            "bias": "none", "fan_in_fan_out": False, "modules_to_save": None, "init_lora_weights": True,
            "use_rslora": False, "use_dora": False, "layers_to_transform": None, "layers_pattern": None,
            "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True}


def write_adapter_weights(checkpoint, layout, out_dir, dtype):
    """adapter_model.safetensors: every adapter slice of `layout` under its PEFT key, in one file (PEFT
    reads no shards; adapters are small beside the model). Returns its size in bytes."""
    from safetensors.torch import save_file
    stored = checkpoint.read(sorted({f"model.{name}" for _, name, _, _ in layout}))
    values = {key: stored[f"model.{name}"][index].to(dtype or stored[f"model.{name}"].dtype, copy=True).contiguous()
              for key, name, index, _ in layout}
    path = os.path.join(out_dir, ADAPTER_WEIGHTS)
    save_file(values, path, metadata={"format": "pt"})
    _give_default_permissions(path)
    return sum(v.numel() * v.element_size() for v in values.values())


def open_base_weights(base_model, lora, config):
    """The Hugging Face weights of the run's base model (--base_model, else the --model_id lora.json
    records), checked to be the model of hf/config.json."""
    from modeling.hf_adapter import WeightReader, has_hf_weights
    from modeling.loading import load_config
    model_id = base_model or lora.model_id
    if model_id is None:
        raise MergeError("--merge_lora needs the base weights the adapters were trained on: pass --base_model DIR, the "
                         "run's --model_id (a directory with its safetensors)")
    if not os.path.isdir(model_id):
        raise MergeError(f"--base_model {model_id}: no such directory; pass the run's --model_id as a local directory "
                         "(download a hub model first: huggingface-cli download ID --local-dir DIR)")
    if not has_hf_weights(model_id):
        raise MergeError(f"--base_model {model_id} holds no weights (config.json only: such a run starts from seeded "
                         "random weights that are not saved); pass a directory with the base model's safetensors, or "
                         "export the adapter alone (leave out --merge_lora)")
    shapes = hf_parameter_shapes(config)
    if hf_parameter_shapes(load_config(model_id)) != shapes:
        raise MergeError(f"--base_model {model_id} is another model than the run's (its config.json gives other "
                         "parameter shapes than the checkpoint's hf/config.json); pass the run's --model_id")
    reader = WeightReader(model_id, config.n_routed_experts or 0)
    missing = [name for name in shapes if name not in reader.where]
    if missing:
        raise MergeError(f"--base_model {model_id}: its weights lack {missing[0]} ({len(missing)} tensor(s) missing); "
                         "pass the run's --model_id with its complete weights")
    return model_id, reader


class MergedLoraWeights:
    """The merged model's tensors for write_shards, by Hugging Face name: the base weight W, plus
    (B @ A) * alpha / rank, in fp32, where the run adapted W's module (the experts' adapters sliced
    out of their stacked tensors)."""

    def __init__(self, base, checkpoint, lora, config):
        self.base, self.checkpoint, self.scaling = base, checkpoint, lora.scaling
        self.shapes = hf_parameter_shapes(config)
        self.adapted = {f"{module}.weight": lora_module_sources(module) for module in lora.modules}

    def read(self, names):
        needed = sorted({f"model.{source}" for name in names for source, _ in self.adapted.get(name, ())})
        adapters = self.checkpoint.read(needed)
        out = {}
        for name in names:
            weight = self.base.read(name)
            if tuple(weight.shape) != self.shapes[name]:
                raise MergeError(f"{self.base.model_dir}: {name} has shape {list(weight.shape)}, the model of its "
                                 f"config.json needs {list(self.shapes[name])}; the weights and config.json disagree")
            weight = weight.to(torch.float32)
            if name in self.adapted:
                (a_name, a_index), (b_name, b_index) = self.adapted[name]
                lora_a = adapters[f"model.{a_name}"][a_index].to(torch.float32)
                lora_b = adapters[f"model.{b_name}"][b_index].to(torch.float32)
                weight = weight + (lora_b @ lora_a) * self.scaling  # PEFT's merge: W + (B @ A) * scaling
            out[name] = weight
        return out


# ---- writing ---------------------------------------------------------------------------------------------
def plan_shards(tensors, max_bytes):
    """Consecutive groups of at most max_bytes (a tensor larger than that gets a shard of its own)."""
    shards, current, size = [], [], 0
    for tensor in tensors:
        if current and size + tensor.nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(tensor)
        size += tensor.nbytes
    if current:
        shards.append(current)
    return shards


def write_shards(checkpoint, tensors, out_dir, prefix, max_bytes, dtype=None, progress=True, index_metadata=None):
    """Writes `tensors` as <prefix>-0000i-of-0000K.safetensors and <prefix>.safetensors.index.json;
    dtype None keeps each tensor's stored dtype. Returns the index."""
    from safetensors.torch import save_file
    from tqdm import tqdm
    shards = plan_shards(tensors, max_bytes)
    # A source (e.g. a layer's stacked experts) may feed several shards: keep it until its last use.
    uses_left = Counter(t.source for t in tensors)
    loaded = {}
    weight_map, total_size = {}, 0
    with tqdm(total=len(tensors), desc=f"write {prefix}", unit="tensor", disable=not progress, file=sys.stderr) as bar:
        for number, shard in enumerate(shards, start=1):
            loaded.update(checkpoint.read(sorted({t.source for t in shard} - set(loaded))))
            values = {}
            for tensor in shard:
                value = loaded[tensor.source][tensor.index]
                # copy: safetensors refuses tensors that share memory, and slices of one source do
                values[tensor.name] = value.to(dtype or value.dtype, copy=True).contiguous()
                uses_left[tensor.source] -= 1
                if uses_left[tensor.source] == 0:
                    del loaded[tensor.source]
                total_size += values[tensor.name].numel() * values[tensor.name].element_size()
                bar.update(1)
            file_name = f"{prefix}-{number:05d}-of-{len(shards):05d}.safetensors"
            save_file(values, os.path.join(out_dir, file_name), metadata={"format": "pt"})
            _give_default_permissions(os.path.join(out_dir, file_name))
            weight_map.update({name: file_name for name in values})
    index = {"metadata": {"total_size": total_size, **(index_metadata or {})}, "weight_map": weight_map}
    with open(os.path.join(out_dir, f"{prefix}.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
    return index


def _give_default_permissions(path):
    """safetensors creates its files readable by their owner only; give them the mode of the other
    files (0666 less the umask), so that whoever may read the directory can load the model."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def model_class_names(model_type):
    """(config, base model, causal LM) class names for config.json's auto_map."""
    from modeling import (DeepseekConfig, DeepseekForCausalLM, DeepseekModel, DeepseekV2Config, DeepseekV2ForCausalLM,
                          DeepseekV2Model)
    classes = {"deepseek_v2": (DeepseekV2Config, DeepseekV2Model, DeepseekV2ForCausalLM),
               "deepseek": (DeepseekConfig, DeepseekModel, DeepseekForCausalLM)}
    return tuple(c.__name__ for c in classes[model_type])


def auto_map(model_type):
    """config.json's auto_map: which class of the exported modeling files each Auto class loads."""
    config_class, base_class, causal_class = model_class_names(model_type)
    return {"AutoConfig": f"configuration_deepseek.{config_class}", "AutoModel": f"modeling_deepseek.{base_class}",
            "AutoModelForCausalLM": f"modeling_deepseek.{causal_class}"}


def write_config_files(hf_dir, out_dir, config, dtype):
    """config.json (as the run had it, plus auto_map, architectures and torch_dtype), the modeling
    files trust_remote_code imports, generation_config.json and the tokenizer files of hf/."""
    with open(os.path.join(hf_dir, "config.json")) as f:
        fields = json.load(f)
    fields["auto_map"] = auto_map(config.model_type)
    fields["architectures"] = [model_class_names(config.model_type)[2]]
    fields["torch_dtype"] = dtype_name(dtype)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(fields, f, indent=2, sort_keys=True)
        f.write("\n")
    for name in MODELING_FILES:
        shutil.copyfile(os.path.join(REPO, "modeling", name), os.path.join(out_dir, name))
    if os.path.isfile(os.path.join(hf_dir, "generation_config.json")):
        shutil.copyfile(os.path.join(hf_dir, "generation_config.json"), os.path.join(out_dir, "generation_config.json"))
    else:
        from transformers import GenerationConfig
        ids = {k: getattr(config, k, None) for k in ("bos_token_id", "eos_token_id")}
        GenerationConfig(**{k: v for k, v in ids.items() if v is not None}).save_pretrained(out_dir)
    copy_tokenizer_files(hf_dir, out_dir)


def copy_tokenizer_files(hf_dir, out_dir):
    """The tokenizer files the run kept in hf/ (every file there but the configs)."""
    for name in sorted(os.listdir(hf_dir)):
        if name not in NON_TOKENIZER_FILES and os.path.isfile(os.path.join(hf_dir, name)):
            shutil.copyfile(os.path.join(hf_dir, name), os.path.join(out_dir, name))


# ---- the output directory ----------------------------------------------------------------------------
def check_output_dir(output_dir, ckpt_dir, overwrite):
    out, ckpt = os.path.realpath(output_dir), os.path.realpath(ckpt_dir)
    if out == ckpt or ckpt.startswith(out + os.sep) or out.startswith(ckpt + os.sep):
        raise MergeError(f"--output_dir {output_dir} overlaps the checkpoint {ckpt_dir}; pick a directory outside it")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise MergeError(f"--output_dir {output_dir} is a file; pick a directory")
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise MergeError(f"--output_dir {output_dir} is not empty; pass --overwrite to replace it, or pick another "
                         "directory")


def publish(partial, output_dir):
    """Puts the finished OUT.partial in place of OUT (an existing OUT is removed only afterwards)."""
    if os.path.exists(output_dir):
        old = output_dir.rstrip(os.sep) + ".replaced"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(output_dir, old)
        os.replace(partial, output_dir)
        shutil.rmtree(old)
    else:
        os.replace(partial, output_dir)


# ---- the merge ------------------------------------------------------------------------------------------
def merge_checkpoint(ckpt_dir, output_dir, dtype=None, max_shard_size="5GB", overwrite=False, optimizer=False,
                     merge_lora=False, base_model=None, progress=True):
    """Writes the Hugging Face checkpoint of `ckpt_dir` to `output_dir` (see the module doc); returns
    the output directory. dtype: "bf16", "fp32" or None (the checkpoint's dtype). A LoRA checkpoint
    gives a PEFT adapter directory, or with merge_lora the merged weights on base_model's."""
    from modeling.loading import load_config
    max_bytes = parse_size(max_shard_size)
    out_dtype = parse_dtype(dtype) if dtype is not None else None
    if merge_lora and optimizer:
        raise MergeError("--optimizer with --merge_lora: the optimizer state belongs to the adapters, which merged "
                         "weights no longer have; export the adapter (leave out --merge_lora) to get it")
    ckpt_dir, committed = resolve_checkpoint(ckpt_dir)
    check_output_dir(output_dir, ckpt_dir, overwrite)
    hf_dir = os.path.join(ckpt_dir, "hf")
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise MergeError(f"{hf_dir}/config.json missing: the checkpoint was saved by an older trainer; copy the run's "
                         "--model_id config.json there")
    verify_files(ckpt_dir, committed, progress)
    config = load_config(hf_dir)

    checkpoint = CheckpointTensors(ckpt_dir)
    lora = read_lora(ckpt_dir, checkpoint, config)
    if lora is None and (merge_lora or base_model is not None):
        flag = "--merge_lora" if merge_lora else "--base_model"
        raise MergeError(f"{flag}: {ckpt_dir} is not a LoRA checkpoint (no {LORA_FILE}): its weights are complete; "
                         f"merge it without {flag}")
    if out_dtype is None:  # the stored dtype (fp32 master weights): a bitwise copy
        stored = {checkpoint.dtype(k) for k in checkpoint.entries if k.startswith("model.")}
        out_dtype = stored.pop() if len(stored) == 1 else torch.float32
    if lora is not None and not merge_lora:
        return _export_adapter(checkpoint, lora, config, committed, output_dir, out_dtype, max_bytes, optimizer,
                               base_model, progress)
    if lora is not None:
        base_id, base = open_base_weights(base_model, lora, config)
        reader = MergedLoraWeights(base, checkpoint, lora, config)
        weights = [OutputTensor(name, name, (), _numel(shape) * out_dtype.itemsize)
                   for name, shape in hf_parameter_shapes(config).items()]
        what = f"{len(lora.modules)} adapted module(s) merged onto {base_id}"
    else:
        reader, weights, what = checkpoint, model_tensors(checkpoint, config, out_dtype), None
    layout = parameter_layout(config)
    optimizer_state = optimizer_tensors(checkpoint, layout) if optimizer else None

    def write(partial):
        index = write_shards(reader, weights, partial, MODEL_PREFIX, max_bytes, out_dtype, progress)
        if optimizer_state is not None:
            write_shards(checkpoint, optimizer_state, partial, OPTIMIZER_PREFIX, max_bytes, None, progress,
                         index_metadata={"step": committed.get("step"),
                                         "param_groups": optimizer_param_groups(checkpoint, layout)})
        write_config_files(hf_dir, partial, config, out_dtype)
        return index

    index = write_atomically(output_dir, write)
    shards = len(set(index["weight_map"].values()))
    print(f"merged {ckpt_dir} (step {committed.get('step')}) -> {output_dir}: {len(weights)} tensors, "
          f"{index['metadata']['total_size'] / 1e9:.3f} GB {dtype_name(out_dtype)} in {shards} shard(s)"
          + (f", {what}" if what else "") + (", with the optimizer state" if optimizer else ""), file=sys.stderr)
    return output_dir


def _export_adapter(checkpoint, lora, config, committed, output_dir, out_dtype, max_bytes, optimizer, base_model,
                    progress):
    """A LoRA checkpoint -> a PEFT adapter directory (LORA_LAYOUT)."""
    if base_model is not None and os.path.isdir(base_model):  # named in adapter_config.json: check it is the model
        from modeling.loading import load_config
        if hf_parameter_shapes(load_config(base_model)) != hf_parameter_shapes(config):
            raise MergeError(f"--base_model {base_model} is another model than the run's (its config.json gives other "
                             "parameter shapes than the checkpoint's hf/config.json); pass the run's --model_id")
    layout = lora_layout(checkpoint, lora, config)
    optimizer_state = optimizer_tensors(checkpoint, layout) if optimizer else None
    base_name = base_model or lora.model_id

    def write(partial):
        size = write_adapter_weights(checkpoint, layout, partial, out_dtype)
        with open(os.path.join(partial, ADAPTER_CONFIG), "w") as f:
            json.dump(peft_adapter_config(lora, base_name), f, indent=2)
            f.write("\n")
        if optimizer_state is not None:
            write_shards(checkpoint, optimizer_state, partial, OPTIMIZER_PREFIX, max_bytes, None, progress,
                         index_metadata={"step": committed.get("step"),
                                         "param_groups": optimizer_param_groups(checkpoint, layout)})
        copy_tokenizer_files(os.path.join(checkpoint.path, "hf"), partial)
        return size

    size = write_atomically(output_dir, write)
    print(f"exported the LoRA adapter of {checkpoint.path} (step {committed.get('step')}) -> {output_dir}: rank "
          f"{lora.rank}, alpha {lora.alpha:g}, {len(lora.modules)} module(s), {len(layout)} tensors, {size / 1e6:.3f} MB "
          f"{dtype_name(out_dtype)}" + (", with the optimizer state" if optimizer else "")
          + "; load it with peft.PeftModel.from_pretrained(base model, OUT)", file=sys.stderr)
    return output_dir


def write_atomically(output_dir, write):
    """Runs write(OUT.partial) and puts the finished directory in place of OUT; on any failure nothing
    is left (an interrupted merge never leaves a directory named OUT that looks complete)."""
    partial = output_dir.rstrip(os.sep) + ".partial"
    shutil.rmtree(partial, ignore_errors=True)  # left by an interrupted merge
    os.makedirs(partial)
    try:
        result = write(partial)
        publish(partial, output_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return result


def build_parser():
    p = argparse.ArgumentParser(
        prog="merge_ckpt.py",
        description="""\
Merge a sharded training checkpoint (torch.distributed.checkpoint, written by train.py) into a
Hugging Face checkpoint directory that AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)
loads: safetensors shards with model.safetensors.index.json, routed experts split back to
model.layers.L.mlp.experts.i.{gate,up,down}_proj.weight, config.json, the modeling code,
generation_config.json and the run's tokenizer files. Every shard's size and CRC-32 are checked
against the COMMITTED marker first. Runs on a CPU; memory peaks at about one output shard. A LoRA
run's checkpoint becomes a PEFT adapter directory, or with --merge_lora the merged weights.""",
        epilog=OPTIMIZER_LAYOUT + "\n\n" + LORA_LAYOUT, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt_dir", required=True, metavar="DIR",
                   help="a committed checkpoint (SAVE_DIR/step_00000020, with its COMMITTED marker), or a save dir "
                        "to merge the checkpoint its `last` pointer names")
    p.add_argument("--output_dir", required=True, metavar="OUT",
                   help="the Hugging Face directory to write; must be empty or absent unless --overwrite "
                        "(written as OUT.partial, renamed when complete)")
    p.add_argument("--dtype", default=None, metavar="{bf16,fp32}",
                   help="bf16 or fp32: the dtype of the written weights (default: the checkpoint's, fp32 master "
                        "weights, so the merge is bitwise exact)")
    p.add_argument("--max_shard_size", default="5GB", metavar="SIZE",
                   help="largest safetensors file, e.g. 5GB, 500MB, 100KB, 4GiB or a number of bytes; a tensor "
                        "larger than this gets a file of its own (default: 5GB)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --output_dir (only once the new one is complete)")
    p.add_argument("--optimizer", action="store_true",
                   help="also write the optimizer state (layout below)")
    p.add_argument("--merge_lora", action="store_true",
                   help="for a LoRA run: write the full merged weights W + (alpha / rank) * B @ A as a Hugging Face "
                        "checkpoint instead of the PEFT adapter directory (needs --base_model)")
    p.add_argument("--base_model", default=None, metavar="DIR",
                   help="for a LoRA run: the run's --model_id, a directory with the base weights the adapters were "
                        "trained on (needed by --merge_lora; named in adapter_config.json otherwise)")
    return p


def _main(argv=None):
    args = build_parser().parse_args(argv)
    merge_checkpoint(args.ckpt_dir, args.output_dir, dtype=args.dtype, max_shard_size=args.max_shard_size,
                     overwrite=args.overwrite, optimizer=args.optimizer, merge_lora=args.merge_lora,
                     base_model=args.base_model)
    return 0


def main(argv=None):
    """The command line: exit status 0, or 2 with one line naming the problem and the fix."""
    return run_cli(_main, argv, prog="merge_ckpt.py")


if __name__ == "__main__":
    sys.exit(main())
