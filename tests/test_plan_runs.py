"""bench/plan_runs.py, the multi-GPU benchmark, dry-run on CPU processes: a 2-device LoRA plan for
packed instruction rows (`--packed`) runs under torchrun and each run's JSON holds the fields
bench/RESULTS.md reports (device, gpus, tokens_per_s_per_gpu, mfu, step_time_s,
predicted_step_time_s, peak_memory_gib), with a loss that moved."""

import json
import os
import subprocess
import sys

from tests.runtime_harness import REPO

TINY = os.path.join(REPO, "configs", "tiny-deepseek-v2")


def test_plan_runs_writes_one_json_per_run_with_the_reported_fields(tmp_path):
    plan = tmp_path / "lora.json"
    compile_cmd = [sys.executable, "train.py", "--run_mode", "compile", "--model_id", TINY, "--plan_ngpus", "2",
                   "--seq_len", "64", "--micro_batch_size", "2", "--global_batch_size", "4", "--device_profile", "cpu",
                   "--document_masking", "on", "--lora_rank", "4", "--plan_out", str(plan)]
    r = subprocess.run(compile_cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "bench/plan_runs.py", "--model_id", TINY, "--device", "cpu", "--packed",
                        "--run", f"lora={plan}@2", "--steps", "3", "--warmup", "1", "--out", str(out),
                        "--timeout_s", "400"], cwd=REPO, capture_output=True, text=True, timeout=500)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-2000:])
    entry = json.loads((out / "lora.json").read_text())
    assert entry["device"] == "cpu" and entry["gpus"] == 2 and entry["rc"] == 0 and entry["steps"] == 3
    for field in ("tokens_per_s_per_gpu", "step_time_s", "predicted_step_time_s", "peak_memory_gib"):
        assert entry[field] > 0, field
    assert entry["tokens_per_s_per_gpu"] * 2 == entry["tokens_per_s"]
    assert "mfu" in entry and entry["first_loss"] != entry["last_loss"]
    assert json.loads((out / "results.json").read_text())["lora"] == entry
    assert any(name.startswith("sft_rows_") for name in os.listdir(out))  # packed rows, not plain ones
