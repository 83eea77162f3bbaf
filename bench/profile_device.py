"""Measure a device profile (the format of compiler/profiles.py) on the device this runs on.

    python bench/profile_device.py --out h100.json                         # one GPU, under a minute
    torchrun --nproc_per_node 8 bench/profile_device.py --out h100.json    # + NCCL collectives
    python bench/profile_device.py --procs 8 --out h100.json               # the same, spawning itself
    python bench/profile_device.py --collectives_from compiler/profiles/h100.json --out h100.json
    python bench/profile_device.py --device cpu --procs 4 --out compiler/profiles/cpu.json
    python bench/profile_device.py --device cpu --quick --out cpu_quick.json   # seconds; for tests

Without --out the profile is printed to stdout. A short table of the main figures is printed
either way (to stderr when the JSON goes to stdout).

What it measures, all on random data (zeros let tensor cores draw less power and run faster):
  matmul         torch.mm throughput at square and skinny shapes (bf16 and a few fp32 on a GPU;
                 fp32 and bf16 on a CPU), kept as a curve of TFLOP/s against the GEMM's FLOPs
  grouped_gemm   torch._grouped_mm over 64 experts at the DeepSeek expert shapes (n=2816, k=2048
                 and n=2048, k=1408; weights in the [E, out, in] layout the model keeps), 64..4096
                 rows per expert; the two shapes' throughputs are averaged into one curve
  memory         device-to-device copy, counting bytes read and written
  kernel launch  host time per tiny eager op (what an op costs when the device is not the limit)
  memory_gib     what one process can still allocate after CUDA and cuBLAS have started
  collectives    all_reduce, all_gather, reduce_scatter, all_to_all over groups of 2, 4, 8 ranks
                 (up to the world size), 4 KiB and 1 MiB..1 GiB (4 KiB..16 MiB on a CPU); NCCL on
                 GPUs, gloo on CPUs. Only with several processes: under torchrun (WORLD_SIZE > 1)
                 or with --procs N. Bus bandwidth and latency: the line (NCCL bus-bandwidth
                 convention, see compiler/profiles.py) that fits every size's time with the
                 least relative error; the raw bus bandwidth per size is kept as "points".
Timing: on a GPU, CUDA events around a batch of back-to-back calls, with the GPU held busy
(torch.cuda._sleep) while the host queues the batch, so the events time kernels and not launches;
on a CPU, perf_counter around the batch. Warm-up first; the median of the samples is kept.
"""

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from compiler.profiles import COLLECTIVE_OPS, DeviceProfile, load_profile  # noqa: E402

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# Datasheet dense bf16 peaks (TFLOP/s, no sparsity), tried in order against the device name.
DATASHEET_PEAKS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
                   ("A100", 312.0)]


def sig(x, digits=4):
    """x rounded to `digits` significant digits, so the JSON stays readable (a CPU's TFLOP/s
    are small numbers, so rounding to decimal places would lose them)."""
    return float(f"{x:.{digits}g}")


# --------------------------------------------------------------------------- what to measure


class Sweep:
    """The sizes each measurement runs at, for one device kind; --quick shrinks every list."""

    def __init__(self, device_type, quick):
        if device_type == "cuda":
            self.matmul = {
                "bf16": [(s, s, s) for s in (256, 512, 1024, 2048, 4096, 8192, 16384)]
                + [(m, n, k) for m in (256, 1024, 4096, 16384)
                   for n, k in ((2048, 2048), (11264, 2048), (2048, 11264))],
                # fp32 without TF32 (PyTorch's default) is an order of magnitude slower; a few points.
                "fp32": [(s, s, s) for s in (1024, 4096, 8192)],
            }
            self.grouped_dtypes = ["bf16"]  # torch._grouped_mm's CUDA kernel is bf16 only
            self.grouped_experts = 64
            self.grouped_shapes = [(2816, 2048), (2048, 1408)]  # (n, k): gate+up and down of a 2048 / 1408 expert
            self.grouped_rows = [64, 128, 256, 512, 1024, 2048, 4096]
            self.copy_bytes = GIB
            self.launch_ops = 5000
            self.collective_bytes = [4 * KIB] + [MIB << (2 * i) for i in range(6)]  # 4 KiB, 1 MiB .. 1 GiB
            self.samples, self.min_sample_s = 10, 1e-3
        else:
            # A CPU runs the tests and the tiny demo (hidden 64, 8 experts): small shapes matter most.
            self.matmul = {
                "fp32": [(s, s, s) for s in (32, 64, 128, 256, 512, 1024, 2048)]
                + [(m, n, k) for m in (64, 512, 4096) for n, k in ((64, 64), (128, 64), (512, 512))],
                # bf16 has no hardware support on most CPUs, so it is slow; smaller sizes.
                "bf16": [(s, s, s) for s in (32, 64, 128, 256, 512)]
                + [(m, n, k) for m in (64, 512, 4096) for n, k in ((64, 64), (128, 64))],
            }
            self.grouped_dtypes = ["fp32", "bf16"]
            self.grouped_experts = 8
            self.grouped_shapes = [(352, 256), (256, 176)]  # the GPU shapes / 8
            self.grouped_rows = [16, 64, 256, 1024]
            self.copy_bytes = 256 * MIB
            self.launch_ops = 5000
            self.collective_bytes = [4 * KIB, 64 * KIB, MIB, 4 * MIB, 16 * MIB]
            self.samples, self.min_sample_s = 7, 10e-3
        if quick:
            # Enough of everything for a valid profile, in seconds on two CPU cores.
            self.matmul = {d: [s for s in shapes if s[0] * s[1] * s[2] <= 256 ** 3][:4]
                           for d, shapes in self.matmul.items()}
            self.grouped_rows = self.grouped_rows[:2]
            self.grouped_shapes = self.grouped_shapes[:1]
            self.copy_bytes = 8 * MIB
            self.launch_ops = 500
            self.collective_bytes = [4 * KIB, 64 * KIB]
            self.samples, self.min_sample_s = 3, 1e-3


# --------------------------------------------------------------------------- timing


class Timer:
    """Median seconds per call of fn, timed in batches long enough to be measured well."""

    def __init__(self, device, samples, min_sample_s):
        self.device = device
        self.cuda = device.type == "cuda"
        self.samples = samples
        self.min_sample_s = min_sample_s

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def _batch(self, fn, reps):
        """Seconds per call over one batch of `reps` calls."""
        return _time_batch(fn, reps, self.cuda, hold_gpu=True)

    def time(self, fn, warmup=2):
        for _ in range(warmup):
            fn()
        self.sync()
        # One call tells how many make a batch of at least min_sample_s (at most 200: the CUDA
        # launch queue holds about a thousand kernels, and a batch must fit in it).
        one = self._batch(fn, 1)
        reps = max(1, min(200, math.ceil(self.min_sample_s / max(one, 1e-9))))
        return statistics.median(self._batch(fn, reps) for _ in range(self.samples))


# --------------------------------------------------------------------------- single-device figures


def measure_matmul(timer, device, sweep):
    """{dtype: [(m, n, k, tflops)]} for every shape of the sweep."""
    out = {}
    for dtype_name, shapes in sweep.matmul.items():
        dtype = DTYPES[dtype_name]
        rows = []
        for m, n, k in shapes:
            a = torch.randn(m, k, device=device, dtype=dtype)
            b = torch.randn(k, n, device=device, dtype=dtype)
            seconds = timer.time(lambda: torch.mm(a, b))
            rows.append((m, n, k, 2.0 * m * n * k / seconds / 1e12))
            del a, b
        out[dtype_name] = rows
    return out


def matmul_curve(rows):
    """[[flops, tflops]] from (m, n, k, tflops) rows: shapes whose FLOPs are within a factor of 2
    (the same power-of-two bin) are merged into their median throughput at their geometric mean
    FLOPs, so square and skinny shapes of about the same work give one point."""
    bins = {}
    for m, n, k, tflops in rows:
        flops = 2.0 * m * n * k
        bins.setdefault(round(math.log2(flops)), []).append((flops, tflops))
    curve = []
    for key in sorted(bins):
        pts = bins[key]
        flops = math.exp(statistics.fmean(math.log(f) for f, _ in pts))
        curve.append([sig(flops), sig(statistics.median(t for _, t in pts))])
    return curve


def measure_grouped(timer, device, sweep):
    """{dtype: [(rows_per_expert, n, k, tflops)]}, the layout the training form runs."""
    out = {}
    E = sweep.grouped_experts
    for dtype_name in sweep.grouped_dtypes:
        dtype = DTYPES[dtype_name]
        rows_out = []
        for n, k in sweep.grouped_shapes:
            # Weights as the model keeps them, [E, out, in], used transposed (column-major B).
            w_EOI = torch.randn(E, n, k, device=device, dtype=dtype) * k ** -0.5
            for r in sweep.grouped_rows:
                x = torch.randn(E * r, k, device=device, dtype=dtype)
                offs = torch.arange(1, E + 1, device=device, dtype=torch.int32) * r  # group end offsets
                seconds = timer.time(lambda: torch._grouped_mm(x, w_EOI.transpose(-2, -1), offs=offs))
                rows_out.append((r, n, k, 2.0 * E * r * n * k / seconds / 1e12))
                del x
            del w_EOI
        out[dtype_name] = rows_out
    return out


def grouped_curve(rows):
    """[[rows_per_expert, tflops]]: the shapes' throughputs at each row count, averaged."""
    by_rows = {}
    for r, _, _, tflops in rows:
        by_rows.setdefault(r, []).append(tflops)
    return [[r, sig(statistics.fmean(ts))] for r, ts in sorted(by_rows.items())]


def measure_copy_gbps(timer, device, nbytes):
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    seconds = timer.time(lambda: dst.copy_(src))
    return 2 * nbytes / seconds / 1e9  # read once, written once


def measure_launch_us(device, ops):
    """Host microseconds per tiny eager op, back to back (the device never waits on data)."""
    x = torch.ones(1, device=device)
    for _ in range(100):
        x.add_(1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(ops):
            x.add_(1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) / ops * 1e6)
    return statistics.median(times)


def memory_gib(device):
    """GiB one process can allocate: free memory once the CUDA context and cuBLAS have started
    (a small matmul starts cuBLAS and its workspace). On a CPU there is no fixed device memory to
    read; the caller uses --memory_gib."""
    torch.mm(torch.randn(64, 64, device=device), torch.randn(64, 64, device=device))
    torch.cuda.synchronize(device)
    free, total = torch.cuda.mem_get_info(device)
    return free / GIB, total / GIB


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


# --------------------------------------------------------------------------- collectives


# Newer PyTorch renamed the flat-tensor collectives (the old names warn); the GPU machines may have
# an older one, so take whichever exists.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _collective_call(op, nbytes, group, g, device, dtype):
    """A closure running one `op` of `nbytes` (the profile's bytes convention) in `group`."""
    numel = nbytes // torch.tensor([], dtype=dtype).element_size()
    if op == "all_reduce":
        buf = torch.randn(numel, device=device, dtype=dtype)
        return lambda: dist.all_reduce(buf, group=group)
    if op == "all_gather":  # nbytes is the gathered (full) buffer
        full, shard = torch.empty(numel, device=device, dtype=dtype), torch.randn(numel // g, device=device, dtype=dtype)
        return lambda: _all_gather_single(full, shard, group=group)
    if op == "reduce_scatter":  # nbytes is the full input
        full, shard = torch.randn(numel, device=device, dtype=dtype), torch.empty(numel // g, device=device, dtype=dtype)
        return lambda: _reduce_scatter_single(shard, full, group=group)
    if op == "all_to_all":  # nbytes is what one rank sends, its own slice included
        send, recv = torch.randn(numel, device=device, dtype=dtype), torch.empty(numel, device=device, dtype=dtype)
        return lambda: dist.all_to_all_single(recv, send, group=group)
    raise ValueError(op)


def _time_collective(fn, group, device, samples, min_sample_s):
    """Median over samples of the slowest rank's seconds per call (a collective ends when its
    last rank does)."""
    cuda = device.type == "cuda"
    fn()
    fn()
    dist.barrier(group=group, device_ids=[device.index] if cuda else None)
    one = _time_batch(fn, 1, cuda)
    # Every rank must make the same number of calls, so they agree on the largest batch.
    reps = torch.tensor([max(1, min(100, math.ceil(min_sample_s / max(one, 1e-9))))], dtype=torch.int64,
                        device=device)
    dist.all_reduce(reps, op=dist.ReduceOp.MAX, group=group)
    reps = int(reps.item())
    times = []
    for _ in range(samples):
        dist.barrier(group=group, device_ids=[device.index] if cuda else None)
        times.append(_time_batch(fn, reps, cuda))
    slowest = torch.tensor(times, dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=group)
    return statistics.median(slowest.cpu().tolist())


def _time_batch(fn, reps, cuda, hold_gpu=False):
    """Seconds per call over one batch of `reps` back-to-back calls: host clock on a CPU, CUDA events
    on a GPU. hold_gpu: first keep the GPU busy for longer than the host needs to queue the batch
    (~20 us a call at most), so the events see kernel time, not launch gaps (not for collectives,
    whose ranks must start together)."""
    if not cuda:
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - start) / reps
    if hold_gpu:
        torch.cuda._sleep(int(reps * 20e-6 * 2e9))  # cycles at up to 2 GHz
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e-3 / reps


def measure_collectives(device, sweep):
    """On every rank of an initialised process group: {op: {g: entry}} on rank 0, None elsewhere."""
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # gloo reduces fp32 best
    results = {op: {} for op in COLLECTIVE_OPS}
    for g in (2, 4, 8):
        if g > world:
            break
        # new_group must be called by every rank, also those outside the group.
        group = dist.new_group(list(range(g)))
        if rank < g:
            for op in COLLECTIVE_OPS:
                factor = 2.0 * (g - 1) / g if op == "all_reduce" else (g - 1) / g
                points = []
                for nbytes in sweep.collective_bytes:
                    fn = _collective_call(op, nbytes, group, g, device, dtype)
                    seconds = _time_collective(fn, group, device, sweep.samples, sweep.min_sample_s)
                    points.append((nbytes, seconds))
                    del fn
                results[op][g] = fit_collective(points, factor)
                if rank == 0:
                    e = results[op][g]
                    print(f"  {op:<15} g={g}: {e['bus_bandwidth_gbps']:8.2f} GB/s bus, "
                          f"{e['latency_us']:8.1f} us", file=sys.stderr, flush=True)
        dist.barrier(device_ids=[device.index] if device.type == "cuda" else None)
    return results if rank == 0 else None


def fit_collective(points, factor):
    """Bus bandwidth and latency of t = latency + factor * bytes / busbw fitted to the measured
    (bytes, seconds) points by least squares on the relative error, so that small and large
    messages count alike and one disturbed size does not set the line alone. "points" keeps
    nccl-tests' bus bandwidth (factor * bytes / t) per size, for the record."""
    xs = [factor * b for b, _ in points]  # bytes over the bus
    ts = [t for _, t in points]
    w = [1.0 / t ** 2 for t in ts]        # relative error: residual / t
    sw, swx = sum(w), sum(wi * x for wi, x in zip(w, xs))
    swxx = sum(wi * x * x for wi, x in zip(w, xs))
    swt, swxt = sum(wi * t for wi, t in zip(w, ts)), sum(wi * x * t for wi, x, t in zip(w, xs, ts))
    det = sw * swxx - swx * swx
    latency, per_byte = ((swt * swxx - swx * swxt) / det, (sw * swxt - swx * swt) / det) if det > 0 else (-1, 0)
    if latency < 0 or per_byte <= 0:
        # A negative latency means the points lie on a line through 0: fit the bandwidth alone.
        latency, per_byte = 0.0, swxt / swxx
    return {
        "bus_bandwidth_gbps": sig(1.0 / per_byte / 1e9),
        "latency_us": sig(latency * 1e6, 3),
        "points": [[b, sig(x / t / 1e9)] for (b, t), x in zip(points, xs)],
    }


def _spawned_worker(rank, world, port, device_type, quick, result_path):
    """One process of a --procs run: joins the group, measures, rank 0 writes the results."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    results = _collectives_in_group(rank, world, rank, device_type, quick)
    if results is not None:
        with open(result_path, "w") as f:
            json.dump({op: {str(g): e for g, e in t.items()} for op, t in results.items()}, f)


def _collectives_in_group(rank, world, local_rank, device_type, quick):
    """Join the process group (rank of world; local_rank picks the GPU), measure, leave."""
    if device_type == "cuda":
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
        dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device)
    else:
        torch.set_num_threads(1)  # several ranks share the cores; one thread each
        device = torch.device("cpu")
        dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        return measure_collectives(device, Sweep(device_type, quick))
    finally:
        dist.destroy_process_group()


def spawn_collectives(procs, device_type, quick):
    """Start `procs` local processes to measure collectives; their table, or {} if none."""
    import socket
    import torch.multiprocessing as mp

    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "collectives.json")
        mp.spawn(_spawned_worker, args=(procs, port, device_type, quick, path), nprocs=procs, join=True)
        with open(path) as f:
            return {op: {int(g): e for g, e in t.items()} for op, t in json.load(f).items()}


# --------------------------------------------------------------------------- assembling the profile


def build_profile(args, device, single, collectives, collectives_source, today):
    """The profile document from the measurements; sources say what was measured, where, when."""
    where = f"measured on {args.where} by bench/profile_device.py on {today}" + (
        " (--quick: shrunken sweeps)" if args.quick else "")
    if device.type == "cpu":
        where += f", torch {torch.__version__}, {torch.get_num_threads()} thread(s)"
    else:
        where += f", torch {torch.__version__}, CUDA {torch.version.cuda}"
    matmul = {d: matmul_curve(rows) for d, rows in single["matmul"].items()}
    grouped = {d: grouped_curve(rows) for d, rows in single["grouped"].items()}
    best_tflops = max(t for rows in single["matmul"].values() for *_, t in rows)
    sweep = Sweep(device.type, args.quick)
    sources = {
        "profile": {"kind": "measured", "note": where},
        "matmul": {"kind": "measured", "note": (
            f"{where}; torch.mm on random data, median of {sweep.samples} timed batches after warm-up; "
            f"square and skinny shapes, merged per power-of-two of FLOPs (median)"),
            "detail": {"columns": ["m", "n", "k", "tflops"], **single["matmul_detail"]}},
        "grouped_gemm": {"kind": "measured", "note": (
            f"{where}; torch._grouped_mm, {sweep.grouped_experts} experts, (n, k) in "
            f"{sweep.grouped_shapes} averaged, weights [E, out, in] used transposed"),
            "detail": {"columns": ["rows_per_expert", "n", "k", "tflops"], **single["grouped_detail"]}},
        "memory_bandwidth_gbps": {"kind": "measured", "note": (
            f"{where}; copy_ of {sweep.copy_bytes // MIB} MiB, bytes read + written")},
        "kernel_launch_us": {"kind": "measured", "note": (
            f"{where}; host time per tiny eager op (x.add_(1) on one element), {sweep.launch_ops} back to back")},
        "collectives": collectives_source,
    }
    if args.memory_gib is not None:
        memory = args.memory_gib
        sources["memory_gib"] = {"kind": "estimate", "note": (
            f"given by --memory_gib {args.memory_gib} (8 by default on a CPU, which has no device memory to read)")}
    else:
        memory = single["memory_free_gib"]
        sources["memory_gib"] = {"kind": "measured", "note": (
            f"{where}; torch.cuda.mem_get_info free after CUDA and cuBLAS start "
            f"(total {single['memory_total_gib']:.2f} GiB)")}
    if args.peak_tflops is not None:
        peak = args.peak_tflops
        sources["peak_bf16_tflops"] = {"kind": "vendor", "note": f"given by --peak_tflops {args.peak_tflops}"}
    else:
        peak = next((p for key, p in DATASHEET_PEAKS if key in single["device_name"]), None)
        if peak is not None and device.type == "cuda":
            sources["peak_bf16_tflops"] = {"kind": "vendor", "note": (
                f"datasheet dense bf16 peak for {single['device_name']} (no sparsity)")}
        else:
            # No datasheet figure (a CPU, or an unknown GPU): the best throughput measured here is
            # the most this device was seen to do, the fairest MFU denominator we have.
            peak = best_tflops
            sources["peak_bf16_tflops"] = {"kind": "measured", "note": (
                f"{where}; no datasheet figure known: the highest matmul throughput measured "
                f"in any dtype")}
    doc = {
        "schema_version": 1,
        "name": args.name,
        "device_name": single["device_name"],
        "memory_gib": sig(memory),
        "peak_bf16_tflops": sig(peak, 6),
        "kernel_launch_us": sig(single["launch_us"], 3),
        "memory_bandwidth_gbps": sig(single["copy_gbps"]),
        "matmul": matmul,
        "grouped_gemm": grouped,
        "collectives": {op: {str(g): e for g, e in sorted(t.items())} for op, t in collectives.items() if t},
        "sources": sources,
    }
    DeviceProfile.from_json(doc, origin="<measured profile>")  # the same checks a reader applies
    return doc


def measure_single_device(device, sweep):
    timer = Timer(device, sweep.samples, sweep.min_sample_s)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    single = {}
    if device.type == "cuda":
        single["device_name"] = torch.cuda.get_device_name(device)
        single["memory_free_gib"], single["memory_total_gib"] = memory_gib(device)
        # Bring the clocks up before anything is timed.
        a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
        end = time.time() + 1.0
        while time.time() < end:
            torch.mm(a, a)
            torch.cuda.synchronize(device)
        del a
    else:
        single["device_name"] = cpu_name()
    log("matmul ...")
    rows = measure_matmul(timer, device, sweep)
    single["matmul"] = rows
    single["matmul_detail"] = {d: [[m, n, k, sig(t)] for m, n, k, t in r] for d, r in rows.items()}
    log("grouped GEMM ...")
    grows = measure_grouped(timer, device, sweep)
    single["grouped"] = grows
    single["grouped_detail"] = {d: [[r, n, k, sig(t)] for r, n, k, t in g] for d, g in grows.items()}
    log("copy, launch ...")
    single["copy_gbps"] = measure_copy_gbps(timer, device, sweep.copy_bytes)
    single["launch_us"] = measure_launch_us(device, sweep.launch_ops)
    return single


def dump_json(obj, indent=0):
    """JSON with one level of indent per level of nesting, but every list or object whose items
    are all plain values (an [x, y] point, a row, a collective's figures) on one line, and large
    or small floats in exponent form (1.1e+12, not 1100000000000.0)."""
    def scalar(v):
        if isinstance(v, float) and v != 0 and not (1e-4 <= abs(v) < 1e6):
            return f"{v:.6g}"
        return json.dumps(v)

    def is_plain(v):
        return not isinstance(v, (list, dict))

    pad, inner = " " * indent, " " * (indent + 1)
    if isinstance(obj, dict):
        if all(is_plain(v) for v in obj.values()):
            return "{" + ", ".join(f"{json.dumps(k)}: {scalar(v)}" for k, v in obj.items()) + "}"
        items = [f"{inner}{json.dumps(k)}: {dump_json(v, indent + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list):
        if all(is_plain(v) for v in obj):
            return "[" + ", ".join(scalar(v) for v in obj) + "]"
        items = [f"{inner}{dump_json(v, indent + 1)}" for v in obj]
        return "[\n" + ",\n".join(items) + "\n" + pad + "]"
    return scalar(obj)


def print_summary(doc, stream):
    p = DeviceProfile.from_json(doc)
    print(f"\n{doc['name']}: {doc['device_name']}", file=stream)
    print(f"  memory {p.memory_gib:.2f} GiB, peak {p.peak_bf16_tflops:g} TFLOP/s, copy "
          f"{p.memory_bandwidth_gbps:g} GB/s, launch {p.kernel_launch_us:g} us", file=stream)
    for what, curves, unit in (("matmul", doc["matmul"], "FLOPs"), ("grouped_gemm", doc["grouped_gemm"], "rows/expert")):
        for dtype, curve in curves.items():
            pts = "  ".join(f"{x:.3g}:{y:.3g}" for x, y in curve)
            print(f"  {what} {dtype} ({unit}:TFLOP/s)  {pts}", file=stream)
    if doc["collectives"]:
        print(f"  {'collective':<15} {'g':>2} {'bus GB/s':>10} {'latency us':>11}", file=stream)
        for op, table in doc["collectives"].items():
            for g, e in table.items():
                print(f"  {op:<15} {g:>2} {e['bus_bandwidth_gbps']:>10.2f} {e['latency_us']:>11.1f}", file=stream)
    else:
        print("  collectives: none", file=stream)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--name", help="profile name (default: h100 / h200 from the GPU's name, gpu, or cpu)")
    ap.add_argument("--out", help="write the profile JSON here (default: print it to stdout)")
    ap.add_argument("--quick", action="store_true", help="tiny sweeps (seconds on a CPU), for tests")
    ap.add_argument("--procs", type=int, default=None,
                    help="local processes for collectives when not under torchrun "
                         "(default: every visible GPU on cuda, none on cpu; 0 or 1: skip)")
    ap.add_argument("--collectives_from", help="profile (name or file) whose collectives to copy when "
                                               "none are measured here; marked as copied")
    ap.add_argument("--memory_gib", type=float, help="memory capacity to record instead of measuring "
                                                     "it (a CPU has none to measure: 8 by default)")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads for the single-device part (default 1: what torchrun gives "
                         "each rank, and how the tests and the demo run; two threads on a shared "
                         "2-core machine also stall whenever another process takes a core)")
    ap.add_argument("--where", help="the machine, in words, for the sources (default: the device name)")
    ap.add_argument("--peak_tflops", type=float, help="peak to record instead of the datasheet table")
    args = ap.parse_args(argv)
    if args.device == "cpu" and args.memory_gib is None:
        args.memory_gib = 8.0  # no device memory to read; a modest budget for tests and the demo
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(0)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    sweep = Sweep(args.device, args.quick)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    if args.where is None:  # the sources name the machine; the device name is the least we know
        args.where = torch.cuda.get_device_name(0) if args.device == "cuda" else cpu_name()
    today = datetime.date.today().isoformat()

    # Collectives first, so under torchrun the other ranks are done before rank 0's long part.
    collectives = {}
    if world > 1:
        if rank == 0:
            print(f"collectives over {world} ranks (torchrun) ...", file=sys.stderr, flush=True)
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        collectives = _collectives_in_group(rank, world, local_rank, args.device, args.quick)
        if rank != 0:
            return  # rank 0 alone measures its device and writes the profile
    else:
        # A CPU gets no processes by default: a --quick run (the tests) skips collectives.
        procs = args.procs if args.procs is not None else (
            torch.cuda.device_count() if args.device == "cuda" else 0)
        if procs > 1:
            print(f"collectives over {procs} spawned processes ...", file=sys.stderr, flush=True)
            collectives = spawn_collectives(procs, args.device, args.quick)
            world = procs
    backend = "NCCL" if args.device == "cuda" else "gloo"
    if any(collectives.values()):
        collectives_source = {"kind": "measured", "note": (
            f"measured on {args.where} by bench/profile_device.py on {today}, {backend} "
            f"over {world} processes, "
            f"messages {sweep.collective_bytes[0]} .. {sweep.collective_bytes[-1]} bytes, median of "
            f"{sweep.samples} timed batches of the slowest rank; busbw and latency: least relative "
            f"error line over the sizes")}
    elif args.collectives_from:
        source = load_profile(args.collectives_from)
        collectives = source.collectives
        collectives_source = {"kind": "copied", "note": (
            f"not measured in this run (one device); copied from {source.origin}, where: "
            f"{source.sources.get('collectives', {}).get('note', '?')}")}
    else:
        collectives_source = {"kind": "placeholder", "note": (
            "not measured: one process and no --collectives_from; launch with torchrun or --procs")}

    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    single = measure_single_device(device, sweep)
    if args.name is None:
        low = single["device_name"].lower()
        args.name = "cpu" if device.type == "cpu" else "h200" if "h200" in low else "h100" if "h100" in low else "gpu"
    doc = build_profile(args, device, single, collectives, collectives_source, today)
    if args.collectives_from and collectives_source["kind"] == "copied":
        # Keep the finer notes of the copied profile (e.g. which ops were vendor figures).
        for key, entry in load_profile(args.collectives_from).sources.items():
            if key.startswith("collectives."):
                doc["sources"][key] = {"kind": "copied", "note": f"from {args.collectives_from}: {entry['note']}"}

    text = dump_json(doc)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
        print_summary(doc, sys.stdout)
        print(f"\nwrote {args.out}")
    else:
        print(text)
        print_summary(doc, sys.stderr)


if __name__ == "__main__":
    main()
