"""Faults of a run that must be refused, or must not outlive their cause ("nothing lost, nothing
silently wrong"): a replicated run whose data ranks do not split the global batch, workers that
survive a killed launcher, two runs in one save directory, token ids the model cannot embed, ragged
or float rows, option values out of range, a save directory that cannot be written.

Each refusal is a user error: exit status 2, one line naming the flag or file and the fix, before the
model is built (the tests that call train.py in this process replace the model build with a failure
to prove it). CPU only, the tiny model, a 1-device plan for global batch 4 (micro-batch 2)."""

import fcntl
import os
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch

from modeling import load_config
from tests.runtime_harness import REPO, make_plan

MODEL = os.path.join(REPO, "configs", "tiny-deepseek-v2")
SEQ, MICRO, GLOBAL = 32, 2, 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import datasets
    root = tmp_path_factory.mktemp("faults_run")
    config = load_config(MODEL)
    ids = torch.randint(0, config.vocab_size, (32, SEQ), generator=torch.Generator().manual_seed(0))
    data = str(root / "data")
    datasets.Dataset.from_dict({"input_ids": ids.tolist()}).save_to_disk(data)
    plan = str(root / "p1.json")
    make_plan(config, MODEL, seq_len=SEQ, micro_batch_size=MICRO, global_batch_size=GLOBAL).save(plan)
    return {"root": root, "config": config, "data": data, "plan": plan, "ids": ids}


@pytest.fixture
def cli(monkeypatch, capsys):
    """train.py's main() in this process (a refusal costs milliseconds, not a Python start): returns
    (exit status, stderr). The model build fails the test if reached: every refusal comes first."""
    import train

    def model_built(*args, **kwargs):
        raise AssertionError("the model was built before the run was refused")

    monkeypatch.setattr("runtime.trainer.apply_plan", model_built)
    saved = dict(os.environ)  # init_distributed sets RANK, WORLD_SIZE, MASTER_PORT for a world of one

    def call(*argv):
        capsys.readouterr()
        try:
            rc = train.main(list(argv))
        finally:
            os.environ.clear()
            os.environ.update(saved)
        return rc, capsys.readouterr().err

    return call


def run_args(setup, *extra, save_dir=None, dataset=None, plan=None):
    return ["--model_id", MODEL, "--dataset_path", dataset or setup["data"], "--plan", plan or setup["plan"],
            "--device", "cpu", "--max_steps", "1", "--save_dir", str(save_dir or setup["root"] / "save"), *extra]


def assert_refused(rc, err, *fragments):
    """Exit status 2, one line, naming what is wrong."""
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(nproc, argv):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "train.py", *argv]


# ---- 2. the global batch split over the data ranks -------------------------------------------------------
def test_replicas_that_do_not_split_the_global_batch_are_refused_under_torchrun(setup, tmp_path):
    """The 1-device plan for global batch 4 (micro-batch 2) on 3 processes: 3 data ranks cannot take
    whole micro-batches of 4 sequences. It used to exit 0 training on 3 of the 4 rows with the loss
    divided as for 4 (4.69 instead of 6.25); compile refuses the same setup, and so must the run."""
    r = subprocess.run(torchrun(3, run_args(setup, "--runtime_ngpus", "3", save_dir=tmp_path / "save")), cwd=REPO,
                       env=env(), capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert "error: --runtime_ngpus 3: its 3 data-parallel ranks (3 replica(s) x dp 1 x ep 1)" in out, out
    assert "use --runtime_ngpus 1 or 2" in out and "recompile the plan with --runtime_ngpus 3" in out
    assert not (tmp_path / "save" / "metrics.jsonl").exists()  # refused before any step


def test_the_batch_rule_is_compiles_and_counts_replicas_dp_and_ep(setup, tmp_path, cli):
    config = setup["config"]
    # runtime_ngpus 2: 2 data ranks x micro-batch 2 divide 4 -> accepted (here refused only because this
    # is 1 process, not 2)
    rc, err = cli(*run_args(setup, "--runtime_ngpus", "2"))
    assert_refused(rc, err, "1 processes were started but --runtime_ngpus is 2")
    # dp 2 x 2 replicas = 4 data ranks for global 4 / micro 2: compile's search refuses it, so the run does
    plan = make_plan(config, MODEL, dp=2, seq_len=SEQ, micro_batch_size=MICRO, global_batch_size=GLOBAL)
    plan.save(str(tmp_path / "dp2.json"))
    rc, err = cli(*run_args(setup, "--runtime_ngpus", "4", plan=str(tmp_path / "dp2.json")))
    assert_refused(rc, err, "--runtime_ngpus 4: its 4 data-parallel ranks (2 replica(s) x dp 2 x ep 1)",
                   "use --runtime_ngpus 2")
    # ep counts too
    plan = make_plan(config, MODEL, ep=2, seq_len=SEQ, micro_batch_size=MICRO, global_batch_size=GLOBAL)
    plan.save(str(tmp_path / "ep2.json"))
    rc, err = cli(*run_args(setup, "--runtime_ngpus", "4", plan=str(tmp_path / "ep2.json")))
    assert_refused(rc, err, "its 4 data-parallel ranks (2 replica(s) x dp 1 x ep 2)")
    # a pipeline compiled for 4 micro-batches per step (global 8 on 1 replica) replicated twice would
    # run 2 micro-batches per pipeline: refused, naming the runtime_ngpus it was compiled for
    plan = make_plan(config, MODEL, pp=2, seq_len=SEQ, micro_batch_size=MICRO, global_batch_size=8)
    plan.save(str(tmp_path / "pp2.json"))
    rc, err = cli(*run_args(setup, "--runtime_ngpus", "4", plan=str(tmp_path / "pp2.json")))
    assert_refused(rc, err, "each of the 2 pipeline(s) would run 2 micro-batches per step",
                   "compiled for 4 (at --runtime_ngpus 2)", "use --runtime_ngpus 2")


# ---- 4. a killed launcher, and one run per save directory ------------------------------------------------
def _children(pid):
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                kids.append(int(entry))
    return kids


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has stopped
    except OSError:
        return False


def _progress(save_dir):
    last = os.path.join(save_dir, "last")
    return (open(last).read() if os.path.exists(last) else None,
            sorted(n for n in os.listdir(save_dir) if n.startswith("step_")))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killing_torchrun_kills_its_workers_and_frees_the_save_dir(setup, tmp_path):
    """torchrun starts each worker in a session of its own, so kill -9 of the launcher's process group
    used to leave them training and moving `last`, and a resume then ran beside them. Now a worker
    dies with its launcher, and the save directory is locked by the run: the resume beside it is
    refused, and once the workers are gone the lock is free."""
    save = tmp_path / "save"
    many_steps = ("--max_steps", "100000")  # a later flag overrides run_args' --max_steps 1
    log = open(tmp_path / "torchrun.log", "w")  # a file, not a pipe: a full pipe would stall the run
    launcher = subprocess.Popen(torchrun(2, run_args(setup, "--runtime_ngpus", "2", *many_steps, "--save_every", "2",
                                                     "--keep_last", "2", save_dir=save)),
                                cwd=REPO, env=env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    workers = []
    try:
        deadline = time.time() + 180
        while not (save / "last").exists():
            assert launcher.poll() is None, (tmp_path / "torchrun.log").read_text()[-3000:]
            assert time.time() < deadline, "the run never saved a checkpoint"
            time.sleep(0.2)
        workers = _children(launcher.pid)
        assert len(workers) == 2, workers
        # a resume beside the live run: refused by the lock, naming the directory
        r = subprocess.run([sys.executable, "train.py", *run_args(setup, "--resume_path", "last", save_dir=save)],
                           cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
        assert_refused(r.returncode, r.stderr, f"--save_dir {save} is in use by another run", "pass another --save_dir")
        assert all(_alive(w) for w in workers)  # the refused run did not disturb the live one

        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=30)
        deadline = time.time() + 5
        while any(_alive(w) for w in workers) and time.time() < deadline:
            time.sleep(0.1)
        assert not [w for w in workers if _alive(w)], "workers outlived their launcher"
        before = _progress(save)
        time.sleep(2)
        assert _progress(save) == before, "`last` kept moving after the launcher was killed"
        with open(save / ".run.lock", "a") as f:  # the kernel released the dead run's lock
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
        for w in workers:  # on failure: the processes this test started, by pid
            if _alive(w):
                os.kill(w, signal.SIGKILL)
        log.close()


def test_a_second_run_on_a_locked_save_dir_is_refused(setup, tmp_path, cli):
    """Another process holds --save_dir's lock (as a live run's rank 0 does): refused before any work,
    naming the directory, the holder and the fix; the same run goes ahead once the holder is gone."""
    from runtime.preflight import LOCK_FILE
    save = tmp_path / "save"
    save.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"f = open({str(save / LOCK_FILE)!r}, 'w'); fcntl.flock(f, fcntl.LOCK_EX)\n"
        "f.write(f'pid {os.getpid()} on testhost'); f.flush(); print('locked', flush=True); time.sleep(600)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        rc, err = cli(*run_args(setup, save_dir=save))
        assert_refused(rc, err, f"--save_dir {save} is in use by another run (pid {holder.pid} on testhost",
                       "wait for it to end or stop it, or pass another --save_dir")
    finally:
        holder.kill()
        holder.wait()
    rc, err = cli(*run_args(setup, save_dir=save, dataset=str(tmp_path / "nothing")))
    assert_refused(rc, err, "--dataset_path")  # past the lock now: the next check speaks


# ---- 8a. the data, checked when opened -------------------------------------------------------------------
def _dataset(path, rows):
    import datasets
    datasets.Dataset.from_dict({"input_ids": rows}).save_to_disk(str(path))
    return str(path)


@pytest.mark.parametrize("fault", ["vocab", "negative", "ragged", "float"])
def test_bad_token_rows_are_named_when_the_data_is_opened(setup, tmp_path, cli, fault):
    vocab = setup["config"].vocab_size
    rows = setup["ids"].tolist()
    expected = {"vocab": ("row 5 of field input_ids holds token id 512", "vocabulary 0..511"),
                "negative": ("row 7 of field input_ids holds token id -1",),
                "ragged": ("row 3 of field input_ids has 31 tokens but row 0 has 32", "ragged"),
                "float": ("row 2 of field input_ids holds double values (e.g. 2.5)", "not integer token ids")}[fault]
    if fault == "vocab":
        rows[5][9] = vocab
    elif fault == "negative":
        rows[7][0] = -1
    elif fault == "ragged":
        rows[3] = rows[3][:-1]
    else:
        rows = [[float(t) for t in row] for row in rows]
        rows[2][4] = 2.5
    data = _dataset(tmp_path / fault, rows)
    rc, err = cli(*run_args(setup, save_dir=tmp_path / "save", dataset=data))
    assert_refused(rc, err, f"--dataset_path {data}", *expected)


# ---- 8c. option values, and the save directory -----------------------------------------------------------
@pytest.mark.parametrize("flag,value,expected", [
    ("--lr", "nan", "--lr nan: give a finite number"),
    ("--lr", "-0.001", "--lr -0.001: must be >= 0"),
    ("--lr", "inf", "--lr inf: give a finite number"),
    ("--weight_decay", "-0.1", "--weight_decay -0.1: must be >= 0"),
    ("--weight_decay", "nan", "--weight_decay nan: give a finite number"),
    ("--max_steps", "-1", "--max_steps -1: must be >= 0"),
    ("--save_every", "-2", "--save_every -2: must be >= 0"),
    ("--warmup_steps", "-1", "--warmup_steps -1: must be >= 0"),
    ("--seed", "-1", "--seed -1: must be from 0 to 4294967295"),
    ("--runtime_ngpus", "0", "--runtime_ngpus 0: must be >= 1"),
])
def test_option_values_out_of_range_are_refused(setup, tmp_path, cli, flag, value, expected):
    rc, err = cli(*run_args(setup, flag, value, save_dir=tmp_path / "save"))
    assert_refused(rc, err, expected)
    assert not (tmp_path / "save").exists()  # refused before anything was written


def test_compile_refuses_a_nan_memory_limit(cli, tmp_path):
    rc, err = cli("--run_mode", "compile", "--model_id", MODEL, "--plan_ngpus", "1", "--device_profile", "cpu",
                  "--mem_limit_gib", "nan", "--plan_out", str(tmp_path / "p.json"))
    assert_refused(rc, err, "--mem_limit_gib nan: give a finite number")


@pytest.mark.parametrize("fault", ["file", "under_a_file", "read_only"])
def test_a_save_dir_that_cannot_be_written_is_refused_before_the_model_is_built(setup, tmp_path, cli, fault):
    (tmp_path / "afile").write_text("not a directory")
    save = {"file": tmp_path / "afile", "under_a_file": tmp_path / "afile" / "run", "read_only": tmp_path / "ro"}[fault]
    expected = {"file": f"--save_dir {save} is a file, not a directory",
                "under_a_file": f"--save_dir {save} cannot be created",
                "read_only": f"--save_dir {save} is not writable"}[fault]
    if fault == "read_only":
        if os.geteuid() == 0:
            pytest.skip("root writes to read-only directories")
        save.mkdir()
        save.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        rc, err = cli(*run_args(setup, save_dir=save))
    finally:
        if fault == "read_only":
            save.chmod(stat.S_IRWXU)
    assert_refused(rc, err, expected)
