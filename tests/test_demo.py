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
