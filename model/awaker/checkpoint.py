"""Awaker2.5-VL / Qwen2-VL checkpoints from local folders (never from a hub).

Formats, detected from the folder's contents (``detect``):
  "hf-qwen2-vl"     a Hugging Face Qwen2-VL folder: config.json (model_type qwen2_vl) + *.safetensors + tokenizer;
  "awaker-release"  an Awaker2.5-VL release: the PeftModel state dict ``pytorch_model.bin`` (keys
                    ``base_model.model.*``), with a Qwen2-VL folder for config and processor (the same folder, or
                    ``base=``);
  "moevl"           our own format (moevl.model.checkpoint.save) with family "awaker".
"""
from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import torch

from moevl.model.awaker.config import PRESETS, AdapterConfig, AwakerConfig
from moevl.model.checkpoint import (CheckpointError, assign_weights, build_on_meta, model_type, read_our_format,
                                    read_safetensors_folder, read_torch_bin)

RELEASE_WEIGHTS = "pytorch_model.bin"
# The release ships no adapter config: r = 256 and lora_alpha = 512 for every adapter (notes/awaker.md), i.e. a
# scaling alpha / r of 2. Another rank is read from the weights; its alpha cannot be, so 2 r is assumed and said.
RELEASE_RANK, RELEASE_SCALING = 256, 2.0
MODEL_TYPES = ("qwen2_vl",)


def detect(folder: Path) -> str | None:
    """The Awaker format of a folder, or None when it is not one. config.json's model_type decides first: a folder
    of another family that happens to hold a pytorch_model.bin is not an Awaker release."""
    mt = model_type(folder)
    if mt is not None and mt not in MODEL_TYPES:
        return None
    if (folder / RELEASE_WEIGHTS).is_file():
        return "awaker-release"
    if mt is not None:
        return "hf-qwen2-vl"
    return None


# --------------------------------------------------------------------------- key mapping
# Hugging Face Qwen2-VL names -> ours. transformers >= 4.52 nests the text model under model.language_model
# and the tower under model.visual; 4.45 (what Awaker was trained with) uses model.* and visual.*.
_HF_PREFIXES = [("model.language_model.", "model."), ("model.visual.", "visual."), ("language_model.model.", "model."),
                ("language_model.lm_head.", "lm_head.")]


def normalize_hf_key(k: str) -> str:
    for old, new in _HF_PREFIXES:
        if k.startswith(old):
            return new + k[len(old):]
    return k


_LORA_MOE = re.compile(r"^(.*)\.lora_moe_([AB])\.([0-9]+|g)\.weight$")
_LORA_PLAIN = re.compile(r"^(.*)\.lora_([AB])\.default\.weight$")


def map_awaker_release(sd: dict[str, torch.Tensor], alpha: float | None = None):
    """The release's PeftModel keys -> (our base state dict, adapter hyper-parameters).

    q/k/v plain LoRA is merged into W here (W + s B A, computed and kept in fp32, whatever the checkpoint's dtype). LoRA-MoE experts "0".."3" and "g"
    are stacked into lora_A [X, r, in] / lora_B [X, out, r] with the global expert last; the router's
    ``w_gate`` and ``ln`` become ``router.gate`` and ``router.norm_weight``.
    """
    base, plain, moe = {}, {}, {}
    for k, v in sd.items():
        if k.startswith("base_model.model."):
            k = k[len("base_model.model."):]
        k = normalize_hf_key(k)
        if m := _LORA_PLAIN.match(k):
            plain.setdefault(m.group(1), {})[m.group(2)] = v
        elif m := _LORA_MOE.match(k):
            moe.setdefault(m.group(1), {}).setdefault(m.group(2), {})[m.group(3)] = v
        elif k.endswith(".w_gate.weight") or k.endswith(".w_gate.bias"):
            base[k.replace(".w_gate.", ".router.gate.")] = v
        elif k.endswith(".ln.weight"):
            base[k[: -len(".ln.weight")] + ".router.norm_weight"] = v
        else:
            base[k] = v
    for mod, ab in plain.items():
        if set(ab) != {"A", "B"} or mod + ".weight" not in base:
            raise CheckpointError(f"incomplete plain LoRA for {mod}: has {sorted(ab)}, base weight "
                                  f"{'present' if mod + '.weight' in base else 'missing'}")
        w = base[mod + ".weight"]
        r = ab["A"].shape[0]
        qkv_scaling = (alpha if alpha is not None else RELEASE_SCALING * r) / r
        # kept in fp32: assign_weights casts once to the compute dtype (rounding back to the checkpoint's bf16 here
        # first put fp32 logits 0.035-0.040 off at 2 layers of 7B width)
        base[mod + ".weight"] = w.float() + qkv_scaling * (ab["B"].float() @ ab["A"].float())
    experts, rank = None, None
    for mod, ab in moe.items():
        names = sorted(ab.get("A", {}), key=lambda n: (n == "g", n))
        if sorted(ab.get("A", {})) != sorted(ab.get("B", {})) or "g" not in names:
            raise CheckpointError(f"LoRA-MoE experts of {mod} are incomplete: A {sorted(ab.get('A', {}))}, "
                                  f"B {sorted(ab.get('B', {}))} (expected 0..N-1 and g in both)")
        ranks = {n: ab["A"][n].shape[0] for n in names}
        if len(set(ranks.values())) > 1 or (rank is not None and ranks[names[0]] != rank):
            raise CheckpointError(f"LoRA-MoE experts of {mod} have ranks {ranks}"
                                  + (f" but earlier modules rank {rank}" if rank is not None else "")
                                  + ": the kit needs one rank for every expert of every module")
        base[mod + ".lora_A"] = torch.stack([ab["A"][n] for n in names])
        base[mod + ".lora_B"] = torch.stack([ab["B"][n] for n in names])
        experts, rank = len(names) - 1, ab["A"][names[0]].shape[0]
    plain_rank = next(iter(plain.values()))["A"].shape[0] if plain else None
    return base, experts, rank, plain_rank


# --------------------------------------------------------------------------- loading
def build_model(cfg: AwakerConfig):
    from moevl.model.awaker.network import AwakerModel

    return build_on_meta(AwakerModel, cfg)


def _note_adapters(folder: Path, experts: int, rank: int, qkv_rank: int, lora_alpha: float | None) -> None:
    """Say at load which LoRA rank the release has and which alpha (scaling) is used, since no file states it."""
    log = logging.getLogger("moevl")
    ranks = f"rank {rank}" + (f" (q/k/v rank {qkv_rank})" if qkv_rank != rank else "")
    if lora_alpha is not None:
        log.info("%s: %d experts + global, LoRA %s, alpha %g as given (--lora-alpha): scaling %g",
                 folder, experts, ranks, lora_alpha, lora_alpha / rank)
    elif rank == RELEASE_RANK and qkv_rank == RELEASE_RANK:
        log.info("%s: %d experts + global, LoRA rank %d, alpha %g (Awaker2.5-VL's release)", folder, experts,
                 rank, RELEASE_SCALING * rank)
    else:
        log.warning("%s: LoRA %s, not the release's %d; the release format does not record alpha, so alpha = "
                    "%g x rank is assumed (scaling %g): pass --lora-alpha (lora_alpha=) if it was trained with "
                    "another", folder, ranks, RELEASE_RANK, RELEASE_SCALING, RELEASE_SCALING)


def load_awaker(spec: str | Path, device, dtype: torch.dtype | None = None, base: str | Path | None = None,
                seed: int = 0, lora_alpha: float | None = None):
    """-> (model on device, processor). ``spec`` is a preset name or a local folder. ``lora_alpha``: an Awaker
    release's LoRA alpha (the format does not record it; default 2 x its rank, as the released model)."""
    from moevl.model.awaker.inputs import AwakerProcessor
    from moevl.model.awaker.tiny import TINY_TOKENIZER, init_random_weights
    from moevl.model.tiny import trained_default

    dtype = dtype or device.dtype
    if base is not None and (str(spec) in PRESETS or Path(spec).is_dir() and detect(Path(spec)) != "awaker-release"):
        raise ValueError(f"--base applies to an Awaker2.5-VL release (a folder with {RELEASE_WEIGHTS}) only; "
                         f"{spec} is not one: drop --base")
    if lora_alpha is not None:
        if not (isinstance(lora_alpha, (int, float)) and math.isfinite(lora_alpha) and lora_alpha > 0):
            raise ValueError(f"lora_alpha must be a finite number > 0 (--lora-alpha), not {lora_alpha!r}")
        if str(spec) in PRESETS or not (Path(spec).is_dir() and detect(Path(spec)) == "awaker-release"):
            raise ValueError(f"--lora-alpha applies to an Awaker2.5-VL release (a folder with {RELEASE_WEIGHTS}) "
                             f"only, whose format does not record alpha; {spec} is not one: drop --lora-alpha")
    if str(spec) == "awaker-tiny" and trained_default("awaker-tiny") is not None:
        spec = trained_default("awaker-tiny")  # the trained default (toy model of synthetic shapes), our format
    elif str(spec) in PRESETS:
        if str(spec) not in ("awaker-tiny", "awaker-tiny-random"):
            raise NotImplementedError(f"preset {spec} has random weights and no tokenizer: it exists for the "
                                      "benchmarks (moevl.model.awaker.config.PRESETS); run a checkpoint folder instead")
        cfg = PRESETS[str(spec)]()
        model = build_model(cfg).to_empty(device="cpu")
        init_random_weights(model, seed)
        model.init_buffers()
        model = model.to(device=device.torch_device, dtype=dtype)
        model.init_buffers()
        return model, AwakerProcessor.from_folder(TINY_TOKENIZER, cfg)
    folder = Path(spec)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is neither a preset ({', '.join(PRESETS)}) nor an existing folder")
    fmt = "moevl" if (folder / "moevl_config.json").is_file() else detect(folder)
    if fmt == "moevl":
        config, sd = read_our_format(folder, "awaker")
        cfg = AwakerConfig.from_dict(config)
        proc_folder = folder
    elif fmt == "awaker-release":
        cfg_folder = Path(base) if base else folder
        if base is not None and not cfg_folder.is_dir():
            raise CheckpointError(f"--base {cfg_folder} does not exist: pass the Qwen2-VL-7B-Instruct folder the "
                                  "release was built on")
        if not (cfg_folder / "config.json").is_file():
            raise CheckpointError(
                f"the Awaker release ships no config.json: pass the Qwen2-VL-7B-Instruct folder it was built on "
                f"(--base <folder>, with config.json and tokenizer/processor files); {cfg_folder} has none")
        raw = read_torch_bin(folder / RELEASE_WEIGHTS)
        sd, experts, rank, plain_rank = map_awaker_release(raw, lora_alpha)
        if experts is None:
            raise CheckpointError(f"{folder / RELEASE_WEIGHTS} has no lora_moe_* keys: not an Awaker release")
        qkv_rank = plain_rank or rank
        alpha, qkv_alpha = ((lora_alpha, lora_alpha) if lora_alpha is not None
                            else (RELEASE_SCALING * rank, RELEASE_SCALING * qkv_rank))
        adapters = AdapterConfig(num_experts=experts, rank=rank, alpha=alpha, qkv_rank=qkv_rank, qkv_alpha=qkv_alpha)
        _note_adapters(folder, experts, rank, qkv_rank, lora_alpha)
        cfg = AwakerConfig.from_hf_qwen2_vl(cfg_folder, adapters)
        proc_folder = cfg_folder
    elif fmt == "hf-qwen2-vl":
        cfg = AwakerConfig.from_hf_qwen2_vl(folder)
        sd = {normalize_hf_key(k): v for k, v in read_safetensors_folder(folder).items()}
        proc_folder = folder
    else:
        raise CheckpointError(f"{folder} is not an Awaker2.5-VL / Qwen2-VL folder")
    model = build_model(cfg)
    assign_weights(model, sd, dtype, device.torch_device, str(folder))
    return model, AwakerProcessor.from_folder(proc_folder, cfg)
