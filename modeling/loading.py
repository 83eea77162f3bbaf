"""Reading a model directory (`config.json`, with or without weights) into our classes.

The one place that turns a `--model_id` into a config and a model class, so every entry point
(demo, compile, run, merge) gives the same errors for a bad directory.
"""

import os
import zlib

import torch

from .configuration_deepseek import DeepseekConfig, DeepseekV2Config
from .modeling_deepseek import DeepseekForCausalLM, DeepseekV2ForCausalLM

from errors import UserError, read_json

CONFIG_CLASSES = {"deepseek_v2": DeepseekV2Config, "deepseek": DeepseekConfig}
CAUSAL_LM_CLASSES = {"deepseek_v2": DeepseekV2ForCausalLM, "deepseek": DeepseekForCausalLM}


class ModelDirError(UserError):
    """A --model_id that cannot be read; the message names the file and the fix."""


# The fields that fix the model's shapes, which config.json must give (a missing one would silently
# take the classes' defaults, e.g. hidden_size 4096, and build another model): all families, the MLA
# fields of deepseek_v2, the key-value heads of deepseek (v1), and the MoE fields of a model with
# routed experts (n_routed_experts not null).
REQUIRED_FIELDS = ("hidden_size", "vocab_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                   "n_routed_experts")
REQUIRED_BY_MODEL_TYPE = {
    "deepseek_v2": ("kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"),
    "deepseek": ("num_key_value_heads",),
}
REQUIRED_MOE_FIELDS = ("num_experts_per_tok", "moe_intermediate_size", "n_shared_experts", "first_k_dense_replace")


def _looks_local(model_id):
    """True when `model_id` is meant as a local path, so a missing one is an error, not a hub id: it
    starts with ./ ../ / ~, exists (as a file), ends with a slash, has a backslash or more than one
    slash (a hub id is `name` or `owner/name`), or its first component is an existing directory
    (`configs/tiny-deepseek-v3`)."""
    if model_id.startswith(("./", "../", "/", "~", ".\\", "..\\")) or model_id in (".", ".."):
        return True
    if os.path.exists(model_id) or model_id.endswith("/") or "\\" in model_id or model_id.count("/") > 1:
        return True
    return "/" in model_id and os.path.isdir(model_id.split("/")[0])


def _missing_dir_error(model_id):
    """ModelDirError for a local-looking --model_id that is not a directory: names the deepest existing
    parent and, when one is close, the directory meant."""
    import difflib
    path = os.path.abspath(os.path.expanduser(model_id))
    if os.path.isfile(path):
        return ModelDirError(f"--model_id {model_id} is a file; pass the directory that holds config.json (e.g. "
                             f"{os.path.dirname(model_id) or '.'})")
    parent = os.path.dirname(path.rstrip(os.sep)) or os.sep
    while not os.path.isdir(parent):
        parent = os.path.dirname(parent)
    hint = ""
    try:
        names = [n for n in os.listdir(parent) if os.path.isdir(os.path.join(parent, n))]
        close = difflib.get_close_matches(os.path.basename(path.rstrip(os.sep)), names, n=1)
        if close:
            hint = f" (did you mean {os.path.join(os.path.relpath(parent), close[0])}?)"
    except OSError:
        pass
    return ModelDirError(f"--model_id {model_id}: no such directory{hint}; pass a directory holding config.json "
                         "(see configs/ for examples) or a Hugging Face hub id such as deepseek-ai/DeepSeek-V2-Lite")


def _one_line(e, limit=200):
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def _hub_config(model_id, trust_remote_code):
    """The config fields of hub repository `model_id`. By default only its config.json is
    downloaded and read as data: no code from the hub runs. trust_remote_code=True (the user's
    --trust_remote_code) lets transformers' AutoConfig run the repository's configuration code."""
    fix = ("the machine may be offline (or HF_HUB_OFFLINE is set): pass a local directory holding config.json "
           "(e.g. configs/deepseek-v2-lite), or check the id and the network")
    try:
        if trust_remote_code:
            from transformers import AutoConfig
            return AutoConfig.from_pretrained(model_id, trust_remote_code=True).to_dict()
        from huggingface_hub import hf_hub_download
        path = hf_hub_download(model_id, "config.json")
    except Exception as e:  # offline, no such repository, gated, invalid id, ...: one line, no chain
        if type(e).__name__ == "HFValidationError":
            raise ModelDirError(f"--model_id {model_id}: not a local directory, nor a valid hub id (`name` or "
                                "`owner/name` of letters, digits, - _ .); pass a directory holding config.json "
                                "(see configs/ for examples)") from None
        raise ModelDirError(f"--model_id {model_id}: not a local directory, and its config.json could not be "
                            f"fetched from the Hugging Face hub ({_one_line(e)}); {fix}") from None
    return read_json(path, ModelDirError, f"the hub copy of {model_id} is damaged: delete it from the cache")


def load_config(model_id, trust_remote_code=False):
    """--model_id -> DeepseekV2Config/DeepseekConfig: a local directory with config.json, or a hub id
    (`name` or `owner/name`, needs network or the hub cache; its config.json is read as data, and its
    code runs only with trust_remote_code). The shape-defining fields are required (REQUIRED_FIELDS),
    and every field is checked for type and range; each problem is one ModelDirError naming the
    file, the field and the fix."""
    if not isinstance(model_id, str) or not model_id:
        raise ModelDirError("--model_id is empty; pass a directory holding config.json or a hub id")
    if os.path.isdir(os.path.expanduser(model_id)):
        path = os.path.join(os.path.expanduser(model_id), "config.json")
        if not os.path.isfile(path):
            raise ModelDirError(f"{path} not found: --model_id must be a directory holding a config.json "
                                "(see configs/ for examples) or a Hugging Face hub id")
        fields = read_json(path, ModelDirError)
    elif _looks_local(model_id):
        raise _missing_dir_error(model_id)
    else:
        fields = _hub_config(model_id, trust_remote_code)
        path = f"{model_id} (hub) config.json"
    return config_from_fields(fields, path)


def config_from_fields(fields, path="config.json"):
    """The config of a config.json document; ModelDirError naming `path`, the field and the fix."""
    if not isinstance(fields, dict):
        raise ModelDirError(f"{path}: a config.json holds a JSON object of fields, got {type(fields).__name__}; "
                            "fix the file (see configs/ for examples)")
    model_type = fields.get("model_type")
    if model_type not in CONFIG_CLASSES:
        raise ModelDirError(f"{path}: field `model_type` is {model_type!r}; this project supports "
                            f"{sorted(CONFIG_CLASSES)} (DeepSeek-V2 family and DeepSeekMoE v1)")
    required = REQUIRED_FIELDS + REQUIRED_BY_MODEL_TYPE[model_type]
    if fields.get("n_routed_experts") is not None:
        required += REQUIRED_MOE_FIELDS
    missing = [name for name in required if name not in fields]
    if missing:
        raise ModelDirError(f"{path}: missing field(s) {', '.join(f'`{m}`' for m in missing)}, which fix the "
                            f"model's shapes (a {model_type} config.json gives them all; see configs/ for examples); "
                            "add them")
    try:
        return CONFIG_CLASSES[model_type].from_dict(fields)
    except (ValueError, TypeError) as e:
        raise ModelDirError(f"{path}: {_one_line(e, 400) if not isinstance(e, ValueError) else e}") from None


def model_class_for(config):
    return CAUSAL_LM_CLASSES[config.model_type]


def build_model(config, device="cpu", dtype=torch.float32, seed=None):
    """A randomly initialised causal LM; device="meta" builds it without allocating memory."""
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device):
        model = model_class_for(config)(config)
    return model.to(dtype)


def initial_value(name, shape, config, seed, device="cpu"):
    """The random initial value of parameter `name`, a function of (seed, name, device type) only.

    Every rank can build exactly the tensor a single process would, whatever part of it the rank
    keeps, so a random start is the same for every plan on the same kind of device. RMSNorm weights
    start at 1, every other weight at N(0, initializer_range) (the models' _init_weights rule). The
    numbers are drawn on `device`: a GPU draws a 16B-parameter model in seconds where a CPU takes
    minutes per rank (CPU and CUDA generators give different, equally valid, draws)."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, device=device)
    generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.randn(shape, generator=generator, device=device) * config.initializer_range
