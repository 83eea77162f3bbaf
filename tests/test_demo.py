"""The README's first command: the demo runs end to end on a CPU without network."""

import subprocess
import sys
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_runs_end_to_end(tmp_path):
    out_dir = tmp_path / "demo"
    result = subprocess.run([sys.executable, "demo.py", "--out_dir", str(out_dir)], cwd=REPO,
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "bookcorpus: wrote" in result.stdout
    assert "demo finished" in result.stdout
    assert (out_dir / "tokenizer" / "tokenizer.json").exists()
    assert (out_dir / "data_128" / "dataset_info.json").exists()
    # the plan was compiled and trained on 8 processes, and the loss fell
    assert (out_dir / "plan.json").exists() and (out_dir / "plan.md").exists()
    assert "(falling)" in result.stdout
    import json
    records = [json.loads(line) for line in (out_dir / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 21))
    for key in ("loss", "grad_norm", "lr", "tokens", "step_time_s"):
        assert all(key in r for r in records), key
    assert records[-1]["loss"] < records[0]["loss"]
    assert list((out_dir / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_finetuning_demo_runs_end_to_end(tmp_path):
    """README's fine-tuning example: instruction data -> LoRA plan -> 2-process run with validation ->
    PEFT adapter and merged checkpoint, both reproducing the run's validation loss."""
    out_dir = tmp_path / "demo_ft"
    result = subprocess.run([sys.executable, "demo_finetune.py", "--out_dir", str(out_dir), "--steps", "20"],
                            cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "fine-tuning demo finished" in result.stdout
    import json
    records = [json.loads(line) for line in (out_dir / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert len(evals) == 2  # step 10 and the last step
    assert (out_dir / "adapter" / "adapter_config.json").exists()
    assert json.loads((out_dir / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert (out_dir / "merged" / "model.safetensors.index.json").exists()
