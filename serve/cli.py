"""``moevl serve``: the OpenAI-compatible server (uvicorn), or with ``--ray`` the same app on Ray Serve."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _need(module: str, extra: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise NotImplementedError(f"{module} is not installed: pip install 'moevl-ascend[{extra}]'")


def config_from_args(args):
    from moevl.serve.app import ServerConfig

    for name in ("max_batch", "port", "replicas"):
        v = getattr(args, name)
        if v is not None and v < (0 if name == "port" else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be >= {0 if name == 'port' else 1}, not {v}")
    if args.max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, not {args.max_queue}")
    if args.allowed_media_dir is not None and not Path(args.allowed_media_dir).is_dir():
        raise ValueError(f"--allowed-media-dir {args.allowed_media_dir} is not a folder: create it or fix the path")
    if args.max_context is not None and args.max_context < 2:
        raise ValueError(f"--max-context must be >= 2 tokens, not {args.max_context}")
    if args.api_key is not None and not args.api_key.strip():
        raise ValueError("--api-key is empty: give a key, or leave the option out for no authentication")
    options = {"routing": args.routing, "moe_routing": args.moe_routing, "vision_tower": args.vision_tower}
    return ServerConfig(model=args.model, device=args.device, backend=args.backend, dtype=args.dtype,
                        max_batch=args.max_batch, max_queue=args.max_queue, max_context=args.max_context,
                        api_key=args.api_key, allowed_media_dir=args.allowed_media_dir,
                        served_model_name=args.served_model_name, shutdown_timeout=args.shutdown_timeout,
                        load_options={k: v for k, v in options.items() if v is not None})


def cmd_serve(args) -> int:
    _need("fastapi", "serve")
    _need("uvicorn", "serve")
    _need("prometheus_client", "serve")
    cfg = config_from_args(args)
    _check_model(cfg)
    if args.ray:
        _need("ray", "ray")
        from moevl.serve.ray_app import run_ray

        return run_ray(cfg, replicas=args.replicas, host=args.host, port=args.port, address=args.ray_address)
    import uvicorn

    from moevl.serve.app import Server, create_app

    limit_malloc_arenas()
    server = Server(cfg)
    app = create_app(server=server)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                            timeout_graceful_shutdown=int(cfg.shutdown_timeout) or None)
    userver = uvicorn.Server(config)
    server.on_error = lambda: setattr(userver, "should_exit", True)
    print(f"moevl serve: {cfg.name} on http://{args.host}:{args.port}/v1 (loading; GET /health says when ready)",
          file=sys.stderr)
    userver.run()
    if server.error:
        print(f"moevl serve: error: the model could not be loaded: {server.error}", file=sys.stderr)
        return 2 if isinstance(server.exception, (ValueError, NotImplementedError)) else 1
    return 0


M_ARENA_MAX = -8  # glibc's mallopt parameter (malloc.h)


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas for the server process unless ``MALLOC_ARENA_MAX`` is set: with the default (8 per
    core) the RSS drifts up and down by tens of MB under load as each thread's arena keeps freed memory; with 2 it is
    flat (``python -m moevl.benchmarks.serve_rss``, benchmarks/results/serve-rss-*.md). -> whether it was applied
    (not on other C libraries, or when the environment already says)."""
    import ctypes
    import ctypes.util
    import os

    if os.environ.get("MALLOC_ARENA_MAX"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if not hasattr(libc, "gnu_get_libc_version"):  # musl, macOS: no such knob
            return False
        return bool(libc.mallopt(M_ARENA_MAX, arenas))
    except OSError:
        return False


def _check_model(cfg) -> None:
    """A --model that names nothing loadable fails here, in one line, before the server starts."""
    if cfg.backend != "torch":
        if not Path(cfg.model).is_dir():
            raise ValueError(f"--model {cfg.model} is not a folder: --backend {cfg.backend} serves an exported folder")
        return
    from moevl.ascend.device import resolve_device
    from moevl.model.family import family_of

    family_of(cfg.model)  # ValueError naming the problem
    resolve_device(cfg.device, cfg.dtype)  # DeviceError naming a bad --device / --dtype


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="an OpenAI-compatible server (continuous batching; Ray Serve with --ray)",
                              description="Serve a model over HTTP: POST /v1/chat/completions, GET /v1/models, "
                                          "GET /health, GET /metrics (needs the 'serve' extra).")
    p.add_argument("--model", required=True, help="a preset (awaker-tiny, moellava-tiny) or a checkpoint folder "
                                                  "(--backend ort/om: an exported folder)")
    p.add_argument("--device", default="auto", help="auto (default) | cpu | cuda | npu[:N]")
    p.add_argument("--backend", default="torch", choices=["torch", "ort", "om"],
                   help="torch: continuous batching; ort/om: one request at a time (request-level)")
    p.add_argument("--dtype", default=None, help="fp32 | fp16 | bf16 (default: the device's)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together (KV cache rows; default 8)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting beyond the running batch before 429 (default 64)")
    p.add_argument("--max-context", type=int, default=None,
                   help="tokens per request, prompt + answer (default: the model's, at most 4096); the KV cache "
                        "is preallocated for --max-batch x this")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    p.add_argument("--allowed-media-dir", default=None, help="allow file:// image URLs under this folder")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: --model's name)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds running requests get to finish at shutdown before they are cancelled")
    p.add_argument("--routing", default=None, choices=["prefill", "legacy"], help="Awaker: routing mode")
    p.add_argument("--moe-routing", default=None, choices=["deterministic"],
                   help="MoE-LLaVA: deterministic top-2 (deepspeed's noisy routing cannot be batched per request)")
    p.add_argument("--vision-tower", default=None, help="MoE-LLaVA: local CLIP/SigLIP folder")
    p.add_argument("--ray", action="store_true", help="run as a Ray Serve deployment (needs the 'ray' extra)")
    p.add_argument("--replicas", type=int, default=None,
                   help="--ray: replicas (default: autoscale 1..number of devices)")
    p.add_argument("--ray-address", default=None, help="--ray: an existing cluster (ray start --head), e.g. auto")
    p.set_defaults(func=cmd_serve)
    return p
