"""``moevl export onnx | check | om``: a thin layer over moevl.export.onnx, .check and .om."""
from __future__ import annotations

import json
import sys


def _clean_errors(fn):
    """Our own errors become one message and exit 1 (moevl.cli handles ValueError/FileExistsError itself)."""
    import functools

    @functools.wraps(fn)
    def wrapped(args):
        from moevl.export.graph import ExportError, GearError, ProviderError
        from moevl.export.validate import ValidationError

        try:
            return fn(args)
        except (ExportError, ValidationError, ProviderError, GearError, FileNotFoundError) as e:
            print(f"moevl export {args.export_command}: error: {e}", file=sys.stderr)
            return 1
    return wrapped


@_clean_errors
def cmd_onnx(args) -> int:
    from moevl.export.onnx import export_onnx

    export_onnx(args.model, args.out, dtype=args.dtype, opset=args.opset, force=args.force,
                validate=not args.no_validate, validate_tokens=args.validate_tokens,
                log=lambda m: print(m, file=sys.stderr), vision_tower=args.vision_tower, base=args.base,
                lora_alpha=args.lora_alpha)
    print(args.out)
    return 0


@_clean_errors
def cmd_check(args) -> int:
    from moevl.export.check import check_onnx_dir

    report = check_onnx_dir(args.dir)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.render())
    return 0 if report.ok else 1


@_clean_errors
def cmd_om(args) -> int:
    from moevl.export.om import build_om, parse_gears

    result = build_om(args.onnx, args.out, soc=args.soc, precision=args.precision, gears=parse_gears(args.gears),
                      batch=args.batch, run_atc=not args.script_only, log=lambda m: print(m, file=sys.stderr),
                      force=args.force)
    print(result)
    return 0


def add_export_parser(subparsers):
    p = subparsers.add_parser("export", help="export to ONNX, check graphs for ATC, build Ascend OM models")
    sub = p.add_subparsers(dest="export_command", required=True)

    q = sub.add_parser("onnx", help="export a model to an ONNX folder (vision, embedding, decoder + contract.json)")
    q.add_argument("--model", required=True, help="a preset (awaker-tiny, moellava-tiny) or a checkpoint folder")
    q.add_argument("--out", required=True, help="output folder (written atomically)")
    q.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"])
    q.add_argument("--opset", type=int, default=17, help="ONNX opset (ATC takes <= 18; default 17)")
    q.add_argument("--force", action="store_true", help="replace an existing --out that is an earlier ONNX export")
    q.add_argument("--no-validate", action="store_true", help="skip the ONNX Runtime vs PyTorch validation")
    q.add_argument("--validate-tokens", type=int, default=8, help="greedy tokens compared in validation")
    q.add_argument("--vision-tower", default=None, help="MoE-LLaVA folder: the local CLIP/SigLIP tower folder")
    q.add_argument("--base", default=None, help="Awaker release: the Qwen2-VL folder with config.json and tokenizer")
    q.add_argument("--lora-alpha", type=float, default=None,
                   help="Awaker release: its LoRA alpha, which the format does not record (default 2 x rank)")
    q.set_defaults(func=cmd_onnx)

    q = sub.add_parser("check", help="list the op types of each graph and check them against ATC's ONNX op list")
    q.add_argument("dir", help="an ONNX export folder")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_check)

    q = sub.add_parser("om", help="ATC command lines (and OM models when atc is on PATH) for an ONNX folder")
    q.add_argument("--onnx", required=True, help="an ONNX export folder")
    q.add_argument("--soc", required=True, help="ATC --soc_version, e.g. Ascend910B2, Ascend310P3")
    q.add_argument("--precision", default="origin", choices=["origin", "fp16", "mixed_float16"],
                   help="ATC --precision_mode_v2 (origin keeps fp32 ops: use it for parity checks)")
    q.add_argument("--gears", action="append", default=[],
                   help="KIND=N1,N2,... with KIND prefill (prompt lengths), decode (KV lengths), vision "
                        "(Awaker: patches per request, multiples of 4) or images (MoE-LLaVA: images per request; "
                        "one value = a static vision model); repeatable")
    q.add_argument("--batch", type=int, default=1, help="static batch size compiled into the OM models")
    q.add_argument("--out", default=None, help="output folder (default: <onnx>-om-<soc>; written atomically)")
    q.add_argument("--force", action="store_true", help="replace an existing --out that is an earlier OM folder")
    q.add_argument("--script-only", action="store_true", help="write build_om.sh even when atc is on PATH")
    q.set_defaults(func=cmd_om)
    return p
