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


def test_expert_parallel_resume_gives_the_losses_of_an_uninterrupted_run(setup):
    # ep=2 x dp=2 with ZeRO 3: experts are DTensors sharded over dp inside each ep rank's slice
    plan = make_plan(setup["config"], setup["model_dir"], seq_len=SEQ, micro_batch_size=MICRO,
                     global_batch_size=GLOBAL, ep=2, dp=2, zero=3)
    root = setup["root"] / "ep"
    straight = losses(run_plan(plan, 4, setup["model_dir"], setup["data_dir"], str(root / "a"), max_steps=4))
    save_dir = str(root / "b" / "save")
    first = losses(run_plan(plan, 4, setup["model_dir"], setup["data_dir"], str(root / "b"), max_steps=2,
                            save_every=2, save_dir=save_dir))
    rest = losses(run_plan(plan, 4, setup["model_dir"], setup["data_dir"], str(root / "c"), max_steps=4,
                           resume_path="last", save_dir=save_dir))
    assert first + rest == straight  # bitwise


@pytest.mark.parametrize("saved,resumed", [(dict(pp=2, dp=2, schedule="1F1B"), dict(ep=4)),
                                           (dict(ep=2, dp=2, zero=3), dict(pp=2, dp=2, zero=2, schedule="1F1B"))],
                         ids=["pp2xdp2-to-ep4", "ep2xdp2zero3-to-pp2xdp2zero2"])
def test_a_checkpoint_resumes_under_another_plan(setup, saved, resumed):
    make = lambda overrides: make_plan(setup["config"], setup["model_dir"], seq_len=SEQ,  # noqa: E731
                                       micro_batch_size=MICRO, global_batch_size=GLOBAL, **overrides)
    root = setup["root"] / ("reshard-" + "-".join(f"{k}{v}" for k, v in saved.items()))
    save_dir = str(root / "a" / "save")
    straight = losses(run_plan(make(saved), 4, setup["model_dir"], setup["data_dir"], str(root / "a"), max_steps=4,
                               save_every=3, save_dir=save_dir))
    resumed_losses = losses(run_plan(make(resumed), 4, setup["model_dir"], setup["data_dir"], str(root / "b"),
                                     max_steps=5, resume_path="last", save_dir=save_dir))
    assert len(resumed_losses) == 2
    assert resumed_losses[0] == pytest.approx(straight[3], rel=1e-5)


def test_a_run_killed_during_its_second_save_resumes_from_the_first(setup, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from runtime.mesh import free_port
    plan = make_plan(setup["config"], setup["model_dir"], seq_len=SEQ, micro_batch_size=MICRO,
                     global_batch_size=GLOBAL, dp=2, zero=3)
    plan_path = str(tmp_path / "plan.json")
    plan.save(plan_path)
    save_dir = tmp_path / "save"
    # the flags of tests.runtime_harness.run_plan, so that the resumed run below continues this one; the
    # wrapper is train.py with the save of step 4 held open before its commit (in every rank)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           os.path.join(REPO, "tests", "slow_save_train.py"), "--slow_save", "4:600",
           "--model_id", setup["model_dir"], "--dataset_path", setup["data_dir"],
           "--plan", plan_path, "--runtime_ngpus", "2", "--device", "cpu", "--max_steps", "6", "--lr", "1e-3",
           "--warmup_steps", "1", "--seed", "0", "--save_every", "2", "--save_dir", str(save_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    partial = save_dir / "step_00000004.partial"
    deadline = time.monotonic() + 120
    try:  # wait until both ranks have written their shards of the second save, then kill everything
        while not ((partial / "__0_0.distcp").exists() and (partial / "__1_0.distcp").exists()):
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the second save never started"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    assert not (partial / "COMMITTED").exists()
    assert (save_dir / "step_00000002" / "COMMITTED").is_file()
    assert (save_dir / "last").read_text().strip() == "step_00000002"
    with open(save_dir / "metrics.jsonl") as f:
        before_kill = [json.loads(line)["loss"] for line in f]
    assert len(before_kill) == 4  # steps 1-4 ran; the kill came during step 4's save

    resumed = losses(run_plan(plan, 2, setup["model_dir"], setup["data_dir"], str(tmp_path / "resume"),
                              max_steps=6, resume_path="last", save_dir=str(save_dir)))
    assert len(resumed) == 4  # steps 3-6
    assert resumed[:2] == before_kill[2:]  # bitwise: the same steps 3 and 4 as before the kill
