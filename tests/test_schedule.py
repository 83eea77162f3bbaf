"""The pipeline-schedule model: the simulated timeline and the closed form the cost model prices with."""

import pytest

from compiler.schedule import idle_fraction, makespan, pipeline_time, pipeline_timeline


def uniform(pp, forward, backward):
    return [{"forward": forward, "backward": backward}] * pp


def test_1f1b_timeline_has_the_textbook_length():
    # With equal stages and no communication, 1F1B takes (M + pp - 1) * (forward + backward).
    for pp, m in [(1, 4), (2, 4), (4, 8), (3, 7)]:
        boxes, approximate = pipeline_timeline("1F1B", pp, m)
        assert not approximate
        assert makespan(boxes) == pytest.approx((m + pp - 1) * 3.0)
        assert len(boxes) == 2 * pp * m
        # Stage 0 runs pp - 1 warm-up forwards before its first backward.
        stage0 = [b.kind for b in sorted(boxes, key=lambda b: b.start) if b.stage == 0]
        assert stage0[:pp] == ["F"] * pp and stage0[pp] == "B"


def test_interleaved_timeline_shrinks_the_bubble():
    pp, m = 4, 8
    plain, _ = pipeline_timeline("1F1B", pp, m)
    interleaved, approximate = pipeline_timeline("Interleaved1F1B", pp, m, virtual_stages=2)
    assert not approximate
    assert len(interleaved) == 2 * pp * m * 2
    assert makespan(interleaved) < makespan(plain)
    assert idle_fraction(interleaved, pp) < idle_fraction(plain, pp)
    # Micro-batches that do not divide into groups of pp fall back to a labelled approximation.
    _, approximate = pipeline_timeline("Interleaved1F1B", pp, 10, virtual_stages=2)
    assert approximate


@pytest.mark.parametrize("pp", [2, 4])
@pytest.mark.parametrize("extra", [0, 1, 5])
@pytest.mark.parametrize("forward, backward", [(1.0, 2.0), (0.3, 0.7)])
def test_closed_form_is_the_1f1b_makespan_for_equal_stages(pp, extra, forward, backward):
    m = pp + extra
    boxes, _ = pipeline_timeline("1F1B", pp, m, stage_times=uniform(pp, forward, backward))
    total, bubble = pipeline_time(pp, m, 1, forward + backward)
    assert total == pytest.approx(makespan(boxes))
    assert bubble == pytest.approx((pp - 1) * (forward + backward))


@pytest.mark.parametrize("pp, chunks", [(2, 2), (4, 2), (4, 3)])
@pytest.mark.parametrize("groups", [1, 2, 3])
def test_closed_form_is_the_interleaved_makespan_for_equal_stages(pp, chunks, groups):
    # The documented relation: Megatron's order with M a multiple of pp spans (M + (pp - 1) / v) * (f + b),
    # i.e. the bubble is 1/v of 1F1B's, exactly what pipeline_time charges.
    m, forward, backward = groups * pp, 0.3, 0.7
    boxes, approximate = pipeline_timeline("Interleaved1F1B", pp, m, chunks, uniform(pp, forward, backward))
    assert not approximate
    assert makespan(boxes) == pytest.approx((m + (pp - 1) / chunks) * (forward + backward))
    total, bubble = pipeline_time(pp, m, chunks, forward + backward)
    assert total == pytest.approx(makespan(boxes))
    plain, _ = pipeline_timeline("1F1B", pp, m, stage_times=uniform(pp, forward, backward))
    assert bubble == pytest.approx((makespan(plain) - m * (forward + backward)) / chunks)


def test_closed_form_without_pipeline_has_no_bubble():
    # GradAccum (pp = 1): the step is just the micro-batches, with exactly zero bubble.
    assert pipeline_time(1, 8, 1, 0.25) == (2.0, 0.0)
