"""How a step is executed, as the compiler chooses it.

The search scores every candidate plan under each combination of the execution options it may
choose (`variants`): compiled decoder layers, the chunked loss, fused AdamW, one gradient
reduction per step. An option the user gave to compile is pinned to that value. Some combinations
cannot run (`unsupported`, the one rule the search and the runtime share); they are not scored, and
a run asked for one is refused with the reason. `effects` says what each chosen option bought in
the prediction, for the plan's explanation and report.
"""

import dataclasses
import itertools
from typing import Dict, Iterable, List, Optional

from options import ExecutionOptions

# The chunk of positions the search tries for the chunked loss: 4096 positions of DeepSeek's
# 102400-token vocabulary are 0.8 GB of bf16 logits at a time (bench/RESULTS.md measured it on an H100).
LOSS_CHUNK_TOKENS = 4096


def unsupported(execution: ExecutionOptions, pp, zero, dtype) -> Optional[str]:
    """Why the runtime cannot execute `execution` for a plan with `pp` stages, ZeRO level `zero` and
    compute dtype `dtype`, or None when it can."""
    if execution.compile != "none" and dtype != "bf16":
        return (f"--compile {execution.compile} needs bf16 compute (torch._grouped_mm compiles only for bfloat16) "
                f"but the compute dtype is {dtype}")
    if execution.ce_chunk_tokens and pp > 1:
        return (f"--ce_chunk_tokens applies to plans without pipeline stages; this one has {pp} (its last stage "
                "computes the loss from full logits)")
    if execution.defer_grad_sync and (pp > 1 or zero != 0):
        return (f"--defer_grad_sync needs a plan with ZeRO 0 and no pipeline stages (this one has ZeRO {zero}, "
                f"pp {pp}): under ZeRO 2 / 3 each rank would hold unsharded float32 gradients")
    return None


def variants(given: ExecutionOptions, pinned: Iterable[str], dtype) -> List[ExecutionOptions]:
    """Every combination the search scores: each costed option not in `pinned` takes its plain value
    or the one the search may choose; pinned ones (and the attention kernel) keep `given`'s value.
    The plain path comes first, so that ties go to the simpler execution."""
    plain = ExecutionOptions()
    searchable = {"compile": ["none", "layer"] if dtype == "bf16" else ["none"],
                  "ce_chunk_tokens": [0, LOSS_CHUNK_TOKENS], "fused_adamw": [False, True],
                  "defer_grad_sync": [False, True]}
    pinned = set(pinned)
    choices = {name: [getattr(given, name)] if name in pinned else values for name, values in searchable.items()}
    out = []
    for combo in itertools.product(*choices.values()):
        out.append(dataclasses.replace(plain, attention=given.attention, **dict(zip(choices, combo))))
    return out


def pinned_options(given: ExecutionOptions, flags_given: Iterable[str] = ()) -> List[str]:
    """The options the search must not change: those given as flags, and those whose value differs
    from the plain path (an API caller that sets one means it)."""
    plain = ExecutionOptions()
    return sorted(set(flags_given) & set(ExecutionOptions.COSTED)
                  | {name for name in ExecutionOptions.COSTED if getattr(given, name) != getattr(plain, name)})


def complexity(execution: ExecutionOptions):
    """How many options differ from the plain path (the tie-breaker: fewer first)."""
    return len(execution.costed())


def effects(evaluate, execution: ExecutionOptions, candidate, dtype) -> Dict[str, dict]:
    """For each option the chosen execution sets: the step time and peak memory predicted without it
    (that option back at its plain value), beside the chosen figures. evaluate(execution) -> Prediction."""
    chosen = evaluate(execution)
    plain = ExecutionOptions()
    out = {}
    for name, value in execution.costed().items():
        without = dataclasses.replace(execution, **{name: getattr(plain, name)})
        if unsupported(without, candidate.pp, candidate.zero, dtype):
            continue
        other = evaluate(without)
        out[name] = {"value": value, "step_time_s": round(chosen.step_time_s, 6),
                     "step_time_s_without": round(other.step_time_s, 6),
                     "peak_memory_gib": round(chosen.max_peak_gib, 3),
                     "peak_memory_gib_without": round(other.max_peak_gib, 3)}
    return out


def describe_effects(effects_by_option: Dict[str, dict]) -> List[str]:
    """One line per chosen option: what it bought in the prediction."""
    lines = []
    for name, e in effects_by_option.items():
        saved = e["step_time_s_without"] - e["step_time_s"]
        memory = e["peak_memory_gib_without"] - e["peak_memory_gib"]
        lines.append(f"- {name} = {e['value']}: {saved * 1e3:+.1f} ms per step saved "
                     f"({e['step_time_s_without']:.3f} -> {e['step_time_s']:.3f} s), "
                     f"peak memory {e['peak_memory_gib_without']:.1f} -> {e['peak_memory_gib']:.1f} GiB"
                     + ("" if abs(memory) < 0.05 else f" ({-memory:+.1f} GiB)"))
    return lines
