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
