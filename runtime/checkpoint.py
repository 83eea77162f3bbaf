"""Sharded checkpoints with torch.distributed.checkpoint, atomic by a commit marker.

    <save_dir>/step_00000012/          one checkpoint: DCP shards of model and optimizer, per-rank
                                       extras (LR schedule, step, RNG states), hf/ and COMMITTED
    <save_dir>/step_00000012/hf/       what merge_ckpt.py needs besides tensors: config.json, and the
                                       generation config and tokenizer files when the run had them
    <save_dir>/last                    the name of the newest committed checkpoint

Keys in the DCP checkpoint are "model.<name>" (the training form's parameter names, full global
shapes whatever the plan: experts as gate_up_proj_E2FD [E, 2, F, D] and down_proj_EDF [E, D, F])
and "optim.state.<name>.<exp_avg|exp_avg_sq|step>", "optim.param_groups.<name>.<hyperparameter>".
COMMITTED is JSON: step, world_size, and files: {relative path: {"bytes", "crc32"}} for every
file of the checkpoint, so a missing, truncated or altered shard is named when it is read back.
A LoRA run's checkpoint holds only what it trains (the adapters and their optimizer state; the
frozen base weights come from --model_id) and `lora.json` (`lora_file`: its rank, alpha, dropout,
targets and the Hugging Face modules adapted), checksummed with the rest; a resume must continue
the same adapters (`check_lora`).

Every rank writes into `step_N.partial/`; after a barrier rank 0 writes the COMMITTED marker and
renames the directory to `step_N`, then moves the `last` pointer (write to a temporary file, then
os.replace). A run killed during a save leaves a `.partial` directory that nothing reads, and the
previous checkpoint and pointer untouched.

Lineage and --keep_last K. COMMITTED also names the checkpoint a save descends from ("parent": the one
this run saved before it, else the one it resumed from, when that one is in the same --save_dir; null
otherwise). After each save, K counts the lineage of the checkpoint just written (it, its parent, the
parent's parent, ...): the newest K of that chain are kept and older ones of the chain deleted, except
the checkpoint this run resumed from, which is kept while the run lasts. Checkpoints outside the chain
(another run's, or the newer steps of a future abandoned by resuming from an earlier step) are neither
counted nor deleted; a save of step N replaces an existing step_N. `last` always names the checkpoint
just written.

Resuming reads nothing it has not checked: every file COMMITTED lists must have its recorded size and
CRC-32 (`verify`, shared with merge_ckpt.py), DCP's `.metadata` is unpickled admitting only the classes
DCP's metadata is made of, and non-tensor entries are read with torch.load(weights_only=True)
(`SafeReader`, `SafeLoadPlanner`): a checkpoint never runs code. What a resume restores: weights, AdamW
moments, the step (and with it the data position and the LR schedule's position) and the RNG states.
The hyperparameters (--lr, --weight_decay, --warmup_steps, AdamW's kind) are the run's flags, never the
checkpoint's: resuming with a lower --lr lowers it.
"""

import json
import os
import pickle
import re
import shutil
import sys
import zlib

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from errors import UserError, read_json
from modeling import hf_adapter
from runtime.expert_parallel import ExpertParallelExperts

# Optimizer state keyed by parameter name (hyperparameters too): what each rank holds is then
# self-describing, whichever modules (pipeline stages) the rank has.
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
# A LoRA run saves only what it trains: the frozen base weights come from --model_id (its Hugging
# Face weights, or the seeded initialisation) and are never written, so a load leaves them missing.
_LORA_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True, ignore_frozen_params=True, strict=False)
LORA_FILE = "lora.json"  # in a LoRA checkpoint: {"rank", "alpha", "dropout", "targets", "modules"}


def _options_for(module):
    return _LORA_OPTIONS if any(not p.requires_grad for p in module.parameters()) else _OPTIONS

COMMIT_MARKER = "COMMITTED"
LAST_POINTER = "last"


class CheckpointError(UserError):
    pass


_NAME = re.compile(r"step_\d{8}")


def _name(step):
    return f"step_{step:08d}"


def check_options(args):
    """The checkpoint flags of a run, before any heavy work."""
    if args.keep_last is not None and args.keep_last < 1:
        raise CheckpointError(f"--keep_last {args.keep_last}: keep at least 1 checkpoint (the one just saved "
                              "counts); leave --keep_last out to keep them all")


def save(save_dir, step, modules, optimizer, scheduler, keep_last=None, hf_files=None, ep_mesh=None, parent=None,
         protect=None, lora=None):
    """hf_files: {name in hf/: source path or bytes}, written by rank 0. ep_mesh: see _state.
    parent: the checkpoint directory this one descends from (the run's previous save, else the one it
    resumed from); protect: one --keep_last never deletes (the one the run resumed from). See the
    module doc for the --keep_last rule. lora: a LoRA run's lora.json (`lora_file`), written by rank 0;
    the model state then holds only the adapters."""
    rank = dist.get_rank()
    final = os.path.join(save_dir, _name(step))
    partial = final + ".partial"
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
    dist.barrier()
    model_state, optim_state, _ = _state(modules, optimizer, ep_mesh)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=partial)
    extra = f"extra_rank{rank:05d}.pt"
    torch.save({"scheduler": scheduler.state_dict(), "step": step, "torch_rng": torch.get_rng_state()},
               os.path.join(partial, extra))
    if rank == 0 and hf_files:
        _write_hf_files(os.path.join(partial, "hf"), hf_files)
    if rank == 0 and lora is not None:
        with open(os.path.join(partial, LORA_FILE), "w") as f:
            json.dump(lora, f, indent=1)
    _commit(save_dir, step, partial, final, extra, bool(hf_files), keep_last, parent, protect)
    dist.barrier()
    return final


def _in_save_dir(path, save_dir):
    """The name of checkpoint `path` if it is a step_N directory of `save_dir`, else None."""
    if path is None:
        return None
    path = os.path.realpath(path)
    name = os.path.basename(path)
    return name if _NAME.fullmatch(name) and os.path.dirname(path) == os.path.realpath(save_dir) else None


def _commit(save_dir, step, partial, final, extra, has_hf, keep_last, parent=None, protect=None):
    """The second half of `save`, on every rank once all its shards are in `partial`: checksum them,
    write the COMMITTED marker (rank 0), rename `partial` to `final` and move the `last` pointer.
    Until it does, the save can be killed and nothing reads what it wrote."""
    rank = dist.get_rank()
    # Each rank checksums what it wrote (its DCP shard files and extras; rank 0 also the DCP metadata
    # and hf/), so the reading is spread over the ranks and rank 0 gathers only the results.
    mine = [extra] + sorted(f for f in os.listdir(partial) if f.startswith(f"__{rank}_"))
    if rank == 0:
        mine.append(".metadata")
        if os.path.isfile(os.path.join(partial, LORA_FILE)):
            mine.append(LORA_FILE)
        if has_hf:
            mine += [os.path.join("hf", f) for f in sorted(os.listdir(os.path.join(partial, "hf")))]
    sums = {f: file_checksum(os.path.join(partial, f)) for f in mine}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, sums)
    if rank == 0:
        files = {k: v for part in gathered for k, v in part.items()}
        with open(os.path.join(partial, COMMIT_MARKER), "w") as f:
            json.dump({"step": step, "world_size": dist.get_world_size(), "parent": _in_save_dir(parent, save_dir),
                       "files": dict(sorted(files.items()))}, f, indent=1)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        tmp = os.path.join(save_dir, LAST_POINTER + ".tmp")
        with open(tmp, "w") as f:
            f.write(_name(step) + "\n")
        os.replace(tmp, os.path.join(save_dir, LAST_POINTER))
        if keep_last:
            kept = {_name(step), _in_save_dir(protect, save_dir)}
            for old in lineage(save_dir, _name(step))[keep_last:]:
                if old not in kept:
                    shutil.rmtree(os.path.join(save_dir, old), ignore_errors=True)


def lineage(save_dir, name):
    """[name, its parent, the parent's parent, ...]: the committed checkpoints of `save_dir` that
    `name` descends from, newest first. The chain ends at a checkpoint that is missing, uncommitted, has
    no parent, or names a parent that is not an older step_N of the same directory (so a damaged or
    crafted marker can never point the deletion elsewhere)."""
    chain = []
    while name is not None and _NAME.fullmatch(name) and (not chain or name < chain[-1]):
        marker = os.path.join(save_dir, name, COMMIT_MARKER)
        try:
            with open(marker) as f:
                parent = json.load(f).get("parent")
        except (OSError, ValueError, AttributeError):
            break
        chain.append(name)
        name = parent if isinstance(parent, str) else None
    return chain


def file_checksum(path, chunk=1 << 24, on_block=None):
    """{"bytes": size, "crc32": CRC-32 of the contents} (streamed: shards can be many GiB);
    on_block(n) is called after each block read, for a progress bar."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
            if on_block is not None:
                on_block(len(block))
    return {"bytes": os.path.getsize(path), "crc32": crc}


def last_pointer_target(save_dir):
    """The checkpoint directory a save dir's `last` pointer names, or None without a pointer."""
    pointer = os.path.join(save_dir, LAST_POINTER)
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        return os.path.join(save_dir, f.read().strip())


def read_commit(ckpt_dir, error=CheckpointError):
    """The COMMITTED record of a checkpoint directory, checked for the shape the trainer writes."""
    marker = os.path.join(ckpt_dir, COMMIT_MARKER)
    committed = read_json(marker, error, "the marker is damaged; use an earlier checkpoint")
    files = committed.get("files") if isinstance(committed, dict) else None
    if not isinstance(files, dict) or not files or not isinstance(committed.get("step"), int) or not all(
            isinstance(v, dict) and isinstance(v.get("bytes"), int) and isinstance(v.get("crc32"), int)
            for v in files.values()):
        raise error(f"{marker} is damaged (not the JSON the trainer writes); use an earlier checkpoint")
    return committed


def verify(ckpt_dir, committed, error=CheckpointError, progress=False, share=(0, 1)):
    """Every file COMMITTED lists exists with the recorded size and CRC-32 (computed by file_checksum
    when the checkpoint was saved), else `error` names the first bad file and the fix. share=(i, n):
    check only the i-th of every n files (in name order), so that n ranks split the reading."""
    from tqdm import tqdm
    index, count = share
    files = dict(sorted(committed["files"].items())[index::count])
    missing = [name for name in files if not os.path.isfile(os.path.join(ckpt_dir, name))]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise error(f"{ckpt_dir}: {shown} listed in COMMITTED but missing; copy the checkpoint again in full "
                    "from where the run saved it, or use an earlier checkpoint")
    # sizes first: a truncated copy is then named without reading gigabytes
    for name, expected in files.items():
        path = os.path.join(ckpt_dir, name)
        if os.path.getsize(path) != expected["bytes"]:
            raise error(f"{path} is corrupt (truncated or altered): {os.path.getsize(path)} bytes where "
                        f"COMMITTED records {expected['bytes']}; copy it again from where the run saved it, "
                        "or use an earlier checkpoint")
    bar = tqdm(total=sum(e["bytes"] for e in files.values()), desc="verify", unit="B", unit_scale=True,
               disable=not progress, file=sys.stderr)
    with bar:
        for name, expected in files.items():
            path = os.path.join(ckpt_dir, name)
            crc = file_checksum(path, on_block=bar.update)["crc32"]
            if crc != expected["crc32"]:
                raise error(f"{path} is corrupt: its CRC-32 {crc} differs from the {expected['crc32']} "
                            "recorded in COMMITTED; copy it again from where the run saved it, or use an "
                            "earlier checkpoint")


# ---- reading a checkpoint without running code from it ------------------------------------------------------
# What DCP's .metadata pickle is made of (torch/distributed/checkpoint/metadata.py, filesystem.py): the
# dataclasses of the metadata, torch.Size, dtypes / layouts / memory formats, and the path it was saved to.
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                              "ChunkStorageMetadata", "TensorProperties", "MetadataIndex",
                                              "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # a layout by its name
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset"},
}
_TORCH_CONSTANTS = {name for name, value in vars(torch).items()
                    if isinstance(value, (torch.dtype, torch.layout, torch.memory_format))}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if name in _METADATA_CLASSES.get(module, ()) or (module == "torch" and name in _TORCH_CONSTANTS):
            return super().find_class(module, name)
        raise _Refused(f"{module}.{name}")


class _Refused(pickle.UnpicklingError):
    pass


def read_metadata_file(stream, path):
    """DCP's Metadata from an open .metadata file, admitting only the classes it is made of."""
    from torch.distributed.checkpoint.metadata import Metadata
    try:
        metadata = _MetadataUnpickler(stream).load()
    except _Refused as e:
        raise CheckpointError(f"{path} names {e}, which DCP's metadata never holds: refused unread (unpickling it "
                              "could run code); use a checkpoint written by train.py, copied from where the run "
                              "saved it") from None
    except Exception as e:  # any malformed pickle
        raise CheckpointError(f"{path} is damaged (not DCP metadata: {type(e).__name__}: {e}); copy it again "
                              "from where the run saved it, or use an earlier checkpoint") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise CheckpointError(f"{path} is damaged (not DCP metadata: a {type(metadata).__name__}); copy it again "
                              "from where the run saved it, or use an earlier checkpoint")
    return metadata


class SafeReader(FileSystemReader):
    """DCP's file-system reader whose .metadata is read by `read_metadata_file`."""

    def read_metadata(self, *args, **kwargs):
        from torch.distributed.checkpoint.metadata import StorageMeta
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = read_metadata_file(f, path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner, reading non-tensor entries (the optimizer's hyperparameters) with
    torch.load(weights_only=True) where DCP uses weights_only=False."""

    def load_bytes(self, read_item, value):
        from torch.distributed.checkpoint._traverse import set_element
        key = read_item.dest_index.fqn
        try:
            loaded = torch.load(value, weights_only=True)
        except Exception as e:
            raise CheckpointError(f"checkpoint entry {key} is not plain data ({type(e).__name__}): refused unread "
                                  "(loading it could run code); use a checkpoint written by train.py") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[key], loaded)
        else:
            self.state_dict[key] = loaded


def read_state(state, checkpoint, no_dist=False):
    """dcp.load of `state` from `checkpoint` (a directory, or its SafeReader) with SafeLoadPlanner; a
    refusal comes out as the CheckpointError it is, not wrapped in DCP's CheckpointException."""
    reader = checkpoint if isinstance(checkpoint, SafeReader) else SafeReader(checkpoint)
    try:
        dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(), no_dist=no_dist)
    except CheckpointException as e:
        for failure in e.failures.values():
            if isinstance(failure[0], CheckpointError):
                raise CheckpointError(str(failure[0])) from None
        raise


def _write_hf_files(hf_dir, hf_files):
    os.makedirs(hf_dir, exist_ok=True)
    for name, source in hf_files.items():
        target = os.path.join(hf_dir, name)
        if isinstance(source, bytes):
            with open(target, "wb") as f:
                f.write(source)
        else:
            shutil.copyfile(source, target)


def _state(modules, optimizer, ep_mesh=None):
    """This rank's model and optimizer state for DCP, every tensor in its global form.

    FSDP's DTensors already are. Expert-parallel experts are not: each ep rank holds a different
    slice of the expert dimension under the same name (a plain tensor, or a DTensor sharded only over
    the data ranks that share those experts). Given ep_mesh (the 1-D ep mesh), they are presented
    as DTensors Shard(0) over it, so DCP writes them as slices of one [E, ...] tensor (ranks holding
    the same experts write it once) and can reshard them for any other plan. Returns (model_state,
    optim_state, local_forms): local_forms maps each converted key to the tensor it came from, which
    `_to_local_forms` needs after a load."""
    model_state, optim_state = {}, {}
    for module in modules:
        m, o = get_state_dict(module, optimizer, options=_options_for(module))
        model_state.update(m)
        optim_state = o  # one optimizer over all of this rank's modules
    local_forms = {}
    if ep_mesh is not None:
        names = _expert_parameter_names(modules)
        for state, key_of in ((model_state, lambda n: [n]),
                              (optim_state, lambda n: [f"state.{n}.exp_avg", f"state.{n}.exp_avg_sq"])):
            for name in names:
                for key in key_of(name):
                    if key in state:
                        local_forms[key] = state[key]
                        state[key] = _global_experts(state[key], ep_mesh)
    return model_state, optim_state, local_forms


def _expert_parameter_names(modules):
    names = []
    for module in modules:
        for prefix, sub in module.named_modules():
            if isinstance(sub, ExpertParallelExperts):
                names += [f"{prefix}.{n}" for n, _ in sub.named_parameters(recurse=False)]
    return sorted(names)


def _global_experts(tensor, ep_mesh):
    # This ep rank's experts in full (gathered over the data ranks if ZeRO shards them), as its
    # slice of the [E, ...] tensor.
    local = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
    return DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False)


def _to_local_forms(state, local_forms):
    """After a load: each converted entry back to the form the module and optimizer hold."""
    for key, original in local_forms.items():
        loaded = state[key].to_local()
        if isinstance(original, DTensor):  # this rank's ZeRO shard of the loaded experts
            loaded = distribute_tensor(loaded, original.device_mesh, original.placements, src_data_rank=None)
        state[key] = loaded


def resolve(resume_path, save_dir):
    """--resume_path DIR or `last` -> a committed checkpoint directory (errors name the path and fix)."""
    if resume_path == "last":
        resume_path = last_pointer_target(save_dir)
        if resume_path is None:
            raise CheckpointError(f"--resume_path last: no {os.path.join(save_dir, LAST_POINTER)}; no checkpoint "
                                  f"was committed in --save_dir {save_dir}")
    if not os.path.isdir(resume_path):
        raise CheckpointError(f"--resume_path {resume_path}: no such checkpoint directory")
    if not os.path.isfile(os.path.join(resume_path, COMMIT_MARKER)):
        raise CheckpointError(f"--resume_path {resume_path} has no {COMMIT_MARKER} marker: the save did not finish; "
                              f"resume from an earlier checkpoint or from `last`")
    return resume_path


def open_resume(resume_path, save_dir):
    """--resume_path -> (checkpoint directory, its COMMITTED record), once every file it lists has been
    checked (the ranks split the reading) and its DCP metadata read safely; every rank raises the same
    CheckpointError otherwise. Nothing heavy has been built yet when this runs."""
    path = resolve(resume_path, save_dir)
    rank, world = dist.get_rank(), dist.get_world_size()
    problem = None
    try:
        committed = read_commit(path)
        verify(path, committed, share=(rank, world))
        SafeReader(path).read_metadata()
    except CheckpointError as e:
        problem = str(e)
    except OSError as e:  # every rank must reach the gather below, whatever went wrong
        problem = f"{e.filename or path}: cannot be read ({e.strerror}); check its permissions, or use an earlier checkpoint"
    problems = [None] * world
    dist.all_gather_object(problems, problem)
    first = next((p for p in problems if p is not None), None)
    if first is not None:
        raise CheckpointError(first)
    return path, committed


def load(path, modules, optimizer, scheduler, ep_mesh=None):
    """Restores this rank's shards (resharded by DCP if the plan differs), the step and RNG states;
    the hyperparameters stay the run's (see the module doc). Returns the saved step."""
    run_hyperparameters = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    model_state, optim_state, local_forms = _state(modules, optimizer, ep_mesh)
    state = {"model": model_state, "optim": optim_state}
    read_state(state, path)
    _to_local_forms(state["model"], {k: v for k, v in local_forms.items() if k in model_state})
    _to_local_forms(state["optim"], {k: v for k, v in local_forms.items() if k in optim_state})
    for module in modules:
        options = _options_for(module)
        keys = set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                              options=options)
        if options is _LORA_OPTIONS:  # not strict: only the frozen base weights may be missing
            frozen = {name for name, p in module.named_parameters() if not p.requires_grad}
            missing = sorted(set(keys.missing_keys) - frozen)
            if missing:
                raise CheckpointError(f"{path}: the adapter {missing[0]} (and {len(missing) - 1} more) is missing from "
                                      "the checkpoint; resume with the LoRA options it was saved with, or use "
                                      "another checkpoint")

    rank = dist.get_rank()
    extra_path = os.path.join(path, f"extra_rank{rank:05d}.pt")
    if os.path.isfile(extra_path):
        extra = torch.load(extra_path, weights_only=True)
        torch.set_rng_state(extra["torch_rng"])
    else:  # a different world size: the schedule and step are the same on every rank
        extra = torch.load(os.path.join(path, "extra_rank00000.pt"), weights_only=True)
    scheduler.load_state_dict(_fit_param_groups(extra["scheduler"], len(optimizer.param_groups), path))
    _use_run_hyperparameters(optimizer, scheduler, run_hyperparameters)
    return extra["step"]


def _use_run_hyperparameters(optimizer, scheduler, hyperparameters):
    """After a load: the optimizer's hyperparameters back to the run's (the checkpoint's param_groups
    and the schedule's base_lrs hold the saving run's), and the learning rate of the schedule's
    position recomputed from the run's --lr and --warmup_steps, as LambdaLR itself computes it."""
    for group, run in zip(optimizer.param_groups, hyperparameters):
        group.update(run)
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    lrs = [base * factor(scheduler.last_epoch) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


def _fit_param_groups(scheduler_state, groups, path):
    """The LR schedule saved under another plan can have another number of optimizer parameter
    groups (the optimizer makes one per device mesh). The schedule is the same for every group, so
    its per-group lists are widened or narrowed to this plan's count."""
    state = dict(scheduler_state)
    for key in ("base_lrs", "_last_lr"):
        values = state.get(key)
        if values is None or len(values) == groups:
            continue
        if len(set(values)) != 1:
            raise CheckpointError(f"{path}: the saved LR schedule has different values per parameter group "
                                  f"({key} = {values}) and cannot be mapped onto this plan's {groups} groups")
        state[key] = [values[0]] * groups
    lambdas = state.get("lr_lambdas")
    if lambdas is not None and len(lambdas) != groups:
        state["lr_lambdas"] = [lambdas[0]] * groups
    return state


# ---- LoRA -------------------------------------------------------------------------------------------------
def lora_file(record, model, num_experts):
    """What a LoRA checkpoint's lora.json holds: the run's LoRA record (rank, alpha, dropout, targets)
    and the Hugging Face modules adapted (for merge_ckpt.py's PEFT export). `model`: the whole model
    of the run (before any pipeline split), whose trainable parameters are the adapters."""
    adapters = [name for name, p in model.named_parameters() if p.requires_grad]
    return {**record, "modules": hf_adapter.lora_modules(adapters, num_experts)}


def check_lora(ckpt_dir, record):
    """A resume continues the adapters it saved: the run's LoRA record (None without LoRA) must equal
    the checkpoint's lora.json (a checkpoint without one holds a full model)."""
    path = os.path.join(ckpt_dir, LORA_FILE)
    saved = None
    if os.path.isfile(path):
        saved = read_json(path, CheckpointError, "copy the checkpoint again from where the run saved it")
        if not isinstance(saved, dict) or not all(k in saved for k in ("rank", "alpha", "dropout", "targets")):
            raise CheckpointError(f"{path} is damaged (not the rank / alpha / dropout / targets the trainer writes); "
                                  "copy the checkpoint again from where the run saved it")
        saved = {k: saved[k] for k in ("rank", "alpha", "dropout", "targets")}
    if saved == record:
        return
    if record is None:
        raise CheckpointError(f"--resume_path {ckpt_dir} is a LoRA checkpoint ({LORA_FILE}: rank {saved['rank']}, alpha "
                              f"{saved['alpha']}, targets {','.join(saved['targets'])}) but this run trains every "
                              f"weight; resume it under a plan compiled with --lora_rank {saved['rank']}, or export "
                              "it with merge_ckpt.py")
    if saved is None:
        raise CheckpointError(f"--resume_path {ckpt_dir} holds a full model, not LoRA adapters (no {LORA_FILE}); a "
                              "LoRA run starts its adapters fresh over --model_id's weights: drop --resume_path, or "
                              "merge the checkpoint (merge_ckpt.py) and pass that directory as --model_id")
    differ = ", ".join(f"{k} {saved[k]} (this run: {record[k]})" for k in record if saved.get(k) != record[k])
    raise CheckpointError(f"--resume_path {ckpt_dir} holds LoRA adapters with {differ}; resume with the LoRA options it "
                          "was saved with (a plan compiled with them), or start a new run")


# ---- what a run keeps beside its tensors ------------------------------------------------------------------
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json")


def hf_files_of_run(model_id, tokenizer_path=None):
    """What a checkpoint's hf/ folder gets, for merge_ckpt.py: --model_id's config.json (as published),
    its generation_config.json if any, and the tokenizer files of --tokenizer_path (default
    --model_id) that exist."""
    files = {"config.json": os.path.join(model_id, "config.json")}
    generation = os.path.join(model_id, "generation_config.json")
    if os.path.isfile(generation):
        files["generation_config.json"] = generation
    tokenizer_dir = tokenizer_path or model_id
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(tokenizer_dir, name)):
            files[name] = os.path.join(tokenizer_dir, name)
    return files
