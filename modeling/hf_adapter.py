"""The one mapping between Hugging Face checkpoint names and the training form, and the one reader
of Hugging Face weight files.

The training form renames only the routed experts. A Hugging Face checkpoint holds one tensor per
expert and projection, `<layer>.mlp.experts.<i>.{gate,up,down}_proj.weight`; the training form
stacks them (`MergedExperts`) as

    <layer>.mlp.experts.gate_up_proj_E2FD [E, 2, F, D]   [i, 0] = expert i's gate_proj, [i, 1] its up_proj
    <layer>.mlp.experts.down_proj_EDF     [E, D, F]      [i]    = expert i's down_proj

Every other tensor (the router's `mlp.gate.weight` included) keeps its name. `training_source`
says where a Hugging Face tensor lives in the training form; `from_hf` / `to_hf` convert whole
state dicts with it (bitwise: only stacking and slicing); `WeightReader` reads a checkpoint
directory (safetensors, sharded with an index, or `pytorch_model*.bin` read with
`torch.load(weights_only=True)`) one tensor at a time, stacking experts as they are read. Loading a
model, the runtime's per-rank materialisation and `merge_ckpt.py` all go through this module.

LoRA adapters are mapped here too: the training form's adapter names (stacked for the experts)
<-> the keys of a PEFT adapter file (`lora_training_source`, `lora_peft_sources`, `lora_to_peft`,
`lora_from_peft`, `lora_modules`; see the section below).
"""

import os
import re

import torch

from errors import UserError, read_json

GATE_UP = "gate_up_proj_E2FD"
DOWN = "down_proj_EDF"
# A Hugging Face per-expert tensor name, and the stacked training-form one.
_HF_EXPERT = re.compile(r"^(?P<experts>.*\.mlp\.experts)\.(?P<index>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")
_STACKED = re.compile(rf"^(?P<experts>.*\.mlp\.experts)\.(?P<name>{GATE_UP}|{DOWN})$")
# where each projection of expert i sits in its stacked tensor
_SLOT = {"gate_proj": (GATE_UP, 0), "up_proj": (GATE_UP, 1), "down_proj": (DOWN, None)}


class WeightsError(UserError):
    """A Hugging Face checkpoint directory that cannot be read; names the file and the fix."""


def training_source(hf_name):
    """(training-form tensor name, index into it) holding the Hugging Face tensor `hf_name`:
    `(name, ())` for every tensor the training form keeps as it is."""
    match = _HF_EXPERT.match(hf_name)
    if match is None:
        return hf_name, ()
    stacked, pair = _SLOT[match["proj"]]
    expert = int(match["index"])
    return f"{match['experts']}.{stacked}", (expert,) if pair is None else (expert, pair)


def hf_sources(training_name, num_experts):
    """The inverse: [(Hugging Face name, index into the training tensor)] that make up
    `training_name` (one entry, index (), for an unrenamed tensor)."""
    match = _STACKED.match(training_name)
    if match is None:
        return [(training_name, ())]
    prefix, stacked = match["experts"], match["name"]
    out = []
    for expert in range(num_experts):
        for proj, (target, pair) in _SLOT.items():
            if target == stacked:
                out.append((f"{prefix}.{expert}.{proj}.weight", (expert,) if pair is None else (expert, pair)))
    return out


def stack_experts(read, training_name, num_experts):
    """The full training tensor `training_name`, with read(hf_name) -> tensor for its parts."""
    sources = hf_sources(training_name, num_experts)
    if len(sources) == 1 and sources[0][1] == ():
        return read(training_name)
    if training_name.endswith(DOWN):
        return torch.stack([read(name) for name, _ in sources])
    pairs = [sources[i:i + 2] for i in range(0, len(sources), 2)]  # (gate, up) of each expert, in order
    return torch.stack([torch.stack([read(gate), read(up)]) for (gate, _), (up, _) in pairs])


def from_hf(state_dict, num_experts):
    """Hugging Face names -> training-form names, experts stacked (num_experts: the config's
    n_routed_experts). A layer missing some of its experts' tensors is named with the missing
    experts."""
    out, stacked = {}, set()
    for key, value in state_dict.items():
        name, index = training_source(key)
        if index == ():
            out[key] = value
        else:
            stacked.add(name)
    for name in sorted(stacked):
        missing = [hf for hf, _ in hf_sources(name, num_experts) if hf not in state_dict]
        if missing:
            raise WeightsError(f"{missing[0]} missing (and {len(missing) - 1} more of {name}); a layer needs all "
                               f"{num_experts} experts (n_routed_experts) to be merged")
        out[name] = stack_experts(state_dict.__getitem__, name, num_experts)
    return out


def to_hf(state_dict, num_experts):
    """Training-form names -> Hugging Face names, stacked experts split back (copies, so that each
    tensor owns its memory, as safetensors requires)."""
    return _split_stacked(state_dict, num_experts, hf_sources)


def _split_stacked(state_dict, num_experts, sources_of):
    """{name: tensor} -> {target name: tensor} by `sources_of(name, num_experts)` = [(target name, index
    into the tensor)]: a tensor with one target and no index keeps its value, a stacked one is split
    into copies of its experts' slices."""
    out = {}
    for name, value in state_dict.items():
        sources = sources_of(name, num_experts)
        if len(sources) == 1 and sources[0][1] == ():
            out[sources[0][0]] = value
            continue
        if value.shape[0] != num_experts:
            raise ValueError(f"{name}: first dim {value.shape[0]} != n_routed_experts {num_experts}")
        for target, index in sources:
            out[target] = value[index].clone()
    return out


# ---- LoRA adapters: training form <-> PEFT ----------------------------------------------------------------
# The training form names the adapters of an adapted nn.Linear after its module (`<module>.lora_A`
# [r, in_features], `<module>.lora_B` [out_features, r]) and stacks the routed experts' adapters the
# way it stacks their weights:
#     <layer>.mlp.experts.lora_A_gate_up_E2RD [E, 2, r, D]   [i, 0] = expert i's gate_proj lora_A, [i, 1] its up_proj's
#     <layer>.mlp.experts.lora_B_gate_up_E2FR [E, 2, F, r]
#     <layer>.mlp.experts.lora_A_down_ERF     [E, r, F]
#     <layer>.mlp.experts.lora_B_down_EDR     [E, D, r]
# PEFT keeps one pair per adapted nn.Linear of the Hugging Face model, under the names
# PeftModel.save_pretrained writes (`base_model.model.<module>.lora_A.weight`, the adapter name left
# out). Non-expert module paths are the same in both forms.
PEFT_PREFIX = "base_model.model."
LORA_A_GATE_UP, LORA_B_GATE_UP = "lora_A_gate_up_E2RD", "lora_B_gate_up_E2FR"
LORA_A_DOWN, LORA_B_DOWN = "lora_A_down_ERF", "lora_B_down_EDR"
_LORA_STACKED = re.compile(rf"^(?P<experts>.*\.mlp\.experts)\."
                           rf"(?P<name>{LORA_A_GATE_UP}|{LORA_B_GATE_UP}|{LORA_A_DOWN}|{LORA_B_DOWN})$")
_LORA_LINEAR = re.compile(r"^(?P<module>.+)\.(?P<half>lora_A|lora_B)$")
_PEFT_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<half>lora_A|lora_B)\.weight$")
_HF_EXPERT_MODULE = re.compile(r"^(?P<experts>.*\.mlp\.experts)\.(?P<index>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)$")
# where expert i's adapter of each (projection, half) sits in its stacked tensor (pair None: [i] itself)
_LORA_SLOT = {("gate_proj", "lora_A"): (LORA_A_GATE_UP, 0), ("up_proj", "lora_A"): (LORA_A_GATE_UP, 1),
              ("gate_proj", "lora_B"): (LORA_B_GATE_UP, 0), ("up_proj", "lora_B"): (LORA_B_GATE_UP, 1),
              ("down_proj", "lora_A"): (LORA_A_DOWN, None), ("down_proj", "lora_B"): (LORA_B_DOWN, None)}


def is_lora_name(training_name):
    """True for a training-form adapter tensor (a Linear's `.lora_A` / `.lora_B`, or a stacked one)."""
    return bool(_LORA_STACKED.match(training_name) or _LORA_LINEAR.match(training_name))


def peft_key(hf_module, half):
    """The PEFT name of adapter `half` ("lora_A" or "lora_B") of Hugging Face module `hf_module`."""
    return f"{PEFT_PREFIX}{hf_module}.{half}.weight"


def lora_training_source(key):
    """(training-form adapter name, index into it) holding the PEFT tensor `key`."""
    match = _PEFT_KEY.match(key)
    if match is None:
        raise ValueError(f"{key} is not a PEFT LoRA key (base_model.model.<module>.lora_A.weight or .lora_B.weight)")
    module, half = match["module"], match["half"]
    expert = _HF_EXPERT_MODULE.match(module)
    if expert is None:
        return f"{module}.{half}", ()
    stacked, pair = _LORA_SLOT[(expert["proj"], half)]
    index = int(expert["index"])
    return f"{expert['experts']}.{stacked}", (index,) if pair is None else (index, pair)


def lora_peft_sources(training_name, num_experts):
    """The inverse: [(PEFT key, index into the training tensor)] that make up adapter `training_name`
    (one entry, index (), for a plain Linear's adapter)."""
    match = _LORA_STACKED.match(training_name)
    if match is None:
        linear = _LORA_LINEAR.match(training_name)
        if linear is None:
            raise ValueError(f"{training_name} is not a LoRA adapter of the training form")
        return [(peft_key(linear["module"], linear["half"]), ())]
    out = []
    for expert in range(num_experts):
        for (proj, half), (stacked, pair) in _LORA_SLOT.items():
            if stacked == match["name"]:
                out.append((peft_key(f"{match['experts']}.{expert}.{proj}", half),
                            (expert,) if pair is None else (expert, pair)))
    return out


def lora_module_sources(hf_module):
    """((lora_A's training name, index), (lora_B's training name, index)) of Hugging Face module
    `hf_module`: what merging `W + scaling * B @ A` into `<hf_module>.weight` reads."""
    return lora_training_source(peft_key(hf_module, "lora_A")), lora_training_source(peft_key(hf_module, "lora_B"))


def _natural_key(name):
    """Sorts model.layers.2 before model.layers.10 (and expert 2 before expert 10)."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in name.split(".")]


def lora_modules(training_names, num_experts):
    """The Hugging Face modules (nn.Linear names) that the adapters `training_names` adapt, in model order."""
    modules = set()
    for name in training_names:
        for key, _ in lora_peft_sources(name, num_experts):
            modules.add(_PEFT_KEY.match(key)["module"])
    return sorted(modules, key=_natural_key)


def lora_to_peft(state_dict, num_experts):
    """Training-form adapters -> PEFT keys, the stacked expert adapters split per expert (copies, so
    that each tensor owns its memory, as safetensors requires)."""
    return _split_stacked(state_dict, num_experts, lora_peft_sources)


def lora_from_peft(state_dict, num_experts):
    """PEFT keys -> training-form adapters, the experts' adapters stacked. A layer whose experts'
    adapters are incomplete is named with the first missing one."""
    out, pieces = {}, {}
    for key, value in state_dict.items():
        name, index = lora_training_source(key)
        if index == ():
            out[name] = value
        else:
            pieces.setdefault(name, {})[index] = value
    for name, parts in sorted(pieces.items()):
        sources = lora_peft_sources(name, num_experts)
        missing = [key for key, index in sources if index not in parts]
        extra = sorted(set(parts) - {index for _, index in sources})
        if missing or extra:
            first = missing[0] if missing else f"expert {extra[0][0]} (beyond n_routed_experts {num_experts})"
            raise WeightsError(f"{name}: adapter {first} missing or unexpected; a layer needs the adapters of all "
                               f"{num_experts} experts (n_routed_experts)")
        if len(sources[0][1]) == 1:
            out[name] = torch.stack([parts[(e,)] for e in range(num_experts)])
        else:
            out[name] = torch.stack([torch.stack([parts[(e, 0)], parts[(e, 1)]]) for e in range(num_experts)])
    return out


# ---- reading checkpoint files -----------------------------------------------------------------------------
_BIN = re.compile(r"pytorch_model(-\d+-of-\d+)?\.bin")


def weight_files(model_dir):
    """{tensor name: file path} of a Hugging Face checkpoint directory, or {} when it holds no weights.
    Indexes (`model.safetensors.index.json`, `pytorch_model.bin.index.json`) are preferred."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = os.path.join(model_dir, index_name)
        if os.path.isfile(index):
            doc = read_json(index, WeightsError, "fix or remove the index")
            weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
            if not isinstance(weight_map, dict):
                raise WeightsError(f"{index} has no `weight_map` object; fix or remove the index")
            return {key: os.path.join(model_dir, file) for key, file in weight_map.items()}
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.isfile(single):
        from safetensors import safe_open
        with safe_open(single, framework="pt") as f:
            return {key: single for key in f.keys()}
    bins = sorted(n for n in os.listdir(model_dir) if _BIN.fullmatch(n)) if os.path.isdir(model_dir) else []
    return {key: os.path.join(model_dir, name) for name in bins for key in _load_bin(os.path.join(model_dir, name))}


def has_hf_weights(model_dir):
    return os.path.isdir(model_dir) and bool(weight_files(model_dir))


def _load_bin(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - a file weights_only refuses, or not a torch file at all
        raise WeightsError(f"{path} cannot be read as plain tensors ({type(e).__name__}: {str(e)[:200]}); "
                           "convert it to safetensors") from None


class WeightReader:
    """Tensors of a Hugging Face checkpoint directory, read one at a time: safetensors files are
    opened lazily, `.bin` files loaded with weights_only (memory-mapped) on first use."""

    def __init__(self, model_dir, num_experts):
        self.model_dir = model_dir
        self.num_experts = num_experts
        self.where = weight_files(model_dir)
        if not self.where:
            raise WeightsError(f"{model_dir}: no model.safetensors, model.safetensors.index.json or "
                               "pytorch_model*.bin found")
        for path in set(self.where.values()):
            if not os.path.isfile(path):
                raise WeightsError(f"{path}: listed in {model_dir}'s checkpoint index but missing; copy the "
                                   "checkpoint again in full")
        self._open = {}

    def names(self):
        return list(self.where)

    def read(self, hf_name):
        if hf_name not in self.where:
            raise WeightsError(f"{self.model_dir}: the checkpoint has no tensor {hf_name}")
        path = self.where[hf_name]
        if path not in self._open:
            if path.endswith(".safetensors"):
                from safetensors import safe_open
                self._open[path] = safe_open(path, framework="pt")
            else:
                self._open[path] = _load_bin(path)
        handle = self._open[path]
        return handle[hf_name] if isinstance(handle, dict) else handle.get_tensor(hf_name)

    def full(self, training_name):
        """The full value of a training-form tensor; stacked experts are built from their parts."""
        return stack_experts(self.read, training_name, self.num_experts)

    def state_dict(self):
        """Every tensor, under its Hugging Face name."""
        return {name: self.read(name) for name in self.names()}


def read_hf_state_dict(model_dir):
    """All tensors of a Hugging Face checkpoint directory, under their Hugging Face names."""
    return WeightReader(model_dir, num_experts=0).state_dict()


def load_hf_weights(model, model_dir, strict=True):
    """Loads a Hugging Face checkpoint directory into a training-form model (experts stacked as they
    are read). Works for a model on the meta device too: tensors are assigned, not copied."""
    config = model.config
    state = from_hf(read_hf_state_dict(model_dir), config.n_routed_experts or 0)
    dtype = next(model.parameters()).dtype
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    on_meta = any(p.device.type == "meta" for p in model.parameters())
    result = model.load_state_dict(state, strict=strict, assign=on_meta)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return result
