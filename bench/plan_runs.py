"""Run saved plans with torchrun on this machine's GPUs and set the measurements beside the plans'
predictions: the multi-GPU benchmark.

    python bench/plan_runs.py --model_id configs/deepseek-coder-v2-lite \\
        --run best=plans/x.json@4 --run second=plans/x2.json@4 --steps 30 --warmup 5 --out bench_out

Each --run NAME=PLAN@N starts `torchrun --nproc_per_node N train.py --plan PLAN --runtime_ngpus N`
(the real training path: random initialisation from --seed, bf16, AdamW, no checkpoint) on a
dataset of random token rows (throughput does not depend on the tokens), reads the run's
metrics.jsonl and reports, over the steps after --warmup: the median step time, tokens/s per GPU,
MFU (the trainer's: the plan's model FLOPs of the global batch / (step time x GPUs x peak)) and the
peak memory per GPU (rank 0's torch.cuda.max_memory_allocated), beside the plan's predicted step
time and peak memory. The prediction is for the --runtime_ngpus the plan was compiled with: compile
one plan file per GPU count to compare (the table flags a mismatch). Results go to OUT/results.json
and a Markdown table on stdout.

`--packed` trains on packed instruction rows instead (random examples of 1/8 to 1/2 of a row, prompts
masked, position ids restarting: bench/finetune_step.py's rows), for plans compiled with
`--document_masking on`, LoRA plans among them (a plan carries its LoRA options). Each run is also
written to OUT/NAME.json with the fields bench/RESULTS.md reports: device, gpus, tokens_per_s_per_gpu,
mfu, step_time_s, predicted_step_time_s, peak_memory_gib.

The step time is the trainer's per-step wall time (host clock after a device synchronisation,
which a multi-process step needs anyway); the median over the timed steps discards compilation
and allocator warm-up.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def parse_run(text):
    """NAME=PLAN.json@NGPUS[:STEPS] -> (name, plan, ngpus, steps or None)."""
    try:
        name, rest = text.split("=", 1)
        plan, n = rest.rsplit("@", 1)
        n, _, steps = n.partition(":")
        return name, plan, int(n), int(steps) if steps else None
    except ValueError:
        raise argparse.ArgumentTypeError(f"--run {text!r}: expected NAME=PLAN.json@NGPUS or NAME=PLAN.json@NGPUS:STEPS")


def summarize(records, warmup):
    timed = records[warmup:] or records
    step = statistics.median(r["step_time_s"] for r in timed)
    tokens = timed[0]["tokens"]
    return {"steps": len(records), "timed_steps": len(timed), "step_time_s": step, "tokens_per_s": tokens / step,
            "mfu": statistics.median(r["mfu"] for r in timed), "peak_memory_gib": max(r["peak_memory_gib"] for r in records),
            "first_loss": records[0]["loss"], "last_loss": records[-1]["loss"]}


def device_name(device):
    import torch
    return torch.cuda.get_device_name(0) if device == "cuda" and torch.cuda.is_available() else "cpu"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_id", required=True, help="model directory (config.json; random initialisation)")
    p.add_argument("--run", action="append", type=parse_run, required=True,
                   help="NAME=PLAN.json@NGPUS[:STEPS]; repeat for several runs (they run one after another)")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per run (unless the run gives its own)")
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of the medians")
    p.add_argument("--out", default="bench_out", help="output directory (runs' metrics, results.json)")
    p.add_argument("--timeout_s", type=int, default=900, help="limit per run; a run past it is stopped")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a dry run with gloo")
    p.add_argument("--extra", default="", help="extra train.py flags, space separated")
    p.add_argument("--packed", action="store_true",
                   help="packed instruction rows (plans compiled with --document_masking on, LoRA plans too)")
    args = p.parse_args(argv)

    from bench.finetune_step import write_packed_dataset
    from bench.train_step import write_dataset
    from compiler.plan import Plan
    from modeling import load_config
    config = load_config(args.model_id)
    os.makedirs(args.out, exist_ok=True)
    results = {}
    for name, plan_path, ngpus, steps in args.run:
        steps = steps or args.steps
        plan = Plan.load(plan_path)
        seq, global_batch = plan.search_inputs["seq_len"], plan.search_inputs["global_batch_size"]
        most_steps = max(s or args.steps for *_, s in args.run)
        rows = global_batch * most_steps
        data = (write_packed_dataset(args.out, config.vocab_size, seq, rows) if args.packed
                else write_dataset(args.out, config.vocab_size, seq, rows=rows))
        save_dir = os.path.join(args.out, name)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ngpus),
               os.path.join(REPO, "train.py"), "--model_id", args.model_id, "--dataset_path", data,
               "--plan", plan_path, "--runtime_ngpus", str(ngpus), "--device", args.device,
               "--max_steps", str(steps), "--warmup_steps", "10", "--lr", "1e-4",
               "--save_dir", save_dir, "--no_final_save"] + args.extra.split()
        print(f"[{name}] {' '.join(cmd[3:])}", flush=True)
        started = time.perf_counter()
        try:
            rc = subprocess.run(cmd, cwd=REPO, timeout=args.timeout_s).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        wall = time.perf_counter() - started
        metrics = os.path.join(save_dir, "metrics.jsonl")
        records = [json.loads(line) for line in open(metrics)] if os.path.isfile(metrics) else []
        entry = {"plan": os.path.basename(plan_path),  # no machine paths: results are committed
                 "ngpus": ngpus, "rc": rc, "wall_s": wall,
                 "plan_summary": f"pp={plan.mesh['pp']} dp={plan.mesh['dp']} ep={plan.mesh['ep']} tp={plan.mesh['tp']} "
                                 f"zero {plan.zero['level']} {plan.schedule['name']} recompute "
                                 f"{'/'.join(s.recompute for s in plan.stages)}",
                 "predicted_step_time_s": plan.predicted["step_time_s"],
                 "predicted_peak_memory_gib": max(plan.predicted["peak_memory_gib"]),
                 "planned_runtime_ngpus": plan.search_inputs.get("runtime_ngpus")}
        if records:
            entry.update(summarize(records, args.warmup))
            entry.update(device=device_name(args.device), gpus=ngpus,
                         tokens_per_s_per_gpu=entry["tokens_per_s"] / ngpus)
        results[name] = entry
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
        with open(os.path.join(args.out, f"{name}.json"), "w") as f:
            json.dump(entry, f, indent=1)
        print(f"[{name}] rc={rc} wall {wall:.0f} s: " + json.dumps({k: v for k, v in entry.items()
                                                                   if k not in ("plan",)}), flush=True)

    print("\n| run | plan | GPUs | step s (pred) | tokens/s/GPU | MFU % | peak GiB (pred) | loss |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for name, e in results.items():
        if "step_time_s" not in e:
            print(f"| {name} | {e['plan_summary']} | {e['ngpus']} | failed (rc {e['rc']}) | | | | |")
            continue
        planned = e["planned_runtime_ngpus"]
        note = "" if planned in (None, e["ngpus"]) else f", for {planned} GPUs"
        print(f"| {name} | {e['plan_summary']} | {e['ngpus']} | {e['step_time_s']:.3f} "
              f"({e['predicted_step_time_s']:.3f}{note}) | {e['tokens_per_s'] / e['ngpus']:.0f} | {100 * e['mfu']:.1f} | "
              f"{e['peak_memory_gib']:.1f} ({e['predicted_peak_memory_gib']:.1f}) | "
              f"{e['first_loss']:.3f} -> {e['last_loss']:.3f} |")
    return 0 if all(e.get("rc") == 0 for e in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
