"""How a step is executed, as the compiler chooses it.

The search scores every candidate plan under each combination of the execution options it may
choose (`variants`): the attention kernel (among those the device profile lists and prices, less
the ones another listed kernel beats on both time and memory: `attention_choices`), compiled
decoder layers, the chunked loss, fused AdamW, one gradient reduction per step, and under ZeRO 3
how many FSDP units stay gathered from forward to backward. An option the user gave to compile is
pinned to that value. Some combinations
cannot run (`unsupported`, the one rule the search and the runtime share); they are not scored, and
a run asked for one is refused with the reason. `effects` says what each chosen option bought in
the prediction, for the plan's explanation and report.
"""

import dataclasses
import itertools
from typing import Callable, Dict, Iterable, List, Optional

from options import ATTENTION_KERNELS, ExecutionOptions

# The chunk of positions the search tries for the chunked loss: 4096 positions of DeepSeek's
# 102400-token vocabulary are 0.8 GB of bf16 logits at a time (bench/RESULTS.md measured it on an H100).
LOSS_CHUNK_TOKENS = 4096
# The FSDP units a ZeRO-3 plan may keep gathered from forward to backward (--zero3_keep_gathered): none,
# the model's own parameters (with the head, whose backward comes first), and then 1 or 3 decoder layers.
ZERO3_KEEP_CHOICES = (0, 1, 2, 4)


def unsupported(execution: ExecutionOptions, pp, zero, dtype) -> Optional[str]:
    """Why the runtime cannot execute `execution` for a plan with `pp` stages, ZeRO level `zero` and
    compute dtype `dtype`, or None when it can."""
    if execution.compile != "none" and dtype != "bf16":
        return (f"--compile {execution.compile} needs bf16 compute (torch._grouped_mm compiles only for bfloat16) "
                f"but the compute dtype is {dtype}")
    # (the chunked loss runs with any plan: with pipeline stages the last stage computes it inside its
    # forward; deferred sync runs with pipeline stages too: runtime/pipeline.py ReducingStage)
    if execution.defer_grad_sync and zero != 0:
        return (f"--defer_grad_sync needs a plan with ZeRO 0 (this one has ZeRO {zero}): under ZeRO 2 / 3 each rank "
                "would hold unsharded float32 gradients until the step's last micro-batch")
    if execution.zero3_keep_gathered and (zero != 3 or pp > 1):
        return (f"--zero3_keep_gathered {execution.zero3_keep_gathered} applies to ZeRO 3 plans without pipeline "
                f"stages (this one has ZeRO {zero}, pp {pp}; ZeRO 2 keeps every unit gathered already)")
    return None


def cudagraph_refusal(compile_scope, devices, lora, backend="inductor", device="cuda") -> Optional[str]:
    """Why `--compile layer_cudagraphs` cannot run with these settings, or None (any other scope: None).
    A CUDA graph replays fixed addresses and may not wait for the host: FSDP gathers the weights into
    fresh memory each step (every plan of several devices, and full training on one, where it casts
    them for mixed precision), and expert parallelism reads its split sizes on the host inside the
    layer. So it runs on one device, with LoRA (whose frozen base needs no FSDP), compiled by inductor
    on CUDA. The search chooses it where this allows (`variants`' cudagraphs), priced as compiled layers
    whose small ops' launches cost the profile's `graph_replay_launch_kept` share (bench/RESULTS.md)."""
    if compile_scope != "layer_cudagraphs":
        return None
    if devices != 1:
        return (f"--compile layer_cudagraphs runs on one device, not {devices} (FSDP gathers the weights into new "
                "memory each step and a CUDA graph replays fixed addresses); use --compile layer")
    if not lora:
        return ("--compile layer_cudagraphs needs a LoRA run (--lora_rank): full training wraps the layers in FSDP "
                "for mixed precision, whose gathered weights a CUDA graph cannot replay; use --compile layer")
    if backend != "inductor":
        return (f"--compile layer_cudagraphs needs --compile_backend inductor (CUDA graphs are its reduce-overhead "
                f"mode), not {backend}")
    if device != "cuda":
        return f"--compile layer_cudagraphs needs --device cuda (CUDA graphs), not {device}"
    return None


def variants(given: ExecutionOptions, pinned: Iterable[str], dtype, attention: Iterable[str] = (),
             cudagraphs=False) -> List[ExecutionOptions]:
    """Every combination the search scores: each costed option not in `pinned` takes its plain value
    or the ones the search may choose; pinned ones keep `given`'s value. attention: the kernels to
    choose among (attention_choices; none: the attention option stays `given`'s). cudagraphs: whether
    layer_cudagraphs is among the compile scopes (where cudagraph_refusal allows it, on a GPU
    profile). The plain path comes first, so that ties go to the simpler execution."""
    plain = ExecutionOptions()
    scopes = ["none", "layer"] + (["layer_cudagraphs"] if cudagraphs else [])
    searchable = {"attention": list(attention) or [given.attention],
                  "compile": scopes if dtype == "bf16" else ["none"],
                  "ce_chunk_tokens": [0, LOSS_CHUNK_TOKENS], "fused_adamw": [False, True],
                  "defer_grad_sync": [False, True], "zero3_keep_gathered": list(ZERO3_KEEP_CHOICES)}
    pinned = set(pinned)
    choices = {name: [getattr(given, name)] if name in pinned else values for name, values in searchable.items()}
    out = []
    for combo in itertools.product(*choices.values()):
        out.append(dataclasses.replace(plain, **dict(zip(choices, combo))))
    return out


def attention_choices(kernels: Iterable[str], price: Callable[[str], tuple]) -> List[str]:
    """The attention kernels worth searching: of `kernels` (a profile's list, in order), those that no
    other listed kernel matches or beats on both price(kernel) = (seconds, bytes) of the model's
    attention; of equal ones the first. PyTorch's own `sdpa` first, so a tie keeps it."""
    kernels = sorted(kernels, key=lambda k: (k != "sdpa", ATTENTION_KERNELS.index(k)))
    prices = {k: price(k) for k in kernels}
    kept = []
    for i, k in enumerate(kernels):
        t, m = prices[k]
        if any(prices[o][0] <= t and prices[o][1] <= m and (prices[o] != (t, m) or j < i)
               for j, o in enumerate(kernels) if o != k):
            continue
        kept.append(k)
    return kept


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
