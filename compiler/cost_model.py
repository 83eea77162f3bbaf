"""Cost model: a traced op graph + a device profile -> step time and memory of any candidate plan.

The trace gives, per decoder layer kind (dense or MoE), embedding and head, and per op family
(attention, norm, dense_mlp, router, experts, shared_experts, embed, head), the GEMMs with their
FLOPs, the grouped GEMMs with their rows per expert, the bytes moved by everything else, the bytes
autograd saves, and the parameter counts. A candidate (`Candidate`) fixes the mesh degrees, the
layer split, ZeRO level, recompute per stage and schedule; `evaluate` turns it into predicted time
and memory per device, for the execution options (`options.ExecutionOptions`: compiled layers,
chunked loss, AdamW kind, gradient-sync policy) the plan records. Which families divide over the
tensor-parallel axis, and the kind of each decoder layer, are the spec's (`modeling.spec`). Every
assumption is a named constant or a documented formula here, so the calibration against measured
runs (bench/RESULTS.md) has one place to change.
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

from compiler.schedule import pipeline_time
from compiler.trace import OpGraph
from modeling import spec
from options import ExecutionOptions

GIB = 2 ** 30
FP32 = 4
# Bytes per parameter that live sharded over the ZeRO group: fp32 master weight, fp32 gradient,
# AdamW's two fp32 moments.
STATE_BYTES_PER_PARAM = FP32 * 4
# Fixed per-device memory the allocator cannot give to tensors: CUDA context, NCCL buffers.
RESERVED_GIB = 1.5
# On a CPU "device" the process itself: the interpreter, torch and transformers (0.43-0.44 GiB
# resident measured on the dev machine for tiny-model runs, 2026-11-28).
CPU_PROCESS_GIB = 0.4
# Allocator fragmentation on top of what tensors need.
FRAGMENTATION = 1.05
# Share of ZeRO collectives hidden behind compute (FSDP prefetches the next layer's parameters and
# reduce-scatters the previous layer's gradients while a layer computes).
FSDP_OVERLAP = 0.85
# How much busier the busiest expert-parallel rank is than the average (uniform routing).
EP_IMBALANCE = 1.05

# Bytes a fused chunked cross-entropy moves per logit: the bf16 logits written by the GEMM and read
# once, the bf16 gradient of the logits written (the float32 softmax stays in registers).
CHUNKED_LOSS_BYTES_PER_LOGIT = 6
# A chunk's working set per logit: bf16 logits, float32 softmax, bf16 gradient.
CHUNKED_LOSS_WORKING_BYTES = 8
# Mixed precision without ZeRO sharding: per micro-batch, each parameter is cast to bf16 (read 4,
# write 2 bytes) and its bf16 gradient accumulated into the float32 one (read 2 + 4, write 4).
CAST_BYTES_PER_PARAM = 16
LAYER_KINDS = ("dense", "moe")



@dataclass
class FamilyCost:
    """The work of one op family in one phase for one micro-batch."""

    gemm_flops: List[float] = field(default_factory=list)
    grouped: List[Tuple[float, float]] = field(default_factory=list)  # (flops, rows per group)
    other_bytes: float = 0.0
    other_ops: int = 0


@dataclass
class LayerKind:
    """Cost of one kind of block (a dense layer, a MoE layer, the embedding, the head)."""

    name: str
    fwd: Dict[str, FamilyCost]
    bwd: Dict[str, FamilyCost]
    saved_bytes: Dict[str, float]     # family -> bytes autograd keeps for the backward
    params: Dict[str, int]            # family -> parameter count
    input_bytes: float                # the block's input activation (kept when recomputing)
    flops: float                      # fwd + bwd FLOPs (for MFU)


@dataclass
class ModelCosts:
    """What the cost model needs from the trace, in a form cheap to evaluate many times."""

    layer_kinds: List[str]            # kind of each decoder layer, in order
    kinds: Dict[str, LayerKind]
    batch_size: int
    seq_len: int
    hidden_size: int
    num_experts: int
    top_k: int
    num_heads: int
    vocab_size: int
    compute_bytes: int = 2            # bytes per element of activations and gathered weights


def _family_costs(ops, num_groups):
    fwd, bwd = {}, {}
    for op in ops:
        target = fwd if op.phase == "fwd" else bwd
        cost = target.setdefault(op.category, FamilyCost())
        if op.name == "aten._grouped_mm":
            a_shape, b_shape = op.in_shapes[0], op.in_shapes[1]
            if len(a_shape) == 2 and len(b_shape) == 2:
                # the weight gradient, [out, rows] x [rows, in] grouped along the rows: the token
                # rows are the reduction dimension, a_shape[1]
                total_rows = a_shape[1]
            else:
                total_rows = a_shape[0] if len(a_shape) == 2 else a_shape[1]
            cost.grouped.append((op.flops, total_rows / num_groups))
        elif op.flops > 0:
            cost.gemm_flops.append(op.flops)
        elif op.bytes > 0:
            cost.other_bytes += op.bytes
            cost.other_ops += 1
    return fwd, bwd


def model_costs(graph: OpGraph, config) -> ModelCosts:
    """Condenses a trace into one LayerKind per distinct block. Layers of one kind must cost the
    same (they do for DeepSeek: all dense layers alike, all MoE layers alike)."""
    by_layer = {}
    for op in graph.ops:
        by_layer.setdefault(op.layer, []).append(op)
    layer_kinds = spec.layer_kinds(config)
    compute_bytes = graph.dtype.itemsize
    act_bytes = graph.batch_size * graph.seq_len * config.hidden_size * compute_bytes
    kinds = {}

    def kind_from(name, ops, layer):
        fwd, bwd = _family_costs(ops, config.n_routed_experts or 1)
        saved = {cat: b for (lay, cat), b in graph.saved_bytes.items() if lay == layer}
        params = {cat: n for (lay, cat), n in graph.param_counts.items() if lay == layer}
        flops = sum(op.flops for op in ops)
        return LayerKind(name, fwd, bwd, saved, params, act_bytes, flops)

    for kind in ("dense", "moe"):
        layers = [i for i, k in enumerate(layer_kinds) if k == kind]
        if not layers:
            continue
        first = layers[0]
        kinds[kind] = kind_from(kind, by_layer[first], first)
        for other in layers[1:]:
            other_flops = sum(op.flops for op in by_layer[other])
            if abs(other_flops - kinds[kind].flops) > 1e-6 * max(1.0, kinds[kind].flops):
                raise ValueError(f"layer {other} costs {other_flops:.4g} FLOPs but layer {first} of the same "
                                 f"kind {kinds[kind].flops:.4g}: the cost model assumes one cost per kind")
    outside = by_layer.get(None, [])
    kinds["embed"] = kind_from("embed", [op for op in outside if op.category == "embed"], None)
    kinds["head"] = kind_from("head", [op for op in outside if op.category != "embed"], None)
    # saved bytes and params outside the layers belong to embed or head by family
    kinds["embed"].saved_bytes = {c: b for c, b in kinds["embed"].saved_bytes.items() if c == "embed"}
    kinds["head"].saved_bytes = {c: b for c, b in kinds["head"].saved_bytes.items() if c != "embed"}
    kinds["embed"].params = {c: n for c, n in kinds["embed"].params.items() if c == "embed"}
    kinds["head"].params = {c: n for c, n in kinds["head"].params.items() if c != "embed"}
    return ModelCosts(layer_kinds=layer_kinds, kinds=kinds, batch_size=graph.batch_size, seq_len=graph.seq_len,
                      hidden_size=config.hidden_size, num_experts=config.n_routed_experts or 1,
                      top_k=config.num_experts_per_tok or 1, num_heads=config.num_attention_heads,
                      vocab_size=config.vocab_size, compute_bytes=compute_bytes)


@dataclass(frozen=True)
class Candidate:
    """One way to use the plan's devices."""

    pp: int
    dp: int
    ep: int
    tp: int
    zero: int
    zero_over_replicas: bool          # ZeRO shards span the runtime replicas (FSDP) or not (HSDP)
    schedule: str                     # GradAccum | 1F1B | Interleaved1F1B
    splits: Tuple[int, ...]           # first layer of each stage after the first (len pp - 1)
    recompute: Tuple[str, ...]        # per stage: "none" | "full"
    micro_batches: int
    virtual_stages: int = 1

    def stage_layers(self, num_layers):
        bounds = (0,) + self.splits + (num_layers,)
        return [(bounds[i], bounds[i + 1]) for i in range(self.pp)]

    def describe(self):
        zero = f"zero {self.zero}" + (" over replicas" if self.zero and self.zero_over_replicas else "")
        parts = [f"pp={self.pp} dp={self.dp} ep={self.ep} tp={self.tp}", zero,
                 f"{self.schedule} x{self.micro_batches}"]
        if self.pp > 1:
            parts.append("split at " + ",".join(map(str, self.splits)))
        if any(r != "none" for r in self.recompute):
            parts.append("recompute " + "/".join(self.recompute))
        return ", ".join(parts)


@dataclass
class Prediction:
    step_time_s: float
    peak_memory_gib: List[float]              # per plan device
    mfu: float
    tokens_per_s: float
    breakdown_s: Dict[str, float]
    memory_breakdown_gib: List[Dict[str, float]]
    stage_times_s: List[Dict[str, float]]     # per stage, per micro-batch: forward, backward
    fits: bool
    model_flops: float = 0.0                  # FLOPs of one step of one plan replica (the MFU numerator)

    @property
    def max_peak_gib(self):
        return max(self.peak_memory_gib)


class CostModel:
    def __init__(self, costs: ModelCosts, profile, mem_limit_gib, runtime_replicas=1, dtype="bf16",
                 execution: ExecutionOptions = None):
        """execution: how the run computes a step (options.ExecutionOptions, as the plan records it);
        the eager trace does not see these options, so they are priced here."""
        self.costs = costs
        execution = execution if execution is not None else ExecutionOptions()
        self.execution = execution
        # --compile layer: each decoder layer one torch.compile region
        self.compiled_layers = execution.compile == "layer"
        # --ce_chunk_tokens: the loss from hidden states, N positions at a time (0: full logits)
        self.loss_chunk_tokens = int(execution.ce_chunk_tokens or 0)
        # --defer_grad_sync: one cast and gradient reduction per step (ZeRO 0)
        self.deferred_grad_sync = bool(execution.defer_grad_sync)
        self.fused_adamw = bool(execution.fused_adamw)
        self.dtype = dtype  # compute dtype: which of the profile's GEMM curves applies
        self.profile = profile
        self.mem_limit_gib = mem_limit_gib
        self.replicas = runtime_replicas
        self.reserved_gib = CPU_PROCESS_GIB if profile.name == "cpu" else RESERVED_GIB
        self._cache = {}
        self._siblings = {}

    def with_execution(self, execution: ExecutionOptions) -> "CostModel":
        """The same model, devices and memory limit priced for another execution (made once each)."""
        key = dataclasses.astuple(execution)
        if key == dataclasses.astuple(self.execution):
            return self
        if key not in self._siblings:
            self._siblings[key] = CostModel(self.costs, self.profile, self.mem_limit_gib, self.replicas, self.dtype,
                                            execution)
        return self._siblings[key]

    # ---- compute -------------------------------------------------------------------------------
    def _family_time(self, family, cost: FamilyCost, tp, ep, kind_name=None):
        split = tp if spec.splits_with_tensor_parallel(family) else 1
        p = self.profile
        fused = p.execution_factor("compiled_layer_bytes") \
            if self.compiled_layers and kind_name in LAYER_KINDS else 1.0
        # GEMM throughput is looked up by the GEMM's FLOPs (matmul curve) or rows per expert
        # (grouped curve); the profile's m/n/k arguments are used so that 2mnk == FLOPs.
        t = sum(p.matmul_time(f / split / 2, 1, 1, self.dtype) for f in cost.gemm_flops)
        for flops, rows in cost.grouped:
            # expert parallel: each rank holds E/ep experts and receives the slots of ep ranks,
            # so it multiplies as many rows as without ep, in groups ep times taller
            work = flops / split * (EP_IMBALANCE if ep > 1 else 1.0)
            rows_per_expert = max(rows * ep, 1.0)
            t += p.grouped_gemm_time(rows_per_expert, 1, 1, work / (2 * rows_per_expert), self.dtype)
        other = cost.other_bytes / (split if family != "experts" else 1)
        t += p.memory_time(other * fused) + cost.other_ops * fused * p.kernel_launch_us * 1e-6
        return t

    def _chunked_loss_time(self, phase):
        """The fused chunked loss moves each logit's bytes once, all inside the forward call."""
        if phase == "bwd":
            return 0.0
        c = self.costs
        logits = c.batch_size * c.seq_len * c.vocab_size
        chunks = max(1, -(-c.batch_size * c.seq_len // self.loss_chunk_tokens))
        return self.profile.memory_time(CHUNKED_LOSS_BYTES_PER_LOGIT * logits) + 4 * chunks * self.profile.launch_s

    def kind_time(self, kind: LayerKind, tp, ep):
        """(forward, backward) seconds of one block for one micro-batch, communication included."""
        key = (kind.name, tp, ep)
        if key not in self._cache:
            fwd = sum(self._family_time(f, c, tp, ep, kind.name) for f, c in kind.fwd.items())
            bwd = sum(self._family_time(f, c, tp, ep, kind.name) for f, c in kind.bwd.items())
            if kind.name == "head" and self.loss_chunk_tokens:
                # the GEMMs stay; the eager loss's memory traffic (full float32 logits, softmax,
                # their gradient) is replaced by the fused chunk kernel's
                def gemms(fams):
                    return sum(self._family_time(f, FamilyCost(gemm_flops=c.gemm_flops, grouped=c.grouped), tp, ep)
                               for f, c in fams.items())
                fwd = gemms(kind.fwd) + self._chunked_loss_time("fwd")
                bwd = gemms(kind.bwd)
            comm_f, comm_b = self._block_comm(kind, tp, ep)
            self._cache[key] = (fwd + comm_f, bwd + comm_b, comm_f + comm_b)
        return self._cache[key]

    def _block_comm(self, kind, tp, ep):
        p, c = self.profile, self.costs
        act = kind.input_bytes
        fwd = bwd = 0.0
        if tp > 1 and kind.name in ("dense", "moe"):
            # one all-reduce after attention and one after the MLP, each way
            fwd += 2 * p.collective_time("all_reduce", act, tp)
            bwd += 2 * p.collective_time("all_reduce", act, tp)
        if ep > 1 and kind.name == "moe":
            # dispatch and combine: every slot's hidden vector crosses the group, each way
            slots_bytes = act * c.top_k
            fwd += 2 * p.collective_time("all_to_all", slots_bytes, ep)
            bwd += 2 * p.collective_time("all_to_all", slots_bytes, ep)
        return fwd, bwd

    # ---- parameters and memory ------------------------------------------------------------------
    def _device_params(self, kind: LayerKind, tp, ep):
        """(dense, expert) parameters of one block on one device (computed once per block kind and
        degrees: the search asks for them millions of times)."""
        key = ("params", kind.name, tp, ep)
        if key not in self._cache:
            self._cache[key] = self._count_device_params(kind, tp, ep)
        return self._cache[key]

    @staticmethod
    def _count_device_params(kind: LayerKind, tp, ep):
        dense = expert = 0.0
        for family, n in kind.params.items():
            split = tp if spec.splits_with_tensor_parallel(family) else 1
            if family == "experts":
                expert += n / split / ep
            else:
                dense += n / split
        return dense, expert

    def _stage_blocks(self, cand: Candidate, stage, layer_range=None):
        first, last = layer_range or cand.stage_layers(len(self.costs.layer_kinds))[stage]
        blocks = [self.costs.kinds[k] for k in self.costs.layer_kinds[first:last]]
        if stage == 0:
            blocks = [self.costs.kinds["embed"]] + blocks
        if stage == cand.pp - 1:
            blocks = blocks + [self.costs.kinds["head"]]
        return blocks

    def stage_memory(self, cand: Candidate, stage, recompute, layer_range=None):
        """Peak memory (GiB) on a device of `stage`, by component; layer_range overrides the
        candidate's split for this stage."""
        blocks = self._stage_blocks(cand, stage, layer_range)
        dense = expert = 0.0
        for b in blocks:
            d, e = self._device_params(b, cand.tp, cand.ep)
            dense += d
            expert += e
        shard_dense, shard_expert = self.shard_degrees(cand)
        state = STATE_BYTES_PER_PARAM * (dense / shard_dense + expert / shard_expert)
        layer_param_bytes = [self.costs.compute_bytes * sum(self._device_params(b, cand.tp, cand.ep)) for b in blocks]
        if cand.zero == 3:  # the current and the prefetched block unsharded
            working = sum(sorted(layer_param_bytes)[-2:])
        else:               # every block's bf16 copy stays gathered from forward to backward
            working = sum(layer_param_bytes)
        grads_working = self.costs.compute_bytes * (dense + expert) if cand.zero == 0 else max(layer_param_bytes)

        in_flight = self._in_flight(cand, stage)
        saved_per_block = [self._saved(b, cand.tp) for b in blocks]
        if recompute == "full":
            kept = sum(b.input_bytes for b in blocks if b.name in ("dense", "moe"))
            kept += sum(s for b, s in zip(blocks, saved_per_block) if b.name in ("embed", "head"))
            activations = kept * in_flight + max(saved_per_block)
        else:
            activations = sum(saved_per_block) * in_flight
        # the backward of the largest block needs room for its gradients next to what it saved
        transient = max(saved_per_block)
        if self.loss_chunk_tokens and any(b.name == "head" for b in blocks):
            # the chunked loss holds one chunk's logits, softmax and gradient at a time
            chunk = min(self.loss_chunk_tokens, self.costs.batch_size * self.costs.seq_len)
            transient = max([s for b, s in zip(blocks, saved_per_block) if b.name != "head"]
                            + [CHUNKED_LOSS_WORKING_BYTES * chunk * self.costs.vocab_size])
        total = (state + working + grads_working + activations + transient) * FRAGMENTATION + self.reserved_gib * GIB
        parts = {"params_and_optimizer": state / GIB, "gathered_params_and_grads": (working + grads_working) / GIB,
                 "activations": activations / GIB, "transient": transient / GIB}
        parts["reserved_and_fragmentation"] = total / GIB - sum(parts.values())
        parts["total"] = total / GIB
        return parts

    def shard_degrees(self, cand):
        """How many ways (dense, expert) parameter state is sharded."""
        if cand.zero == 0:
            return 1, 1
        outer = self.replicas if cand.zero_over_replicas else 1
        return cand.dp * cand.ep * outer, cand.dp * outer

    def _saved(self, block, tp):
        """Bytes one block keeps for its backward per micro-batch on one device (cached per kind)."""
        key = ("saved", block.name, tp)
        if key not in self._cache:
            self._cache[key] = self._count_saved(block, tp)
        return self._cache[key]

    def _count_saved(self, block, tp):
        if block.name == "head" and self.loss_chunk_tokens:
            return block.input_bytes  # only the final hidden states: the chunks' logits are not kept
        saved = sum(b / (tp if spec.splits_with_tensor_parallel(f) and f != "experts" else 1)
                    for f, b in block.saved_bytes.items())
        if self.compiled_layers and block.name in LAYER_KINDS:
            saved *= self.profile.execution_factor("compiled_layer_saved")
        return saved

    @staticmethod
    def _in_flight(cand, stage):
        """Micro-batches whose activations a stage holds at once."""
        if cand.pp == 1:
            return 1
        held = min(cand.micro_batches, cand.pp - stage)
        if cand.schedule == "Interleaved1F1B":
            held = min(cand.micro_batches, held + (cand.pp - 1) // cand.virtual_stages + 1)
        return held

    # ---- the step ------------------------------------------------------------------------------
    def stage_time(self, cand: Candidate, stage, recompute, layer_range=None):
        """(forward, backward) seconds of one micro-batch on a stage, recompute included."""
        fwd = bwd = 0.0
        for b in self._stage_blocks(cand, stage, layer_range):
            f, bw, _ = self.kind_time(b, cand.tp, cand.ep)
            fwd += f
            bwd += bw + (f if recompute == "full" and b.name in ("dense", "moe") else 0.0)
        if cand.pp > 1:  # activations to the next stage, gradients back
            send = self.costs.batch_size * self.costs.seq_len * self.costs.hidden_size * self.costs.compute_bytes
            hop = self.profile.collective_time("all_gather", 2 * send, 2) * cand.virtual_stages
            fwd += hop
            bwd += hop
        return fwd, bwd

    def _zero_comm(self, cand, stage):
        """(per micro-batch, per step) seconds of data-parallel parameter and gradient traffic."""
        p = self.profile
        dense = expert = 0.0
        for b in self._stage_blocks(cand, stage):
            d, e = self._device_params(b, cand.tp, cand.ep)
            dense += d
            expert += e
        per_mb = per_step = 0.0
        if cand.zero == 0:
            groups = [(dense, cand.dp * cand.ep * self.replicas), (expert, cand.dp * self.replicas)]
        else:
            groups = list(zip((dense, expert), self.shard_degrees(cand)))
        for n, g in groups:
            if g <= 1 or n == 0:
                continue
            if cand.zero == 0:
                per_step += p.collective_time("all_reduce", FP32 * n, g)
            else:
                gathers = 2 if cand.zero == 3 else 1
                per_mb += gathers * p.collective_time("all_gather", self.costs.compute_bytes * n, g)
                per_mb += p.collective_time("reduce_scatter", FP32 * n, g)
        if self.replicas > 1 and cand.zero and not cand.zero_over_replicas:
            # HSDP: the sharded gradients are all-reduced across replicas once per step
            shard_dense, shard_expert = self.shard_degrees(cand)
            per_step += p.collective_time("all_reduce", FP32 * (dense / shard_dense + expert / shard_expert),
                                          self.replicas)
        return per_mb, per_step, dense + expert

    def _cast_time(self, cand, params):
        """Without ZeRO sharding, FSDP's mixed precision casts every parameter to the compute dtype
        and accumulates its gradient, once per micro-batch (once per step when the gradient sync
        is deferred); with ZeRO the cast rides on the all-gather."""
        if cand.zero != 0 or self.dtype != "bf16" or self.profile.name == "cpu":
            return 0.0
        return self.profile.memory_time(CAST_BYTES_PER_PARAM * params)

    def evaluate(self, cand: Candidate) -> Prediction:
        c = self.costs
        stage_f_b, peaks, mem = [], [], []
        zero_exposed, per_step, optimizer, casts = 0.0, 0.0, 0.0, 0.0
        for s in range(cand.pp):
            f, b = self.stage_time(cand, s, cand.recompute[s])
            per_mb, step_comm, params = self._zero_comm(cand, s)
            hidden = FSDP_OVERLAP * (f + b)
            exposed = max(per_mb - hidden, 0.05 * per_mb)
            zero_exposed = max(zero_exposed, exposed)
            stage_f_b.append({"forward": f, "backward": b + exposed})
            per_step = max(per_step, step_comm)
            shard = params / self.shard_degrees(cand)[0]
            # AdamW reads and writes fp32 weight, gradient and two moments
            adamw = self.profile.memory_time(2 * STATE_BYTES_PER_PARAM * shard)
            if not self.fused_adamw:
                adamw *= self.profile.execution_factor("foreach_adamw")
            optimizer = max(optimizer, adamw)
            casts = max(casts, self._cast_time(cand, params))
            m = self.stage_memory(cand, s, cand.recompute[s])
            mem.append(m)
        worst = max(x["forward"] + x["backward"] for x in stage_f_b)
        m_count = cand.micro_batches
        pipeline, bubble = pipeline_time(cand.pp, m_count, cand.virtual_stages, worst)
        cast_total = casts * (1 if self.deferred_grad_sync else m_count)
        step = pipeline + per_step + optimizer + cast_total
        devices_per_stage = cand.dp * cand.ep * cand.tp
        for m in mem:
            peaks.extend([m["total"]] * devices_per_stage)
        mem_per_device = [m for m in mem for _ in range(devices_per_stage)]
        plan_devices = cand.pp * devices_per_stage
        sequences = m_count * c.batch_size * cand.dp * cand.ep
        model_flops = sequences / c.batch_size * sum(
            c.kinds[k].flops for k in c.layer_kinds + ["embed", "head"])
        mfu = model_flops / (step * plan_devices * self.profile.peak_bf16_tflops * 1e12)
        compute = m_count * sum(x["forward"] + x["backward"] for x in stage_f_b) / cand.pp
        breakdown = {"compute and tp/ep communication": m_count * worst,
                     "ZeRO collectives not hidden by compute (included above)": m_count * zero_exposed,
                     "pipeline bubble": bubble,
                     "gradient sync at the end of the step": per_step, "optimizer step": optimizer,
                     "mixed-precision casts": cast_total,
                     "stage imbalance (included above)": max(0.0, m_count * worst - compute)}
        return Prediction(step_time_s=step, peak_memory_gib=peaks, mfu=mfu,
                          tokens_per_s=sequences * c.seq_len / step, breakdown_s=breakdown,
                          memory_breakdown_gib=mem_per_device, stage_times_s=stage_f_b,
                          fits=max(peaks) <= self.mem_limit_gib, model_flops=model_flops)
