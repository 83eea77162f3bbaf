"""`train.py --run_mode compile`: trace, cost, search, and save the plan with its report.

    compile_plan(CompileOptions(model_id=..., plan_ngpus=4, runtime_ngpus=8, ...)) -> (Plan, path)

Runs on a CPU in seconds: the model is built on the meta device, so no weights are read or
allocated, whatever the model's size.
"""

import dataclasses
import os
import sys
import time

import torch

from compiler.cost_model import CostModel, model_costs
from compiler.plan import Plan, PlanError, Stage, default_plan_path, model_fingerprint, model_name_of, summarize
from compiler.profiles import load_profile
from compiler.execution import (attention_choices, cudagraph_refusal, describe_effects, effects, pinned_options,
                                variants)
from compiler.search import NoPlanFits, SearchResult, divisors, explain, search
from compiler.trace import build_traced_model, trace_training_step
from modeling import spec
from options import CompileOptions, ExecutionOptions, OptionError

RUNNERS_UP = 8
# More devices than this for one copy of a plan is a typo, not a machine (the search would take minutes)
MAX_PLAN_DEVICES = 4096
# --micro_batch_size auto tries the divisors of the global batch up to this many sequences
MAX_AUTO_MICRO_BATCH = 64


def check_options(options: CompileOptions):
    """Flag errors before any work; each message names the flag and the fix. The numeric ranges are
    Options.validate()'s (options.py: LEAST / ABOVE / MOST), applied here as well because the API
    (tests, benchmarks) builds CompileOptions without train.py's parser; then what only a plan needs."""
    if not options.model_id:
        raise PlanError("--run_mode compile needs --model_id")
    if options.plan_ngpus is None:
        raise PlanError("--plan_ngpus must be a positive number of devices")
    micro = options.micro_batch_size
    for flag, value in (("--seq_len", options.seq_len), ("--micro_batch_size", 1 if micro == "auto" else micro),
                        ("--global_batch_size", options.global_batch_size)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise PlanError(f"{flag} must be a positive integer, got {value!r}")
    try:
        options.validate()
    except OptionError as e:
        raise PlanError(str(e)) from None
    runtime = options.runtime_ngpus or options.plan_ngpus
    if runtime % options.plan_ngpus:
        raise PlanError(f"--runtime_ngpus {runtime} is not a multiple of --plan_ngpus {options.plan_ngpus}: the plan "
                        "is replicated runtime_ngpus / plan_ngpus times; choose a multiple")
    if options.plan_ngpus > MAX_PLAN_DEVICES:
        raise PlanError(f"--plan_ngpus {options.plan_ngpus}: a plan spans at most {MAX_PLAN_DEVICES} devices; compile "
                        "a plan for fewer and replicate it with --runtime_ngpus")
    reason = cudagraph_refusal(options.compile, runtime, bool(options.lora_rank))
    if reason:
        raise PlanError(reason)
    if micro != "auto" and options.global_batch_size % micro:
        raise PlanError(f"--global_batch_size {options.global_batch_size} is not a multiple of --micro_batch_size "
                        f"{options.micro_batch_size}")
    for f in dataclasses.fields(ExecutionOptions):
        value, choices = getattr(options, f.name), f.metadata.get("choices")
        if choices and value is not None and value not in choices:
            raise PlanError(f"--{f.name} {value}: choose one of {', '.join(choices)}")


def _log(msg):
    print(f"[compile] {msg}", file=sys.stderr, flush=True)


def compile_plan(options: CompileOptions):
    """Returns (plan, plan_path). Raises PlanError, ProfileError, ModelDirError or NoPlanFits."""
    from modeling import load_config

    check_options(options)
    runtime = options.runtime_ngpus or options.plan_ngpus
    started = time.perf_counter()
    config = load_config(options.model_id, trust_remote_code=options.trust_remote_code)
    profile = load_profile(options.device_profile)
    mem_limit = options.mem_limit_gib
    if mem_limit > profile.memory_gib:
        _log(f"--mem_limit_gib {mem_limit:g} exceeds the {profile.memory_gib:g} GiB of a {profile.device_name}; "
             f"using {profile.memory_gib:g} GiB")
        mem_limit = profile.memory_gib

    dtype = options.compute_dtype or ("fp32" if profile.name == "cpu" else "bf16")
    if dtype not in ("bf16", "fp32"):
        raise PlanError(f"compute dtype {dtype!r}: use bf16 or fp32")
    pinned = pinned_options(options.execution(), options.pinned)
    executions = None  # made with the first micro-batch's cost model, which prices the attention kernels
    micro_sizes = micro_batch_sizes(options, runtime)
    traced = spec.representative_config(config)
    _log(f"tracing the training form of {options.model_id} on the meta device ({traced.num_hidden_layers} of its "
         f"{config.num_hidden_layers} layers: one of each kind; {options.seq_len} tokens per sequence, {dtype}, "
         f"micro-batch {', '.join(map(str, micro_sizes))})")
    replicas = runtime // options.plan_ngpus
    graphs, models, results, no_fit = {}, {}, [], None
    lora = options.lora_record()  # LoRA: the adapters traced over the frozen base, as the run trains them
    meta_model = build_traced_model(traced, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32, lora=lora)
    for micro in micro_sizes:
        graph = trace_training_step(meta_model, micro, options.seq_len)
        costs = dataclasses.replace(model_costs(graph, traced), layer_kinds=spec.layer_kinds(config), lora=lora)
        graphs[micro] = graph
        models[micro] = CostModel(costs, profile, mem_limit, runtime_replicas=replicas, dtype=dtype,
                                  execution=options.execution(), document_masking=options.document_masking,
                                  expert_load_imbalance=options.expert_load_imbalance)
        if executions is None:
            kernels = () if "attention" in pinned else attention_choices(profile.attention,
                                                                       models[micro].attention_cost)
            # CUDA graphs: a GPU profile's plan for one device with LoRA (cudagraph_refusal says why not otherwise)
            replays = profile.name != "cpu" and cudagraph_refusal("layer_cudagraphs", runtime, bool(lora)) is None
            executions = variants(options.execution(), pinned, dtype, kernels, cudagraphs=replays)
        try:
            results.append(search(models[micro], options.plan_ngpus, runtime, options.global_batch_size, micro,
                                  executions))
        except NoPlanFits as e:
            no_fit = e
    if not results:
        raise no_fit
    result = merge_results(results)
    _log(f"searched {options.plan_ngpus} devices with the {profile.name} profile, {mem_limit:g} GiB per device, "
         f"{len(executions)} execution variant(s) (pinned: {', '.join(pinned) or 'none'}): scored "
         f"{result.considered} candidates, {len(result.ranked)} fit")
    if options.plan_rank > 1:
        if options.plan_rank > len(result.ranked):
            raise PlanError(f"--plan_rank {options.plan_rank}: only {len(result.ranked)} candidates fit; choose at "
                            f"most {len(result.ranked)}")
        chosen = result.ranked[options.plan_rank - 1]
        _log(f"--plan_rank {options.plan_rank}: writing {chosen.candidate.describe()} instead of the best, "
             f"{result.best.candidate.describe()}")
        result = dataclasses.replace(result, best=chosen,
                                     ranked=[chosen] + [r for r in result.ranked if r is not chosen])
    best = result.best
    model = models[best.micro_batch_size]
    chosen_effects = effects(lambda e: model.with_execution(e).evaluate(best.candidate), best.execution,
                             best.candidate, dtype)

    name = model_name_of(options.model_id)
    plan = build_plan(name, config, options, runtime, mem_limit, profile, graphs[best.micro_batch_size], result,
                      dtype, chosen_effects)
    path = options.plan_out or default_plan_path(name, options.plan_ngpus, options.plans_dir, lora=bool(lora))
    plan.save(path)
    if options.report:
        from compiler.report import write_report
        stem = os.path.splitext(path)[0]
        write_report(plan, stem + ".md", stem + ".png")
    _log(f"done in {time.perf_counter() - started:.1f} s; plan written to {path}")
    return plan, path


def micro_batch_sizes(options: CompileOptions, runtime):
    """The micro-batch sizes to search: the one given, or with `--micro_batch_size auto` every
    divisor of the global batch up to MAX_AUTO_MICRO_BATCH."""
    if options.micro_batch_size != "auto":
        return [options.micro_batch_size]
    return [m for m in divisors(options.global_batch_size) if m <= MAX_AUTO_MICRO_BATCH]


def merge_results(results):
    """One ranking over the searches of several micro-batch sizes."""
    ranked = sorted((s for r in results for s in r.ranked), key=lambda s: s.sort_key())
    rejected = sorted((x for r in results for x in r.rejected), key=lambda x: x[0].sort_key())
    return SearchResult(best=ranked[0], ranked=ranked, rejected=rejected, considered=sum(r.considered for r in results))


def _ops_section(cand, graph):
    """The plan's `ops`: one entry per op family of the spec (spec.OP_FAMILIES), keyed by the family's
    name, with the partition the mesh gives it (spec.partitions_for_mesh: expert parallel where the
    family has it and ep > 1, else tensor parallel where it has it and tp > 1, else replicate), the
    degrees, for the routed experts the token dispatch, and the family's annotation; then one entry
    per registered custom op the trace met (deepseek::moe_route), with how its batch dim is split."""
    tp, ep = cand.tp, cand.ep
    ops = {}
    for name, partition in spec.partitions_for_mesh(tp, ep).items():
        family = spec.OP_FAMILIES[name]
        entry = {"partition": partition, "tp": tp}
        if family.expert_parallel:
            entry["ep"] = ep
            entry["dispatch"] = "all_to_all" if partition == family.expert_parallel else "local"
        entry["annotation"] = family.annotation
        ops[name] = entry
    from compiler.annotations import parse_annotation
    data_axes = [axis for axis, size in (("dp", cand.dp), ("ep", cand.ep)) if size > 1]
    for op in graph.custom_ops():
        qualname = op.name.replace(".", "::", 1)
        if qualname in ops:
            continue
        annotation = parse_annotation(op.annotation)
        first = annotation.inputs[0].dims[0] if annotation.inputs[0].dims else ()
        batch_dim = first[0].name if len(first) == 1 and first[0].splittable else None
        ops[qualname] = {"annotation": op.annotation,
                         "split": {batch_dim: ["replica"] + data_axes} if batch_dim else {},
                         "replicated_over": ["tp"] if tp > 1 else []}
    return ops


def _predicted(pred):
    return {"step_time_s": pred.step_time_s, "peak_memory_gib": [round(x, 3) for x in pred.peak_memory_gib],
            "mfu": pred.mfu, "tokens_per_s": pred.tokens_per_s, "model_flops_per_step": pred.model_flops,
            "breakdown_s": {k: round(v, 6) for k, v in pred.breakdown_s.items()},
            "memory_breakdown_gib": [{k: round(v, 3) for k, v in m.items() if k != "total"}
                                     for m in pred.memory_breakdown_gib],
            "stage_times_s": [{k: round(v, 6) for k, v in s.items()} for s in pred.stage_times_s]}


def assign_chunks(stages, virtual_stages):
    """Interleaved schedules: each stage's layer count cut in `virtual_stages` chunks, laid out so that
    virtual stage k = chunk k // pp of stage k % pp holds the next layers in order."""
    pp = len(stages)
    sizes = []
    for stage in stages:
        n = stage.layers[1] - stage.layers[0]
        sizes.append([n // virtual_stages + (1 if j < n % virtual_stages else 0) for j in range(virtual_stages)])
    for stage in stages:
        stage.chunks = [None] * virtual_stages
    start = 0
    for k in range(pp * virtual_stages):
        s, j = k % pp, k // pp
        stages[s].chunks[j] = [start, start + sizes[s][j]]
        start += sizes[s][j]
    for stage in stages:
        stage.layers = [stage.chunks[0][0], stage.chunks[-1][1]]


def describe(scored):
    """A candidate with its micro-batch size and execution, as the plan lists runners-up."""
    text = f"{scored.candidate.describe()}, micro-batch {scored.micro_batch_size}"
    chosen = scored.execution.costed() if scored.execution is not None else {}
    return text + (", " + ", ".join(f"{k}={v}" for k, v in chosen.items()) if chosen else "")


def imbalance_input(options, profile):
    """What the search priced expert parallelism's load imbalance with: the --expert_load_imbalance
    given, else the profile's figures by expert-parallel degree, else the cost model's default."""
    from compiler.cost_model import EP_IMBALANCE
    if options.expert_load_imbalance is not None:
        return float(options.expert_load_imbalance)
    if profile.expert_load_imbalance:
        return {str(g): f for g, f in sorted(profile.expert_load_imbalance.items())}
    return EP_IMBALANCE


def build_plan(name, config, options, runtime, mem_limit, profile, graph, result, dtype, execution_effects):
    """The plan document of the search's best candidate, with its runners-up, the reasons, and what
    each execution option it chose bought in the prediction."""
    best = result.best.candidate
    fields, digest = model_fingerprint(config)
    layer_ranges = best.stage_layers(config.num_hidden_layers)
    per_stage = best.dp * best.ep * best.tp
    stages = [Stage(index=s, layers=[first, last], devices=list(range(s * per_stage, (s + 1) * per_stage)),
                    embed=(s == 0), head=(s == best.pp - 1), recompute=best.recompute[s])
              for s, (first, last) in enumerate(layer_ranges)]
    if best.schedule == "Interleaved1F1B":
        assign_chunks(stages, best.virtual_stages)
    alternatives = [{"summary": describe(r), "predicted": _predicted(r.prediction)}
                    for r in result.ranked[1:1 + RUNNERS_UP]]
    alternatives += [{"summary": describe(r), "predicted": _predicted(r.prediction), "rejected": why}
                     for r, why in result.rejected[:3]]
    predicted = _predicted(result.best.prediction)
    predicted["execution_effects"] = execution_effects
    explanation = explain(result)
    if execution_effects:
        explanation += "\nExecution chosen, and what each option buys in the prediction:\n" + "\n".join(
            describe_effects(execution_effects))
    return Plan(
        model={"name": name, "model_id": options.model_id, "model_type": config.model_type,
               "fingerprint": fields, "fingerprint_sha": digest},
        search_inputs={"seq_len": options.seq_len, "micro_batch_size": result.best.micro_batch_size,
                       "global_batch_size": options.global_batch_size, "runtime_ngpus": runtime,
                       "device_profile": profile.name, "mem_limit_gib": mem_limit,
                       "dtype": dtype, "device_name": profile.device_name,
                       "document_masking": bool(options.document_masking),
                       "expert_load_imbalance": imbalance_input(options, profile)},
        plan_ngpus=options.plan_ngpus,
        mesh={"pp": best.pp, "dp": best.dp, "ep": best.ep, "tp": best.tp},
        stages=stages,
        ops=_ops_section(best, graph),
        zero={"level": best.zero, "shard_over_replicas": bool(best.zero_over_replicas)},
        schedule={"name": best.schedule, "micro_batches": best.micro_batches,
                  "virtual_stages": best.virtual_stages},
        predicted=predicted,
        alternatives=alternatives,
        explanation=explanation,
        execution=result.best.execution.costed(),
        lora=options.lora_record(),
    )


def inspect_plan(plan_path, model_id=None):
    """`train.py --run_mode inspect`: prints the plan; with a model, checks it. Returns exit status."""
    plan = Plan.load(plan_path)
    print(summarize(plan))
    print("\nwhy this plan:\n" + (plan.explanation or "(no explanation recorded)"))
    print("\nop partitions:")
    for name, part in plan.ops.items():
        print(f"  {name}: {part}")
    if plan.alternatives:
        print("\nrunners-up:")
        for i, alt in enumerate(plan.alternatives, 1):
            note = f"  [{alt['rejected']}]" if alt.get("rejected") else ""
            print(f"  {i}. {alt['summary']}: {alt['predicted']['step_time_s']:.3f} s, "
                  f"peak {max(alt['predicted']['peak_memory_gib']):.1f} GiB{note}")
    if model_id is not None:
        from modeling import load_config
        plan.check_model(load_config(model_id), source=plan_path)
        print(f"\n{plan_path} matches the model in {model_id}")
    return 0
