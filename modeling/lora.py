"""LoRA adapters on the training form: every projection of the families named, routed experts included.

    apply_lora(model, rank, alpha, dropout, targets)   # after apply_training_form; returns the model

A low-rank update is added to a frozen weight W [out, in]: y = W x + scaling * B (A drop(x)), with
A [r, in], B [out, r], scaling = alpha / r (PEFT's definition, so an exported adapter means the same
thing to PEFT). Initialisation as PEFT's: A kaiming-uniform (a = sqrt(5), i.e. U(-1/sqrt(in),
1/sqrt(in))), B zeros, so the adapted model starts as the base model.

Where the adapters sit (the families of modeling/spec.py that may carry them, LORA_TARGETS):

* attention, dense_mlp, shared_experts: each nn.Linear of the family's module becomes a
  `LoraLinear`, an nn.Linear subclass that keeps its `weight` (and `bias`) under the same name, so
  the Hugging Face mapping of the base weights does not change, and adds `lora_A` [r, in] and
  `lora_B` [out, r] beside it.
* experts: the stacked routed experts (training_form.MergedExperts, and the expert-parallel module
  made from it) get four stacked adapters (training_form.EXPERT_LORA_PARAMETERS), two per expert on
  the fused gate+up projection, as PEFT has them on gate_proj and up_proj:
      lora_A_gate_up_E2RD [E, 2, r, D]   [e, 0] expert e's gate_proj A, [e, 1] its up_proj A
      lora_B_gate_up_E2FR [E, 2, F, r]
      lora_A_down_ERF     [E, r, F]
      lora_B_down_EDR     [E, D, r]
  applied with grouped GEMMs over the same expert grouping as the base (kernels.grouped_swiglu_lora):
  no loop over experts.

The router, the embeddings, the norms and the head are never adapted. apply_lora freezes every
parameter that is not an adapter (requires_grad False): autograd then skips the frozen weights'
gradient GEMMs by itself, and a runtime keeps them in the compute dtype with no master copy,
gradient or optimizer state.
"""

import math
import zlib
from dataclasses import dataclass
from typing import Iterable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .training_form import EXPERT_LORA_PARAMETERS, ExpertAdapters

# The op families (modeling/spec.py OP_FAMILIES) whose projections may carry adapters, in model order.
LORA_TARGETS = ("attention", "dense_mlp", "shared_experts", "experts")
DEFAULT_LORA_TARGETS = ",".join(LORA_TARGETS)


def parse_targets(targets) -> Tuple[str, ...]:
    """A comma list ("attention,experts") or a sequence of family names -> the names in LORA_TARGETS
    order, each once. Raises ValueError naming an unknown or missing one."""
    names = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else [str(t) for t in targets]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in LORA_TARGETS]
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {unknown}: choose among {', '.join(LORA_TARGETS)} (the router, "
                         "embeddings, norms and head are never adapted)")
    if not names:
        raise ValueError(f"no LoRA target given: name at least one of {', '.join(LORA_TARGETS)}")
    return tuple(t for t in LORA_TARGETS if t in names)


@dataclass(frozen=True)
class LoraConfig:
    """What a LoRA run adapts and how; `record()` is what a plan's `lora` field and a checkpoint's
    lora.json hold."""

    rank: int
    alpha: float
    dropout: float
    targets: Tuple[str, ...]

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "targets", parse_targets(self.targets))

    @property
    def scaling(self):
        return self.alpha / self.rank

    def record(self):
        return {"rank": self.rank, "alpha": float(self.alpha), "dropout": float(self.dropout),
                "targets": list(self.targets)}

    @classmethod
    def from_record(cls, record):
        return cls(int(record["rank"]), float(record["alpha"]), float(record["dropout"]), tuple(record["targets"]))


# ---- adapted nn.Linear ----------------------------------------------------------------------------------------
class LoraLinear(nn.Linear):
    """nn.Linear with a low-rank update: y = x W^T + b + (drop(x) A^T) (scaling B)^T.

    `weight` and `bias` keep their names (the base checkpoint maps unchanged); `lora_A` [r, in] and
    `lora_B` [out, r] are the adapters. The adapters are cast to the input's dtype for the product,
    so fp32 adapters train over a bf16 base without a runtime cast (under FSDP's mixed precision the
    cast is already done and this one is a no-op); their gradients come back in their own dtype."""

    def __init__(self, in_features, out_features, bias=True, rank=8, scaling=1.0, dropout=0.0, device=None,
                 dtype=None, adapter_dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        kw = {"device": device, "dtype": adapter_dtype or dtype}
        self.rank, self.scaling = rank, float(scaling)
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.lora_B = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @classmethod
    def adapt(cls, linear: nn.Linear, rank, scaling, dropout, adapter_dtype=None):
        """A LoraLinear that takes over `linear`'s weight and bias (the same Parameter objects)."""
        weight = linear.weight
        adapted = cls(linear.in_features, linear.out_features, bias=False, rank=rank, scaling=scaling,
                      dropout=dropout, device="meta", dtype=weight.dtype, adapter_dtype=adapter_dtype)
        adapted.weight, adapted.bias = weight, linear.bias
        # the adapters on the base's device (the meta placeholders above allocated nothing)
        adapted.lora_A = nn.Parameter(torch.empty_like(adapted.lora_A, device=weight.device))
        adapted.lora_B = nn.Parameter(torch.empty_like(adapted.lora_B, device=weight.device))
        return adapted

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        # the scaling folded into B (an [out, r] product): the update's gradient is then y's own, with
        # no scaled [tokens, out] copy of it in the backward
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A.to(x.dtype)),
                          (self.lora_B * self.scaling).to(x.dtype))
        return y + update

    def extra_repr(self):
        return f"{super().extra_repr()}, rank={self.rank}, scaling={self.scaling:g}"


# ---- stacked expert adapters --------------------------------------------------------------------------------
def expert_adapter_shapes(num_experts, hidden, intermediate, rank):
    """{name: shape} of the stacked expert adapters (EXPERT_LORA_PARAMETERS order)."""
    E, D, F_, r = num_experts, hidden, intermediate, rank
    return dict(zip(EXPERT_LORA_PARAMETERS, ((E, 2, r, D), (E, 2, F_, r), (E, r, F_), (E, D, r))))


def adapt_experts(experts, rank, scaling, dropout, adapter_dtype=None):
    """Registers the stacked adapters on a stacked-experts module (gate_up_proj_E2FD [E, 2, F, D],
    down_proj_EDF [E, D, F]) and sets its `lora` (training_form.ExpertAdapters), which makes its
    forward add the adapter terms."""
    gate_up = experts.gate_up_proj_E2FD
    E, _, F_, D = gate_up.shape
    for name, shape in expert_adapter_shapes(E, D, F_, rank).items():
        experts.register_parameter(name, nn.Parameter(torch.empty(shape, device=gate_up.device,
                                                                  dtype=adapter_dtype or gate_up.dtype)))
    experts.lora = ExpertAdapters(scaling=float(scaling), dropout=float(dropout))
    return experts


# ---- initial values ---------------------------------------------------------------------------------------------
def is_lora_parameter(name):
    """Whether parameter `name` (a dotted path) is a LoRA adapter."""
    return name.rpartition(".")[2].startswith("lora_")


def _is_lora_A(name):
    return name.rpartition(".")[2].startswith("lora_A")


def _init_adapter_(name, param, generator=None):
    """PEFT's initialisation: A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), which is kaiming_uniform_ with
    a = sqrt(5) per adapter (fan_in = its last dim, the input features: computed here rather than by
    kaiming_uniform_, which would read the stacked [E, 2, r, D] tensor's fan-in wrongly); B zeros."""
    with torch.no_grad():
        if _is_lora_A(name):
            bound = 1.0 / math.sqrt(param.shape[-1])
            param.uniform_(-bound, bound, generator=generator)
        else:
            param.zero_()
    return param


def lora_initial_value(name, shape, seed, device="cpu", dtype=torch.float32):
    """The initial value of adapter `name` of full shape `shape`: a function of (seed, name) only, so
    that every plan starts from the same adapters (a runtime slices its share of the full value)."""
    value = torch.empty(shape, device=device, dtype=dtype)
    generator = None
    if _is_lora_A(name):
        generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return _init_adapter_(name, value, generator)


# ---- the rewrite ---------------------------------------------------------------------------------------------------
def apply_lora(model, rank, alpha=16.0, dropout=0.0, targets=LORA_TARGETS, adapter_dtype=None):
    """Adds adapters of `rank` to every projection of the `targets` families (see the module doc) of a
    training-form model, in place, freezes every other parameter, and returns the model.

    Off the meta device the adapters are initialised as PEFT does (with torch's global RNG); on meta
    they are shapes only (a runtime fills them with `lora_initial_value`). adapter_dtype: the
    adapters' dtype (default: the base weight's)."""
    from . import spec  # spec imports this module: a late import keeps the cycle out of import time
    config = LoraConfig(int(rank), float(alpha), float(dropout), parse_targets(targets))
    if any(is_lora_parameter(n) for n, _ in model.named_parameters()):
        raise ValueError("the model already has LoRA adapters")
    for p in model.parameters():
        p.requires_grad_(False)
    for family in config.targets:
        for _, _, module in spec.family_modules(model, family):
            if family == "experts":
                adapt_experts(module, config.rank, config.scaling, config.dropout, adapter_dtype)
                continue
            for child_name, child in list(module.named_children()):
                if isinstance(child, nn.Linear) and not isinstance(child, LoraLinear):
                    setattr(module, child_name, LoraLinear.adapt(child, config.rank, config.scaling, config.dropout,
                                                                 adapter_dtype))
    for name, param in model.named_parameters():
        if is_lora_parameter(name):
            param.requires_grad_(True)
            if param.device.type != "meta":
                _init_adapter_(name, param)
    model.lora_config = config
    return model


def lora_config_of(model) -> Optional[LoraConfig]:
    """The LoraConfig a model was adapted with (None for a model without adapters)."""
    return getattr(model, "lora_config", None)


def adapter_names(named_parameters: Iterable) -> list:
    """The names of the adapters among (name, parameter) pairs."""
    return [name for name, _ in named_parameters if is_lora_parameter(name)]
