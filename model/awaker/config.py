"""Model configuration: one dataclass per family, with named presets (gpt-fast style)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from moevl.model.checkpoint import ConfigError


@dataclasses.dataclass
class VisionConfig:
    depth: int = 32
    embed_dim: int = 1280
    num_heads: int = 16
    mlp_ratio: float = 4.0
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    hidden_act: str = "quick_gelu"
    rope_theta: float = 10000.0


@dataclasses.dataclass
class AdapterConfig:
    """Awaker's adapters. num_experts = 0 means the plain base model (no adapters at all)."""

    num_experts: int = 4          # task experts; the global expert comes on top
    rank: int = 256
    alpha: float = 512.0
    qkv_rank: int = 256           # plain LoRA on q/k/v (merged into W at load time)
    qkv_alpha: float = 512.0
    router_eps: float = 1e-6

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @property
    def qkv_scaling(self) -> float:
        return self.qkv_alpha / self.qkv_rank


@dataclasses.dataclass
class AwakerConfig:
    """Qwen2-VL (text decoder + vision tower) with Awaker2.5-VL's LoRA-MoE adapters."""

    family: str = "awaker"
    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_layers: int = 28
    num_heads: int = 28
    num_kv_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    adapters: AdapterConfig = dataclasses.field(default_factory=AdapterConfig)
    # special token ids (Qwen2-VL's vocabulary)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    im_start_token_id: int = 151644
    im_end_token_id: int = 151645
    eos_token_ids: tuple[int, ...] = (151645, 151643)
    pad_token_id: int = 151643

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "AwakerConfig":
        d = dict(d)
        d.pop("family", None)
        vision = VisionConfig(**d.pop("vision", {}))
        adapters = AdapterConfig(**d.pop("adapters", {}))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown Awaker config fields: {sorted(unknown)}")
        for key in ("mrope_section", "eos_token_ids"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(vision=vision, adapters=adapters, **d)

    @classmethod
    def from_hf_qwen2_vl(cls, path: str | Path, adapters: AdapterConfig | None = None) -> "AwakerConfig":
        """Build from a Hugging Face Qwen2-VL ``config.json`` (transformers 4.45 flat or 5.x nested layout)."""
        path = Path(path)
        cfg_file = path / "config.json" if path.is_dir() else path
        if not cfg_file.is_file():
            raise ConfigError(f"{cfg_file} not found: a Qwen2-VL checkpoint folder needs its config.json")
        try:
            hf = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{cfg_file} is not valid JSON: {e}") from e
        if hf.get("model_type") not in ("qwen2_vl", None):
            raise ConfigError(f"{cfg_file}: model_type {hf.get('model_type')!r} is not qwen2_vl")
        text = dict(hf)
        text.update(hf.get("text_config") or {})
        vis = hf.get("vision_config") or {}
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        eos = text.get("eos_token_id", hf.get("eos_token_id", 151645))
        eos = tuple(eos) if isinstance(eos, list) else (eos,)
        try:
            heads = text["num_attention_heads"]
            return cls(
                vocab_size=text["vocab_size"],
                hidden_size=text["hidden_size"],
                intermediate_size=text["intermediate_size"],
                num_layers=text["num_hidden_layers"],
                num_heads=heads,
                num_kv_heads=text.get("num_key_value_heads") or heads,
                rms_norm_eps=text.get("rms_norm_eps", 1e-6),
                rope_theta=rope.get("rope_theta", text.get("rope_theta", 1_000_000.0)),
                mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))),
                max_position_embeddings=text.get("max_position_embeddings", 32768),
                tie_word_embeddings=hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False)),
                vision=VisionConfig(
                    depth=vis.get("depth", 32),
                    embed_dim=vis.get("embed_dim", 1280),
                    num_heads=vis.get("num_heads", 16),
                    mlp_ratio=vis.get("mlp_ratio", 4.0),
                    in_channels=vis.get("in_channels", vis.get("in_chans", 3)),
                    patch_size=vis.get("patch_size", 14),
                    temporal_patch_size=vis.get("temporal_patch_size", 2),
                    spatial_merge_size=vis.get("spatial_merge_size", 2),
                    hidden_act=vis.get("hidden_act", "quick_gelu"),
                ),
                adapters=adapters if adapters is not None else AdapterConfig(num_experts=0),
                image_token_id=hf.get("image_token_id", 151655),
                video_token_id=hf.get("video_token_id", 151656),
                vision_start_token_id=hf.get("vision_start_token_id", 151652),
                vision_end_token_id=hf.get("vision_end_token_id", 151653),
                eos_token_ids=eos,
                pad_token_id=text.get("pad_token_id") or 151643,
            )
        except KeyError as e:
            raise ConfigError(f"{cfg_file} lacks the field {e.args[0]!r} that a Qwen2-VL config must have") from e


def awaker_tiny() -> AwakerConfig:
    """The built-in demo: the full Awaker structure (4 + 1 experts, routers, q/k/v LoRA) at toy width."""
    return AwakerConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        rope_theta=10000.0,
        mrope_section=(2, 3, 3),
        max_position_embeddings=2048,
        vision=VisionConfig(depth=2, embed_dim=32, num_heads=2, mlp_ratio=2.0),
        adapters=AdapterConfig(num_experts=4, rank=8, alpha=16.0, qkv_rank=8, qkv_alpha=16.0),
        # ids of the locally built tiny tokenizer (model/assets/awaker-tiny)
        image_token_id=5, video_token_id=6, vision_start_token_id=3, vision_end_token_id=4,
        im_start_token_id=1, im_end_token_id=2, eos_token_ids=(2, 0), pad_token_id=0,
    )


def awaker_7b() -> AwakerConfig:
    return AwakerConfig()


def awaker_7b_width(num_layers: int = 2, vision_depth: int = 2) -> AwakerConfig:
    """7B width with few layers: the benchmark configuration."""
    cfg = AwakerConfig(num_layers=num_layers)
    cfg.vision.depth = vision_depth
    return cfg


# "awaker-tiny" loads the trained default when one is installed (model/assets/defaults); "awaker-tiny-random" is
# always this structure with random weights from a seed (tests and benchmarks of the machinery)
PRESETS = {"awaker-tiny": awaker_tiny, "awaker-tiny-random": awaker_tiny, "awaker-7b": awaker_7b,
           "awaker-7b-2layer": awaker_7b_width}
