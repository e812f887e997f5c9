"""MoE-LLaVA configuration: one dataclass for the network, one for the vision tower, named presets.

Read from a LanguageBind MoE-LLaVA ``config.json`` (model_type moe_llava_phi | moe_llava_stablelm) with
:meth:`MoeLlavaConfig.from_moe_llava`; the vision tower's shape comes from a local CLIP/SigLIP folder or, for the
two towers the released checkpoints use, from the table ``KNOWN_TOWERS`` (the original fetches them by name).
Facts: shared/notes/moe-llava.md.
"""
from __future__ import annotations

import dataclasses

from moevl.model.checkpoint import ConfigError

IMAGE_TOKEN_INDEX = -200  # the original's <image> sentinel in input_ids
SYSTEM_PROMPT = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions.")
ARCHS = ("phi", "stablelm")


@dataclasses.dataclass
class VisionTowerConfig:
    """A CLIP or SigLIP ViT, run up to ``select_layer`` (hidden_states index, -2 = second-to-last layer)."""

    kind: str = "clip"               # "clip" (CLS token, pre-LayerNorm, no patch bias) | "siglip"
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"   # CLIP: quick_gelu; SigLIP: gelu_pytorch_tanh
    select_layer: int = -2
    select_feature: str = "patch"    # "patch": drop token 0 (also for SigLIP, as the original) | "cls_patch"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_positions(self) -> int:
        return self.num_patches + (1 if self.kind == "clip" else 0)

    @property
    def layers_used(self) -> int:
        """Encoder layers that run: hidden_states has num_layers + 1 entries (0 = the embeddings)."""
        n = self.num_layers + 1 + self.select_layer if self.select_layer < 0 else self.select_layer
        if not 0 <= n <= self.num_layers:
            raise ConfigError(f"mm_vision_select_layer {self.select_layer} is outside a {self.num_layers}-layer tower")
        return n

    @property
    def num_image_tokens(self) -> int:
        return self.num_positions - (1 if self.select_feature == "patch" else 0)

    @classmethod
    def from_hf(cls, d: dict, select_layer: int = -2, select_feature: str = "patch") -> "VisionTowerConfig":
        """From a CLIP/SigLIP config.json dict (full model with vision_config, or the vision model alone)."""
        mt = d.get("model_type", "")
        v = d.get("vision_config") or d
        kind = "siglip" if "siglip" in (mt or v.get("model_type", "")) else "clip"
        if not (mt or v.get("model_type", "")).startswith(("clip", "siglip")):
            raise ConfigError(f"vision tower model_type {mt!r} is not CLIP or SigLIP")
        try:
            return cls(kind=kind, hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
                       num_layers=v["num_hidden_layers"], num_heads=v["num_attention_heads"],
                       image_size=v["image_size"], patch_size=v["patch_size"],
                       layer_norm_eps=v.get("layer_norm_eps", 1e-5 if kind == "clip" else 1e-6),
                       hidden_act=v.get("hidden_act", "quick_gelu" if kind == "clip" else "gelu_pytorch_tanh"),
                       select_layer=select_layer, select_feature=select_feature)
        except KeyError as e:
            raise ConfigError(f"the vision tower config lacks {e.args[0]!r}") from e


# The towers of the released checkpoints (mm_image_tower names), so that a folder whose shards already hold the
# tower weights needs no separate tower folder. image processor settings as their preprocessor_config.json.
KNOWN_TOWERS = {
    "openai/clip-vit-large-patch14-336": (
        VisionTowerConfig(),
        {"kind": "clip", "size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336},
         "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}),
    "google/siglip-so400m-patch14-384": (
        VisionTowerConfig(kind="siglip", hidden_size=1152, intermediate_size=4304, num_layers=27, num_heads=16,
                          image_size=384, patch_size=14, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh"),
        {"kind": "siglip", "size": {"height": 384, "width": 384}, "image_mean": [0.5, 0.5, 0.5],
         "image_std": [0.5, 0.5, 0.5]}),
}


@dataclasses.dataclass
class MoeLlavaConfig:
    family: str = "moe-llava"
    arch: str = "phi"                   # "phi" (parallel block) | "stablelm" (sequential pre-norm, SwiGLU)
    vocab_size: int = 51200
    hidden_size: int = 2560
    intermediate_size: int = 10240
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    layer_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.4  # Phi-2 0.4, StableLM-2 0.25
    qkv_bias: bool = True
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    moe_layers: tuple[int, ...] = tuple(range(0, 32, 2))
    num_experts: int = 4
    top_k: int = 2
    mm_hidden_size: int = 1024
    projector: str = "mlp2x_gelu"
    image_aspect_ratio: str = "pad"
    vision: VisionTowerConfig = dataclasses.field(default_factory=VisionTowerConfig)
    eos_token_ids: tuple[int, ...] = (50256,)
    pad_token_id: int = 50256

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ConfigError(f"arch must be one of {ARCHS}, got {self.arch!r} (Qwen-1.8B is not supported yet)")
        if self.projector != "mlp2x_gelu":
            raise ConfigError(f"image projector {self.projector!r} is not supported; MoE-LLaVA uses mlp2x_gelu")
        bad = [i for i in self.moe_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ConfigError(f"moe_layers_idx {bad} outside a {self.num_layers}-layer decoder")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MoeLlavaConfig":
        d = dict(d)
        d.pop("family", None)
        vision = VisionTowerConfig(**d.pop("vision", {}))
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown MoE-LLaVA config fields: {sorted(unknown)}")
        for key in ("moe_layers", "eos_token_ids"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(vision=vision, **d)

    @classmethod
    def from_moe_llava(cls, hf: dict, vision: VisionTowerConfig, source: str = "config.json") -> "MoeLlavaConfig":
        """From a LanguageBind MoE-LLaVA config.json dict (model_type moe_llava_phi | moe_llava_stablelm)."""
        mt = hf.get("model_type", "")
        arch = {"moe_llava_phi": "phi", "moe_llava_stablelm": "stablelm"}.get(mt)
        if arch is None:
            raise ConfigError(f"{source}: model_type {mt!r} is not supported (moe_llava_phi, moe_llava_stablelm; "
                              "moe_llava_qwen is not implemented)")
        moe = hf.get("moe") or {}
        try:
            n = hf["num_hidden_layers"]
            layers = moe_layer_indices(moe, n)
            experts = moe.get("num_experts", 4)
            if isinstance(experts, list):
                if len(set(experts)) > 1:
                    raise ConfigError(f"{source}: different expert counts per layer {experts} are not supported")
                experts = experts[0] if experts else 4
            heads = hf["num_attention_heads"]
            eos = hf.get("eos_token_id", 50256 if arch == "phi" else 100257)
            eos = tuple(eos) if isinstance(eos, list) else (eos,)
            rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
            factor = hf.get("partial_rotary_factor", hf.get("rope_pct", rope.get("partial_rotary_factor")))
            if hf.get("qk_layernorm"):
                raise ConfigError(f"{source}: qk_layernorm is not supported")
            if arch == "stablelm" and hf.get("use_parallel_residual"):
                raise ConfigError(f"{source}: StableLM with use_parallel_residual is not supported")
            return cls(
                arch=arch, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
                intermediate_size=hf["intermediate_size"], num_layers=n, num_heads=heads,
                num_kv_heads=hf.get("num_key_value_heads") or heads,
                layer_norm_eps=hf.get("layer_norm_eps", hf.get("norm_eps", 1e-5)),
                rope_theta=hf.get("rope_theta", rope.get("rope_theta", 10000.0)),
                partial_rotary_factor=factor if factor is not None else (0.4 if arch == "phi" else 0.25),
                qkv_bias=True if arch == "phi" else bool(hf.get("use_qkv_bias", True)),
                max_position_embeddings=hf.get("max_position_embeddings", 2048),
                tie_word_embeddings=hf.get("tie_word_embeddings", False),
                moe_layers=tuple(layers), num_experts=experts, top_k=moe.get("top_k_experts", 2),
                mm_hidden_size=hf.get("mm_hidden_size", vision.hidden_size),
                projector=hf.get("image_projector_type", hf.get("mm_projector_type", "mlp2x_gelu")),
                image_aspect_ratio=hf.get("image_aspect_ratio", "pad"), vision=vision, eos_token_ids=eos,
                pad_token_id=hf.get("pad_token_id") if hf.get("pad_token_id") is not None else eos[0],
            )
        except KeyError as e:
            raise ConfigError(f"{source} lacks the field {e.args[0]!r} that a MoE-LLaVA config must have") from e


def moe_layer_indices(moe: dict, num_layers: int) -> list[int]:
    """The MoE layers from the checkpoint's ``moe`` dict, as the original's initialize_moe_modules decides them."""
    if not moe or moe.get("moe_enable") is False:
        return []
    if moe.get("moe_layers_idx") is not None:
        return sorted(int(i) for i in moe["moe_layers_idx"])
    mode = moe.get("moe_mode", "sparse")
    modes = {"sparse": list(range(num_layers))[::2], "dense": list(range(num_layers)),
             "first_half": list(range(num_layers // 2)), "second_half": list(range(num_layers // 2, num_layers))}
    if mode not in modes:
        raise ConfigError(f"moe_mode {mode!r} is not one of {sorted(modes)}")
    return modes[mode]


# ------------------------------------------------------------------------------------------------ presets
def moellava_tiny() -> MoeLlavaConfig:
    """The built-in demo: Phi-2 flavour at toy width, MoE on layers 0 and 2 of 3, a 3-layer CLIP tower on 56x56."""
    return MoeLlavaConfig(
        arch="phi", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4,
        num_kv_heads=4, partial_rotary_factor=0.5, max_position_embeddings=1024, moe_layers=(0, 2),
        mm_hidden_size=32,
        vision=VisionTowerConfig(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=2, image_size=56,
                                 patch_size=14),
        # ids of the locally built tiny tokenizer (model/assets/moellava-tiny): <|endoftext|> = 0
        eos_token_ids=(0,), pad_token_id=0,
    )


def moellava_phi2_width(num_layers: int = 4, moe_layers=(0, 2), vision_layers: int = 2) -> MoeLlavaConfig:
    """Phi-2 width, few layers, CLIP-L/336 width tower: the end-to-end benchmark configuration."""
    return MoeLlavaConfig(num_layers=num_layers, moe_layers=tuple(moe_layers),
                          vision=VisionTowerConfig(num_layers=vision_layers + 1))


# "moellava-tiny" loads the trained default when one is installed (model/assets/defaults); "moellava-tiny-random" is
# always this structure with random weights from a seed (tests and benchmarks of the machinery)
PRESETS = {"moellava-tiny": moellava_tiny, "moellava-tiny-random": moellava_tiny,
           "moellava-phi2-4layer": moellava_phi2_width}
