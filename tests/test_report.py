"""The plan report: Markdown tables and a PNG figure, for hand-built plans of several shapes."""

import struct

import pytest

from compiler.plan import Plan, Stage
from compiler.report import write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_plan(pp, dp, ep, tp, layers=8, schedule="GradAccum", micro_batches=4, virtual_stages=1,
              full_predictions=True, alternatives=None):
    """A valid plan (Plan.validate passes) with layers split evenly over pp stages."""
    ngpus = pp * dp * ep * tp
    per_stage = ngpus // pp
    bounds = [round(i * layers / pp) for i in range(pp + 1)]
    stages = [Stage(index=i, layers=[bounds[i], bounds[i + 1]],
                    devices=list(range(i * per_stage, (i + 1) * per_stage)),
                    embed=i == 0, head=i == pp - 1, recompute="full" if i == 0 and pp > 1 else "none")
              for i in range(pp)]
    if schedule == "Interleaved1F1B":
        from compiler.compile import assign_chunks
        assign_chunks(stages, virtual_stages)
    peaks = [10.0 + 1.5 * d for d in range(ngpus)]
    predicted = {"step_time_s": 1.25, "peak_memory_gib": peaks, "mfu": 0.413}
    if full_predictions:
        predicted.update({
            "tokens_per_s": 52428.8,
            "breakdown_s": {"compute": 0.9, "all_to_all": 0.2, "allreduce": 0.1, "bubble": 0.05},
            "memory_breakdown_gib": [{"params": 2.0, "grads": 2.0, "optimizer": 4.0,
                                      "activations": p - 8.5, "buffers": 0.5} for p in peaks],
            "stage_times_s": [{"forward": 0.02 + 0.005 * i, "backward": 0.04 + 0.01 * i} for i in range(pp)],
        })
    plan = Plan(
        model={"name": "tiny-deepseek-v2", "model_type": "deepseek_v2",
               "fingerprint": {"num_hidden_layers": layers}, "fingerprint_sha": "0123456789abcdef"},
        search_inputs={"seq_len": 2048, "micro_batch_size": 1, "global_batch_size": 32, "runtime_ngpus": 2 * ngpus,
                       "device_profile": "h100", "mem_limit_gib": 40.0},
        plan_ngpus=ngpus, mesh={"pp": pp, "dp": dp, "ep": ep, "tp": tp}, stages=stages,
        ops={"experts": {"partition": "expert" if ep > 1 else "replicate", "dispatch": "all-to-all"},
             "attention": {"partition": "heads" if tp > 1 else "replicate"}},
        zero={"level": 2, "shard_over_replicas": False},
        schedule={"name": schedule, "micro_batches": micro_batches, "virtual_stages": virtual_stages},
        predicted=predicted,
        alternatives=alternatives if alternatives is not None else [
            {"summary": "pp=1 dp=2 ep=2 tp=1 zero=3", "predicted": {"step_time_s": 1.5, "peak_memory_gib": [30.0, 31.0],
                                                                   "mfu": 0.34}},
            {"summary": "pp=1 dp=4 ep=1 tp=1 zero=0", "predicted": {"step_time_s": 1.0, "peak_memory_gib": [55.0] * 4,
                                                                   "mfu": 0.51},
             "rejected": "peak memory 55.0 GiB exceeds the 40 GiB limit"},
        ],
        explanation="Expert parallel keeps every expert's weights on one device and moves tokens instead; "
                    "the step is compute-bound, so the winner keeps communication off the critical path.",
    )
    plan.validate()
    return plan


def png_size(path):
    """Width and height from the IHDR chunk, after checking the PNG signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, "not a PNG file"
    assert data[12:16] == b"IHDR", "the first chunk of a PNG must be IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height, len(data)


def write(plan, tmp_path, stem="plan"):
    md, png = tmp_path / f"{stem}.md", tmp_path / f"{stem}.png"
    write_report(plan, str(md), str(png))
    assert md.is_file() and png.is_file()
    width, height, size = png_size(png)
    assert 1200 <= width <= 2400 and 700 <= height <= 1500, (width, height)
    assert size > 20_000  # three drawn panels, not an empty canvas
    return md.read_text()


def test_report_data_parallel_only(tmp_path):
    plan = make_plan(pp=1, dp=4, ep=1, tp=1)
    text = write(plan, tmp_path)
    assert text.startswith("# Parallel plan for tiny-deepseek-v2 on P=4 devices")
    assert "plan for tiny-deepseek-v2 on 4 devices" in text  # summarize()'s text
    assert plan.explanation in text
    assert "| 0 | 0-7 (8 layers) | 0, 1, 2, 3 | embed, head | none |" in text
    assert "| dp | 4 | data parallel:" in text
    assert "| experts | replicate | dispatch=all-to-all | - |" in text
    assert "ops: all replicated" in text  # summarize()
    for d in range(4):
        peak = 10.0 + 1.5 * d
        assert f"| {d} | 0 | dp{d} | {peak:.2f} | 40.00 | {40 - peak:.2f} | 2.00 | 2.00 | 4.00 | " in text
    assert "| compute | 0.9 | 72.0 % |" in text
    assert "- MFU: 41.3 %" in text and "- tokens per second: 52,429" in text
    assert "| 2 | pp=1 dp=2 ep=2 tp=1 zero=3 | 1.5 | 1.20x | 31.00 | 34.0 % |  |" in text
    assert "| 3 | pp=1 dp=4 ep=1 tp=1 zero=0 | 1 | 0.80x | 55.00 | 51.0 % | rejected: peak memory 55.0 GiB" in text
    assert "![Layers on devices, memory per device and pipeline schedule](plan.png)" in text


def test_report_pipeline_expert_parallel(tmp_path):
    plan = make_plan(pp=2, dp=1, ep=2, tp=1, schedule="1F1B", micro_batches=8)
    text = write(plan, tmp_path)
    assert "| 0 | 0-3 (4 layers) | 0, 1 | embed | full |" in text
    assert "| 1 | 4-7 (4 layers) | 2, 3 | head | none |" in text
    assert "| ep | 2 | expert parallel: routed experts split, tokens exchanged by all-to-all |" in text
    assert "| experts | expert | dispatch=all-to-all | - |" in text
    assert "ops: experts expert (all-to-all), others replicated" in text
    for d in range(4):
        stage, peak = d // 2, 10.0 + 1.5 * d
        assert f"| {d} | {stage} | ep{d % 2} | {peak:.2f} | 40.00 | {40 - peak:.2f} |" in text
    assert "| 1 | (chosen) pp=2 dp=1 ep=2 tp=1 zero=2 1F1B mb=8 | 1.25 | 1.00x |" in text
    assert "| 2 | pp=1 dp=2 ep=2 tp=1 zero=3 |" in text
    assert plan.explanation in text


@pytest.mark.parametrize("schedule, virtual, micro_batches", [("1F1B", 1, 64), ("Interleaved1F1B", 2, 8),
                                                             ("Interleaved1F1B", 2, 10)])
def test_report_deep_pipeline_sparse_plan(tmp_path, schedule, virtual, micro_batches):
    # Four stages, more micro-batches than are drawn, and none of the optional predictions or runners-up.
    # an interleaved plan needs at least two layers per stage (one per model chunk)
    layers = 6 if virtual == 1 else 8
    plan = make_plan(pp=4, dp=1, ep=1, tp=1, layers=layers, schedule=schedule, micro_batches=micro_batches,
                     virtual_stages=virtual, full_predictions=False, alternatives=[])
    plan.explanation = ""
    del plan.search_inputs["mem_limit_gib"]
    text = write(plan, tmp_path)
    if virtual == 1:
        # 6 layers over 4 stages: 0-1, 2, 3, 4-5.
        assert "| 1 | 2 (1 layer) | 1 | - | none |" in text and "| 3 | 4-5 (2 layers) | 3 | head | none |" in text
    assert "| 0 | 0 | - | 10.00 | n/a | n/a |" in text
    assert "_The search kept no runners-up._" in text


def test_report_with_only_required_predictions(tmp_path):
    # No step time or MFU: summarize() cannot run, the report still can.
    plan = make_plan(pp=2, dp=2, ep=1, tp=2, schedule="1F1B", micro_batches=3, full_predictions=False)
    plan.predicted = {"peak_memory_gib": plan.predicted["peak_memory_gib"]}
    text = write(plan, tmp_path)
    assert "mesh: pp=2 dp=2 ep=1 tp=2; zero 2; schedule 1F1B with 3 micro-batches" in text
    assert "- step time: n/a\n" in text
    assert "| 2 | pp=1 dp=2 ep=2 tp=1 zero=3 | 1.5 | n/a |" in text


def test_report_png_in_other_directory(tmp_path):
    plan = make_plan(pp=1, dp=1, ep=1, tp=1, micro_batches=40)
    (tmp_path / "figs").mkdir()
    write_report(plan, str(tmp_path / "r.md"), str(tmp_path / "figs" / "r.png"))
    assert "](figs/r.png)" in (tmp_path / "r.md").read_text()

