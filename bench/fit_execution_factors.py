"""Fit a device profile's execution factors and attention throughputs to `bench/train_step.py` runs
(the `calibrate` preset, and any other rows), on a CPU, and show every variant's prediction beside its
measurement under the fitted profile.

    python bench/fit_execution_factors.py RESULTS.json [MORE.json ...] --device_profile h200 [--write]

Rows of several files of one setup (model, layers, sequence, global batch) are pooled. Each number is
fitted to the one measured figure it prices (bisection on the cost model's own prediction, compiled
the way the benchmark compiles each variant's plan):
  attention kernels     the kernel check's throughput where the run recorded one (setup.attention_kernels,
                        a CUDA run); then every kernel a pair of rows differing only in the attention kernel
                        measures against one already known (PyTorch's own `sdpa` first): the kernel's
                        throughput that gives the pair's measured step-time difference
  foreach_adamw         base - adamw=fused step time
  compiled_layer_bytes  the value that makes the largest step-time error of the rows with compiled
                        layers smallest (the base - compile=layer gap alone, at one micro-batch size,
                        left the rows of one large micro-batch 8-11 % over)
  compiled_layer_saved  the peak memory of the all-options row with the largest micro-batch, where the
                        compiled layers' saved activations dominate (the base row's peak is set by the
                        full-logits loss, not by what the layers save)
--write stores them in compiler/profiles/<profile>.json (`execution`, `attention.kernels`), keeping
everything else.
"""

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.train_step import parse_variant, write_model_dir  # noqa: E402
from compiler.compile import compile_plan  # noqa: E402
from compiler.cost_model import PADDED_ATTENTION, RESERVED_GIB  # noqa: E402
from compiler.profiles import profile_path  # noqa: E402
from options import CompileOptions, ExecutionOptions  # noqa: E402



def execution_of(settings):
    return {"attention": settings["attention"], "compile": settings["compile"], "ce_chunk_tokens": settings["ce_chunk"],
            "fused_adamw": settings["adamw"] == "fused", "defer_grad_sync": settings["sync"] == "step"}


def row_execution(row):
    """The execution options a row ran: its variant's, or for `plan` what that plan recorded (a plan
    that recorded no attention kernel ran the runtime's default, which the cost model resolves)."""
    settings = parse_variant(row["variant"])
    if settings.get("plan"):
        return {**execution_of(parse_variant("base")), "attention": None, **row["plan_execution"]}
    return execution_of(settings)


class Predictor:
    """Predictions of a benchmark row under a profile whose execution factors and attention kernel
    throughputs are overridden."""

    def __init__(self, setup, profile, model_id, work):
        self.setup, self.model_id, self.work = setup, model_id, work
        with open(profile_path(profile)) as f:
            self.profile = json.load(f)
        self._cache = {}

    attention = None  # the fitted {kernel: [[kernel FLOPs, TFLOP/s]]} every prediction uses, once known

    def predict(self, row, factors, attention=None):
        """(step time s, peak memory GiB) of `row`; attention: {kernel: [[kernel FLOPs, TFLOP/s]]}
        overriding the profile's (default: self.attention)."""
        attention = attention if attention is not None else self.attention
        key = (row["variant"], json.dumps(factors, sort_keys=True), json.dumps(attention, sort_keys=True))
        if key in self._cache:
            return self._cache[key]
        doc = dict(self.profile, execution={**self.profile.get("execution", {}), **factors})
        if attention:
            kernels = {**doc.get("attention", {}).get("kernels", {}), **attention}
            doc["attention"] = {**doc.get("attention", {}), "kernels": kernels}
            doc["sources"] = {**doc["sources"], "attention": doc["sources"].get(
                "attention", {"kind": "measured", "note": "fitted by bench/fit_execution_factors.py"})}
        path = os.path.join(self.work, "profile.json")
        with open(path, "w") as f:
            json.dump(doc, f)
        execution = row_execution(row)
        plan, _ = compile_plan(CompileOptions(
            model_id=self.model_id, plan_ngpus=1, runtime_ngpus=1, seq_len=self.setup["seq_len"],
            micro_batch_size=row["micro_batch_size"], global_batch_size=self.setup["global_batch_size"],
            mem_limit_gib=128, device_profile=path, plan_out=os.path.join(self.work, "p.json"), report=False,
            pinned=ExecutionOptions.COSTED, **execution))
        self._cache[key] = plan.predicted["step_time_s"], max(plan.predicted["peak_memory_gib"])
        return self._cache[key]


def bisect(f, lo, hi, target, steps=30):
    """x in [lo, hi] with f(x) == target, f monotonic."""
    f_lo = f(lo)
    for _ in range(steps):
        mid = (lo + hi) / 2
        if (f(mid) - target) * (f_lo - target) > 0:
            lo, f_lo = mid, f(mid)
        else:
            hi = mid
    return round((lo + hi) / 2, 3)


def minimax(worst_error, lo, hi, steps=24):
    """x in [lo, hi] minimising worst_error(x), a function with one minimum (golden-section search)."""
    ratio = (5 ** 0.5 - 1) / 2
    a, b = lo, hi
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = worst_error(c), worst_error(d)
    for _ in range(steps):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = worst_error(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = worst_error(d)
    return round((a + b) / 2, 3)


def kernel_flops(config, micro_batch, seq_len, kernel):
    """One layer's attention call, forward + backward, in the profiles' convention (compiler/profiles.py)."""
    if config.model_type == "deepseek_v2":
        d_qk, d_v = config.qk_nope_head_dim + config.qk_rope_head_dim, config.v_head_dim
    else:
        d_qk = d_v = config.hidden_size // config.num_attention_heads
    width = d_qk if kernel in PADDED_ATTENTION else d_v
    return 3 * micro_batch * config.num_attention_heads * seq_len * seq_len * (d_qk + width)


def fit_attention(predictor, rows, measured, config, seq_len):
    """{kernel: [[kernel FLOPs, TFLOP/s]]}: the kernel check's figures (`measured`, a CUDA run's
    setup.attention_kernels), then, repeatedly, each kernel that a pair of rows differing only in
    the attention kernel measures against a kernel already known (from the check, or PyTorch's own
    `sdpa` as the profile lists it)."""
    profile_kernels = predictor.profile.get("attention", {}).get("kernels", {})
    fitted = {k: [[m["kernel_flops"], round(m["tflops"], 2)]] for k, m in (measured or {}).items() if "tflops" in m}
    default = "flash" if "flash" in profile_kernels else "sdpa"  # what a run with no attention option gets

    def kernel_of(row):
        return row_execution(row)["attention"] or default

    def rest_of(row):
        e = dict(row_execution(row))
        e.pop("attention")
        return row["micro_batch_size"], row.get("recompute"), json.dumps(e, sort_keys=True)

    groups = {}
    for row in rows.values():
        groups.setdefault(rest_of(row), {}).setdefault(kernel_of(row), row)
    # PyTorch's own choice is the reference where the run has no kernel check: the profile's figure
    reference = {"sdpa"} if "sdpa" in profile_kernels and "sdpa" not in fitted else set()
    progress = True
    while progress:
        progress = False
        for group in groups.values():
            known = [k for k in group if k in fitted or k in reference]
            if not known:
                continue
            ref = group[known[0]]
            for kernel, row in group.items():
                if kernel in fitted or kernel in reference:
                    continue
                x = kernel_flops(config, row["micro_batch_size"], seq_len, kernel)
                measured_gap = row["step_time_s"] - ref["step_time_s"]

                def gap(tflops, kernel=kernel, row=row, x=x):
                    attention = {**fitted, kernel: [[x, tflops]]}
                    return predictor.predict(row, {}, attention)[0] - predictor.predict(ref, {}, attention)[0]
                fitted[kernel] = [[x, bisect(gap, 1.0, 2000.0, measured_gap)]]
                print(f"attention {kernel}: {fitted[kernel][0][1]} TFLOP/s from {row['variant']} - {ref['variant']} "
                      f"({1e3 * measured_gap:+.1f} ms per step)", flush=True)
                progress = True
    return fitted


def write_factors(path, factors, attention=None):
    """Sets the profile's `execution` object (and the fitted `attention.kernels`), leaving the rest of
    the file as it is written."""
    with open(path) as f:
        text = f.read()
    profile = json.loads(text)
    block = json.dumps({**profile.get("execution", {}), **factors}, indent=1).replace("\n", "\n ")
    if attention:
        profile["attention"] = {**profile.get("attention", {}),
                                "kernels": {**profile.get("attention", {}).get("kernels", {}), **attention}}
    if "execution" in profile or attention:
        profile["execution"] = {**profile.get("execution", {}), **factors}
        text = json.dumps(profile, indent=1) + "\n"
    else:
        end = text.rstrip().rindex("}")
        text = text[:end].rstrip() + ',\n "execution": ' + block + "\n}\n"
    json.loads(text)  # still one valid document
    with open(path, "w") as f:
        f.write(text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="the --json of bench/train_step.py runs of one setup, the calibrate "
                                              "variants among them")
    p.add_argument("--device_profile", required=True, help="the shipped profile to fit (h100, h200)")
    p.add_argument("--model_dir", default="configs/deepseek-coder-v2-lite")
    p.add_argument("--write", action="store_true", help="store the fitted factors in the profile file")
    args = p.parse_args(argv)
    setup, rows, kernels = None, {}, {}
    for path in args.results:
        with open(path) as f:
            doc = json.load(f)
        same = ("model", "layers", "seq_len", "global_batch_size")
        if setup is not None and any(doc["setup"][k] != setup[k] for k in same):
            theirs = ", ".join(f"{k} {doc['setup'][k]}" for k in same)
            print(f"error: {path} is another setup ({theirs}) than {args.results[0]}", file=sys.stderr)
            return 2
        setup = setup or doc["setup"]
        kernels.update(doc["setup"].get("attention_kernels", {}).get("kernels", {}))
        rows.update({r["variant"]: r for r in doc["results"] if "error" not in r and r["variant"] not in rows})
    work = tempfile.mkdtemp(prefix="fit_")
    model_id = write_model_dir(args.model_dir, work, setup["layers"])
    predictor = Predictor(setup, args.device_profile, model_id, work)
    from modeling import load_config
    predictor.attention = fit_attention(predictor, rows, kernels, load_config(model_id), setup["seq_len"])
    base, fused = rows["base"], rows["adamw=fused"]

    factors = {"foreach_adamw": bisect(lambda x: predictor.predict(base, {"foreach_adamw": x})[0]
                                       - predictor.predict(fused, {})[0], 1.0, 6.0,
                                       base["step_time_s"] - fused["step_time_s"])}
    compiled_rows = [r for r in rows.values() if row_execution(r).get("compile") == "layer"]
    factors["compiled_layer_bytes"] = minimax(
        lambda x: max(abs(predictor.predict(r, {**factors, "compiled_layer_bytes": x})[0] / r["step_time_s"] - 1)
                      for r in compiled_rows), 0.02, 1.0)
    reserved = RESERVED_GIB  # what max_memory_allocated cannot see: the plan's allowance for the CUDA context
    widest = max((r for name, r in rows.items() if name.startswith("compile=layer+")),
                 key=lambda r: r["micro_batch_size"])
    factors["compiled_layer_saved"] = bisect(
        lambda x: predictor.predict(widest, {**factors, "compiled_layer_saved": x})[1] - reserved, 0.05, 1.0,
        widest["peak_memory_gib"])
    print(json.dumps({"execution": factors, "attention": {"kernels": predictor.attention}}, indent=1))
    print("\n| variant | mb | step s | predicted | error | peak GiB | predicted tensors | error |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, row in rows.items():
        step, peak = predictor.predict(row, factors)
        tensors = peak - reserved
        print(f"| {name} | {row['micro_batch_size']} | {row['step_time_s']:.3f} | {step:.3f} | "
              f"{100 * (step / row['step_time_s'] - 1):+.1f} % | {row['peak_memory_gib']:.2f} | {tensors:.2f} | "
              f"{100 * (tensors / row['peak_memory_gib'] - 1):+.1f} % |")
    if args.write:
        write_factors(profile_path(args.device_profile), factors, predictor.attention)
        print(f"\nwrote the factors into {profile_path(args.device_profile)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
