"""Tracing: one forward and backward of the training form on the meta device, recorded op by op.

No weights and no memory: every tensor is a shape. Each op that reaches the dispatcher is
recorded with its phase (forward or backward), the module path it belongs to (backward ops
inherit the path of the forward op whose autograd node runs them), its input and output shapes,
FLOPs, bytes read and written, and, in the forward, the bytes autograd saves for the backward.
Registered custom ops (the router) stay single nodes and carry their annotation; an annotation
that disagrees with the traced shapes is an error naming the op.

Which op family and decoder layer a module path belongs to is the spec's answer
(`modeling.spec.family_of_path`, `layer_of_path`). The cost model (`cost_model.model_costs`) reads
the op list, the saved bytes and the parameter counts, each keyed by (layer, family).
"""

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from compiler.annotations import check_shapes, get_op_annotation
from modeling import spec

# Ops that only reinterpret memory: no bytes move.
_VIEW_OPS = {
    "aten.view", "aten._unsafe_view", "aten.t", "aten.transpose", "aten.permute", "aten.expand",
    "aten.detach", "aten.alias", "aten.slice", "aten.select", "aten.split", "aten.split_with_sizes",
    "aten.unsqueeze", "aten.squeeze", "aten.as_strided", "aten._reshape_alias", "aten.unbind",
    "aten.lift_fresh", "aten.empty", "aten.empty_like", "aten.empty_strided", "aten.new_empty",
    "aten.new_empty_strided", "aten._to_copy_noop", "aten.chunk", "aten.unflatten", "aten.flatten",
    "aten.view_as", "aten.reshape", "aten.narrow", "aten.diagonal", "aten.real", "aten.imag",
}


@dataclass
class OpRecord:
    name: str
    phase: str                     # "fwd" | "bwd"
    module_path: str
    layer: Optional[int]           # decoder layer (spec.layer_of_path), None outside the layers
    category: str                  # op family (a key of spec.OP_FAMILIES, from spec.family_of_path)
    in_shapes: List[Optional[Tuple[int, ...]]]
    out_shapes: List[Optional[Tuple[int, ...]]]
    flops: float
    bytes: float
    annotation: Optional[str] = None
    # a forward GEMM whose weight is frozen (LoRA's base): its weight gradient is never computed
    frozen_weight: bool = False


@dataclass
class OpGraph:
    """The trace of one micro-batch: ops, saved activations, and what it was traced with."""

    ops: List[OpRecord]
    saved_bytes: Dict[Tuple[Optional[int], str], float]   # (layer, category) -> bytes saved in forward
    batch_size: int
    seq_len: int
    dtype: torch.dtype
    trace_seconds: float = 0.0
    param_counts: Dict[Tuple[Optional[int], str], int] = field(default_factory=dict)
    # the parameters that train (all of them, or a LoRA run's adapters), keyed the same way
    trainable_counts: Dict[Tuple[Optional[int], str], int] = field(default_factory=dict)

    def total_flops(self, phase=None):
        return sum(op.flops for op in self.ops if phase is None or op.phase == phase)

    def custom_ops(self):
        return [op for op in self.ops if op.annotation is not None]


def _shape(x):
    return tuple(x.shape) if isinstance(x, torch.Tensor) else None


def _tensor_bytes(x):
    return x.numel() * x.element_size() if isinstance(x, torch.Tensor) else 0


def _flatten(values):
    out = []
    for v in values:
        if isinstance(v, (list, tuple)):
            out.extend(_flatten(v))
        else:
            out.append(v)
    return out


def _router_flops(in_shapes):
    """deepseek::moe_route: the gate GEMM dominates (softmax and top-k are O(T*E))."""
    (n, l, h), (e, _) = in_shapes[0], in_shapes[1]
    return 2 * n * l * h * e


# FLOPs of registered custom ops, which FlopCounter does not see into.
CUSTOM_OP_FLOPS = {"deepseek.moe_route": _router_flops}


def grouped_mm_flops(a_shape, b_shape, out_shape):
    """FLOPs of torch._grouped_mm: 2 x rows x reduction x columns, whatever dim is grouped."""
    if len(a_shape) == 2 and len(b_shape) == 3:      # [M, K] x [G, K, N] -> [M, N]  (forward, dX)
        return 2 * a_shape[0] * a_shape[1] * b_shape[2]
    if len(a_shape) == 2 and len(b_shape) == 2:      # [M, Ktot] x [Ktot, N] grouped over K -> [G, M, N] (dW)
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    if len(a_shape) == 3 and len(b_shape) == 2:      # [G, M, K] x [K, Ntot] -> [M?, Ntot]
        return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[1] // max(1, out_shape[0])
    return 2 * a_shape[-2] * a_shape[-1] * b_shape[-1] * (a_shape[0] if len(a_shape) == 3 else 1)


# Ops whose output carries its input's values (a view, a cast, a copy): a GEMM reading such an output
# of a frozen parameter multiplies by that frozen weight.
_VALUE_PRESERVING_OPS = _VIEW_OPS | {"aten._to_copy", "aten.clone", "aten.contiguous", "aten.copy"}


class _Recorder(TorchDispatchMode):
    def __init__(self, path_stack, frozen_params=()):
        super().__init__()
        self.path_stack = path_stack
        self.phase = "fwd"
        self.last_backward_path = ""
        self.ops: List[OpRecord] = []
        # id -> tensor of the frozen parameters and what the forward derives from them by views and casts
        # (holding them keeps their ids from being reused; on the meta device they cost nothing)
        self.frozen = {id(p): p for p in frozen_params}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func.overloadpacket
        name = str(packet)
        if self.phase == "bwd":
            node = torch._C._current_autograd_node()
            path = node.metadata.get("module_path") if node is not None else None
            if path is None:
                # A node the tagging did not reach runs inside or right after a tagged one: the graph a
                # custom op's backward builds to recompute its forward (the router), the accumulation
                # of a parameter's gradient. Its work belongs to that module, not to the head.
                path = self.last_backward_path
            self.last_backward_path = path
        else:
            path = self.path_stack[-1] if self.path_stack else ""
        flat_in = _flatten(list(args) + list(kwargs.values()))
        flat_out = _flatten(out if isinstance(out, (list, tuple)) else [out])
        in_shapes = [_shape(a) for a in flat_in]
        out_shapes = [_shape(o) for o in flat_out]
        if packet in flop_registry:
            flops = flop_registry[packet](*args, **kwargs, out_val=out)
        elif name == "aten._grouped_mm":
            flops = grouped_mm_flops(args[0].shape, args[1].shape, out.shape)
        elif name in CUSTOM_OP_FLOPS:
            flops = CUSTOM_OP_FLOPS[name]([_shape(a) for a in args])
        else:
            flops = 0
        moved = 0 if name in _VIEW_OPS else sum(map(_tensor_bytes, flat_in)) + sum(map(_tensor_bytes, flat_out))
        annotation = None
        namespace = name.split(".")[0]
        if namespace not in ("aten", "prims", "prim"):
            qualname = name.replace(".", "::", 1)
            registered = get_op_annotation(qualname)
            if registered is not None:
                # the custom op's own arguments (not flattened: non-tensor args keep their slot)
                op_in = [_shape(a) if isinstance(a, torch.Tensor) else None for a in args]
                check_shapes(registered, op_in, out_shapes, qualname)
                annotation = registered.text
        frozen_weight = False
        if self.frozen and self.phase == "fwd":
            reads_frozen = any(isinstance(a, torch.Tensor) and id(a) in self.frozen for a in flat_in)
            if reads_frozen and name in _VALUE_PRESERVING_OPS:
                self.frozen.update((id(o), o) for o in flat_out if isinstance(o, torch.Tensor))
            frozen_weight = reads_frozen and flops > 0
        self.ops.append(OpRecord(name, self.phase, path, spec.layer_of_path(path), spec.family_of_path(path),
                                 in_shapes, out_shapes, float(flops), float(moved), annotation, frozen_weight))
        return out


def _tag_autograd_nodes(outputs, path):
    """Marks the autograd nodes created inside a module with its path, stopping at nodes already
    marked by an inner module or by earlier modules (the module's inputs)."""
    stack = [t.grad_fn for t in _flatten(outputs if isinstance(outputs, (list, tuple)) else [outputs])
             if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or "module_path" in node.metadata:
            continue
        node.metadata["module_path"] = path
        stack.extend(next_node for next_node, _ in node.next_functions if next_node is not None)


def trace_training_step(model, batch_size, seq_len):
    """Forward and backward of a (meta-device) training-form model on a [batch_size, seq_len] batch.

    Saved bytes are what the forward leaves for the backward: each distinct tensor (a view counts as
    its base) that autograd saves during the forward, charged to the module that saved it first.
    Tensors saved during the backward (the router's backward recomputes its gate with autograd) are
    transient working memory of one layer's backward, not activations, and are not counted."""
    started = time.perf_counter()
    model.zero_grad(set_to_none=True)  # a model traced before must not accumulate into old gradients
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    path_stack: List[str] = []
    saved = defaultdict(float)
    # id -> the saved tensor itself: holding it keeps its id from being reused by a later tensor for
    # the whole trace (ids of dead tensors are reused, which would skip tensors at random). On the
    # meta device holding them costs nothing, and the forward holds them until the backward anyway.
    seen_saved: Dict[int, torch.Tensor] = {}
    params = {id(p) for p in model.parameters()}
    recorder = _Recorder(path_stack, [p for p in model.parameters() if not p.requires_grad])
    handles = []
    for path, module in model.named_modules():
        def pre_hook(mod, inputs, path=path):
            path_stack.append(path)

        def post_hook(mod, inputs, outputs, path=path):
            path_stack.pop()
            _tag_autograd_nodes(outputs, path)
        handles.append(module.register_forward_pre_hook(pre_hook))
        handles.append(module.register_forward_hook(post_hook))

    def pack(t):
        base = t._base if t._base is not None else t
        if recorder.phase == "fwd" and id(base) not in params and id(t) not in params and id(base) not in seen_saved:
            seen_saved[id(base)] = base
            path = path_stack[-1] if path_stack else ""
            saved[(spec.layer_of_path(path), spec.family_of_path(path))] += _tensor_bytes(base)
        return t

    input_ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)
    model.train()
    try:
        with recorder, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=input_ids, labels=input_ids).loss
            recorder.phase = "bwd"
            loss.backward()
    finally:
        for h in handles:
            h.remove()
        seen_saved.clear()
    param_counts, trainable_counts = defaultdict(int), defaultdict(int)
    for name, p in model.named_parameters():
        key = (spec.layer_of_path(name), spec.family_of_path(name))
        param_counts[key] += p.numel()
        trainable_counts[key] += p.numel() if p.requires_grad else 0
    return OpGraph(ops=recorder.ops, saved_bytes=dict(saved), batch_size=batch_size, seq_len=seq_len,
                   dtype=dtype, trace_seconds=time.perf_counter() - started, param_counts=dict(param_counts),
                   trainable_counts=dict(trainable_counts))


def efficient_attention(query, key, value, padding_mask, softmax_scale, dropout_p, training):
    """The memory-efficient SDPA kernel that CUDA runs for MLA's 192/128 head dims, called directly:
    on the meta device SDPA would otherwise pick its math path and record S x S activations
    that no GPU run keeps."""
    return torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, None, True, 0.0, True, scale=softmax_scale)[0]


def build_traced_model(config, dtype=torch.bfloat16, lora=None):
    """The training form of `config` on the meta device, ready to trace: SDPA attention, with the
    memory-efficient kernel a GPU runs (`efficient_attention`). lora: a plan's LoRA record (rank,
    alpha, dropout, targets): the adapters added and the base frozen, as the run trains it, so that
    the backward has no weight gradient for the frozen weights (autograd skips those GEMMs)."""
    model = spec.build_training_model(config, device="meta", dtype=dtype, attention="sdpa")
    spec.set_attention_kernel(model, efficient_attention)
    if lora is not None:
        spec.apply_lora(model, lora["rank"], lora["alpha"], lora["dropout"], lora["targets"])
    return model
