"""``moevl``: the command line, a thin layer over ``moevl.load`` (run, demo), moevl.ascend (info, doctor),
moevl.export (export) and moevl.benchmarks (bench)."""
from __future__ import annotations

import argparse
import json
import signal
import sys

EXIT_USAGE = 2


def _add_model_args(p, default_model=None):
    p.add_argument("--model", default=default_model, required=default_model is None,
                   help="a preset (awaker-tiny) or a local checkpoint folder")
    p.add_argument("--base", help="Awaker release only: the Qwen2-VL folder with config.json and tokenizer")
    p.add_argument("--lora-alpha", type=float, default=None,
                   help="Awaker release only: its LoRA alpha, which the format does not record (default 2 x rank)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] | npu[:N] | npu-emulated[:910B|:310P]")
    p.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default: the device's preferred dtype)")
    p.add_argument("--routing", default=None, choices=["prefill", "legacy"],
                   help="Awaker: route once at prefill (default) or per step as the original generate does")
    _add_npu_args(p)


def _add_npu_args(p):
    p.add_argument("--strict-npu", action="store_true", default=None,
                   help="NPU: an op falling back to the CPU is an error (default: on for npu-emulated)")
    p.add_argument("--compile", action="store_true",
                   help="NPU: TorchAir graph mode for the decode step (not yet verified on hardware)")


def _add_generation_args(p):
    p.add_argument("--image", action="append", default=[], help="image file (repeat for several images)")
    p.add_argument("--prompt", default="Describe the image.", help="the question")
    # sampling: what is not given comes from the model folder's generation_config.json, else the kit's default
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 32 (16 for demo)")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (the default)")
    p.add_argument("--top-p", type=float, default=None, help="default 1 (off)")
    p.add_argument("--top-k", type=int, default=None, help="default 0 (off)")
    p.add_argument("--repetition-penalty", type=float, default=None, help="default 1 (off)")
    p.add_argument("--no-generation-config", dest="generation_config", action="store_false",
                   help="ignore the model folder's generation_config.json (its sampling defaults)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-context", type=int, default=None, help="context length limit (default: the model's)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--no-stream", action="store_true", help="print the answer at the end, not as it comes")


def run_generation(args) -> int:
    import moevl

    backend = getattr(args, "backend", "torch")
    options = {"max_context": args.max_context, "log": _eprint if backend == "ort" else None}
    for name in ("routing", "base", "lora_alpha", "moe_routing", "vision_tower", "provider", "quantize"):
        if getattr(args, name, None) is not None:
            options[name] = getattr(args, name)
    vl = moevl.load(args.model, device=args.device, backend=backend, dtype=args.dtype,
                    strict_npu=getattr(args, "strict_npu", None), compile=getattr(args, "compile", False),
                    generation_config=args.generation_config, **options)
    return answer_and_report(vl, args, backend=backend)


def _eprint(message: str) -> None:
    print(message, file=sys.stderr)


def answer_and_report(vl, args, backend: str = "torch") -> int:
    """Ask the session, stream or print the answer, then the figures (or one JSON object). Shared by every
    backend so scripts see the same fields: text, token_ids, ttft_ms, decode_tokens_per_s, device, dtype, routing."""
    stream = None
    if not args.json and not args.no_stream:
        def stream(i, text):
            sys.stdout.write(text)
            sys.stdout.flush()
    max_new = args.max_new_tokens
    if max_new is None and "max_new_tokens" not in vl.generation_defaults:
        max_new = args.default_max_new_tokens
    res = vl.ask(args.prompt, images=args.image, on_text=stream, max_new_tokens=max_new,
                 temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                 repetition_penalty=args.repetition_penalty, seed=args.seed)
    settings = res.settings
    if args.max_new_tokens is None and max_new is not None:
        settings["source"]["max_new_tokens"] = "default"  # the CLI's own default (32, demo 16)
    desc = vl.describe()
    dtype = vl.dtype_name
    decisions = vl.routing_decisions()
    routing = [d.to_dict() for d in decisions]
    if args.json:
        print(json.dumps({
            "text": res.texts[0], "token_ids": res.token_ids[0], "prompt_tokens": res.prompt_tokens[0],
            "finish_reason": res.finish_reasons[0], "ttft_ms": round(res.ttft_ms, 3),
            "decode_tokens_per_s": round(res.decode_tokens_per_s, 3), "device": desc, "dtype": dtype,
            "model": str(args.model), "family": vl.family, "backend": backend, "routing": routing,
            "generation": settings,
            "generation_config": str(vl.generation_config_path) if vl.generation_config_path else None}))
        return 0
    if stream is None:
        print(res.texts[0])
    else:
        print()
    weights = ""
    if getattr(vl, "model", None) is not None:  # torch: weight-only quantised base linears (moevl.kernels.quant)
        from moevl.kernels.quant import describe as describe_quantization

        q = describe_quantization(vl.model)
        weights = f", {q['mode']} weights ({', '.join(q['kernels'])})" if q else ""
    print(f"--\nbackend {backend} ({desc['device']}, {desc['chip']}), dtype {dtype}"
          f"{', int8 decoder' if desc.get('quantize') else ''}{weights}; prompt {res.prompt_tokens[0]} tokens; "
          f"time to first token {res.ttft_ms:.1f} ms; decode {res.decode_tokens_per_s:.1f} tokens/s; "
          f"finish: {res.finish_reasons[0]}", file=sys.stderr)
    for line in routing_lines(decisions):
        print(line, file=sys.stderr)
    return 0


def routing_lines(decisions) -> list[str]:
    """One labelled line per kind of routing step (in order: all | first token, decode)."""
    lines = []
    for steps in dict.fromkeys(d.steps for d in decisions):
        line = ", ".join(d.summary() for d in decisions if d.steps == steps)
        what = {"all": "", "first token": " (first token)", "decode": " (decode steps)"}[steps]
        lines.append(f"{type(decisions[0]).title}{what}: {line}")
    return lines


def cmd_run(args) -> int:
    if args.backend == "torch":
        return run_generation(args)
    from moevl.export.session import RUNTIME_ERRORS

    try:  # a missing runtime, provider or file, or a call no compiled gear fits: exit 1, as export errors
        return run_generation(args)
    except RUNTIME_ERRORS as e:
        print(f"moevl run --backend {args.backend}: error: {e}", file=sys.stderr)
        return 1


def cmd_demo(args) -> int:
    from moevl.model import family
    from moevl.model.tiny import DEMO_IMAGE, demo_questions, trained_default

    args.model = family.get(args.family).demo
    args.image = args.image or [str(DEMO_IMAGE)]
    if trained_default(args.model) is None:
        if not args.json:
            print(f"moevl demo: {args.model} has RANDOM weights (the full {args.family} structure at toy size): the "
                  "answer is noise. Point `moevl run --model <folder>` at a real checkpoint.", file=sys.stderr)
        args.prompt = args.prompt or "Describe the image."
        return run_generation(args)
    if not args.json:
        print(f"moevl demo: {args.model} is a TOY model trained on synthetic shapes (python -m moevl.train.defaults): "
              "it answers count / color / shape / position / caption questions about such images, in English and "
              "Chinese, and knows nothing else.", file=sys.stderr)
    if args.json or args.prompt is not None:  # one question: as `moevl run`
        args.prompt = args.prompt or "Describe the image."
        return run_generation(args)
    return demo_questions_and_routing(args, demo_questions() if args.image == [str(DEMO_IMAGE)] else
                                      [{"question": "Describe the image.", "answer": None}])


def demo_questions_and_routing(args, questions: list[dict]) -> int:
    """The demo's questions about the image, one at a time: the answer, the data set's answer, and the routing."""
    import moevl

    vl = moevl.load(args.model, device=args.device, dtype=args.dtype, routing=args.routing,
                    strict_npu=getattr(args, "strict_npu", None), compile=getattr(args, "compile", False))
    print(f"image: {args.image[0]}")
    for q in questions:
        res = vl.ask(q["question"], images=args.image, max_new_tokens=args.max_new_tokens or 40,
                     temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
        expected = f"   (data set: {q['answer']})" if q.get("answer") is not None else ""
        print(f"Q: {q['question']}\nA: {res.texts[0]}{expected}", flush=True)
        for line in routing_lines(vl.routing_decisions()):  # on stderr, as `moevl run` prints them
            print(f"   {line}", file=sys.stderr, flush=True)
    desc = vl.describe()
    print(f"--\nbackend torch ({desc['device']}, {desc['chip']}), dtype {vl.dtype_name}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from moevl.ascend.cli_commands import add_doctor_parser, add_info_parser
    from moevl.model.family import families

    parser = argparse.ArgumentParser(prog="moevl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="answer a question about an image")
    _add_model_args(p)
    _add_generation_args(p)
    p.add_argument("--backend", default="torch", choices=["torch", "ort", "om"],
                   help="torch (default), ort (an exported ONNX folder), om (Ascend OM folder)")
    p.add_argument("--provider", default=None, help="ONNX Runtime execution provider: cpu (default) | cuda | cann")
    p.add_argument("--quantize", default=None, choices=["int8", "int4"],
                   help="torch: int8 (per channel) / int4 (group 128) weights of the base linears (int8 on a VNNI "
                        "CPU runs FBGEMM with int8 activations per row; MOEVL_CPU_QUANT_KERNEL=aten keeps bf16 "
                        "activations); ort: int8 only (dynamic int8 decoder)")
    p.add_argument("--moe-routing", default=None, choices=["deterministic", "deepspeed"],
                   help="MoE-LLaVA: deterministic top-2 (default) or the original's Gumbel second expert")
    p.add_argument("--vision-tower", default=None, help="MoE-LLaVA: local CLIP/SigLIP folder")
    p.set_defaults(func=cmd_run, default_max_new_tokens=32)

    p = sub.add_parser("demo", help="run the built-in tiny preset on the bundled image")
    p.add_argument("--family", default=next(iter(families())), choices=list(families()))
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default=None)
    p.add_argument("--routing", default=None, choices=["prefill", "legacy"])
    p.add_argument("--base", default=None, help=argparse.SUPPRESS)
    _add_npu_args(p)
    _add_generation_args(p)
    p.set_defaults(func=cmd_demo, default_max_new_tokens=16, prompt=None)

    add_info_parser(sub)
    add_doctor_parser(sub)
    for mod, fn in (("moevl.benchmarks.cli", "add_bench_parser"), ("moevl.export.cli", "add_export_parser"),
                    ("moevl.train.cli", "add_data_parser"), ("moevl.train.cli", "add_eval_parser"),
                    ("moevl.train.cli", "add_train_parser"),
                    ("moevl.quantize", "add_quantize_parser"), ("moevl.serve.cli", "add_serve_parser")):
        try:
            module = __import__(mod, fromlist=[fn])
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
            continue
        getattr(module, fn)(sub)
    return parser


def _print_notes() -> None:
    """What the kit says while it works (the ``moevl`` logger: a checkpoint upcast, an assumed LoRA alpha) goes to
    stderr as one ``moevl: note:`` line each."""
    import logging

    log = logging.getLogger("moevl")
    if not any(getattr(h, "moevl_cli", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("moevl: note: %(message)s"))
        handler.moevl_cli = True
        log.addHandler(handler)
    log.setLevel(logging.INFO)


def main(argv=None) -> int:
    from moevl.ascend.errors import DeviceError
    from moevl.model.checkpoint import CheckpointError
    from moevl.model.request import InputError

    parser = build_parser()
    args = parser.parse_args(argv)
    _print_notes()
    try:
        return args.func(args)
    except (DeviceError, InputError, CheckpointError, FileExistsError, ValueError, NotImplementedError) as e:
        # one line: multi-line messages (key listings, a device's "Fix:" line) are joined
        message = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"moevl {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE if not isinstance(e, NotImplementedError) else 3
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM/SIGHUP while an output folder was being written
        signum = getattr(e, "signum", signal.SIGINT)
        how = "interrupted" if signum == signal.SIGINT else f"interrupted by {signal.Signals(signum).name}"
        written = "; nothing was written" if args.command == "export" else ""  # exports are written atomically
        print(f"moevl {args.command}: {how}{written}", file=sys.stderr)
        return 128 + signum  # the shell's status for a process ended by that signal


if __name__ == "__main__":
    sys.exit(main())
