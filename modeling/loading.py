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


def load_config(model_id):
    """A local directory with config.json, or a hub id (needs network), -> DeepseekV2Config/DeepseekConfig."""
    if os.path.isdir(model_id):
        path = os.path.join(model_id, "config.json")
        if not os.path.isfile(path):
            raise ModelDirError(f"{path} not found: --model_id must be a directory holding a config.json "
                                "(see configs/ for examples) or a Hugging Face hub id")
        fields = read_json(path, ModelDirError)
    elif os.path.sep in model_id.strip("/") and model_id.count("/") > 1 or model_id.startswith((".", "/", "~")):
        raise ModelDirError(f"--model_id {model_id!r}: no such directory")
    else:
        from transformers import AutoConfig  # hub path: real code, needs network
        fields = AutoConfig.from_pretrained(model_id, trust_remote_code=True).to_dict()
        path = model_id
    model_type = fields.get("model_type")
    if model_type not in CONFIG_CLASSES:
        raise ModelDirError(f"{path}: field `model_type` is {model_type!r}; this project supports "
                            f"{sorted(CONFIG_CLASSES)} (DeepSeek-V2 family and DeepSeekMoE v1)")
    try:
        return CONFIG_CLASSES[model_type].from_dict(fields)
    except ValueError as e:
        raise ModelDirError(f"{path}: {e}") from None


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
