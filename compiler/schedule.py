"""The one model of a pipeline schedule: GradAccum, 1F1B and Interleaved1F1B.

Two views of the same schedule live here:

- `pipeline_time(pp, micro_batches, virtual_stages, worst_stage_time)`: the closed form the cost
  model prices a step with (and the committed plans were priced with): every stage takes the
  slowest stage's time per micro-batch, plus a bubble of (pp - 1) / virtual_stages of that time.
- `pipeline_timeline(...)`: an op-by-op simulation of each stage running its forwards and
  backwards in the schedule's order, which the report draws.

With equal stage times and no communication the two agree exactly: 1F1B spans
(M + pp - 1) * (f + b), and Megatron's interleaved order with v model chunks and M a multiple of pp
spans (M + (pp - 1) / v) * (f + b) (tests/test_schedule.py checks both). With unequal stages the
closed form is only an estimate: the simulation lets a fast stage's forward overlap a slow stage's
backward, and a stage with a long forward and another with a long backward can together stretch the
timeline past the closed form (by up to about a fifth for strongly skewed stages).

GradAccum is a single stage running F, B, F, B, ...: the 1F1B order with pp = 1.
"""

import math
from typing import List, NamedTuple, Sequence, Tuple


class Box(NamedTuple):
    """One op of a simulated step: a forward ("F") or backward ("B") of one micro-batch's chunk."""
    stage: int
    kind: str
    micro_batch: int
    chunk: int
    start: float
    end: float


# Without measured stage times a forward takes 1 unit and a backward 2 (backward computes the
# gradients of both inputs and weights, about twice the forward's FLOPs).
DEFAULT_FORWARD, DEFAULT_BACKWARD = 1.0, 2.0


def pipeline_time(pp: int, micro_batches: int, virtual_stages: int, worst_stage_time: float) -> Tuple[float, float]:
    """(time of the pipelined part of a step, of which bubble) under the closed form.

    `worst_stage_time` is the slowest stage's forward + backward of one micro-batch. During the
    steady state every stage is busy with one micro-batch per `worst_stage_time`; filling and draining
    the pipeline idles each stage for pp - 1 stage times, which v model chunks per device cut to
    (pp - 1) / v because a chunk is 1/v of a stage. With pp = 1 the bubble is exactly 0.
    """
    bubble = (pp - 1) / virtual_stages * worst_stage_time
    return micro_batches * worst_stage_time + bubble, bubble


def stage_op_order(name: str, pp: int, stage: int, micro_batches: int, chunks: int) -> List[Tuple[str, int, int]]:
    """The order in which one pipeline stage runs its ops, as (kind, micro-batch, chunk) tuples.

    1F1B (PipeDream-flush): stage s first runs pp-1-s forwards (warm-up), then alternates one forward
    and one backward, then drains the remaining backwards. With one stage this is GradAccum's F,B,F,B.
    Interleaved (Megatron-LM): each device holds `chunks` model chunks; forwards walk the chunks in
    groups of pp micro-batches, backwards walk them in reverse, with a longer warm-up.
    """
    if name == "Interleaved1F1B" and chunks > 1:
        total = micro_batches * chunks

        def unit(k, forward):
            chunk = (k // pp) % chunks
            micro_batch = (k // (pp * chunks)) * pp + k % pp
            return ("F" if forward else "B", micro_batch, chunk if forward else chunks - 1 - chunk)

        warmup = min((pp - stage - 1) * 2 + (chunks - 1) * pp, total)
    else:
        total = micro_batches

        def unit(k, forward):
            return ("F" if forward else "B", k, 0)

        warmup = min(pp - stage - 1, total)
    order = [unit(k, True) for k in range(warmup)]
    for i in range(total - warmup):
        order += [unit(warmup + i, True), unit(i, False)]
    order += [unit(k, False) for k in range(total - warmup, total)]
    return order


def _inputs(kind, v, micro_batch, last_virtual):
    """The ops an op waits for: a forward the previous virtual stage's forward, a backward its own
    forward and the next virtual stage's backward (the last virtual stage starts the backward)."""
    if kind == "F":
        return [("F", v - 1, micro_batch)] if v > 0 else []
    return [("F", v, micro_batch)] + ([("B", v + 1, micro_batch)] if v < last_virtual else [])


def simulate(orders: Sequence[Sequence[Tuple[str, int, int]]], pp: int, chunks: int,
             durations: Sequence[dict]) -> List[Box]:
    """Every op's start and end, each stage running its ops in order as soon as their inputs are ready.

    `orders[s]` is stage s's `stage_op_order`; `durations[s]` is {"F": s, "B": s} for the whole stage,
    so one chunk's op takes 1/chunks of it. Virtual stage v = chunk * pp + stage. Communication time
    is ignored. Raises RuntimeError when the orders cannot make progress (an order not modelled here).
    """
    last_virtual = pp * chunks - 1
    done = {}  # (kind, virtual stage, micro_batch) -> end time
    position, free_at, boxes = [0] * pp, [0.0] * pp, []
    remaining = sum(len(o) for o in orders)
    while remaining:
        progressed = False
        for s in range(pp):
            # Run this stage as far as it can go before looking at the next one.
            while position[s] < len(orders[s]):
                kind, mb, chunk = orders[s][position[s]]
                v = chunk * pp + s
                needs = _inputs(kind, v, mb, last_virtual)
                if any(n not in done for n in needs):
                    break
                start = max([free_at[s]] + [done[n] for n in needs])
                end = start + durations[s][kind] / chunks
                done[(kind, v, mb)] = free_at[s] = end
                boxes.append(Box(s, kind, mb, chunk, start, end))
                position[s] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise RuntimeError("pipeline order deadlocks")
    return boxes


def _positive(x, default):
    ok = isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0
    return x if ok else default


def _durations(pp, stage_times):
    """Per stage {"F": s, "B": s}, from `stage_times` where it has a positive number, else the defaults."""
    durations = []
    for s in range(pp):
        t = stage_times[s] if stage_times and s < len(stage_times) and isinstance(stage_times[s], dict) else {}
        durations.append({"F": _positive(t.get("forward"), DEFAULT_FORWARD),
                          "B": _positive(t.get("backward"), DEFAULT_BACKWARD)})
    return durations


def _split_into_chunks(boxes, chunks):
    """Each 1F1B box drawn as `chunks` consecutive chunk boxes (backwards walk the chunks in reverse)."""
    split = []
    for b in boxes:
        step = (b.end - b.start) / chunks
        for c in range(chunks):
            chunk = c if b.kind == "F" else chunks - 1 - c
            split.append(Box(b.stage, b.kind, b.micro_batch, chunk, b.start + c * step, b.start + (c + 1) * step))
    return split


def pipeline_timeline(name, pp, micro_batches, virtual_stages=1, stage_times=None) -> Tuple[List[Box], bool]:
    """The boxes of a simulated step and whether they are only an approximation.

    `stage_times`: list per stage of {"forward": s, "backward": s} for one micro-batch (the whole
    stage, all its chunks); absent, forward takes 1 unit and backward 2.
    """
    durations = _durations(pp, stage_times)
    chunks = virtual_stages if name == "Interleaved1F1B" and isinstance(virtual_stages, int) else 1
    chunks = max(1, chunks)
    if chunks > 1 and micro_batches % pp == 0:
        try:
            orders = [stage_op_order(name, pp, s, micro_batches, chunks) for s in range(pp)]
            return simulate(orders, pp, chunks, durations), False
        except RuntimeError:
            pass  # fall back to the 1F1B order below
    orders = [stage_op_order("1F1B", pp, s, micro_batches, 1) for s in range(pp)]
    boxes = simulate(orders, pp, 1, durations)
    if chunks == 1:
        return boxes, False
    # Megatron's interleaved order needs micro-batches divisible by pp; otherwise show the chunking
    # inside 1F1B slots, which does not show the smaller bubble.
    return _split_into_chunks(boxes, chunks), True


def makespan(boxes: Sequence[Box]) -> float:
    """When the last op of the step ends (the step starts at 0)."""
    return max(b.end for b in boxes)


def idle_fraction(boxes: Sequence[Box], pp: int) -> float:
    """Share of the pp stages' time over the step spent waiting, i.e. the simulated bubble."""
    busy = sum(b.end - b.start for b in boxes)
    return 1 - busy / (pp * makespan(boxes))
