"""Device profiles (compiler/profiles.py) and the script that measures them (bench/profile_device.py)."""

import copy
import json
import math
import os
import re
import subprocess
import sys
import time

import pytest

from compiler.profiles import (COLLECTIVE_OPS, Curve, DeviceProfile, ProfileError, known_profiles,
                               load_profile)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = ["h100", "h200", "cpu"]


def synthetic_doc(**overrides):
    """A small valid profile document with round numbers, for hand-computed expectations."""
    doc = {
        "schema_version": 1,
        "name": "test",
        "device_name": "Test Device",
        "memory_gib": 16.0,
        "peak_bf16_tflops": 100.0,
        "kernel_launch_us": 5.0,
        "memory_bandwidth_gbps": 1000.0,
        "matmul": {"bf16": [[1e9, 10.0], [1e11, 50.0], [1e13, 80.0]]},
        "grouped_gemm": {"bf16": [[64, 20.0], [1024, 60.0]]},
        "collectives": {
            "all_reduce": {"2": {"bus_bandwidth_gbps": 200.0, "latency_us": 8.0},
                           "4": {"bus_bandwidth_gbps": 100.0, "latency_us": 10.0},
                           "8": {"bus_bandwidth_gbps": 80.0, "latency_us": 20.0}},
            "all_gather": {"4": {"bus_bandwidth_gbps": 100.0, "latency_us": 10.0}},
            "reduce_scatter": {"4": {"bus_bandwidth_gbps": 100.0, "latency_us": 10.0}},
            "all_to_all": {"4": {"bus_bandwidth_gbps": 50.0, "latency_us": 30.0}},
        },
        "sources": {key: {"kind": "estimate", "note": "made up for a test"} for key in (
            "memory_gib", "peak_bf16_tflops", "kernel_launch_us", "memory_bandwidth_gbps",
            "matmul", "grouped_gemm", "collectives")},
    }
    doc.update(overrides)
    return doc


def synthetic():
    return DeviceProfile.from_json(synthetic_doc(), origin="<test>")


# --------------------------------------------------------------------------- shipped profiles


def test_the_three_profiles_are_shipped():
    assert set(SHIPPED) <= set(known_profiles())


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profile_loads_with_sensible_numbers(name):
    p = load_profile(name)
    assert p.name == name
    assert p.memory_gib > 1 and p.peak_bf16_tflops > 0 and p.memory_bandwidth_gbps > 0
    assert p.kernel_launch_us >= 0
    # The cost model asks for bf16 by default, so every profile must answer that.
    assert "bf16" in p.matmul and "bf16" in p.grouped_gemm
    for curves in (p.matmul, p.grouped_gemm):
        for curve in curves.values():
            xs = [x for x, _ in curve.points]
            assert xs == sorted(set(xs))
            # Nothing measured beats the peak that MFU is computed against.
            assert all(0 < y <= p.peak_bf16_tflops * 1.001 for _, y in curve.points)
    for op in COLLECTIVE_OPS:
        assert p.collectives.get(op), f"{name} has no {op} figures"
        for g, entry in p.collectives[op].items():
            assert g >= 2 and entry["bus_bandwidth_gbps"] > 0 and entry["latency_us"] >= 0
    # Every number says where it came from.
    assert {"matmul", "grouped_gemm", "collectives", "memory_gib"} <= set(p.sources)


@pytest.mark.parametrize("name", ["h100", "h200"])
def test_gpu_profiles_are_measured_on_their_devices(name):
    p = load_profile(name)
    assert p.sources["matmul"]["kind"] == "measured"
    assert p.sources["grouped_gemm"]["kind"] == "measured"
    assert p.device_name.startswith({"h100": "NVIDIA H100", "h200": "NVIDIA H200"}[name])
    assert p.peak_bf16_tflops == 989.0
    # a large bf16 GEMM runs at 65-85 % of the datasheet peak on both
    assert 0.65 * 989 < p.matmul["bf16"](1e12) < 0.85 * 989
    # collectives: measured on the H200 host, copied (same NVLink generation) for the H100
    expected = {"h100": "copied", "h200": "measured"}[name]
    assert p.sources["collectives"]["kind"] == expected
    assert sorted(p.collectives["all_reduce"]) == [2, 4]


def test_cpu_profile_is_measured_here():
    p = load_profile("cpu")
    assert p.sources["matmul"]["kind"] == "measured"
    assert "2-core CPU dev machine" in p.sources["matmul"]["note"]
    assert p.memory_gib == 8.0
    assert sorted(p.collectives["all_reduce"]) == [2, 4]
    # The CPU's peak is the best matmul throughput it was seen to do.
    best = max(y for curve in p.matmul.values() for _, y in curve.points)
    assert best <= p.peak_bf16_tflops <= best * 1.5


@pytest.mark.parametrize("name", SHIPPED)
def test_times_grow_with_the_work(name):
    p = load_profile(name)
    for dtype in p.matmul:
        times = [p.matmul_time(s, s, s, dtype) for s in (64, 256, 1024, 4096, 16384)]
        assert times == sorted(times) and len(set(times)) == len(times)
    for dtype in p.grouped_gemm:
        times = [p.grouped_gemm_time(t, 64, 2816, 2048, dtype) for t in (16, 64, 256, 1024, 4096)]
        assert times == sorted(times) and len(set(times)) == len(times)
    assert p.memory_time(1 << 20) < p.memory_time(1 << 30)
    for op in COLLECTIVE_OPS:
        assert 0 < p.collective_time(op, 1 << 20, 2) < p.collective_time(op, 1 << 30, 2)


def test_gpu_matmul_estimate_matches_the_measurement_it_was_built_from():
    p = load_profile("h100")
    flops = 2 * 8192 ** 3
    measured = [y for x, y in p.matmul["bf16"].points if x == pytest.approx(flops, rel=1e-3)]
    assert measured, "the H100 profile measures an 8192^3 GEMM"
    seconds = p.matmul_time(8192, 8192, 8192)
    assert flops / seconds / 1e12 == pytest.approx(measured[0], rel=0.01)


# --------------------------------------------------------------------------- curves


def test_curve_interpolates_log_log_and_clamps():
    c = Curve(((1e6, 10.0), (1e8, 100.0)))
    assert c(1e6) == pytest.approx(10.0)
    assert c(1e8) == pytest.approx(100.0)
    assert c(1e7) == pytest.approx(math.sqrt(10.0 * 100.0))  # halfway in log x -> geometric mean
    assert c(1.0) == 10.0 and c(1e20) == 100.0               # clamped to the end points


def test_curve_is_monotone_where_its_points_are():
    c = Curve(((1.0, 1.0), (10.0, 5.0), (100.0, 20.0), (1000.0, 15.0)))
    xs = [10 ** (i / 50) for i in range(0, 151)]  # 1 .. 1000
    ys = [c(x) for x in xs]
    rising = [y for x, y in zip(xs, ys) if x <= 100.0]
    falling = [y for x, y in zip(xs, ys) if x >= 100.0]
    assert rising == sorted(rising)
    assert falling == sorted(falling, reverse=True)
    assert min(ys) >= 1.0 and max(ys) <= 20.0  # never overshoots the points


def test_single_point_curve_is_constant():
    c = Curve(((5.0, 7.0),))
    assert c(1.0) == c(5.0) == c(1e9) == 7.0


# --------------------------------------------------------------------------- compute times


def test_matmul_time_formula():
    p = synthetic()
    # 2 * 1000 * 500 * 100 = 1e8 FLOPs: below the first point, clamped to 10 TFLOP/s.
    assert p.matmul_time(1000, 500, 100) == pytest.approx(1e8 / 10e12 + 5e-6)
    # 2 * 5000 * 5000 * 2000 = 1e11 FLOPs, exactly the second point: 50 TFLOP/s.
    assert p.matmul_time(5000, 5000, 2000) == pytest.approx(1e11 / 50e12 + 5e-6)
    assert p.matmul_time(0, 10, 10) == 0.0


def test_matmul_dtype_spellings_and_missing_dtype():
    p = synthetic()
    t = p.matmul_time(4096, 4096, 4096)
    assert p.matmul_time(4096, 4096, 4096, "bfloat16") == t
    assert p.matmul_time(4096, 4096, 4096, "torch.bfloat16") == t
    with pytest.raises(ProfileError, match="no matmul figures for fp32, only for bf16"):
        p.matmul_time(4096, 4096, 4096, "float32")
    with pytest.raises(ProfileError, match="unknown dtype"):
        p.matmul_time(4096, 4096, 4096, "int4")


def test_grouped_gemm_and_memory_time_formulas():
    p = synthetic()
    flops = 2.0 * 256 * 64 * 2816 * 2048
    tflops = math.exp((math.log(20) + math.log(60)) / 2)  # 256 is halfway between 64 and 1024 in log
    assert p.grouped_gemm_time(256, 64, 2816, 2048) == pytest.approx(flops / (tflops * 1e12) + 5e-6)
    assert p.grouped_gemm_time(0, 64, 2816, 2048) == 0.0
    assert p.memory_time(2e9) == pytest.approx(2e9 / 1000e9 + 5e-6)
    assert p.mfu(50e12, 1.0) == pytest.approx(0.5)


# --------------------------------------------------------------------------- collectives


def test_collective_formulas_by_hand():
    p = synthetic()
    gb = 1e9
    # all_reduce over 4: 10 us + 2 * 3/4 * 1e9 B / 100 GB/s = 10 us + 15 ms
    assert p.collective_time("all_reduce", gb, 4) == pytest.approx(10e-6 + 0.015)
    # all_gather / reduce_scatter over 4: 10 us + 3/4 * 1e9 / 100e9 = 10 us + 7.5 ms
    assert p.collective_time("all_gather", gb, 4) == pytest.approx(10e-6 + 0.0075)
    assert p.collective_time("reduce_scatter", gb, 4) == pytest.approx(10e-6 + 0.0075)
    # all_to_all over 4 at 50 GB/s, 30 us: 30 us + 3/4 * 1e9 / 50e9 = 30 us + 15 ms
    assert p.collective_time("all_to_all", gb, 4) == pytest.approx(30e-6 + 0.015)
    # all_reduce over 2 at 200 GB/s, 8 us: 8 us + 2 * 1/2 * 1e9 / 200e9 = 8 us + 5 ms
    assert p.collective_time("all_reduce", gb, 2) == pytest.approx(8e-6 + 0.005)


def test_group_of_one_and_empty_buffer_are_free():
    p = synthetic()
    for op in COLLECTIVE_OPS:
        assert p.collective_time(op, 1e9, 1) == 0.0
        assert p.collective_time(op, 0, 4) == 0.0
    assert load_profile("h100").collective_time("all_reduce", 1 << 30, 1) == 0.0


def test_unmeasured_group_size_uses_the_nearest_larger_then_the_largest():
    p = synthetic()
    # 3 ranks: the 4-rank figures (100 GB/s, 10 us), with g = 3 in the formula.
    assert p.collective_time("all_reduce", 1e9, 3) == pytest.approx(10e-6 + 2 * 2 / 3 * 1e9 / 100e9)
    # 16 ranks: nothing larger was measured, so the 8-rank figures.
    assert p.collective_time("all_reduce", 1e9, 16) == pytest.approx(20e-6 + 2 * 15 / 16 * 1e9 / 80e9)
    # all_gather only has 4: a group of 2 uses it too.
    assert p.collective_entry("all_gather", 2)["bus_bandwidth_gbps"] == 100.0


def test_unknown_or_unmeasured_collective_is_an_error():
    with pytest.raises(ProfileError, match="unknown collective"):
        synthetic().collective_time("broadcast", 1e6, 4)
    doc = synthetic_doc()
    del doc["collectives"]["all_to_all"]
    p = DeviceProfile.from_json(doc, origin="x.json")
    with pytest.raises(ProfileError, match="no figures for all_to_all"):
        p.collective_time("all_to_all", 1e6, 4)


# --------------------------------------------------------------------------- loading errors


def test_unknown_profile_name_lists_the_known_ones():
    with pytest.raises(ProfileError) as info:
        load_profile("a100")
    message = str(info.value)
    assert "unknown device profile 'a100'" in message
    for name in SHIPPED:
        assert name in message
    assert "pass a JSON file path to --device_profile" in message


def test_missing_profile_file(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(ProfileError, match="no such profile file .*known profiles are .*h100.*--device_profile"):
        load_profile(str(path))


def test_malformed_file_names_the_file_and_the_field(tmp_path):
    doc = synthetic_doc()
    del doc["memory_bandwidth_gbps"]
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ProfileError) as info:
        load_profile(str(path))
    assert str(path) in str(info.value)
    assert "'memory_bandwidth_gbps' is missing" in str(info.value)


@pytest.mark.parametrize("change, field", [
    (lambda d: d["matmul"]["bf16"].reverse(), "matmul.bf16"),                   # x not increasing
    (lambda d: d["grouped_gemm"]["bf16"][0].__setitem__(1, 0), "grouped_gemm.bf16[0][1]"),
    (lambda d: d["collectives"]["all_reduce"]["4"].pop("latency_us"), "collectives.all_reduce.4.latency_us"),
    (lambda d: d["collectives"]["all_reduce"].__setitem__("1", {}), "collectives.all_reduce.1"),
    (lambda d: d["sources"].pop("matmul"), "sources.matmul"),
    (lambda d: d["sources"]["matmul"].__setitem__("kind", "guess"), "sources.matmul.kind"),
    (lambda d: d.__setitem__("memory_gib", "80"), "memory_gib"),
    (lambda d: d.__setitem__("schema_version", 2), "schema_version"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_fields_are_named(tmp_path, change, field):
    doc = copy.deepcopy(synthetic_doc())
    change(doc)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ProfileError, match=re.escape(f"bad.json: field '{field}'")):
        load_profile(str(path))


def test_invalid_json_names_the_file(tmp_path):
    path = tmp_path / "truncated.json"
    path.write_text('{"name": "x", ')
    with pytest.raises(ProfileError, match="truncated.json: not valid JSON"):
        load_profile(str(path))


def test_json_round_trip(tmp_path):
    p = load_profile("h100")
    path = tmp_path / "copy.json"
    path.write_text(json.dumps(p.to_json()))
    assert load_profile(str(path)) == p


# --------------------------------------------------------------------------- the measuring script


def test_quick_cpu_measurement_writes_a_loadable_profile(tmp_path):
    out = tmp_path / "cpu_quick.json"
    start = time.time()
    subprocess.run([sys.executable, os.path.join(REPO_ROOT, "bench", "profile_device.py"),
                    "--device", "cpu", "--quick", "--out", str(out)],
                   check=True, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    elapsed = time.time() - start
    p = load_profile(str(out))
    assert p.name == "cpu"
    assert set(p.matmul) == {"fp32", "bf16"} and set(p.grouped_gemm) == {"fp32", "bf16"}
    assert p.sources["matmul"]["kind"] == "measured"
    assert p.matmul_time(256, 256, 256, "fp32") > 0
    # A single process measures no collectives; asking for one says how to get them.
    assert p.collectives == {}
    with pytest.raises(ProfileError, match="torchrun"):
        p.collective_time("all_reduce", 1 << 20, 2)
    # About 5 s on two idle cores; the margin is for a machine that others are busy on.
    assert elapsed < 60, f"--quick took {elapsed:.0f} s"


def test_collective_fit_recovers_an_exact_line():
    sys.path.insert(0, os.path.join(REPO_ROOT, "bench"))
    import profile_device

    factor = 2 * 3 / 4  # all_reduce over 4
    points = [(b, 50e-6 + factor * b / 2e9) for b in (4096, 1 << 16, 1 << 20, 1 << 24)]
    fit = profile_device.fit_collective(points, factor)
    assert fit["bus_bandwidth_gbps"] == pytest.approx(2.0, rel=1e-3)
    assert fit["latency_us"] == pytest.approx(50.0, rel=1e-2)
