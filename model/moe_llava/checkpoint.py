"""Loading MoE-LLaVA from local folders (never from a hub), the ``moellava-tiny`` preset, and saving our format.

Sources:
  (a) a LanguageBind MoE-LLaVA folder: config.json (model_type moe_llava_phi | moe_llava_stablelm, ``moe`` dict,
      mm_* fields) + safetensors shards with DeepSpeed expert names + tokenizer files; the vision tower's weights
      come from the shards when they hold them, otherwise from a local CLIP/SigLIP folder (``vision_tower=``),
      which also gives the tower's config and image processor settings;
  (b) our own format (``moevl_config.json`` with family "moe-llava" + model.safetensors + tokenizer/processor).
Unknown, missing and mis-shaped keys are reported by name (``moevl.model.checkpoint.assign_weights``).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from moevl.model import checkpoint
from moevl.model.checkpoint import (OUR_CONFIG, CheckpointError, assign_weights, build_on_meta, listing, model_type,
                                    read_json, read_our_format, read_weights, save)
from moevl.model.moe_llava.config import KNOWN_TOWERS, PRESETS, MoeLlavaConfig, VisionTowerConfig
from moevl.model.tiny import ASSETS, train_tiny_bpe, trained_default

TINY_ASSETS = ASSETS / "moellava-tiny"


def detect(folder: Path) -> str | None:
    """"moe-llava" for a LanguageBind MoE-LLaVA folder (config.json model_type moe_llava_*), else None."""
    mt = model_type(folder)
    return "moe-llava" if mt is not None and mt.startswith("moe_llava") else None

# ------------------------------------------------------------------------------------------- key mapping
# The original's names -> ours. Everything else (embeddings, attention, norms, dense FFNs, lm_head) has the same
# name in both. Expert tensors are stacked over the expert index e.
ORIGINAL_TOWER_PREFIX = "model.image_tower.image_tower.vision_model."
_ROUTER = re.compile(r"^model\.layers\.(\d+)\.mlp\.deepspeed_moe\.gate\.wg\.weight$")
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\."
                     r"(fc1|fc2|gate_proj|up_proj|down_proj)\.(weight|bias)$")
_PROJECTOR = re.compile(r"^model\.mm_projector\.image_spatial_proj\.(\d+)\.(weight|bias)$")
EXPERT_PARAM = {  # (original module, tensor) -> our stacked parameter of MoeFFN
    ("fc1", "weight"): "w_in", ("fc1", "bias"): "b_in", ("fc2", "weight"): "w_out", ("fc2", "bias"): "b_out",
    ("gate_proj", "weight"): "w_in", ("up_proj", "weight"): "w_up", ("down_proj", "weight"): "w_out",
}
_TOWER_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.")
# Keys of a vision checkpoint that the selected features never use (or that belong to the text side of a full
# CLIP/SigLIP model): skipped on purpose, not reported.
_TOWER_UNUSED = ("post_layernorm.", "head.")
_TOWER_TOP = ("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.", "head.")
_CLIP_NON_VISION = ("text_model.", "visual_projection.", "text_projection.", "logit_scale", "logit_bias")


def map_tower_key(k: str, vision: VisionTowerConfig) -> str | None:
    """A tower key without its ``vision_model.`` prefix -> our name, or None when the key is not used."""
    if k.startswith(_TOWER_UNUSED) or k.endswith("position_ids"):
        return None
    m = _TOWER_LAYER.match(k)
    if m and int(m.group(1)) >= vision.layers_used:
        return None
    return "vision_tower." + k


def tower_state_dict(sd: dict[str, torch.Tensor], vision: VisionTowerConfig) -> dict[str, torch.Tensor]:
    """A CLIP/SigLIP folder's keys (``vision_model.*`` of a full model or a 4.x vision model; unprefixed from
    transformers 5's vision model) -> ours."""
    out = {}
    for k, v in sd.items():
        if k.startswith(_CLIP_NON_VISION):
            continue
        if k.startswith("vision_model."):  # transformers 4.x / the openai folders; 5.x saves without the prefix
            k = k[len("vision_model."):]
        elif not k.startswith(_TOWER_TOP):
            out[k] = v  # reported as unexpected
            continue
        ours = map_tower_key(k, vision)
        if ours is not None:
            out[ours] = v
    return out


def map_moe_llava_keys(sd: dict[str, torch.Tensor], cfg: MoeLlavaConfig) -> dict[str, torch.Tensor]:
    """The original's state dict -> ours: routers renamed, experts stacked, projector and tower renamed."""
    out, experts = {}, {}
    for k, v in sd.items():
        if m := _ROUTER.match(k):
            out[f"model.layers.{m.group(1)}.mlp.router"] = v
        elif m := _EXPERT.match(k):
            layer, e, mod, kind = int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)
            if (mod, kind) not in EXPERT_PARAM:
                out[k] = v  # e.g. a bias the architecture does not have: unexpected
                continue
            experts.setdefault((layer, EXPERT_PARAM[mod, kind]), {})[e] = (k, v)
        elif m := _PROJECTOR.match(k):
            out[f"mm_projector.{m.group(1)}.{m.group(2)}"] = v
        elif k.startswith(ORIGINAL_TOWER_PREFIX):
            ours = map_tower_key(k[len(ORIGINAL_TOWER_PREFIX):], cfg.vision)
            if ours is not None:
                out[ours] = v
        elif k.endswith(".rotary_emb.inv_freq"):
            continue  # a buffer older modeling code saved; recomputed
        else:
            out[k] = v
    missing = []
    for (layer, param), by_e in sorted(experts.items()):
        want = range(cfg.num_experts)
        absent = [e for e in want if e not in by_e]
        if absent:
            some = next(iter(by_e.values()))[0]
            missing += [re.sub(r"deepspeed_experts\.\d+\.", f"deepspeed_experts.{e}.", some) for e in absent]
            continue
        extra = sorted(set(by_e) - set(want))
        if extra:
            raise CheckpointError(f"layer {layer} has experts {sorted(by_e)} but the config says "
                                  f"{cfg.num_experts} (moe.num_experts)")
        shapes = {tuple(by_e[e][1].shape) for e in want}
        if len(shapes) > 1:
            raise CheckpointError(f"the experts of layer {layer} ({param}) have different shapes: "
                                  + ", ".join(f"{by_e[e][0]} {tuple(by_e[e][1].shape)}" for e in want))
        out[f"model.layers.{layer}.mlp.{param}"] = torch.stack([by_e[e][1] for e in want])
    if missing:
        raise CheckpointError("the expert weights are incomplete\n  " + listing("missing", missing))
    return out


# ------------------------------------------------------------------------------------------- building
def build_model(cfg: MoeLlavaConfig):
    from moevl.model.moe_llava.network import MoeLlavaModel

    return build_on_meta(MoeLlavaModel, cfg)


# parameter name suffixes -> initialisation (moevl.model.checkpoint.init_random_weights)
RANDOM_INIT = [
    (("layernorm.weight", "layer_norm1.weight", "layer_norm2.weight", "pre_layrnorm.weight"), "one", 0.1),
    (("mlp.router",), "normal", 0.5),  # spread the tokens over the experts
    (("bias", "b_in", "b_out"), "normal", 0.02),
]


def init_random_weights(model: torch.nn.Module, seed: int = 0) -> None:
    """Deterministic random weights, independent of creation order and device (presets and tests)."""
    checkpoint.init_random_weights(model, seed, RANDOM_INIT)


def random_model(cfg: MoeLlavaConfig, seed: int = 0, dtype=torch.float32, device="cpu"):
    model = build_model(cfg).to_empty(device="cpu")
    init_random_weights(model, seed)
    model = model.to(device=device, dtype=dtype)
    model.init_buffers()
    return model.eval()


def _tower_config(tower: Path | None, hf: dict, shards_have_tower: bool) -> tuple[VisionTowerConfig, dict]:
    """-> (tower config, image processor settings)."""
    select = dict(select_layer=hf.get("mm_vision_select_layer", -2),
                  select_feature=hf.get("mm_vision_select_feature", "patch"))
    name = hf.get("mm_image_tower") or hf.get("mm_vision_tower") or "?"
    if tower is not None:
        if not (tower / "config.json").is_file():
            raise CheckpointError(f"the vision tower folder {tower} has no config.json (a CLIP/SigLIP folder "
                                  f"such as {name} is needed)")
        vision = VisionTowerConfig.from_hf(read_json(tower / "config.json"), **select)
        pre = tower / "preprocessor_config.json"
        if not pre.is_file():
            raise CheckpointError(f"the vision tower folder {tower} has no preprocessor_config.json")
        return vision, dict(json.loads(pre.read_text()), kind=vision.kind)
    if shards_have_tower and name in KNOWN_TOWERS:
        known, pre = KNOWN_TOWERS[name]
        return VisionTowerConfig(**{**known.__dict__, **select}), pre
    raise CheckpointError(f"the checkpoint needs the vision tower {name}: pass a local copy of that folder with "
                          "--vision-tower <folder> (config.json, preprocessor_config.json and weights)")


def load_moe_llava(spec: str | Path, device, dtype: torch.dtype | None = None, vision_tower: str | Path | None = None,
                   seed: int = 0):
    """-> (model on device, MoeLlavaProcessor). ``spec``: a preset name, a MoE-LLaVA folder or our format."""
    from moevl.model.moe_llava.inputs import MoeLlavaProcessor

    dtype = dtype or device.dtype
    if str(spec) == "moellava-tiny" and trained_default("moellava-tiny") is not None:
        if vision_tower is not None:
            raise ValueError("--vision-tower does not apply to a preset")
        spec = trained_default("moellava-tiny")  # the trained default (toy model of synthetic shapes), our format
    elif str(spec) in PRESETS:
        if str(spec) not in ("moellava-tiny", "moellava-tiny-random"):
            raise NotImplementedError(f"preset {spec} has random weights and no tokenizer; use it for benchmarks")
        if vision_tower is not None:
            raise ValueError("--vision-tower does not apply to a preset")
        cfg = PRESETS[str(spec)]()
        model = random_model(cfg, seed, dtype, device.torch_device)
        return model, MoeLlavaProcessor.from_folder(TINY_ASSETS, cfg)
    folder = Path(spec)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is neither a preset ({', '.join(PRESETS)}) nor an existing folder")
    fmt = "moevl" if (folder / OUR_CONFIG).is_file() else detect(folder)
    tower = Path(vision_tower) if vision_tower is not None else None
    if tower is not None and not tower.is_dir():
        raise CheckpointError(f"the vision tower folder {tower} does not exist")
    if fmt == "moevl":
        config, sd = read_our_format(folder, "moe-llava")
        cfg = MoeLlavaConfig.from_dict(config)
        proc = MoeLlavaProcessor.from_folder(folder, cfg)
    elif fmt == "moe-llava":
        hf = read_json(folder / "config.json")
        raw = read_weights(folder)
        shards_have_tower = any(k.startswith(ORIGINAL_TOWER_PREFIX) for k in raw)
        vision, pre = _tower_config(tower, hf, shards_have_tower)
        cfg = MoeLlavaConfig.from_moe_llava(hf, vision, str(folder / "config.json"))
        sd = map_moe_llava_keys(raw, cfg)
        if not shards_have_tower:
            if tower is None:  # (unreachable: _tower_config raised) kept for clarity
                raise CheckpointError("no vision tower weights")
            sd.update(tower_state_dict(read_weights(tower), vision))
        proc = MoeLlavaProcessor.from_folder(folder, cfg, preprocessor=pre)
    else:
        raise CheckpointError(f"{folder} is not a MoE-LLaVA folder (config.json with model_type moe_llava_*)")
    model = build_model(cfg)
    assign_weights(model, sd, dtype, device.torch_device, str(folder))
    return model.eval(), proc


def save_moe_llava(model, processor, out: str | Path, overwrite: bool = False,
                   extra_files: dict | None = None) -> Path:
    """Our format (moevl.model.checkpoint.save) plus the image processor settings (they may come from the tower
    folder, so the checkpoint folder may not have them)."""
    conf = processor.image_processor.to_dict()
    conf = {k: v for k, v in conf.items() if k in ("size", "crop_size", "do_center_crop", "do_resize", "do_rescale",
                                                     "rescale_factor", "do_normalize", "image_mean", "image_std",
                                                     "resample", "do_convert_rgb")}
    return save(model, processor.folder, out, overwrite=overwrite,
                extra_files={"preprocessor_config.json": json.dumps(conf, indent=2, default=int), **(extra_files or {})})


# ------------------------------------------------------------------------------------------- tiny assets
def build_tiny_assets(folder: Path = TINY_ASSETS) -> None:
    """(Re)build the moellava-tiny tokenizer + CLIP image processor files; deterministic. Committed."""
    from transformers import PreTrainedTokenizerFast
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    # The tiny byte-level BPE, with Phi's conventions: <|endoftext|> (id 0) ends turns and pads.
    tok = PreTrainedTokenizerFast(tokenizer_object=train_tiny_bpe(), eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>")
    folder.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(folder))
    size = PRESETS["moellava-tiny"]().vision.image_size
    CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}) \
        .save_pretrained(str(folder))
