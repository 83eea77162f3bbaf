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

User errors (bad flags, missing or corrupt checkpoint, occupied output) raise MergeError; the command
line prints its one-line message (which names the path and the fix) and exits with status 2.
"""

import argparse
import json
import os
import re
import shutil
import sys
import warnings
from collections import Counter
from dataclasses import dataclass

import torch

from errors import UserError, run_cli
from modeling.hf_adapter import training_source

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

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
# config.json files the run kept in hf/ that are not tokenizer files
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


def optimizer_tensors(checkpoint, config):
    """exp_avg, exp_avg_sq and step of every parameter that has optimizer state, experts split."""
    out = []
    for name, shape in hf_parameter_shapes(config).items():
        train_name, index = training_source(name)
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


def optimizer_param_groups(checkpoint, config):
    """AdamW hyperparameters as torch's param_groups: [{lr, betas, ..., "params": [HF names]}]."""
    keys = [k for k in checkpoint.entries if k.startswith("optim.param_groups.")]
    values = checkpoint.read(keys)
    per_param = {}
    for key, value in values.items():
        train_name, _, hyper = key[len("optim.param_groups."):].rpartition(".")
        per_param.setdefault(train_name, {})[hyper] = value.item() if isinstance(value, torch.Tensor) else value
    groups = {}
    for name in hf_parameter_shapes(config):
        hypers = per_param.get(training_source(name)[0])
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


def write_config_files(hf_dir, out_dir, config, dtype):
    """config.json (as the run had it, plus auto_map, architectures and torch_dtype), the modeling
    files trust_remote_code imports, generation_config.json and the tokenizer files of hf/."""
    with open(os.path.join(hf_dir, "config.json")) as f:
        fields = json.load(f)
    config_class, base_class, causal_class = model_class_names(config.model_type)
    fields["auto_map"] = {"AutoConfig": f"configuration_deepseek.{config_class}",
                          "AutoModel": f"modeling_deepseek.{base_class}",
                          "AutoModelForCausalLM": f"modeling_deepseek.{causal_class}"}
    fields["architectures"] = [causal_class]
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
                     progress=True):
    """Writes the Hugging Face checkpoint of `ckpt_dir` to `output_dir` (see the module doc); returns
    the output directory. dtype: "bf16", "fp32" or None (the checkpoint's dtype)."""
    from modeling.loading import load_config
    max_bytes = parse_size(max_shard_size)
    out_dtype = parse_dtype(dtype) if dtype is not None else None
    ckpt_dir, committed = resolve_checkpoint(ckpt_dir)
    check_output_dir(output_dir, ckpt_dir, overwrite)
    hf_dir = os.path.join(ckpt_dir, "hf")
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise MergeError(f"{hf_dir}/config.json missing: the checkpoint was saved by an older trainer; copy the run's "
                         "--model_id config.json there")
    verify_files(ckpt_dir, committed, progress)
    config = load_config(hf_dir)

    checkpoint = CheckpointTensors(ckpt_dir)
    if out_dtype is None:  # the stored dtype (fp32 master weights): a bitwise copy
        stored = {checkpoint.dtype(k) for k in checkpoint.entries if k.startswith("model.")}
        out_dtype = stored.pop() if len(stored) == 1 else torch.float32
    weights = model_tensors(checkpoint, config, out_dtype)
    optimizer_state = optimizer_tensors(checkpoint, config) if optimizer else None

    partial = output_dir.rstrip(os.sep) + ".partial"
    shutil.rmtree(partial, ignore_errors=True)  # left by an interrupted merge
    os.makedirs(partial)
    try:
        index = write_shards(checkpoint, weights, partial, MODEL_PREFIX, max_bytes, out_dtype, progress)
        if optimizer_state is not None:
            write_shards(checkpoint, optimizer_state, partial, OPTIMIZER_PREFIX, max_bytes, None, progress,
                         index_metadata={"step": committed.get("step"),
                                         "param_groups": optimizer_param_groups(checkpoint, config)})
        write_config_files(hf_dir, partial, config, out_dtype)
        publish(partial, output_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shards = len(set(index["weight_map"].values()))
    print(f"merged {ckpt_dir} (step {committed.get('step')}) -> {output_dir}: {len(weights)} tensors, "
          f"{index['metadata']['total_size'] / 1e9:.3f} GB {dtype_name(out_dtype)} in {shards} shard(s)"
          + (", with the optimizer state" if optimizer else ""), file=sys.stderr)
    return output_dir


def build_parser():
    p = argparse.ArgumentParser(
        prog="merge_ckpt.py",
        description="""\
Merge a sharded training checkpoint (torch.distributed.checkpoint, written by train.py) into a
Hugging Face checkpoint directory that AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)
loads: safetensors shards with model.safetensors.index.json, routed experts split back to
model.layers.L.mlp.experts.i.{gate,up,down}_proj.weight, config.json, the modeling code,
generation_config.json and the run's tokenizer files. Every shard's size and CRC-32 are checked
against the COMMITTED marker first. Runs on a CPU; memory peaks at about one output shard.""",
        epilog=OPTIMIZER_LAYOUT, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    return p


def _main(argv=None):
    args = build_parser().parse_args(argv)
    merge_checkpoint(args.ckpt_dir, args.output_dir, dtype=args.dtype, max_shard_size=args.max_shard_size,
                     overwrite=args.overwrite, optimizer=args.optimizer)
    return 0


def main(argv=None):
    """The command line: exit status 0, or 2 with one line naming the problem and the fix."""
    return run_cli(_main, argv, prog="merge_ckpt.py")


if __name__ == "__main__":
    sys.exit(main())
