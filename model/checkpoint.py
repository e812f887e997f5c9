"""Reading and writing checkpoints, for every family: tensors from safetensors / PyTorch files, checking and
assigning them to a model built on the meta device, and the kit's own format.

Our format, written by ``save``: ``moevl_config.json`` ({"family": ..., "config": ...}) + ``model.safetensors`` +
the tokenizer/processor files. A family's own formats (Hugging Face folders, the original releases) are read by its
``checkpoint`` module, which maps their keys onto ours. Unknown, missing and mis-shaped keys are reported by name.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

OUR_CONFIG = "moevl_config.json"
OUR_WEIGHTS = "model.safetensors"
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "chat_template.jinja",
                   "chat_template.json", "special_tokens_map.json", "added_tokens.json",
                   "preprocessor_config.json", "generation_config.json")


class ConfigError(ValueError):
    """A model configuration that is missing, malformed or describes something the kit does not implement."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded: missing, corrupt, or not matching the model."""


def listing(title: str, keys, limit: int = 12) -> str:
    """'title (n): a, b, c ... and k more' for error messages that name keys."""
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{title} ({len(keys)}): " + ", ".join(keys[:limit]) + more


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path} not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from e


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


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a folder: its *.safetensors files, else its pytorch_model*.bin files."""
    if any(folder.glob("*.safetensors")):
        return read_safetensors_folder(folder)
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if not bins:
        raise CheckpointError(f"{folder} has no *.safetensors or pytorch_model*.bin weight files")
    out = {}
    for b in bins:
        out.update(read_torch_bin(b))
    return out


def model_type(folder: Path) -> str | None:
    """``model_type`` of a folder's config.json (None when there is none)."""
    if not (folder / "config.json").is_file():
        return None
    return read_json(folder / "config.json").get("model_type")


# --------------------------------------------------------------------------- our format
def read_our_format(folder: Path, family: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """-> (the family's config dict, tensors) of a folder written by ``save``."""
    meta = read_json(folder / OUR_CONFIG)
    if meta.get("family") != family:
        raise CheckpointError(f"{folder} holds a {meta.get('family')!r} model, not {family}")
    if not (folder / OUR_WEIGHTS).is_file():
        raise CheckpointError(f"{folder / OUR_WEIGHTS} is missing")
    return meta["config"], read_safetensors_folder(folder)


def save(model, processor_folder: Path | None, out: str | Path, overwrite: bool = False,
         extra_files: dict[str, str] | None = None) -> Path:
    """Write our format atomically: a temporary folder next to ``out``, renamed into place when complete.
    ``extra_files``: name -> text written beside the weights (e.g. image processor settings)."""
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
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# --------------------------------------------------------------------------- loading into a model
def build_on_meta(model_class, cfg):
    """The network with no storage: weights are assigned from the checkpoint (no double allocation)."""
    with torch.device("meta"):
        return model_class(cfg)


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
            parts.append(listing("missing", missing))
        if unknown:
            parts.append(listing("unexpected", unknown))
        if bad:
            parts.append(listing("wrong shape", [f"{k} {tuple(sd[k].shape)} != {tuple(expected[k].shape)}"
                                                 for k in bad]))
        parts.append("check that the config (layers, sizes, experts, rank) belongs to these weights")
        raise CheckpointError("\n  ".join(parts))
    model.load_state_dict({k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
                           for k, v in sd.items()}, assign=True)
    model.init_buffers(device)


@torch.no_grad()
def init_random_weights(model: torch.nn.Module, seed: int, rules: list[tuple[tuple[str, ...], str, float]]) -> None:
    """Deterministic random weights, independent of module creation order and of the device (presets, tests).

    rules: (name suffixes, kind, scale), the first match wins; kind "one" = 1 + scale * N(0, 1) (norm gains),
    "fan_in" = N(0, 1) / sqrt(last dim), "normal" = scale * N(0, 1); unmatched names get 0.05 * N(0, 1).
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        kind, scale = next(((k, s) for suffixes, k, s in rules if name.endswith(suffixes)), ("normal", 0.05))
        t = torch.randn(p.shape, generator=g)
        if kind == "one":
            t = 1.0 + scale * t
        elif kind == "fan_in":
            t = t / p.shape[-1] ** 0.5
        else:
            t = scale * t
        p.copy_(t.to(p.dtype))
