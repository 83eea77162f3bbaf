"""Checkpoint faults: nothing lost, nothing silently wrong, no code run from a file.

Every case runs train.py (one CPU process, the tiny DeepSeek-V2, 32-token rows, 4 sequences a step)
or merge_ckpt.py as a user would, against copies of one module-wide run that saved steps 1-6 with
--keep_last 4. A user error must exit 2 with one line naming the file or flag and the fix.
"""

import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

import merge_ckpt
from modeling import load_config
from runtime.checkpoint import file_checksum
from tests.runtime_harness import REPO, make_plan

SEQ, MICRO, GLOBAL = 32, 2, 4
MODEL = os.path.join(REPO, "configs", "tiny-deepseek-v2")
LR = 1e-3


def _name(step):
    return f"step_{step:08d}"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Data, a 1-device plan, and a save dir trained for 6 steps, saving every step, keeping 4."""
    import datasets
    root = tmp_path_factory.mktemp("faults_ckpt")
    ids = torch.randint(0, 512, (64, SEQ), generator=torch.Generator().manual_seed(0))
    datasets.Dataset.from_dict({"input_ids": ids.tolist()}).save_to_disk(str(root / "data"))
    make_plan(load_config(MODEL), MODEL, seq_len=SEQ, micro_batch_size=MICRO,
              global_batch_size=GLOBAL).save(str(root / "plan.json"))
    paths = {"root": root, "data": str(root / "data"), "plan": str(root / "plan.json"), "save": str(root / "save")}
    r = _train(paths, "--max_steps", "6", "--save_every", "1", "--keep_last", "4", "--save_dir", paths["save"])
    assert r.returncode == 0, r.stderr[-3000:]
    return paths


def _train(paths, *args):
    cmd = [sys.executable, "train.py", "--model_id", MODEL, "--dataset_path", paths["data"], "--plan", paths["plan"],
           "--device", "cpu", "--lr", str(LR), "--warmup_steps", "1", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def _error_line(r, *expected):
    """The run refused as a user error: exit 2, no traceback, one line holding every `expected`."""
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, r.stderr[-3000:]
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def _copy_save(base, tmp_path):
    target = str(tmp_path / "save")
    shutil.copytree(base["save"], target)
    return target


def _steps(save_dir):
    return sorted(d for d in os.listdir(save_dir) if d.startswith("step_"))


def _last(save_dir):
    with open(os.path.join(save_dir, "last")) as f:
        return f.read().strip()


def _commit_record(ckpt):
    with open(os.path.join(ckpt, "COMMITTED")) as f:
        return json.load(f)


def _recommit(ckpt, *names):
    """Lists `names` in COMMITTED with their current size and CRC-32: the damage a checksum cannot see
    (a crafted checkpoint)."""
    record = _commit_record(ckpt)
    for name in names:
        record["files"][name] = file_checksum(os.path.join(ckpt, name))
    with open(os.path.join(ckpt, "COMMITTED"), "w") as f:
        json.dump(record, f)


# ---- 1. --keep_last ---------------------------------------------------------------------------------------
def test_keep_last_below_one_is_refused_before_anything_is_saved(base, tmp_path):
    save = str(tmp_path / "save")
    r = _train(base, "--max_steps", "2", "--save_every", "1", "--keep_last", "-1", "--save_dir", save)
    _error_line(r, "--keep_last -1", "at least 1")
    assert not os.path.isdir(save) or not _steps(save)


def test_keep_last_counts_this_lineage_and_keeps_the_new_and_the_resumed_checkpoints(base, tmp_path):
    assert _steps(base["save"]) == [_name(s) for s in (3, 4, 5, 6)] and _last(base["save"]) == _name(6)
    save = _copy_save(base, tmp_path)
    # back to step 3 (the future 4-6 is abandoned), keeping 2: the checkpoint resumed from stays, the
    # new 4 and 5 replace the old ones, the abandoned step 6 is neither counted nor deleted
    r = _train(base, "--max_steps", "5", "--save_every", "1", "--keep_last", "2", "--save_dir", save,
               "--resume_path", os.path.join(save, _name(3)))
    assert r.returncode == 0, r.stderr[-3000:]
    assert _steps(save) == [_name(s) for s in (3, 4, 5, 6)]
    assert _last(save) == _name(5)
    assert _commit_record(os.path.join(save, _name(5)))["parent"] == _name(4)
    assert _commit_record(os.path.join(save, _name(4)))["parent"] == _name(3)
    # continuing from `last` (step 5): its lineage 6 (new) > 5 > 4 > 3 keeps the newest 2 and the one
    # resumed from; 3 and 4 go
    r = _train(base, "--max_steps", "7", "--save_every", "1", "--keep_last", "2", "--save_dir", save,
               "--resume_path", "last")
    assert r.returncode == 0, r.stderr[-3000:]
    assert _steps(save) == [_name(s) for s in (5, 6, 7)]
    assert _last(save) == _name(7)


# ---- 3. checksums on resume -----------------------------------------------------------------------------
def test_resume_refuses_a_shard_whose_checksum_differs(base, tmp_path):
    save = _copy_save(base, tmp_path)
    shard = os.path.join(save, _name(6), "__0_0.distcp")
    with open(shard, "r+b") as f:
        f.seek(os.path.getsize(shard) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))
    r = _train(base, "--max_steps", "7", "--save_every", "1", "--save_dir", save, "--resume_path", "last")
    _error_line(r, shard, "CRC-32", "COMMITTED", "copy it again")
    assert _steps(save) == [_name(s) for s in (3, 4, 5, 6)]  # nothing trained, nothing saved


def test_resume_with_max_steps_not_past_the_checkpoint_is_refused(base):
    r = _train(base, "--max_steps", "6", "--save_dir", base["save"], "--resume_path", "last")
    _error_line(r, "--max_steps 6", "step 6 already")


# ---- 5. no code run from a checkpoint ---------------------------------------------------------------------
class _RunsCode:
    """Unpickled, it runs a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _craft(ckpt, vector, marker):
    """A checkpoint whose COMMITTED checksums match, yet which runs code when DCP reads it plainly:
    `metadata`: the .metadata pickle holds the object; `bytes_entry`: a non-tensor entry (the learning
    rate of the optimizer's first parameter) is moved to a new shard holding the object."""
    with open(os.path.join(ckpt, ".metadata"), "rb") as f:
        metadata = pickle.load(f)  # our own file, written by the base run
    if vector == "metadata":
        metadata.planner_data = _RunsCode(marker)
        changed = [".metadata"]
    else:
        from torch.distributed.checkpoint.filesystem import _StorageInfo
        with open(os.path.join(ckpt, "__evil.distcp"), "wb") as f:
            torch.save(_RunsCode(marker), f)
        key = next(k for k in sorted(metadata.state_dict_metadata) if k.startswith("optim.param_groups.")
                   and k.endswith(".lr"))
        index = next(i for i in metadata.storage_data if i.fqn == key)
        metadata.storage_data[index] = _StorageInfo("__evil.distcp", 0, os.path.getsize(os.path.join(ckpt, "__evil.distcp")))
        changed = [".metadata", "__evil.distcp"]
    with open(os.path.join(ckpt, ".metadata"), "wb") as f:
        pickle.dump(metadata, f)
    _recommit(ckpt, *changed)


@pytest.mark.parametrize("vector", ["metadata", "bytes_entry"])
def test_a_crafted_checkpoint_runs_no_code_on_resume_nor_merge(base, tmp_path, capsys, vector):
    save = _copy_save(base, tmp_path)
    ckpt = os.path.join(save, _name(6))
    marker = tmp_path / "code_ran"
    _craft(ckpt, vector, marker)

    r = _train(base, "--max_steps", "7", "--save_dir", save, "--resume_path", "last")
    assert not marker.exists(), "resuming ran code from the checkpoint"
    _error_line(r, ".metadata" if vector == "metadata" else "optim.param_groups.", "refused")

    assert merge_ckpt.main(["--ckpt_dir", ckpt, "--output_dir", str(tmp_path / "hf"), "--optimizer"]) == 2
    assert not marker.exists(), "merging ran code from the checkpoint"
    err = capsys.readouterr().err
    assert "Traceback" not in err and "refused" in err.strip().splitlines()[-1]
    assert not (tmp_path / "hf").exists()


# ---- 7. the run's hyperparameters; a diverging step is not saved --------------------------------------------
def test_resume_takes_lr_and_weight_decay_from_the_flags(base, tmp_path):
    save = _copy_save(base, tmp_path)
    r = _train(base, "--max_steps", "7", "--save_dir", save, "--resume_path", "last", "--lr", "1e-4",
               "--weight_decay", "0.05")
    assert r.returncode == 0, r.stderr[-3000:]
    with open(os.path.join(save, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records[-1:]] == [7] and records[-1]["lr"] == 1e-4
    assert all(r["lr"] == LR for r in records[:-1])  # the saving run's
    saved = merge_ckpt.CheckpointTensors(os.path.join(save, _name(7)))
    keys = [k for k in saved.entries if k.startswith("optim.param_groups.")]
    values = saved.read(keys)
    assert {v for k, v in values.items() if k.endswith(".lr")} == {1e-4}
    assert {v for k, v in values.items() if k.endswith(".weight_decay")} == {0.05}
    assert {v for k, v in values.items() if k.endswith(".initial_lr")} == {1e-4}


@pytest.mark.parametrize("optimizer", [[], ["--fused_adamw"]], ids=["foreach", "fused"])
def test_a_diverging_step_is_not_saved_and_the_last_healthy_checkpoint_is_named(base, tmp_path, optimizer):
    """A step whose update is absurd (--lr 1e6) raises DivergedError before it is saved, with the
    foreach and the fused AdamW alike."""
    save = _copy_save(base, tmp_path)
    r = _train(base, "--max_steps", "9", "--save_every", "1", "--save_dir", save, "--resume_path", "last",
               "--lr", "1e6", *optimizer)
    assert r.returncode == 3, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if "last healthy checkpoint" in line]
    assert len(lines) == 1, r.stderr[-3000:]
    assert "step 7" in lines[0] and f"the last healthy checkpoint is {os.path.join(save, _name(6))}" in lines[0]
    assert "MAX_WEIGHT_NORM_CHANGE" in lines[0]
    assert _steps(save) == [_name(s) for s in (3, 4, 5, 6)] and _last(save) == _name(6)


@pytest.mark.parametrize("max_steps", [7, 9], ids=["last-step", "checked-by-the-next-step"])
def test_a_diverging_step_without_a_save_due_still_stops_the_run_naming_it(base, tmp_path, max_steps):
    """The weight check of a step is read with the next step's values (or when the run ends), not at
    once: without a save due, the run still stops with the diverged step named, and saves nothing."""
    save = _copy_save(base, tmp_path)
    before = _steps(save)
    r = _train(base, "--max_steps", str(max_steps), "--save_every", "0", "--save_dir", save, "--resume_path", "last",
               "--lr", "1e6", "--no_final_save")
    assert r.returncode == 3, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if "last healthy checkpoint" in line]
    assert len(lines) == 1 and "step 7" in lines[0] and "MAX_WEIGHT_NORM_CHANGE" in lines[0], r.stderr[-3000:]
    assert _steps(save) == before
