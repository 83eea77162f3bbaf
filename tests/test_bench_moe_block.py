"""The benchmark's variants compute the expert block correctly (checked on the CPU; timing needs a GPU)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import moe_block  # noqa: E402


@pytest.mark.parametrize("variant", ["loop", "naive", "gather", "fused", "grouped"])
def test_variant_matches_float32_loop(variant):
    assert moe_block.check_against_float32(variant, "cpu") < 2e-2


def test_mfu_formula_reproduces_the_example_figure():
    # nnScaler example: 4096 tokens, 64 experts, 3.190 + 6.363 ms -> 13.5 % on an H100
    mfu = moe_block.block_flops(4096) / ((3.190 + 6.363) * 1e-3 * moe_block.PEAK_FLOPS) * 100
    assert round(mfu, 1) == 13.5
