"""Loading models from local folders (never from a hub) and saving our own format.

Sources, detected from the folder's contents:
  (a) a Hugging Face Qwen2-VL folder: config.json (model_type qwen2_vl) + *.safetensors + tokenizer files;
  (b) an Awaker2.5-VL release: the PeftModel state dict ``pytorch_model.bin`` (keys ``base_model.model.*``),
      with a Qwen2-VL folder for config and processor (the same folder, or ``base=``);
  (c) our own format, written by ``save``: ``moevl_config.json`` + ``model.safetensors`` + tokenizer files.
Unknown, missing and mis-shaped keys are reported by name.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from model.config import PRESETS, AdapterConfig, AwakerConfig

OUR_CONFIG = "moevl_config.json"
OUR_WEIGHTS = "model.safetensors"
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "chat_template.jinja",
                   "chat_template.json", "special_tokens_map.json", "added_tokens.json",
                   "preprocessor_config.json", "generation_config.json")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded: missing, corrupt, or not matching the model."""


def _listing(title: str, keys, limit: int = 12) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{title} ({len(keys)}): " + ", ".join(keys[:limit]) + more


# --------------------------------------------------------------------------- reading tensors
def read_safetensors_folder(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder} has no *.safetensors weight files")
    out = {}
    for f in files:
        try:
            out.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{f} is not a readable safetensors file ({e}); re-download or re-save it") from e
    return out


def read_torch_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for a truncated/corrupt pickle
        raise CheckpointError(f"{path} could not be read as a PyTorch state dict ({type(e).__name__}: {e}); "
                              "the file may be truncated — check its size and checksum") from e
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path} holds a {type(sd).__name__}, not a state dict")
    return sd


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


def map_awaker_release(sd: dict[str, torch.Tensor], qkv_scaling: float):
    """The release's PeftModel keys -> (our base state dict, adapter hyper-parameters).

    q/k/v plain LoRA is merged into W here (W + s B A, computed in fp32). LoRA-MoE experts "0".."3" and "g"
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
        base[mod + ".weight"] = (w.float() + qkv_scaling * (ab["B"].float() @ ab["A"].float())).to(w.dtype)
    experts, rank = None, None
    for mod, ab in moe.items():
        names = sorted(ab.get("A", {}), key=lambda n: (n == "g", n))
        if sorted(ab.get("A", {})) != sorted(ab.get("B", {})) or "g" not in names:
            raise CheckpointError(f"LoRA-MoE experts of {mod} are incomplete: A {sorted(ab.get('A', {}))}, "
                                  f"B {sorted(ab.get('B', {}))} (expected 0..N-1 and g in both)")
        base[mod + ".lora_A"] = torch.stack([ab["A"][n] for n in names])
        base[mod + ".lora_B"] = torch.stack([ab["B"][n] for n in names])
        experts, rank = len(names) - 1, ab["A"][names[0]].shape[0]
    plain_rank = next(iter(plain.values()))["A"].shape[0] if plain else None
    return base, experts, rank, plain_rank


# --------------------------------------------------------------------------- loading into a model
def build_model(cfg: AwakerConfig):
    from model.awaker import AwakerModel

    with torch.device("meta"):
        return AwakerModel(cfg)


def assign_weights(model, sd: dict[str, torch.Tensor], dtype: torch.dtype, device, source: str) -> None:
    """Check names and shapes against the model, then assign (cast to dtype, moved to device)."""
    expected = dict(model.state_dict())
    if "lm_head.weight" not in sd and model.cfg.tie_word_embeddings and "model.embed_tokens.weight" in sd:
        sd = dict(sd, **{"lm_head.weight": sd["model.embed_tokens.weight"]})
    missing = set(expected) - set(sd)
    unknown = set(sd) - set(expected)
    bad = {k for k in set(sd) & set(expected) if tuple(sd[k].shape) != tuple(expected[k].shape)}
    if missing or unknown or bad:
        parts = [f"the weights in {source} do not match the model"]
        if missing:
            parts.append(_listing("missing", missing))
        if unknown:
            parts.append(_listing("unexpected", unknown))
        if bad:
            parts.append(_listing("wrong shape", [f"{k} {tuple(sd[k].shape)} != {tuple(expected[k].shape)}"
                                                  for k in bad]))
        parts.append("check that the config (layers, sizes, experts, rank) belongs to these weights")
        raise CheckpointError("\n  ".join(parts))
    model.load_state_dict({k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
                           for k, v in sd.items()}, assign=True)
    model.init_buffers(device)


def detect_format(folder: Path) -> str:
    if (folder / OUR_CONFIG).is_file():
        return "moevl"
    if (folder / "pytorch_model.bin").is_file():
        return "awaker-release"
    if (folder / "config.json").is_file():
        cfg = json.loads((folder / "config.json").read_text())
        mt = cfg.get("model_type", "")
        if mt.startswith("moe_llava"):
            return "moe-llava"
        return "hf-qwen2-vl"
    raise CheckpointError(
        f"{folder} is not a model folder this kit knows: expected {OUR_CONFIG} (our format), pytorch_model.bin "
        "(Awaker2.5-VL release) or config.json + *.safetensors (Hugging Face Qwen2-VL)")


def load_awaker(spec: str | Path, device, dtype: torch.dtype | None = None, base: str | Path | None = None,
                seed: int = 0):
    """-> (model on device, processor). ``spec`` is a preset name or a local folder."""
    from model.inputs import AwakerProcessor
    from model.tiny import TINY_TOKENIZER, init_random_weights

    dtype = dtype or device.dtype
    if str(spec) in PRESETS:
        if str(spec) != "awaker-tiny":
            raise NotImplementedError(f"preset {spec} has random weights and no tokenizer: it exists for the "
                                      "benchmarks (model.config.PRESETS); run a checkpoint folder instead")
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
    fmt = detect_format(folder)
    if fmt == "moevl":
        meta = json.loads((folder / OUR_CONFIG).read_text())
        if meta.get("family") != "awaker":
            raise CheckpointError(f"{folder} holds a {meta.get('family')!r} model, not awaker")
        cfg = AwakerConfig.from_dict(meta["config"])
        if not (folder / OUR_WEIGHTS).is_file():
            raise CheckpointError(f"{folder / OUR_WEIGHTS} is missing")
        sd = read_safetensors_folder(folder)
        proc_folder = folder
    elif fmt == "awaker-release":
        cfg_folder = Path(base) if base else folder
        if not (cfg_folder / "config.json").is_file():
            raise CheckpointError(
                f"the Awaker release ships no config.json: pass the Qwen2-VL-7B-Instruct folder it was built on "
                f"(--base <folder>, with config.json and tokenizer/processor files); {cfg_folder} has none")
        raw = read_torch_bin(folder / "pytorch_model.bin")
        defaults = AdapterConfig()
        sd, experts, rank, plain_rank = map_awaker_release(raw, defaults.qkv_scaling)
        if experts is None:
            raise CheckpointError(f"{folder / 'pytorch_model.bin'} has no lora_moe_* keys: not an Awaker release")
        adapters = AdapterConfig(num_experts=experts, rank=rank, alpha=defaults.scaling * rank,
                                 qkv_rank=plain_rank or rank, qkv_alpha=defaults.qkv_scaling * (plain_rank or rank))
        cfg = AwakerConfig.from_hf_qwen2_vl(cfg_folder, adapters)
        proc_folder = cfg_folder
    elif fmt == "hf-qwen2-vl":
        cfg = AwakerConfig.from_hf_qwen2_vl(folder)
        sd = {normalize_hf_key(k): v for k, v in read_safetensors_folder(folder).items()}
        proc_folder = folder
    else:
        raise CheckpointError(f"{folder} is a {fmt} checkpoint; load it with the moe-llava family")
    model = build_model(cfg)
    assign_weights(model, sd, dtype, device.torch_device, str(folder))
    return model, AwakerProcessor.from_folder(proc_folder, cfg)


def save(model, processor_folder: Path | None, out: str | Path, overwrite: bool = False) -> Path:
    """Write our format atomically: a temporary folder next to ``out``, renamed into place when complete."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another folder or pass overwrite=True (--force)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        save_file(sd, str(tmp / OUR_WEIGHTS))
        (tmp / OUR_CONFIG).write_text(json.dumps({"family": model.cfg.family, "config": model.cfg.to_dict()},
                                                 indent=2))
        if processor_folder is not None:
            for name in PROCESSOR_FILES:
                if (Path(processor_folder) / name).is_file():
                    shutil.copy2(Path(processor_folder) / name, tmp / name)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
