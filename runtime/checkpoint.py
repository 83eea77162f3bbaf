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

# Optimizer state keyed by parameter name (hyperparameters too): what each rank holds is then
# self-describing, whichever modules (pipeline stages) the rank has.
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)

COMMIT_MARKER = "COMMITTED"
LAST_POINTER = "last"


class CheckpointError(ValueError):
    pass


def _name(step):
    return f"step_{step:08d}"


def save(save_dir, step, modules, optimizer, scheduler, keep_last=None, hf_files=None, expert_mesh=None):
    """hf_files: {name in hf/: source path or bytes}, written by rank 0. expert_mesh: see _state."""
    rank = dist.get_rank()
    final = os.path.join(save_dir, _name(step))
    partial = final + ".partial"
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
    dist.barrier()
    model_state, optim_state = _state(modules, optimizer, expert_mesh)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=partial)
    extra = f"extra_rank{rank:05d}.pt"
    torch.save({"scheduler": scheduler.state_dict(), "step": step, "torch_rng": torch.get_rng_state()},
               os.path.join(partial, extra))
    if rank == 0 and hf_files:
        _write_hf_files(os.path.join(partial, "hf"), hf_files)
    # Each rank checksums what it wrote (its DCP shard files and extras; rank 0 also the DCP metadata
    # and hf/), so the reading is spread over the ranks and rank 0 gathers only the results.
    mine = [extra] + sorted(f for f in os.listdir(partial) if f.startswith(f"__{rank}_"))
    if rank == 0:
        mine.append(".metadata")
        if hf_files:
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
    dist.barrier()
    return final


def file_checksum(path, chunk=1 << 24):
    """{"bytes": size, "crc32": CRC-32 of the contents} (streamed: shards can be many GiB)."""
    crc = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            crc = zlib.crc32(block, crc)
    return {"bytes": os.path.getsize(path), "crc32": crc}


def _write_hf_files(hf_dir, hf_files):
    os.makedirs(hf_dir, exist_ok=True)
    for name, source in hf_files.items():
        target = os.path.join(hf_dir, name)
        if isinstance(source, bytes):
            with open(target, "wb") as f:
                f.write(source)
        else:
            shutil.copyfile(source, target)


def _state(modules, optimizer, expert_mesh=None):
    model_state, optim_state = {}, {}
    for module in modules:
        m, o = get_state_dict(module, optimizer, options=_OPTIONS)
        model_state.update(m)
        optim_state = o  # one optimizer over all of this rank's modules
    return model_state, optim_state


def resolve(resume_path, save_dir):
    """--resume_path DIR or `last` -> a committed checkpoint directory (errors name the path and fix)."""
    if resume_path == "last":
        pointer = os.path.join(save_dir, LAST_POINTER)
        if not os.path.isfile(pointer):
            raise CheckpointError(f"--resume_path last: no {pointer}; no checkpoint was committed in --save_dir "
                                  f"{save_dir}")
        with open(pointer) as f:
            resume_path = os.path.join(save_dir, f.read().strip())
    if not os.path.isdir(resume_path):
        raise CheckpointError(f"--resume_path {resume_path}: no such checkpoint directory")
    if not os.path.isfile(os.path.join(resume_path, COMMIT_MARKER)):
        raise CheckpointError(f"--resume_path {resume_path} has no {COMMIT_MARKER} marker: the save did not finish; "
                              f"resume from an earlier checkpoint or from `last`")
    return resume_path


def load(path, modules, optimizer, scheduler):
    """Restores this rank's shards (resharded by DCP if the plan differs); returns the saved step."""
    model_state, optim_state = _state(modules, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=path)
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
    scheduler.load_state_dict(extra["scheduler"])
    return extra["step"]
