"""Cost model: a traced op graph + a device profile -> step time and memory of any candidate plan.

The trace gives, per decoder layer kind (dense or MoE), embedding and head, and per op family
(attention, norm, dense_mlp, router, experts, shared_experts, embed, head), the GEMMs with their
FLOPs, the grouped GEMMs with their rows per expert, the bytes moved by everything else, the bytes
autograd saves, and the parameter counts. A candidate (`Candidate`) fixes the mesh degrees, the
layer split, ZeRO level, recompute per stage and schedule; `evaluate` turns it into predicted time
and memory per device, for the execution options (`options.ExecutionOptions`: the attention kernel,
priced at the profile's measured throughput for the kernel the run executes; compiled layers,
chunked loss, AdamW kind, gradient-sync policy, ZeRO-3 units kept gathered) the plan records, with
rows that pack documents (attention through an explicit mask) and the expert-parallel load
imbalance as the search's inputs. Which families divide over the
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
# How much busier the busiest expert-parallel rank is than the average when neither the profile nor
# --expert_load_imbalance says (compiler/profiles.py `expert_load_imbalance`).
EP_IMBALANCE = 1.05

# Bytes a fused chunked cross-entropy moves per logit: the bf16 logits written by the GEMM and read
# once, the bf16 gradient of the logits written (the float32 softmax stays in registers).
CHUNKED_LOSS_BYTES_PER_LOGIT = 6
# A chunk's working set per logit (runtime/loss.py): its logits and their gradient, in the compute
# dtype, when the softmax and gradient are one compiled kernel (CUDA); run eagerly (a CPU) it also
# holds float32 copies: the shifted logits' exponent, softmax - one-hot and its masked form, and the
# boolean target mask.
CHUNKED_LOSS_EAGER_EXTRA_BYTES = 3 * FP32 + 1
# The plain loss over full logits (modeling next_token_cross_entropy) peaks in its forward with three
# float32 copies of the logits alive: the upcast logits the model returns, the shifted contiguous
# copy cross_entropy reads, and the log-softmax it saves (counted in the head's saved bytes).
FULL_LOSS_FP32_COPIES = 2
# The attention ops of the trace (compiler/trace.py traces SDPA's memory-efficient kernel): priced as
# the kernel the run executes when the profile lists it (`attention`); (query, value) argument slots.
ATTENTION_OPS = {"aten._scaled_dot_product_efficient_attention": (0, 2),
                 "aten._scaled_dot_product_efficient_attention_backward": (1, 3)}
# Attention options whose kernel pads MLA's value head to the query/key width (modeling/kernels.py).
PADDED_ATTENTION = ("sdpa_flash_padded", "flash")
# kernels that take packed documents as they lie (no regrouping into windows): flash-attn's varlen
# form, FlexAttention's block mask
DOCUMENT_NATIVE_ATTENTION = ("flash", "flex")
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
    # attention kernel calls: (the trace's FLOPs, (batch, heads, seq, d_qk, d_v), is the forward)
    attention: List[Tuple[float, Tuple[int, int, int, int, int], bool]] = field(default_factory=list)


@dataclass
class LayerKind:
    """Cost of one kind of block (a dense layer, a MoE layer, the embedding, the head)."""

    name: str
    fwd: Dict[str, FamilyCost]
    bwd: Dict[str, FamilyCost]
    saved_bytes: Dict[str, float]     # family -> bytes autograd keeps for the backward
    params: Dict[str, int]            # family -> parameter count
    input_bytes: float                # the block's input activation (kept when recomputing)
    flops: float                      # fwd + bwd FLOPs of full training (for MFU; see model_costs)
    # family -> parameters that train (all, or LoRA's adapters: the rest is frozen, held in the
    # compute dtype with no master copy, gradient or optimizer state); None: all of `params`
    trainable: Dict[str, int] = None

    def __post_init__(self):
        if self.trainable is None:
            self.trainable = dict(self.params)


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
    lora: dict = None                 # the plan's LoRA record (rank, alpha, dropout, targets), or None


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
        elif op.name in ATTENTION_OPS:
            q, v = (op.in_shapes[i] for i in ATTENTION_OPS[op.name])
            cost.attention.append((op.flops, (q[0], q[1], q[2], q[3], v[3]), op.phase == "fwd"))
        elif op.flops > 0:
            cost.gemm_flops.append(op.flops)
        elif op.bytes > 0:
            cost.other_bytes += op.bytes
            cost.other_ops += 1
    return fwd, bwd


def _training_flops(ops):
    """The FLOPs of full training of these ops, what MFU counts (the bench's definition: 6 x active
    parameters per token, and attention): those the trace ran, and for each forward GEMM by a frozen
    weight (LoRA's base) the weight gradient a LoRA step skips, which costs as much as that GEMM.
    The time model prices only the ops the trace ran."""
    return sum(op.flops for op in ops) + sum(op.flops for op in ops if op.frozen_weight)


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
        trainable = {cat: n for (lay, cat), n in graph.trainable_counts.items() if lay == layer} \
            if graph.trainable_counts else None
        return LayerKind(name, fwd, bwd, saved, params, act_bytes, _training_flops(ops), trainable)

    for kind in ("dense", "moe"):
        layers = [i for i, k in enumerate(layer_kinds) if k == kind]
        if not layers:
            continue
        first = layers[0]
        kinds[kind] = kind_from(kind, by_layer[first], first)
        for other in layers[1:]:
            other_flops = _training_flops(by_layer[other])
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
    kinds["embed"].trainable = {c: n for c, n in kinds["embed"].trainable.items() if c == "embed"}
    kinds["head"].trainable = {c: n for c, n in kinds["head"].trainable.items() if c != "embed"}
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
                 execution: ExecutionOptions = None, document_masking=False, expert_load_imbalance=None):
        """execution: how the run computes a step (options.ExecutionOptions, as the plan records it);
        the eager trace does not see these options, so they are priced here. document_masking: the
        rows pack documents, so attention runs with an explicit block-causal mask (PlanOptions).
        expert_load_imbalance: the busiest expert rank's slots over the mean rank's (None: the
        profile's figure for the candidate's ep)."""
        self.costs = costs
        execution = execution if execution is not None else ExecutionOptions()
        self.execution = execution
        self.document_masking = bool(document_masking)
        self.expert_load_imbalance = expert_load_imbalance
        # the attention kernel the run executes: the option, or the runtime's default for it unset
        # (flash-attn where installed, which a profile says by listing `flash`; else PyTorch's sdpa)
        self.attention = execution.attention or ("flash" if "flash" in profile.attention else "sdpa")
        # --zero3_keep_gathered: FSDP units kept gathered from forward to backward under ZeRO 3
        self.keep_gathered = int(execution.zero3_keep_gathered or 0)
        # --compile layer: each decoder layer one torch.compile region
        self.compiled_layers = execution.compile in spec.WHOLE_LAYER_SCOPES
        # --compile layer_cudagraphs: those layers replayed as CUDA graphs, whose kernels the host
        # does not launch one by one
        self.graph_replayed_layers = execution.compile == "layer_cudagraphs"
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
        # per block kind and degrees: compute times, saved bytes, parameter counts. They depend only on
        # the options that change what a block computes (COMPUTE_OPTIONS), so the siblings of one model
        # that differ in the others (AdamW, gradient sync, ZeRO-3 units kept) share one cache.
        self._caches = {self._compute_key(execution): {}}
        self._cache = self._caches[self._compute_key(execution)]
        self._siblings = {}

    COMPUTE_OPTIONS = ("attention", "compile", "ce_chunk_tokens")

    @classmethod
    def _compute_key(cls, execution):
        return tuple(getattr(execution, name) for name in cls.COMPUTE_OPTIONS)

    def with_execution(self, execution: ExecutionOptions) -> "CostModel":
        """The same model, devices and memory limit priced for another execution (made once each)."""
        key = dataclasses.astuple(execution)
        if key == dataclasses.astuple(self.execution):
            return self
        if key not in self._siblings:
            sibling = CostModel(self.costs, self.profile, self.mem_limit_gib, self.replicas, self.dtype,
                                execution, self.document_masking, self.expert_load_imbalance)
            sibling._caches = self._caches
            sibling._cache = self._caches.setdefault(self._compute_key(execution), {})
            self._siblings[key] = sibling
        return self._siblings[key]

    def attention_cost(self, attention):
        """(seconds, bytes saved) of the model's attention for one micro-batch on one device with the
        `attention` kernel: the forward and backward of every decoder layer's attention family, and what
        those layers save (what compiler/execution.attention_choices compares kernels by)."""
        priced = self.with_execution(dataclasses.replace(self.execution, attention=attention))
        seconds = saved = 0.0
        for name in self.costs.layer_kinds:
            kind = self.costs.kinds[name]
            seconds += sum(priced._family_time("attention", c, 1, 1, name)
                           for c in (kind.fwd.get("attention"), kind.bwd.get("attention")) if c is not None)
            saved += priced._saved(kind, 1)
        return seconds, saved

    def load_imbalance(self, ep):
        """The factor on the busiest expert rank's routed work and all-to-all volume (1 without ep)."""
        if ep <= 1:
            return 1.0
        if self.expert_load_imbalance is not None:
            return float(self.expert_load_imbalance)
        return self.profile.load_imbalance(ep) if self.profile.expert_load_imbalance else EP_IMBALANCE

    # ---- compute -------------------------------------------------------------------------------
    def _family_time(self, family, cost: FamilyCost, tp, ep, kind_name=None):
        split = tp if spec.splits_with_tensor_parallel(family) else 1
        p = self.profile
        fused = 1.0
        if self.compiled_layers and kind_name in LAYER_KINDS:
            # a LoRA run's layers (frozen base: no weight-gradient traffic) have their own figure where
            # the profile measured one, else full training's
            lora_figure = self.costs.lora and "compiled_layer_bytes_lora" in p.execution
            fused = p.execution_factor("compiled_layer_bytes_lora" if lora_figure else "compiled_layer_bytes")
        # GEMM throughput is looked up by the GEMM's FLOPs (matmul curve) or rows per expert
        # (grouped curve); the profile's m/n/k arguments are used so that 2mnk == FLOPs.
        t = sum(p.matmul_time(f / split / 2, 1, 1, self.dtype) for f in cost.gemm_flops)
        t += sum(self._attention_call_time(flops, shape, forward, split) for flops, shape, forward in cost.attention)
        for flops, rows in cost.grouped:
            # expert parallel: each rank holds E/ep experts and receives the slots of ep ranks,
            # so it multiplies as many rows as without ep, in groups ep times taller; the busiest
            # rank (load_imbalance over the mean) sets the pace
            work = flops / split * self.load_imbalance(ep)
            rows_per_expert = max(rows * ep, 1.0)
            t += p.grouped_gemm_time(rows_per_expert, 1, 1, work / (2 * rows_per_expert), self.dtype)
        other = cost.other_bytes / (split if family != "experts" else 1)
        t += p.memory_time(other * fused)
        launches = cost.other_ops * fused * p.kernel_launch_us * 1e-6  # each small op costs its launch
        if self.graph_replayed_layers and kind_name in LAYER_KINDS:
            # a replayed CUDA graph launches the layer's kernels at once: the share of those launch costs
            # still paid is the profile's measured figure (none measured: the same as compiled layers)
            launches *= p.execution_factor("graph_replay_launch_kept")
        return t + launches

    def _attention_kernel(self):
        """(the profile's kernel that prices this run's attention, whether it computes every score),
        or (None, masked) when the profile lists no such kernel."""
        p = self.profile
        if self.document_masking and self.attention == "eager":
            # the eager kernel applies an explicit S x S mask, computing every score
            return (p.attention_masked or None), True
        if self.attention == "flex" and not self.document_masking:
            kernel = "sdpa"  # flex runs whole rows through sdpa's causal kernel
        else:
            # the SDPA kernels regroup packed documents for their causal path (modeling/kernels.py:
            # attention_by_document), flash-attn takes them as varlen sequences, flex skips the tiles
            # outside the documents: causal work
            kernel = self.attention
        return (kernel if kernel in p.attention else None), False

    def _attention_call_time(self, trace_flops, shape, forward, split):
        """Seconds of one traced attention op (the forward or the backward) as the kernel the run
        executes: the profile's throughput of that kernel for the call's forward + backward FLOPs (its
        convention: causal, the kernel's own value width), a third of it in the forward and two thirds
        in the backward (the convention's 1 : 2). A profile that lists no such kernel: the trace's
        FLOPs on the GEMM curve. Document masking computes every score and adds the mask's traffic."""
        p = self.profile
        batch, heads, seq, d_qk, d_v = shape
        heads = heads / split
        kernel, masked = self._attention_kernel()
        if kernel is None:
            t = p.matmul_time(trace_flops / split / 2, 1, 1, self.dtype)
        else:
            width = d_qk if (kernel in PADDED_ATTENTION and not masked) else d_v
            kernel_flops = 3 * batch * heads * seq * seq * (d_qk + width) * (2 if masked else 1)
            t = p.attention_time(kernel, kernel_flops) * (1 / 3 if forward else 2 / 3)
        cb = self.costs.compute_bytes
        if masked:
            scores = batch * seq * seq
            if forward:  # the boolean block-causal mask written, then made additive (read 1, write cb bytes)
                t += p.memory_time(scores * (2 + cb))
            # the kernel reads the additive mask for every head: once forward, twice backward
            t += p.memory_time(scores * heads * cb * (1 if forward else 2))
        elif self.document_masking and self.attention not in DOCUMENT_NATIVE_ATTENTION:
            # regrouping (attention_by_document): q, k, v gathered into document windows and the output
            # gathered back (each read and written), forward; the same traffic of the gradients backward.
            # The causal work above is priced over whole rows: documents in power-of-two windows do about
            # that much (between half and twice it, with the mix of lengths). Beside the traffic, its
            # per-call cost (the windows' several kernel calls, the host's work): the profile's
            # document_regroup_ms per layer, forward + backward, split 1 : 2
            t += p.memory_time(2 * batch * heads * seq * (2 * d_qk + 2 * d_v) * cb)
            t += p.execution.get("document_regroup_ms", 0.0) * 1e-3 * (1 / 3 if forward else 2 / 3)
        return t

    def _loss_chunks(self):
        """How many chunks the chunked loss cuts a micro-batch's predicting positions into."""
        c = self.costs
        return max(1, -(-c.batch_size * (c.seq_len - 1) // self.loss_chunk_tokens))

    def _chunked_loss_time(self, phase):
        """The chunked loss's own traffic (runtime/loss.py). Forward (where it does all its work): each
        logit's bytes once in the fused kernel, and with several chunks the float32 accumulation of
        the head's weight gradient (the first chunk's cast, then per chunk its partial read and the
        accumulator read and written). Backward: both stored gradients scaled by the incoming one
        and the weight gradient cast to the weight's dtype. A LoRA run's head is frozen: no weight
        gradient is computed, accumulated or cast."""
        c, p = self.costs, self.profile
        cb, chunks = c.compute_bytes, self._loss_chunks()
        weight = 0 if c.lora else c.vocab_size * c.hidden_size
        if phase == "bwd":
            scale = 2 * (FP32 if chunks > 1 else cb) + (FP32 + cb if chunks > 1 else 0)
            return p.memory_time(scale * weight) + p.memory_time(2 * cb * c.batch_size * c.seq_len * c.hidden_size)
        logits = c.batch_size * c.seq_len * c.vocab_size
        accumulate = (cb + FP32) * weight + (chunks - 1) * (cb + 2 * FP32) * weight if chunks > 1 else 0.0
        return p.memory_time(CHUNKED_LOSS_BYTES_PER_LOGIT * logits) + p.memory_time(accumulate) + \
            4 * chunks * p.launch_s

    def _chunked_head_time(self, families, tp, ep):
        """The head's families under the chunked loss: the lm_head GEMMs run once per chunk, at the
        chunk's shape (the GEMM curve's throughput for that size), and the eager loss's traffic (full
        float32 logits, softmax, their gradient) is gone (_chunked_loss_time prices the chunk
        kernel's); the final norm is as traced."""
        chunks = self._loss_chunks()
        t = 0.0
        for family, cost in families.items():
            if family != "head":
                t += self._family_time(family, cost, tp, ep, "head")
                continue
            t += sum(chunks * self.profile.matmul_time(f / chunks / 2, 1, 1, self.dtype) for f in cost.gemm_flops)
        return t

    def kind_time(self, kind: LayerKind, tp, ep):
        """(forward, backward) seconds of one block for one micro-batch, communication included."""
        key = (kind.name, tp, ep)
        if key not in self._cache:
            fwd = sum(self._family_time(f, c, tp, ep, kind.name) for f, c in kind.fwd.items())
            bwd = sum(self._family_time(f, c, tp, ep, kind.name) for f, c in kind.bwd.items())
            if kind.name == "head" and self.loss_chunk_tokens:
                fwd = self._chunked_head_time(kind.fwd, tp, ep) + self._chunked_loss_time("fwd")
                bwd = self._chunked_head_time(kind.bwd, tp, ep) + self._chunked_loss_time("bwd")
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
            # dispatch and combine: every slot's hidden vector crosses the group, each way; the busiest
            # rank receives load_imbalance times the mean rank's slots, and every rank waits for it
            slots_bytes = act * c.top_k * self.load_imbalance(ep)
            fwd += 2 * p.collective_time("all_to_all", slots_bytes, ep)
            bwd += 2 * p.collective_time("all_to_all", slots_bytes, ep)
            fwd += self._split_sizes_time(ep)
        return fwd, bwd

    def _split_sizes_time(self, ep):
        """The forward's host synchronisation for the all-to-all's split sizes (runtime/expert_parallel.py):
        the per-expert counts exchanged (a small all-to-all: its latency), then copied to the host,
        which waits for the device to reach that point and leaves it idle until the host has launched
        the next kernel. The backward reuses the forward's sizes (no exchange, no wait)."""
        p, c = self.profile, self.costs
        counts = 8 * c.num_experts  # int64, one per expert
        return p.collective_time("all_to_all", counts, ep) + p.host_sync_us * 1e-6 + p.launch_s

    # ---- parameters and memory ------------------------------------------------------------------
    def _device_params(self, kind: LayerKind, tp, ep, trainable=False):
        """(dense, expert) parameters of one block on one device, or only those that train
        (computed once per block kind and degrees: the search asks for them millions of times)."""
        key = ("params", kind.name, tp, ep, trainable)
        if key not in self._cache:
            self._cache[key] = self._count_device_params(kind.trainable if trainable else kind.params, tp, ep)
        return self._cache[key]

    def _device_frozen(self, kind: LayerKind, tp, ep):
        """(dense, expert) frozen parameters of one block on one device (LoRA's base; else none)."""
        (d, e), (td, te) = self._device_params(kind, tp, ep), self._device_params(kind, tp, ep, trainable=True)
        return d - td, e - te

    @staticmethod
    def _count_device_params(params, tp, ep):
        dense = expert = 0.0
        for family, n in params.items():
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
        dense = expert = frozen_dense = frozen_expert = 0.0
        for b in blocks:
            d, e = self._device_params(b, cand.tp, cand.ep, trainable=True)
            fd, fe = self._device_frozen(b, cand.tp, cand.ep)
            dense, expert, frozen_dense, frozen_expert = dense + d, expert + e, frozen_dense + fd, frozen_expert + fe
        shard_dense, shard_expert = self.shard_degrees(cand)
        # trainable: fp32 master, gradient and AdamW's moments; frozen (LoRA's base): only the weight
        # itself, in the compute dtype, sharded the same way under ZeRO 2 / 3
        state = STATE_BYTES_PER_PARAM * (dense / shard_dense + expert / shard_expert) + \
            self.costs.compute_bytes * (frozen_dense / shard_dense + frozen_expert / shard_expert)
        # compute-dtype copies: of the trainable weights always (cast or gathered), of the frozen ones
        # only when ZeRO shards them (ZeRO 0 computes with the frozen weights themselves)
        layer_param_bytes = [self.costs.compute_bytes * (sum(self._device_params(b, cand.tp, cand.ep, trainable=True))
                                                         + (sum(self._device_frozen(b, cand.tp, cand.ep)) if cand.zero
                                                            else 0.0)) for b in blocks]
        layer_grad_bytes = [self.costs.compute_bytes * sum(self._device_params(b, cand.tp, cand.ep, trainable=True))
                            for b in blocks]
        if cand.zero == 3:  # the current and the prefetched block unsharded, and the units kept gathered
            working = sum(sorted(layer_param_bytes)[-2:]) + sum(
                layer_param_bytes[i] for i in self._kept_gathered(blocks))
        else:               # every block's bf16 copy stays gathered from forward to backward
            working = sum(layer_param_bytes)
        # FSDP reduces (or, deferred, accumulates in float32 in place of the reduced gradient), casts and
        # frees each unit's compute-dtype gradients as the unit's backward ends: one block's at a time
        grads_working = max(layer_grad_bytes)

        in_flight = self._in_flight(cand, stage)
        saved_per_block = [self._saved(b, cand.tp) for b in blocks]
        if recompute == "full":
            kept = sum(b.input_bytes for b in blocks if b.name in ("dense", "moe"))
            kept += sum(s for b, s in zip(blocks, saved_per_block) if b.name in ("embed", "head"))
            activations = kept * in_flight + max(saved_per_block)
        else:
            activations = sum(saved_per_block) * in_flight
        # The peak is the largest of these moments: the loss's forward, with every activation saved,
        # the head's working set alive (loss_working) and no gradient yet; and the backward of each
        # block, with the activations of the blocks before it (and of the other micro-batches in
        # flight) still saved, room for its gradients and as much working memory as it saved (under
        # the chunked loss the head's backward only scales the gradients it stored).
        has_head = any(b.name == "head" for b in blocks)
        moments = [(activations, self._loss_working() if has_head else 0.0, 0.0)]
        if recompute != "full":
            earlier = (in_flight - 1) * sum(saved_per_block)
            for b, saved, grads in zip(blocks, saved_per_block, layer_grad_bytes):
                earlier += saved
                working_b = 0.0 if (b.name == "head" and self.loss_chunk_tokens) else saved
                moments.append((earlier, working_b, grads))
        else:
            moments.append((activations, max(saved_per_block), grads_working))
        alive, transient, grads_now = max(moments, key=sum)
        total = (state + working + alive + transient + grads_now) * FRAGMENTATION + self.reserved_gib * GIB
        parts = {"params_and_optimizer": state / GIB, "gathered_params_and_grads": (working + grads_now) / GIB,
                 "activations": alive / GIB, "transient": transient / GIB}
        parts["reserved_and_fragmentation"] = total / GIB - sum(parts.values())
        parts["total"] = total / GIB
        return parts

    def _loss_working(self):
        """Bytes the loss's forward holds beyond what the head saves. The plain loss: two more float32
        copies of the logits (FULL_LOSS_FP32_COPIES). The chunked loss (runtime/loss.py): one chunk's
        logits and their gradient (CHUNKED_LOSS_EAGER_EXTRA_BYTES more per logit where the kernel is
        not compiled: a CPU) and the chunk's compute-dtype weight gradient before it is accumulated."""
        c = self.costs
        if not self.loss_chunk_tokens:
            return FULL_LOSS_FP32_COPIES * FP32 * c.batch_size * c.seq_len * c.vocab_size
        chunk = min(self.loss_chunk_tokens, c.batch_size * (c.seq_len - 1))
        per_logit = 2 * c.compute_bytes + (CHUNKED_LOSS_EAGER_EXTRA_BYTES if self.profile.name == "cpu" else 0)
        weight_grad = 0 if c.lora else c.compute_bytes * c.vocab_size * c.hidden_size  # LoRA: the head is frozen
        return per_logit * chunk * c.vocab_size + weight_grad

    def _kept_gathered(self, blocks):
        """Indices of `blocks` whose gathered weights --zero3_keep_gathered keeps from forward to backward:
        the first unit is the stage's own parameters (embedding, final norm, head: FSDP's root module),
        then its decoder layers from the last."""
        if not self.keep_gathered:
            return []
        root = [i for i, b in enumerate(blocks) if b.name not in LAYER_KINDS]
        layers = [i for i, b in enumerate(blocks) if b.name in LAYER_KINDS]
        return root + layers[::-1][:self.keep_gathered - 1]

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
        c = self.costs
        if block.name == "head" and self.loss_chunk_tokens:
            # the final norm's input, and what the chunked loss stores for its backward: the hidden
            # states' gradient and the head's weight gradient (float32 when accumulated over chunks);
            # the chunks' logits are not kept; a LoRA run's frozen head has no weight gradient
            weight_bytes = 0 if c.lora else (FP32 if self._loss_chunks() > 1 else c.compute_bytes)
            return block.input_bytes + c.compute_bytes * c.batch_size * (c.seq_len - 1) * c.hidden_size + \
                weight_bytes * c.vocab_size * c.hidden_size
        saved = sum(b / (tp if spec.splits_with_tensor_parallel(f) and f != "experts" else 1)
                    for f, b in block.saved_bytes.items())
        if self.compiled_layers and block.name in LAYER_KINDS:
            # LoRA's compiled layers keep more of what eager keeps than full training's do (measured on
            # an H200: 0.665 against 0.484); a profile without its own LoRA figure prices eager's (1.0)
            saved *= self.profile.execution_factor("compiled_layer_saved_lora" if self.costs.lora
                                                   else "compiled_layer_saved")
        return saved + self._attention_saved_extra(block, tp)

    def _attention_saved_extra(self, block, tp):
        """What the run's attention kernel saves beyond the traced one: a padding kernel keeps its
        padded value and output (d_qk wide instead of d_v); a masked one its additive S x S mask."""
        cb, extra = self.costs.compute_bytes, 0.0
        cost = block.fwd.get("attention")
        for _, (batch, heads, seq, d_qk, d_v), _ in (cost.attention if cost is not None else []):
            if self.document_masking and self.attention == "eager":
                extra += batch * seq * seq * cb
            elif self.document_masking and self.attention not in DOCUMENT_NATIVE_ATTENTION:
                # the kernel saves the regrouped q, k, v and output, their windows' padding beyond the
                # tokens' own (about half of them, with power-of-two windows)
                extra += 0.5 * batch * heads / tp * seq * (2 * d_qk + 2 * d_v) * cb
            elif self.attention in PADDED_ATTENTION and d_v < d_qk:
                extra += 2 * batch * heads / tp * seq * (d_qk - d_v) * cb
        return extra

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
        """(per micro-batch, per step) seconds of data-parallel parameter and gradient traffic, and the
        stage's trainable parameters on a device (what AdamW steps and mixed precision casts)."""
        p = self.profile
        dense = expert = frozen_dense = frozen_expert = 0.0
        for b in self._stage_blocks(cand, stage):
            d, e = self._device_params(b, cand.tp, cand.ep, trainable=True)
            fd, fe = self._device_frozen(b, cand.tp, cand.ep)
            dense, expert, frozen_dense, frozen_expert = dense + d, expert + e, frozen_dense + fd, frozen_expert + fe
        per_mb = per_step = 0.0
        # the units --zero3_keep_gathered keeps gathered skip the backward's all-gather (all their weights)
        blocks = self._stage_blocks(cand, stage)
        kept = [self._device_params(blocks[i], cand.tp, cand.ep) for i in self._kept_gathered(blocks)]
        kept_dense, kept_expert = sum(k[0] for k in kept), sum(k[1] for k in kept)
        # gradients travel for the trainable parameters only; ZeRO 2 / 3 gather the frozen ones too
        if cand.zero == 0:
            groups = [(dense, 0.0, cand.dp * cand.ep * self.replicas, 0.0),
                      (expert, 0.0, cand.dp * self.replicas, 0.0)]
        else:
            groups = list(zip((dense, expert), (frozen_dense, frozen_expert), self.shard_degrees(cand),
                              (kept_dense, kept_expert)))
        for n, frozen, g, kept_n in groups:
            if g <= 1 or n + frozen == 0:
                continue
            if cand.zero == 0 and cand.pp > 1 and not self.deferred_grad_sync:
                # pipeline stages reduce in each micro-batch's backward (runtime/pipeline.py ReducingStage),
                # overlapped with the backwards; deferred, once after the stage's last micro-batch, exposed
                per_mb += p.collective_time("all_reduce", FP32 * n, g)
            elif cand.zero == 0:
                per_step += p.collective_time("all_reduce", FP32 * n, g)
            else:
                per_mb += p.collective_time("all_gather", self.costs.compute_bytes * (n + frozen), g)
                if cand.zero == 3:  # regathered for the backward
                    per_mb += p.collective_time("all_gather", self.costs.compute_bytes * (n + frozen - kept_n), g)
                if n:
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
