"""``moevl quantize --model <folder|preset> --out <folder> --int8|--int4``: write a weight-only quantised copy of a
model in the kit's format (moevl_config.json + model.safetensors with the packed weights + processor files).

The saved weights are the device-independent stored form of kernels/quant.py (int8 [out, in] + per-channel scales;
int4 nibble pairs [out, in / 2] + per-group scales and zero points). Loading such a folder (``moevl run --model
<out>`` / ``moevl.load(out)``) builds the quantised modules before the weights are read, so the fp32 weights of the
base linears never exist in that process; each backend then binds its kernel (CPU: the ATen int8/int4 kernels).
"""
from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

QUANTIZATION_FILE = "quantization.json"


def quantize_folder(model: str, out: str | Path, mode: str, force: bool = False, dtype: str = "fp32",
                    group_size: int | None = None, zero_point: bool = True, lm_head: bool = True,
                    log=print, **load_options) -> Path:
    """Load ``model`` on the CPU in ``dtype`` (not placed: its weights stay in the stored form), quantise the base
    linears and save to ``out`` atomically. -> out"""
    from moevl.ascend.device import resolve_device
    from moevl.kernels import quant
    from moevl.model.checkpoint import CHECKPOINT, check_output_folder
    from moevl.model.family import load_torch

    quant.check_mode(mode)
    group_size = quant.GROUP_SIZE if group_size is None else group_size
    if mode == "int4" and (group_size < 2 or group_size % 2):
        raise ValueError(f"--group-size {group_size}: use an even group size (128 is the default)")
    out = Path(out)
    check_output_folder(out, CHECKPOINT, force, other="another --out")  # before the slow part
    device = resolve_device("cpu", dtype)
    session = load_torch(model, device, device.dtype, **load_options)
    if quant.quantized_weights(session.model):
        raise ValueError(f"{model} is already quantised: quantise the original (unquantised) model instead")
    quant.quantize_model(session.model, mode, group_size=group_size, zero_point=zero_point,
                         include_lm_head=lm_head)
    info = quant.describe(session.model)
    extra = {QUANTIZATION_FILE: json.dumps(info, indent=2)}
    _save(session, out, force, extra)
    log(f"wrote {out}: {mode} ({info['linears']} linears, {info['weight_bytes'] / 2**20:.1f} MiB of quantised "
        f"weights)")
    return out


def _save(session, out: Path, force: bool, extra: dict) -> Path:
    """The family's own saver when it has one (``save_<family>`` in its checkpoint module: e.g. MoE-LLaVA writes
    its image processor settings), else the generic one."""
    from moevl.model.checkpoint import save

    model = session.model
    family_pkg = type(model).__module__.rsplit(".", 1)[0]
    saver = getattr(importlib.import_module(family_pkg + ".checkpoint"),
                    "save_" + model.cfg.family.replace("-", "_"), None)
    if saver is not None:
        return saver(model, session.processor, out, overwrite=force, extra_files=extra)
    return save(model, getattr(session.processor, "folder", None), out, overwrite=force, extra_files=extra)


def cmd_quantize(args) -> int:
    mode = "int8" if args.int8 else "int4"
    options = {k: v for k, v in (("base", args.base), ("vision_tower", args.vision_tower)) if v is not None}
    quantize_folder(args.model, args.out, mode, force=args.force, dtype=args.dtype, group_size=args.group_size,
                    zero_point=not args.symmetric, lm_head=not args.keep_lm_head, **options)
    return 0


def add_quantize_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("quantize", help="save a weight-only int8/int4 quantised copy of a model")
    p.add_argument("--model", required=True, help="a checkpoint folder (or the awaker-tiny preset)")
    p.add_argument("--out", required=True, help="the folder to write (the kit's format)")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--int8", action="store_true", help="int8, one scale per output channel")
    mode.add_argument("--int4", action="store_true", help="int4, one scale (+ zero point) per group of inputs")
    p.add_argument("--group-size", type=int, default=None, help="int4 group size (default 128)")
    p.add_argument("--symmetric", action="store_true", help="int4 without zero points")
    p.add_argument("--keep-lm-head", action="store_true", help="leave lm_head in the compute dtype")
    p.add_argument("--dtype", default="fp32", help="dtype of the unquantised parts (default fp32)")
    p.add_argument("--base", default=None, help="Awaker release only: the Qwen2-VL folder")
    p.add_argument("--vision-tower", default=None, help="MoE-LLaVA: local CLIP/SigLIP folder")
    p.add_argument("--force", action="store_true", help="replace an existing checkpoint folder at --out")
    p.set_defaults(func=cmd_quantize)
    return p
