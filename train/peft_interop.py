"""peft interop, both ways: the kit's stage-1 LoRA as a standard peft adapter folder that loads onto transformers'
Qwen2-VL, and a peft adapter trained on transformers' Qwen2-VL loaded into the kit's network.

The LoRA itself is always peft's: ``get_peft_model`` wraps the kit's network (its ``AdaptedLinear`` is registered
with peft as a linear layer), and loading merges with peft's ``merge_and_unload``. Only names are translated here:
the kit names the text decoder ``model.layers.*`` and the tower ``visual.*`` (transformers 4.45's names, the ones
Awaker was trained with); transformers 5 nests them under ``model.language_model`` / ``model.visual``.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from moevl.model.awaker.checkpoint import normalize_hf_key

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# the decoder linears Awaker adapts: q/k/v (plain LoRA) and o/gate/up/down (LoRA-MoE after stage 2); a regex so
# that it matches the kit's names and transformers' (4.x and 5.x) alike, and never the vision tower
TEXT_LINEARS = r".*layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"


def lora_config(rank: int, alpha: float, target_modules=TEXT_LINEARS):
    """peft's LoraConfig for the kit's network (no dropout: training stays deterministic)."""
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as LoraLinear

    from moevl.model.awaker.lora_moe import AdaptedLinear

    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=target_modules, bias="none")
    # AdaptedLinear (weight [out, in] + optional experts) is a linear layer to peft: its LoRA layer wraps it, calls
    # it with the same arguments and adds B A x; merging adds s B A to its weight
    cfg._register_custom_module({AdaptedLinear: LoraLinear})
    return cfg


def wrap(model, config):
    """peft's ``get_peft_model`` on the kit's network (in place: the kit's own forward now runs the LoRA)."""
    from peft import get_peft_model

    with warnings.catch_warnings():  # "Unsupported layer type AdaptedLinear": it is registered above
        warnings.filterwarnings("ignore", message="Unsupported layer type")
        return get_peft_model(model, config)


def to_transformers_key(key: str) -> str:
    """A peft key on the kit's network -> the same key on transformers 5's Qwen2VLForConditionalGeneration."""
    inner = key[len(PEFT_PREFIX):]
    if inner.startswith("model."):
        inner = "model.language_model." + inner[len("model."):]
    elif inner.startswith("visual."):
        inner = "model." + inner
    return PEFT_PREFIX + inner


def from_transformers_key(key: str) -> str:
    """The reverse (transformers 4.x or 5.x names -> the kit's)."""
    if not key.startswith(PEFT_PREFIX):
        raise ValueError(f"{key!r} is not a peft adapter key (expected the prefix {PEFT_PREFIX!r})")
    return PEFT_PREFIX + normalize_hf_key(key[len(PEFT_PREFIX):])


def adapter_files(peft_model) -> dict[str, str | bytes]:
    """The standard peft adapter folder of a peft-wrapped kit network, in transformers' names:
    {adapter_config.json: text, adapter_model.safetensors: bytes}."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save

    sd = get_peft_model_state_dict(peft_model)
    sd = {to_transformers_key(k): v.detach().cpu().contiguous() for k, v in sd.items()}
    conf = peft_model.peft_config["default"].to_dict()
    conf["target_modules"] = TEXT_LINEARS if isinstance(conf["target_modules"], str) else sorted(
        conf["target_modules"])
    conf["base_model_name_or_path"] = None
    conf["task_type"] = None
    conf.pop("runtime_config", None)
    return {ADAPTER_CONFIG: json.dumps(conf, indent=2, default=list),
            ADAPTER_WEIGHTS: save(sd, metadata={"format": "pt"})}


def read_adapter(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """A peft adapter folder -> (its adapter_config.json, tensors under the kit's names)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / ADAPTER_CONFIG).is_file() or not (folder / ADAPTER_WEIGHTS).is_file():
        raise ValueError(f"{folder} is not a peft adapter folder (it needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    conf = json.loads((folder / ADAPTER_CONFIG).read_text())
    if conf.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{folder}: peft_type {conf.get('peft_type')!r} is not LORA, the only kind the kit loads")
    sd = {from_transformers_key(k): v for k, v in load_file(str(folder / ADAPTER_WEIGHTS)).items()}
    return conf, sd


def apply_adapter(model, folder: str | Path):
    """Load a peft LoRA adapter folder (trained on transformers' Qwen2-VL, or written by ``moevl train --stage 1``)
    into the kit's network and merge it with peft (W + s B A). -> the same network object, merged."""
    from peft import LoraConfig, set_peft_model_state_dict

    conf, sd = read_adapter(folder)
    known = set(LoraConfig.__dataclass_fields__)
    config = lora_config(conf["r"], conf["lora_alpha"], conf["target_modules"])
    for k in ("rank_pattern", "alpha_pattern", "use_rslora", "fan_in_fan_out"):
        if k in conf and k in known and conf[k] is not None:
            setattr(config, k, conf[k])
    if conf.get("use_dora"):
        raise ValueError(f"{folder}: DoRA adapters are not supported; merge it with peft and load the merged model")
    peft_model = wrap(model, config)
    result = set_peft_model_state_dict(peft_model, sd)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise ValueError(f"{folder}: {len(unexpected)} adapter tensors match no module of this model, e.g. "
                         f"{unexpected[0]}: the adapter belongs to another model")
    return peft_model.merge_and_unload()
