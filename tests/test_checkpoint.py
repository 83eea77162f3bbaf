"""Sharded checkpoints: atomic commits and an exact resume."""

import json
import os

import pytest
import torch

from modeling import load_config
from tests.runtime_harness import REPO, losses, make_plan, run_plan

SEQ, MICRO, GLOBAL = 32, 2, 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import datasets
    root = tmp_path_factory.mktemp("ckpt")
    ids = torch.randint(0, 512, (64, SEQ), generator=torch.Generator().manual_seed(0))
    datasets.Dataset.from_dict({"input_ids": ids.tolist()}).save_to_disk(str(root / "data"))
    model_dir = os.path.join(REPO, "configs", "tiny-deepseek-v2")
    return {"root": root, "model_dir": model_dir, "data_dir": str(root / "data"), "config": load_config(model_dir)}


@pytest.mark.parametrize("family,overrides,world", [("zero3", dict(dp=2, zero=3), 2),
                                                    ("pipeline", dict(pp=2, schedule="1F1B"), 2)])
def test_resume_gives_the_losses_of_an_uninterrupted_run(setup, family, overrides, world):
    plan = make_plan(setup["config"], setup["model_dir"], seq_len=SEQ, micro_batch_size=MICRO,
                     global_batch_size=GLOBAL, **overrides)
    root = setup["root"] / family
    straight = losses(run_plan(plan, world, setup["model_dir"], setup["data_dir"], str(root / "a"), max_steps=6))
    save_dir = str(root / "b" / "save")
    first = losses(run_plan(plan, world, setup["model_dir"], setup["data_dir"], str(root / "b"), max_steps=3,
                            save_every=3, save_dir=save_dir))
    assert os.path.isfile(os.path.join(save_dir, "step_00000003", "COMMITTED"))
    with open(os.path.join(save_dir, "last")) as f:
        assert f.read().strip() == "step_00000003"
    rest = losses(run_plan(plan, world, setup["model_dir"], setup["data_dir"], str(root / "c"), max_steps=6,
                           resume_path="last", save_dir=save_dir))
    assert first + rest == straight  # bitwise


def test_a_checkpoint_without_commit_marker_is_refused(setup, tmp_path):
    from runtime.checkpoint import CheckpointError, resolve
    (tmp_path / "step_00000002").mkdir()
    with pytest.raises(CheckpointError, match="no COMMITTED marker"):
        resolve(str(tmp_path / "step_00000002"), str(tmp_path))
    with pytest.raises(CheckpointError, match="no checkpoint was committed"):
        resolve("last", str(tmp_path))
