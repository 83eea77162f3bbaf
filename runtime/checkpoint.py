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

Every rank writes into `step_N.partial/`; after a barrier rank 0 writes the COMMITTED marker and
renames the directory to `step_N`, then moves the `last` pointer (write to a temporary file, then
os.replace). A run killed during a save leaves a `.partial` directory that nothing reads, and the
previous checkpoint and pointer untouched.
"""

import json
import os
import shutil
import zlib

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from errors import UserError
from runtime.expert_parallel import ExpertParallelExperts

# Optimizer state keyed by parameter name (hyperparameters too): what each rank holds is then
# self-describing, whichever modules (pipeline stages) the rank has.
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)

COMMIT_MARKER = "COMMITTED"
LAST_POINTER = "last"


class CheckpointError(UserError):
    pass


def _name(step):
    return f"step_{step:08d}"


def save(save_dir, step, modules, optimizer, scheduler, keep_last=None, hf_files=None, ep_mesh=None):
    """hf_files: {name in hf/: source path or bytes}, written by rank 0. ep_mesh: see _state."""
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
    _commit(save_dir, step, partial, final, extra, bool(hf_files), keep_last)
    dist.barrier()
    return final


def _commit(save_dir, step, partial, final, extra, has_hf, keep_last):
    """The second half of `save`, on every rank once all its shards are in `partial`: checksum them,
    write the COMMITTED marker (rank 0), rename `partial` to `final` and move the `last` pointer.
    Until it does, the save can be killed and nothing reads what it wrote."""
    rank = dist.get_rank()
    # Each rank checksums what it wrote (its DCP shard files and extras; rank 0 also the DCP metadata
    # and hf/), so the reading is spread over the ranks and rank 0 gathers only the results.
    mine = [extra] + sorted(f for f in os.listdir(partial) if f.startswith(f"__{rank}_"))
    if rank == 0:
        mine.append(".metadata")
        if has_hf:
            mine += [os.path.join("hf", f) for f in sorted(os.listdir(os.path.join(partial, "hf")))]
    sums = {f: file_checksum(os.path.join(partial, f)) for f in mine}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, sums)
    if rank == 0:
        files = {k: v for part in gathered for k, v in part.items()}
        with open(os.path.join(partial, COMMIT_MARKER), "w") as f:
            json.dump({"step": step, "world_size": dist.get_world_size(), "files": dict(sorted(files.items()))},
                      f, indent=1)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        tmp = os.path.join(save_dir, LAST_POINTER + ".tmp")
        with open(tmp, "w") as f:
            f.write(_name(step) + "\n")
        os.replace(tmp, os.path.join(save_dir, LAST_POINTER))
        if keep_last:
            committed = sorted(d for d in os.listdir(save_dir)
                               if d.startswith("step_") and not d.endswith(".partial")
                               and os.path.isfile(os.path.join(save_dir, d, COMMIT_MARKER)))
            for old in committed[:-keep_last]:
                shutil.rmtree(os.path.join(save_dir, old), ignore_errors=True)


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
        m, o = get_state_dict(module, optimizer, options=_OPTIONS)
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


def load(path, modules, optimizer, scheduler, ep_mesh=None):
    """Restores this rank's shards (resharded by DCP if the plan differs); returns the saved step."""
    model_state, optim_state, local_forms = _state(modules, optimizer, ep_mesh)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=path)
    _to_local_forms(state["model"], {k: v for k, v in local_forms.items() if k in model_state})
    _to_local_forms(state["optim"], {k: v for k, v in local_forms.items() if k in optim_state})
    for module in modules:
        set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=_OPTIONS)

    rank = dist.get_rank()
    extra_path = os.path.join(path, f"extra_rank{rank:05d}.pt")
    if os.path.isfile(extra_path):
        extra = torch.load(extra_path, weights_only=True)
        torch.set_rng_state(extra["torch_rng"])
    else:  # a different world size: the schedule and step are the same on every rank
        extra = torch.load(os.path.join(path, "extra_rank00000.pt"), weights_only=True)
    scheduler.load_state_dict(_fit_param_groups(extra["scheduler"], len(optimizer.param_groups), path))
    return extra["step"]


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
