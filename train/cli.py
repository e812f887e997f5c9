"""``moevl data shapes`` and ``moevl eval`` (a thin layer over moevl.train.data and moevl.train.evaluate); the
training commands have their own section below."""
from __future__ import annotations

import argparse
import json
import sys


def _eprint(message: str) -> None:
    print(message, file=sys.stderr)


# =========================================================================== moevl data
def cmd_data_shapes(args) -> int:
    from moevl.train.data import make_shapes

    path = make_shapes(args.out, args.n, args.seed, tasks=args.tasks, langs=args.langs,
                       balanced=not args.unbalanced, force=args.force, log=None if args.quiet else _eprint)
    print(path)
    return 0


def add_data_parser(subparsers):
    from moevl.train.data import LANGS, TASKS

    p = subparsers.add_parser("data", help="write data sets (the synthetic multi-task shapes set)")
    sub = p.add_subparsers(dest="data_command", required=True)
    q = sub.add_parser("shapes", help="images + a LLaVA-format JSON of count/color/shape/position/caption "
                                      "questions in English and Chinese")
    q.add_argument("--out", required=True, help="output folder (written atomically; holds shapes.json, images/)")
    q.add_argument("--n", type=int, required=True, help="number of records (one image and one question each)")
    q.add_argument("--seed", type=int, required=True, help="record i depends on (seed, i) only")
    q.add_argument("--tasks", nargs="+", default=list(TASKS), metavar="TASK",
                   help=f"tasks to ask ({' '.join(TASKS)}; default all)")
    q.add_argument("--langs", nargs="+", default=list(LANGS), metavar="LANG",
                   help=f"languages ({' '.join(LANGS)}; default both)")
    q.add_argument("--unbalanced", action="store_true",
                   help="draw each record's task and language at random (default: equal counts per pair)")
    q.add_argument("--force", action="store_true", help="replace an existing --out that is an earlier data set")
    q.add_argument("--quiet", action="store_true", help="no progress lines")
    q.set_defaults(func=cmd_data_shapes)
    return p


# =========================================================================== moevl eval
LOAD_OPTIONS = ("routing", "base", "moe_routing", "vision_tower", "provider", "quantize", "max_context")


def load_options(args) -> dict:
    """The moevl.load options given on the command line (the loader refuses those that do not apply)."""
    return {name: getattr(args, name) for name in LOAD_OPTIONS if getattr(args, name, None) is not None}


def cmd_eval(args) -> int:
    import moevl
    from moevl.model.checkpoint import check_output_folder
    from moevl.train.evaluate import EVAL_REPORT, evaluate, render_markdown, write_report
    from moevl.train.data import load_records

    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit {args.limit}: pass a positive number of records")
    if args.batch_size < 1 or (args.max_new_tokens is not None and args.max_new_tokens < 1):
        raise ValueError("--batch-size and --max-new-tokens must be at least 1")
    records = load_records(args.data)  # bad data fails before the model is loaded
    if args.out is not None:
        check_output_folder(args.out, EVAL_REPORT, args.force)
    session = moevl.load(args.model, device=args.device, backend=args.backend, dtype=args.dtype,
                         **load_options(args))
    meta = {"model": str(args.model), "backend": args.backend}
    meta |= {k: v for k, v in load_options(args).items() if k != "max_context"}
    report = evaluate(session, records, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                      limit=args.limit, log=None if args.json else _eprint, meta=meta)
    report["data"] = str(args.data)
    if args.out is not None:
        paths = write_report(report, args.out, force=args.force)
        _eprint(f"wrote {paths[0]} and {paths[1]}")
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k != "predictions"}, ensure_ascii=False))
    else:
        print(render_markdown(report, title=f"moevl eval: {args.model} ({args.backend})"), end="")
    return 0


def _cmd_eval_clean(args) -> int:
    """Runtime errors of the exported backends exit 1 with one line, as ``moevl run --backend`` does."""
    if args.backend == "torch":
        return cmd_eval(args)
    from moevl.export.session import RUNTIME_ERRORS

    try:
        return cmd_eval(args)
    except RUNTIME_ERRORS as e:
        print(f"moevl eval --backend {args.backend}: error: {e}", file=sys.stderr)
        return 1


def add_eval_parser(subparsers):
    p = subparsers.add_parser("eval", help="per-task, per-language accuracy and routing on a data set")
    p.add_argument("--model", required=True, help="a preset, a checkpoint folder, or an exported folder "
                                                  "(--backend ort|om)")
    p.add_argument("--data", required=True, help="a JSON file written by `moevl data shapes` (or its folder)")
    p.add_argument("--backend", default="torch", choices=["torch", "ort", "om"])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] | npu[:N] | npu-emulated[:910B|:310P]")
    p.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (torch; default: the device's)")
    p.add_argument("--quantize", default=None, choices=["int8", "int4"],
                   help="torch: weight-only int8 / int4 base linears; ort: int8 only (dynamic int8 decoder)")
    p.add_argument("--provider", default=None, help="ort: cpu (default) | cuda | cann")
    p.add_argument("--moe-routing", default=None, choices=["deterministic", "deepspeed"],
                   help="MoE-LLaVA: deterministic top-2 (default) or the original's Gumbel second expert")
    p.add_argument("--routing", default=None, choices=["prefill", "legacy"], help="Awaker routing mode")
    p.add_argument("--base", default=None, help="Awaker release: the Qwen2-VL folder")
    p.add_argument("--vision-tower", default=None, help="MoE-LLaVA folder: the local CLIP/SigLIP tower folder")
    p.add_argument("--max-context", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N records only")
    p.add_argument("--batch-size", type=int, default=8, help="questions per ask() call (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="default: the longest reference answer in tokens + 8")
    p.add_argument("--out", default=None, help="write eval.json and eval.md into this folder (atomically)")
    p.add_argument("--force", action="store_true", help="replace an existing --out that is an earlier report")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object (no predictions)")
    p.set_defaults(func=_cmd_eval_clean)
    return p


# =========================================================================== moevl train
# (the training helper's commands: add_train_parser)
def cmd_train(args) -> int:
    from moevl.train.loop import TrainSettings
    from moevl.train.recipe import StageOptions, run_stage

    for name in ("steps", "batch_size", "experts", "lora_rank"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, not {value}")
    if args.epochs is not None and args.epochs <= 0 or args.lr <= 0:
        raise ValueError("--epochs and --lr must be positive")
    if args.tower_cache_mb < 0:
        raise ValueError(f"--tower-cache-mb must be 0 (no cache) or more, not {args.tower_cache_mb}")
    settings = TrainSettings(steps=args.steps, epochs=args.epochs or 1.0, lr=args.lr, batch_size=args.batch_size,
                             seed=args.seed, tower_cache_mb=args.tower_cache_mb, loss_average=args.loss_average)
    moe_layers = None
    if args.moe_layers:
        try:
            moe_layers = tuple(int(x) for x in args.moe_layers.split(","))
        except ValueError:
            raise ValueError(f"--moe-layers {args.moe_layers!r}: pass layer indices like 0,2") from None
    options = StageOptions(lora_rank=args.lora_rank, lora_alpha=args.lora_alpha or 2.0 * args.lora_rank,
                           experts=args.experts, moe_layers=moe_layers, freeze_vision=args.freeze_vision)
    run_stage(args.model, args.data, args.stage, args.out, args.device, settings, options, resume=args.resume,
              force=args.force, progress=not args.quiet, log=_eprint)
    print(args.out)
    return 0


def add_train_parser(subparsers):
    from moevl.train.recipe import STAGES

    p = subparsers.add_parser(
        "train", help="one stage of the training recipe (Awaker LoRA-MoE 0/1/2/3, MoE-LLaVA moe)",
        description="Train one stage. vision: the vision tower pretrained on the shapes data set's scene "
                    "annotations (dense probes; the stand-in for a pretrained ViT/CLIP); 0: every weight (from "
                    "scratch; --freeze-vision keeps a pretrained tower); 1: one peft LoRA on the frozen base "
                    "(Awaker; also written as a peft adapter folder); 2: experts + global expert initialised from "
                    "the stage-1 LoRA, experts and routers trained; 3: routers frozen, experts trained; moe: "
                    "MoE-LLaVA's MoE-tuning (FFN copied into the experts, top-2 routing, load-balancing loss 0.01).")
    p.add_argument("--model", required=True, help="a preset or a checkpoint folder (for --stage 2: a stage-1 output)")
    p.add_argument("--data", required=True, help="a LLaVA-format JSON (`moevl data shapes`)")
    p.add_argument("--stage", required=True, choices=list(STAGES))
    p.add_argument("--out", required=True, help="output folder (the kit's format; written atomically)")
    p.add_argument("--device", default="cpu", help="cpu | cuda[:N] | npu[:N] (NPU training not verified on hardware)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: --epochs over the data)")
    p.add_argument("--epochs", type=float, default=None, help="passes over the data (default 1)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lora-rank", type=int, default=8, help="stage 1: the LoRA's rank (the experts' rank later)")
    p.add_argument("--lora-alpha", type=float, default=None, help="stage 1: LoRA alpha (default 2 x rank)")
    p.add_argument("--experts", type=int, default=4, help="stage 2: task experts; moe: experts per MoE layer")
    p.add_argument("--moe-layers", default=None, help="moe: layer indices (default every other layer from 0)")
    p.add_argument("--freeze-vision", action="store_true", help="stage 0: keep the vision tower as it is (after "
                   "--stage vision); its merger / projector is still trained")
    p.add_argument("--tower-cache-mb", type=int, default=4096,
                   help="when the vision tower is frozen, keep its output per record for later epochs, up to this "
                        "many MB (0: recompute every step)")
    p.add_argument("--loss-average", default="token", choices=["token", "record"],
                   help="token: the mean over every answer token of a batch (LLaVA's); record: every record weighs "
                        "the same, whatever its answer's length (short answers beside long captions)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last saved state")
    p.add_argument("--force", action="store_true", help="replace an existing --out that is a moevl checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)
    return p
