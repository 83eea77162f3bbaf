"""bench/fit_execution_factors.py fits a profile's attention throughputs from bench/train_step.py rows:
a pair of rows that differ only in the attention kernel gives the other kernel's throughput against PyTorch's
own sdpa (the profile's), and the kernel check a CUDA run writes into its JSON is taken as measured."""

import os
import tempfile

import pytest

from bench.fit_execution_factors import Predictor, fit_attention, kernel_flops, minimax, write_factors
from modeling import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny-deepseek-v2")
SETUP = {"model": "tiny", "layers": 3, "seq_len": 1024, "global_batch_size": 4}


def _row(variant, step_time_s):
    return {"variant": variant, "micro_batch_size": 2, "recompute": "none", "step_time_s": step_time_s,
            "plan_execution": {}}


def test_a_pair_of_rows_gives_the_other_kernels_throughput():
    """Rows 'measured' as the cost model predicts them with sdpa_flash_padded at 60 TFLOP/s (the h200
    profile says 175.9): the fit finds 60 again from their difference alone."""
    config = load_config(TINY)
    predictor = Predictor(SETUP, "h200", TINY, tempfile.mkdtemp(prefix="fit_test_"))
    x = kernel_flops(config, 2, SETUP["seq_len"], "sdpa_flash_padded")
    truth = {"sdpa_flash_padded": [[x, 60.0]]}
    base = _row("base", 0.0)
    flash = _row("attention=sdpa_flash_padded", 0.0)
    base["step_time_s"] = predictor.predict(base, {}, truth)[0]
    flash["step_time_s"] = predictor.predict(flash, {}, truth)[0]
    assert flash["step_time_s"] > base["step_time_s"]
    fitted = fit_attention(predictor, {r["variant"]: r for r in (base, flash)}, {}, config, SETUP["seq_len"])
    assert set(fitted) == {"sdpa_flash_padded"}  # sdpa is the reference, not refitted
    assert fitted["sdpa_flash_padded"][0][0] == x
    assert fitted["sdpa_flash_padded"][0][1] == pytest.approx(60.0, rel=2e-2)


def test_the_kernel_check_is_taken_as_measured_and_written_into_the_profile(tmp_path):
    """A run's setup.attention_kernels: each kernel that ran becomes a one-point curve; --write puts the
    curves in the profile's attention.kernels, keeping the other kernels and fields."""
    import json
    from compiler.profiles import load_profile, profile_path
    config = load_config(TINY)
    predictor = Predictor(SETUP, "h200", TINY, tempfile.mkdtemp(prefix="fit_test_"))
    measured = {"sdpa_cudnn": {"ms": 2.0, "kernel_flops": 5e11, "tflops": 250.0}, "sdpa_efficient": {"error": "no"}}
    fitted = fit_attention(predictor, {}, measured, config, SETUP["seq_len"])
    assert fitted == {"sdpa_cudnn": [[5e11, 250.0]]}
    copy = tmp_path / "h200.json"
    copy.write_text(open(profile_path("h200")).read())
    write_factors(str(copy), {"foreach_adamw": 2.0}, fitted)
    written = load_profile(str(copy))
    assert written.attention["sdpa_cudnn"](5e11) == 250.0
    assert set(written.attention) == set(load_profile("h200").attention)
    assert written.execution["foreach_adamw"] == 2.0 and json.loads(copy.read_text())["name"] == "h200"


def test_the_compiled_factor_is_fitted_to_the_smallest_worst_error():
    """compiled_layer_bytes is the factor whose largest relative error over the rows with compiled
    layers is smallest: with two rows over-priced by opposite amounts the fit lands between them,
    where neither error alone would put it."""
    # predicted / measured - 1 of two rows, linear in the factor x: zero at x = 0.4 and at x = 0.7
    errors = [lambda x: 1.5 * (x - 0.4), lambda x: -(x - 0.7)]
    fitted = minimax(lambda x: max(abs(e(x)) for e in errors), 0.02, 1.0)
    assert fitted == pytest.approx(0.52, abs=0.005)  # where 1.5 (x - 0.4) = 0.7 - x
    assert minimax(lambda x: abs(x - 0.9), 0.02, 1.0) == pytest.approx(0.9, abs=0.005)

