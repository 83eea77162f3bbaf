"""Plan search: every way to use `plan_ngpus` devices, scored by the cost model.

The space: pipeline degree and where the layers split, data / expert / tensor parallel degrees
inside a stage, ZeRO level and whether its shards span the runtime replicas, recompute per stage,
and the schedule; the number of micro-batches follows from the batch sizes and the data-parallel
degree. Layer splits are enumerated exhaustively while there are at most `MAX_SPLITS` of them per
pipeline shape; beyond that a dynamic program picks the split that minimises the slowest stage.
Per stage, recompute is off unless the stage would not fit without it (recompute only adds time,
and a stage's memory does not depend on the other stages' choice, so this is optimal).

The result is deterministic: candidates are ranked by predicted step time, then peak memory, then
a fixed order of their fields.
"""

import dataclasses
import itertools
import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

from compiler.cost_model import Candidate, CostModel, Prediction
from compiler.execution import complexity, unsupported
from options import ExecutionOptions

from errors import UserError

MAX_SPLITS = 300
# The search emits only what the runtime executes: ZeRO shards confined to one replica (HSDP),
# tensor parallelism together with expert parallelism or with ZeRO 2/3 are not executed yet, so
# they are not searched (lift these when they are).
MAX_TP = 8
HSDP = False


class NoPlanFits(UserError):
    """Nothing fits the memory limit; the message gives the smallest peak found and what to change."""


@dataclass
class Scored:
    candidate: Candidate
    prediction: Prediction
    execution: Optional[ExecutionOptions] = None  # how its steps run (None: the cost model's own)
    micro_batch_size: Optional[int] = None

    def sort_key(self):
        c = self.candidate
        simpler = complexity(self.execution) if self.execution is not None else 0
        return (round(self.prediction.step_time_s, 9), round(self.prediction.max_peak_gib, 6), simpler, c.pp, c.tp,
                c.ep, c.zero, c.zero_over_replicas, c.schedule, c.splits, c.recompute,
                # (an unset option, None, sorts first: tuples holding None and a string do not compare)
                tuple("" if v is None else v for v in dataclasses.astuple(self.execution))
                if self.execution is not None else (), self.micro_batch_size or 0)


@dataclass
class SearchResult:
    best: Scored
    ranked: List[Scored]          # feasible candidates, best first (best included)
    rejected: List[Tuple[Scored, str]]
    considered: int


def divisors(n):
    """The divisors of n in increasing order (O(sqrt n): plan_ngpus may be large)."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return small + [n // d for d in reversed(small) if d * d != n]


def _splits(num_layers, pp):
    """All ways to cut layers 0..L-1 into pp non-empty contiguous stages (first layers of stages 1..)."""
    return itertools.combinations(range(1, num_layers), pp - 1)


def mesh_shapes(plan_ngpus, num_layers, num_heads, num_experts, has_moe):
    """(pp, dp, ep, tp) with pp*dp*ep*tp == plan_ngpus that the runtime can build."""
    for pp in divisors(plan_ngpus):
        if pp > num_layers:
            continue
        for tp in divisors(plan_ngpus // pp):
            if tp > MAX_TP or num_heads % tp:
                continue
            for ep in divisors(plan_ngpus // pp // tp):
                if ep > 1 and (not has_moe or num_experts % ep or tp > 1):
                    continue
                yield pp, plan_ngpus // pp // tp // ep, ep, tp


def _schedules(pp, micro_batches, num_layers):
    if pp == 1:
        return [("GradAccum", 1)]
    options = [("1F1B", 1)]
    # two model chunks per stage; torch's interleaved schedule wants micro-batches in multiples of pp
    if num_layers >= 2 * pp and micro_batches % pp == 0:
        options.append(("Interleaved1F1B", 2))
    return options


def search(model: CostModel, plan_ngpus, runtime_ngpus, global_batch_size, micro_batch_size,
           executions: Optional[List[ExecutionOptions]] = None) -> SearchResult:
    """The ranked candidates for one micro-batch size. executions: the ways to run a step to score
    each candidate under (compiler/execution.py variants; default: the cost model's own); each
    candidate keeps its best supported one."""
    executions = executions or [model.execution]
    costs = model.costs
    num_layers = len(costs.layer_kinds)
    replicas = runtime_ngpus // plan_ngpus
    has_moe = "moe" in costs.layer_kinds
    feasible: List[Scored] = []
    rejected: List[Tuple[Scored, str]] = []
    considered = 0
    refusals = set()  # why the runtime could not execute a candidate under any of the executions
    for pp, dp, ep, tp in mesh_shapes(plan_ngpus, num_layers, costs.num_heads, costs.num_experts, has_moe):
        if tp > 1 and costs.lora and costs.lora["dropout"] > 0:
            continue  # LoRA dropout under tensor parallelism: the ranks' masks of one input would differ
        data_parallel = dp * ep * replicas
        if global_batch_size % (micro_batch_size * data_parallel):
            continue
        micro_batches = global_batch_size // (micro_batch_size * data_parallel)
        if pp > 1 and micro_batches < pp:
            continue
        zero_options = [(0, False)]
        if dp * ep * replicas > 1 and tp == 1:
            overs = (True, False) if HSDP and replicas > 1 and dp * ep > 1 else (True,)
            zero_options += [(level, over) for level in (2, 3) for over in overs]
        for (zero, over), (schedule, virtual) in itertools.product(zero_options,
                                                                     _schedules(pp, micro_batches, num_layers)):
            def make(splits, recompute):
                return Candidate(pp=pp, dp=dp, ep=ep, tp=tp, zero=zero, zero_over_replicas=over,
                                 schedule=schedule, splits=tuple(splits), recompute=tuple(recompute),
                                 micro_batches=micro_batches, virtual_stages=virtual)

            if math.comb(num_layers - 1, pp - 1) <= MAX_SPLITS:
                split_options = _splits(num_layers, pp)
            else:
                split_options = [_balanced_split(model, make, num_layers, pp)]
            for splits in split_options:
                considered += 1
                scored = _best_execution(model, executions, make, splits, pp, zero)
                if scored is None:
                    refusals.update(unsupported(e, pp, zero, model.dtype) for e in executions)
                    continue
                scored.micro_batch_size = micro_batch_size
                if scored.prediction.fits:
                    feasible.append(scored)
                else:
                    rejected.append((scored, f"peak {scored.prediction.max_peak_gib:.1f} GiB > limit "
                                             f"{model.mem_limit_gib:g} GiB"))
    if not feasible:
        if not rejected and refusals:
            raise NoPlanFits("no candidate can run with the execution options given: " + "; ".join(sorted(refusals)))
        if not rejected:
            raise NoPlanFits(f"no mesh of {plan_ngpus} devices divides the batch: global batch {global_batch_size} "
                             f"must be a multiple of micro batch {micro_batch_size} x data-parallel ranks; change "
                             "--global_batch_size or --micro_batch_size")
        smallest = min(rejected, key=lambda r: r[0].prediction.max_peak_gib)[0]
        raise NoPlanFits(
            f"no plan fits {model.mem_limit_gib:g} GiB per device: the smallest predicted peak is "
            f"{smallest.prediction.max_peak_gib:.1f} GiB ({smallest.candidate.describe()}). Raise --mem_limit_gib, "
            "lower --micro_batch_size, or use more devices (--plan_ngpus)")
    feasible.sort(key=Scored.sort_key)
    rejected.sort(key=lambda r: r[0].sort_key())
    return SearchResult(best=feasible[0], ranked=feasible, rejected=rejected, considered=considered)


def _best_execution(model, executions, make, splits, pp, zero):
    """The candidate with these splits under its best supported execution (fitting ones first), with
    recompute per stage only where the stage would not fit without it; None if none is supported."""
    best = None
    for execution in executions:
        if unsupported(execution, pp, zero, model.dtype):
            continue
        priced = model.with_execution(execution)
        probe = make(splits, ("none",) * pp)
        recompute = tuple("none" if priced.stage_memory(probe, s, "none")["total"] <= priced.mem_limit_gib
                          else "full" for s in range(pp))
        cand = make(splits, recompute)
        scored = Scored(cand, priced.evaluate(cand), execution)
        if best is None or (not best.prediction.fits, best.sort_key()) > (not scored.prediction.fits, scored.sort_key()):
            best = scored
    return best


def _balanced_split(model, make, num_layers, pp):
    """Dynamic program over contiguous splits minimising the slowest stage (with recompute where a
    stage would not fit); used when there are too many splits to enumerate."""
    probe = make(tuple(range(1, pp)), ("none",) * pp)
    stage_costs = {}

    def stage_cost(stage, first, last):
        key = (stage, first, last)
        if key not in stage_costs:
            span = (first, last)
            fits_plain = model.stage_memory(probe, stage, "none", span)["total"] <= model.mem_limit_gib
            recompute = "none" if fits_plain else "full"
            f, b = model.stage_time(probe, stage, recompute, span)
            fits = fits_plain or model.stage_memory(probe, stage, "full", span)["total"] <= model.mem_limit_gib
            stage_costs[key] = (f + b) if fits else math.inf
        return stage_costs[key]

    solved = {}

    def solve(stage, first):
        """(slowest stage time, boundaries) for stages stage..pp-1 covering layers first..L-1."""
        if (stage, first) not in solved:
            if stage == pp - 1:
                solved[(stage, first)] = (stage_cost(stage, first, num_layers), ())
            else:
                best = (math.inf, None)
                for last in range(first + 1, num_layers - (pp - 1 - stage) + 1):
                    rest, rest_splits = solve(stage + 1, last)
                    worst = max(stage_cost(stage, first, last), rest)
                    if worst < best[0] and rest_splits is not None:
                        best = (worst, (last,) + rest_splits)
                solved[(stage, first)] = best
        return solved[(stage, first)]

    cost, splits = solve(0, 0)
    if splits is None or cost == math.inf:
        # nothing fits: equal layer counts, so that the caller can report the peak
        return tuple(round(num_layers / pp * (s + 1)) for s in range(pp - 1))
    return splits


def explain(result: SearchResult, model: Optional[CostModel] = None) -> str:
    """Why the winner won, in words: its figures against the best runner-up of each other shape."""
    best = result.best
    p = best.prediction
    lines = [f"The search scored {result.considered} candidates ({len(result.ranked)} fit the memory limit). "
             f"The winner, {best.candidate.describe()}, is predicted at {p.step_time_s:.3f} s per step, "
             f"{100 * p.mfu:.1f} % MFU, peak {p.max_peak_gib:.1f} GiB."]
    seen = {_shape(best.candidate)}
    for other in result.ranked[1:]:
        shape = _shape(other.candidate)
        if shape in seen:
            continue
        seen.add(shape)
        q = other.prediction
        diffs = {k: q.breakdown_s.get(k, 0.0) - p.breakdown_s.get(k, 0.0) for k in q.breakdown_s}
        worst = max(diffs, key=diffs.get)
        lines.append(f"- {other.candidate.describe()}: {q.step_time_s:.3f} s ({q.step_time_s / p.step_time_s:.2f}x); "
                     f"it loses most on {worst} (+{diffs[worst]:.3f} s)"
                     + (f", peak {q.max_peak_gib:.1f} GiB" if q.max_peak_gib > p.max_peak_gib else ""))
        if len(seen) > 5:
            break
    if result.rejected:
        r, why = min(result.rejected, key=lambda x: x[0].prediction.step_time_s)
        if r.prediction.step_time_s < p.step_time_s:
            lines.append(f"- faster but does not fit: {r.candidate.describe()} "
                         f"({r.prediction.step_time_s:.3f} s, {why})")
    return "\n".join(lines)


def _shape(c: Candidate):
    return (c.pp, c.dp, c.ep, c.tp, c.zero, c.zero_over_replicas, c.schedule)
