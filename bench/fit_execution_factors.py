"""Fit a device profile's execution factors to a `bench/train_step.py --variants calibrate` run, on
a CPU, and show every variant's prediction beside its measurement under the fitted profile.

    python bench/fit_execution_factors.py RESULTS.json --device_profile h200 [--write]

Each factor is fitted to the one measured difference it prices (bisection on the cost model's own
prediction, compiled the way the benchmark compiles each variant's plan):
  foreach_adamw         base - adamw=fused step time
  compiled_layer_bytes  base - compile=layer step time
  compiled_layer_saved  the peak memory of the all-options row with the largest micro-batch, where the
                        compiled layers' saved activations dominate (the base row's peak is set by the
                        full-logits loss, not by what the layers save)
--write stores them in compiler/profiles/<profile>.json (`execution`), keeping everything else.
"""

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.train_step import parse_variant, write_model_dir  # noqa: E402
from compiler.compile import compile_plan  # noqa: E402
from compiler.profiles import profile_path  # noqa: E402
from options import CompileOptions, ExecutionOptions  # noqa: E402

RESERVED = "predicted_tensor_memory_gib"


def execution_of(settings):
    return {"compile": settings["compile"], "ce_chunk_tokens": settings["ce_chunk"],
            "fused_adamw": settings["adamw"] == "fused", "defer_grad_sync": settings["sync"] == "step"}


class Predictor:
    """Predictions of a benchmark row under a profile whose execution factors are overridden."""

    def __init__(self, setup, profile, model_id, work):
        self.setup, self.model_id, self.work = setup, model_id, work
        with open(profile_path(profile)) as f:
            self.profile = json.load(f)

    def predict(self, row, factors):
        doc = dict(self.profile, execution={**self.profile.get("execution", {}), **factors})
        path = os.path.join(self.work, "profile.json")
        with open(path, "w") as f:
            json.dump(doc, f)
        settings = parse_variant(row["variant"])
        execution = execution_of(settings)
        if settings.get("plan"):  # the compiler's own choice: what that plan recorded
            execution = {**execution_of(parse_variant("base")), **row["plan_execution"]}
        plan, _ = compile_plan(CompileOptions(
            model_id=self.model_id, plan_ngpus=1, runtime_ngpus=1, seq_len=self.setup["seq_len"],
            micro_batch_size=row["micro_batch_size"], global_batch_size=self.setup["global_batch_size"],
            mem_limit_gib=128, device_profile=path, plan_out=os.path.join(self.work, "p.json"), report=False,
            pinned=ExecutionOptions.COSTED, **execution))
        return plan.predicted["step_time_s"], max(plan.predicted["peak_memory_gib"])


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


def write_factors(path, factors):
    """Sets the profile's `execution` object, leaving the rest of the file as it is written."""
    with open(path) as f:
        text = f.read()
    profile = json.loads(text)
    block = json.dumps({**profile.get("execution", {}), **factors}, indent=1).replace("\n", "\n ")
    if "execution" in profile:
        profile["execution"] = {**profile["execution"], **factors}
        text = json.dumps(profile, indent=1) + "\n"
    else:
        end = text.rstrip().rindex("}")
        text = text[:end].rstrip() + ',\n "execution": ' + block + "\n}\n"
    json.loads(text)  # still one valid document
    with open(path, "w") as f:
        f.write(text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", help="the --json of a bench/train_step.py run with the calibrate variants")
    p.add_argument("--device_profile", required=True, help="the shipped profile to fit (h100, h200)")
    p.add_argument("--model_dir", default="configs/deepseek-coder-v2-lite")
    p.add_argument("--write", action="store_true", help="store the fitted factors in the profile file")
    args = p.parse_args(argv)
    with open(args.results) as f:
        doc = json.load(f)
    setup, rows = doc["setup"], {r["variant"]: r for r in doc["results"] if "error" not in r}
    work = tempfile.mkdtemp(prefix="fit_")
    model_id = write_model_dir(args.model_dir, work, setup["layers"])
    predictor = Predictor(setup, args.device_profile, model_id, work)
    base, fused, compiled = rows["base"], rows["adamw=fused"], rows["compile=layer"]

    def time_gap(row, name):
        return lambda x: predictor.predict(base, {name: x})[0] - predictor.predict(row, {name: x})[0]

    factors = {"foreach_adamw": bisect(lambda x: predictor.predict(base, {"foreach_adamw": x})[0]
                                       - predictor.predict(fused, {})[0], 1.0, 6.0,
                                       base["step_time_s"] - fused["step_time_s"])}
    factors["compiled_layer_bytes"] = bisect(time_gap(compiled, "compiled_layer_bytes"), 0.02, 1.0,
                                             base["step_time_s"] - compiled["step_time_s"])
    reserved = base["predicted_peak_memory_gib"] - base[RESERVED]
    widest = max((r for name, r in rows.items() if name.startswith("compile=layer+")),
                 key=lambda r: r["micro_batch_size"])
    factors["compiled_layer_saved"] = bisect(
        lambda x: predictor.predict(widest, {**factors, "compiled_layer_saved": x})[1] - reserved, 0.05, 1.0,
        widest["peak_memory_gib"])
    print(json.dumps({"execution": factors}, indent=1))
    print("\n| variant | mb | step s | predicted | error | peak GiB | predicted tensors | error |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, row in rows.items():
        step, peak = predictor.predict(row, factors)
        tensors = peak - reserved
        print(f"| {name} | {row['micro_batch_size']} | {row['step_time_s']:.3f} | {step:.3f} | "
              f"{100 * (step / row['step_time_s'] - 1):+.1f} % | {row['peak_memory_gib']:.2f} | {tensors:.2f} | "
              f"{100 * (tensors / row['peak_memory_gib'] - 1):+.1f} % |")
    if args.write:
        write_factors(profile_path(args.device_profile), factors)
        print(f"\nwrote the factors into {profile_path(args.device_profile)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
