"""Runs the training runtime in several CPU processes (gloo) for tests, and collects what each rank saw.

A plan is written by hand for each family (mesh, stages, ZeRO, schedule); every process runs
`runtime.trainer.train` and saves its per-step records and the full value of every parameter it
holds (sharded tensors gathered) so that the test can compare them with a single-process run.
"""

import json
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from compiler.plan import Plan, Stage, model_fingerprint
from modeling import spec
from runtime.mesh import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_plan(config, model_id, pp=1, dp=1, ep=1, tp=1, zero=0, over_replicas=True, schedule=None,
              micro_batches=None, virtual_stages=1, stage_layers=None, recompute="none", seq_len=32,
              micro_batch_size=2, global_batch_size=8, runtime_ngpus=None):
    plan_ngpus = pp * dp * ep * tp
    runtime = runtime_ngpus or plan_ngpus
    replicas = runtime // plan_ngpus
    if micro_batches is None:
        micro_batches = global_batch_size // (micro_batch_size * dp * ep * replicas)
    schedule = schedule or ("GradAccum" if pp == 1 else "1F1B")
    L = config.num_hidden_layers
    stage_layers = stage_layers or [(round(L * s / pp), round(L * (s + 1) / pp)) for s in range(pp)]
    per_stage = dp * ep * tp
    stages = [Stage(index=s, layers=list(rng), devices=list(range(s * per_stage, (s + 1) * per_stage)),
                    embed=s == 0, head=s == pp - 1, recompute=recompute) for s, rng in enumerate(stage_layers)]
    if schedule == "Interleaved1F1B":
        from compiler.compile import assign_chunks
        assign_chunks(stages, virtual_stages)
    fields, digest = model_fingerprint(config)
    plan = Plan(model={"name": "test", "model_id": model_id, "model_type": config.model_type, "fingerprint": fields,
                       "fingerprint_sha": digest},
                search_inputs={"seq_len": seq_len, "micro_batch_size": micro_batch_size,
                               "global_batch_size": global_batch_size, "runtime_ngpus": runtime,
                               "device_profile": "cpu", "mem_limit_gib": 8},
                plan_ngpus=plan_ngpus, mesh={"pp": pp, "dp": dp, "ep": ep, "tp": tp}, stages=stages,
                ops={family: {"partition": partition} for family, partition in
                     spec.partitions_for_mesh(tp, ep).items()},
                zero={"level": zero, "shard_over_replicas": over_replicas},
                schedule={"name": schedule, "micro_batches": micro_batches, "virtual_stages": virtual_stages},
                predicted={"step_time_s": 1.0, "peak_memory_gib": [0.0] * plan_ngpus, "mfu": 0.0})
    plan.validate()
    return plan


def _full(tensor):
    from torch.distributed.tensor import DTensor
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _worker(rank, world, port, run_kwargs, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from runtime.trainer import RunArgs, train
    dist.init_process_group("gloo")
    try:
        records, params = train(RunArgs(**run_kwargs))
        values = {name: _full(p.detach()).clone() for name, p in params.items()}
        torch.save({"records": records, "params": values}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_plan(plan, world, model_id, dataset_path, out_dir, max_steps=3, lr=1e-3, seed=0, **run_args):
    """Trains `max_steps` steps of `plan` on `world` CPU processes; returns the per-rank results."""
    os.makedirs(out_dir, exist_ok=True)
    plan_path = os.path.join(out_dir, "plan.json")
    plan.save(plan_path)
    run_kwargs = dict(model_id=model_id, dataset_path=dataset_path, plan_ngpus=plan.plan_ngpus, runtime_ngpus=world,
                      plan=plan_path, max_steps=max_steps, lr=lr, warmup_steps=1, seed=seed, device="cpu",
                      save_dir=os.path.join(out_dir, "save"), progress=False, final_save=False)
    run_kwargs.update(run_args)
    mp.spawn(_worker, args=(world, free_port(), run_kwargs, out_dir), nprocs=world, join=True)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]


def gather_parameters(results, plan):
    """One full tensor per parameter name across ranks. With expert parallelism (the plan's experts
    partitioned by expert) a rank holds the
    slice of experts of its ep coordinate (rank layout: replica, pp, dp, ep, tp, row-major); the
    slices are concatenated along the expert dim."""
    ep, tp = plan.mesh["ep"], plan.mesh["tp"]
    experts_split = plan.ops["experts"]["partition"] == "expert"
    full, slices = {}, {}
    for rank, result in enumerate(results):
        ep_rank = (rank // tp) % ep
        for name, value in result["params"].items():
            if experts_split and ".mlp.experts." in name:
                slices.setdefault(name, {})[ep_rank] = value
            else:
                full.setdefault(name, value)
    for name, parts in slices.items():
        full[name] = torch.cat([parts[k] for k in sorted(parts)], dim=0)
    return full


def losses(results):
    return [r["loss"] for r in results[0]["records"]]


def write_tiny_v2(root, num_hidden_layers):
    """configs/tiny-deepseek-v2 with `num_hidden_layers` layers, as a config.json-only directory under
    `root`; returns (its path, its config fields)."""
    with open(os.path.join(REPO, "configs", "tiny-deepseek-v2", "config.json")) as f:
        fields = json.load(f)
    fields["num_hidden_layers"] = num_hidden_layers
    model_dir = os.path.join(str(root), f"tiny{num_hidden_layers}")
    os.makedirs(model_dir)
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(fields, f)
    return model_dir, fields


def write_random_rows(path, vocab_size, rows, seq_len, seed=0):
    """A pretraining dataset of `rows` random token rows (column input_ids) saved with save_to_disk at
    `path`; returns the path."""
    import datasets
    ids = torch.randint(0, vocab_size, (rows, seq_len), generator=torch.Generator().manual_seed(seed))
    datasets.Dataset.from_dict({"input_ids": ids.tolist()}).save_to_disk(str(path))
    return str(path)


def save_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)
