"""Several machines, simulated on one host: two torchrun "nodes" (`--nnodes 2`, a c10d rendezvous on
127.0.0.1) of 2 CPU processes each run a 4-device plan of the tiny model and give the losses of one
process (as the plan-family table of test_runtime.py does); the checkpoint they save resumes on
another split (1 node x 4 processes) and continues with the single process's loss, and
merge_ckpt.py turns it into the single process's weights.

Nodes that do not share --save_dir are refused before training: on one host, giving the second node
another --save_dir path is exactly what a disk of its own looks like to the check (its ranks' tokens
are not where rank 0 looks)."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from modeling import load_config
from modeling.hf_adapter import to_hf
from runtime.mesh import free_port
from runtime.preflight import LOCK_FILE, TOKEN_PREFIX
from tests.runtime_harness import REPO, gather_parameters, make_plan, run_plan

MODEL = os.path.join(REPO, "configs", "tiny-deepseek-v2")
SEQ, MICRO, GLOBAL = 32, 2, 8
STEPS, RESUMED_STEPS = 2, 3  # the two-node run saves after STEPS; the resume continues to RESUMED_STEPS
LAUNCH_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Random-token data, the 4-device plan (dp 2 x ep 2, ZeRO-3: its parameter shards, gradient
    reductions and expert all-to-all all cross the node boundary or sit beside it), a 1-device plan,
    and the single-process reference run of RESUMED_STEPS steps."""
    import datasets
    root = tmp_path_factory.mktemp("multinode")
    config = load_config(MODEL)
    ids = torch.randint(0, config.vocab_size, (64, SEQ), generator=torch.Generator().manual_seed(0))
    data = str(root / "data")
    datasets.Dataset.from_dict({"input_ids": ids.tolist()}).save_to_disk(data)
    shape = dict(seq_len=SEQ, micro_batch_size=MICRO, global_batch_size=GLOBAL)
    plan4 = make_plan(config, MODEL, dp=2, ep=2, zero=3, **shape)
    plan4_path = str(root / "plan4.json")
    plan4.save(plan4_path)
    plan1 = make_plan(config, MODEL, **shape)
    plan1_path = str(root / "plan1.json")
    plan1.save(plan1_path)
    reference = run_plan(plan1, 1, MODEL, data, str(root / "reference"), max_steps=RESUMED_STEPS, lr=1e-3)
    return {"root": root, "config": config, "data": data, "plan4": plan4_path, "plan1": plan1_path,
            "plan1_obj": plan1, "reference": reference}


def train_args(setup, plan, save_dir, *extra):
    """The flags run_plan gives the reference (lr 1e-3, warmup 1, seed 0), as train.py flags."""
    return ["--model_id", MODEL, "--dataset_path", setup["data"], "--plan", plan, "--device", "cpu",
            "--lr", "1e-3", "--warmup_steps", "1", "--seed", "0", "--save_dir", str(save_dir), *extra]


def launch(nnodes, nproc, argv_of_node, log_dir):
    """Starts one torchrun per node, all meeting at one c10d rendezvous on 127.0.0.1 (the commands of
    the README's "Several machines", with 127.0.0.1 for the first node's address); waits for all of
    them and returns [(exit status, output)] per node."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launchers = []
    for node in range(nnodes):
        log = open(os.path.join(log_dir, f"node{node}.log"), "w")  # a file, not a pipe: a full pipe stalls a run
        # --node_rank as a user would pass it; the c10d rendezvous numbers the nodes itself (so the test
        # never assumes which launcher holds rank 0)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--node_rank", str(node),
               "--nproc_per_node", str(nproc), "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
               "train.py", *argv_of_node(node)]
        launchers.append((subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True), log))
    results = []
    try:
        for launcher, log in launchers:
            launcher.wait(timeout=LAUNCH_TIMEOUT_S)
            log.close()
            with open(log.name) as f:
                results.append((launcher.returncode, f.read()))
    finally:
        for launcher, log in launchers:  # on a timeout: the launchers this test started (their workers die with them)
            if launcher.poll() is None:
                os.killpg(launcher.pid, signal.SIGKILL)
                launcher.wait()
            log.close()
    return results


def metrics(save_dir):
    with open(os.path.join(save_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_like_reference(records, reference, steps):
    """Loss and gradient norm of each step within 1e-5 relative of the single process's (the family
    table's bar; AdamW would hide a wrong gradient scale from the loss, not from the norm)."""
    assert [r["step"] for r in records] == list(steps)
    for got in records:
        ref = reference[0]["records"][got["step"] - 1]
        assert abs(got["loss"] - ref["loss"]) / abs(ref["loss"]) < 1e-5, (got["step"], got["loss"], ref["loss"])
        assert abs(got["grad_norm"] - ref["grad_norm"]) / ref["grad_norm"] < 1e-5, (got["step"], got, ref)


def merged_weights(hf_dir):
    """{name: tensor} of every shard a merged directory's index lists."""
    with open(os.path.join(hf_dir, "model.safetensors.index.json")) as f:
        files = set(json.load(f)["weight_map"].values())
    return {name: t for file in sorted(files) for name, t in load_file(os.path.join(hf_dir, file)).items()}


def no_tokens_left(save_dir):
    return not [n for n in os.listdir(save_dir) if n.startswith(TOKEN_PREFIX)]


def test_two_nodes_train_like_one_process_resume_on_one_node_and_merge(setup, tmp_path):
    save = tmp_path / "save"  # one path both "nodes" see: on one host, a shared filesystem
    save.mkdir()
    (save / f"{TOKEN_PREFIX}0123456789abcdef.3").write_text("0123456789abcdef 3\n")  # a killed run's, deleted
    two_nodes = launch(2, 2, lambda node: train_args(setup, setup["plan4"], save, "--runtime_ngpus", "4",
                                                     "--max_steps", str(STEPS)), tmp_path)
    for node, (rc, out) in enumerate(two_nodes):
        assert rc == 0, f"node {node}:\n{out[-4000:]}"
    reference = setup["reference"]
    assert_like_reference(metrics(save), reference, range(1, STEPS + 1))
    assert (save / "last").read_text().strip() == f"step_{STEPS:08d}"
    assert no_tokens_left(save)

    # the same checkpoint on another split of the 4 processes: 1 node x 4
    one_node = launch(1, 4, lambda node: train_args(setup, setup["plan4"], save, "--runtime_ngpus", "4",
                                                    "--max_steps", str(RESUMED_STEPS), "--resume_path", "last"),
                      tmp_path)
    assert one_node[0][0] == 0, one_node[0][1][-4000:]
    assert_like_reference(metrics(save), reference, range(1, RESUMED_STEPS + 1))  # appended: step 3 only is new

    # merged: the single process's weights after RESUMED_STEPS, under their Hugging Face names
    merged_dir = tmp_path / "hf"
    r = subprocess.run([sys.executable, "merge_ckpt.py", "--ckpt_dir", str(save), "--output_dir", str(merged_dir)],
                       cwd=REPO, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert r.returncode == 0, r.stderr[-3000:]
    merged = merged_weights(str(merged_dir))
    expected = to_hf(gather_parameters(reference, setup["plan1_obj"]), setup["config"].n_routed_experts)
    assert merged.keys() == expected.keys()
    for name, ref in expected.items():
        rel = ((merged[name] - ref).norm() / ref.norm().clamp_min(1e-12)).item()
        assert rel < 1e-4, f"{name}: {rel:.2e}"


def test_nodes_that_see_different_save_dirs_are_refused_before_training(setup, tmp_path):
    """Node 1 is given another --save_dir: the run is refused on every rank before the model is built,
    one line naming the node and asking for a shared filesystem; no metrics, no checkpoint, no token
    is left, and the directory only the refused node made is removed again. A token a killed run
    left in the save directory is deleted, and cannot stand in for this run's."""
    dirs = [tmp_path / "node0_save", tmp_path / "node1_save"]
    dirs[0].mkdir()
    stale = dirs[0] / f"{TOKEN_PREFIX}0123456789abcdef.1"  # "rank 1 was here", from an older run
    stale.write_text("0123456789abcdef 1\n")
    # the 1-device plan replicated on 2 processes, one per node: the cheapest run that spans two nodes
    nodes = launch(2, 1, lambda node: train_args(setup, setup["plan1"], dirs[node], "--runtime_ngpus", "2",
                                                 "--max_steps", "1"), tmp_path)
    for node, (rc, out) in enumerate(nodes):
        assert rc != 0, f"node {node} was not refused:\n{out[-3000:]}"
    errors = [line for _, out in nodes for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and errors[0] == errors[1], "\n\n".join(out[-3000:] for _, out in nodes)
    error = errors[0]
    # which launcher became node 0 (holding rank 0) is the rendezvous' choice: the other one is at fault
    rank0_dir = next(d for d in dirs if f"rank 0's {d} " in error)
    other_dir = dirs[1 - dirs.index(rank0_dir)]
    assert "node 1 (host " in error and f"rank 1) writes its --save_dir {other_dir} but" in error, error
    assert "(node 0, host " in error, error
    assert "put --save_dir on a filesystem shared by every node" in error and "give every node the same path" in error
    # refused before training, and tidy: rank 0's directory holds only its lock (the stale token
    # deleted, if it was there); the other node's directory is gone if this run made it, else as it was
    assert sorted(os.listdir(rank0_dir)) == [LOCK_FILE]
    if other_dir == dirs[1]:
        assert not other_dir.exists()
    else:
        assert os.listdir(other_dir) == [stale.name]
