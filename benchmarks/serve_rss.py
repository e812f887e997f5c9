"""Does the server's memory grow with the requests it serves? ``python -m moevl.benchmarks.serve_rss [--waves 6]
[--requests 300] [--clients 16] [--max-tokens 16]`` (also ``moevl bench serve_rss``).

The awaker-tiny server runs in a thread of this process; after a warm-up of 200 requests, waves of streaming
requests (half with the demo image) are sent through loopback, and after each wave the process's RSS is read and
(with ``--tracemalloc``) the Python heap traced. Run it twice, with and without ``MALLOC_ARENA_MAX=2`` in the
environment, to tell the Python heap, glibc's per-thread malloc arenas and a real leak apart. Writes
serve-rss-<device>.json / .md. Not a test: the machine is shared, figures are noisy.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import os
import sys
import tracemalloc

import torch


def measure(waves: int, requests: int, clients: int, max_tokens: int, trace: bool) -> dict:
    from moevl.benchmarks.common import progress
    from moevl.benchmarks.serve import rss_mb, run_level
    from moevl.model.tiny import DEMO_IMAGE
    from moevl.serve.app import ServerConfig, ThreadedServer, create_app

    image_url = "data:image/png;base64," + base64.b64encode(DEMO_IMAGE.read_bytes()).decode()
    cfg = ServerConfig("awaker-tiny", device="cpu", dtype="fp32", max_batch=16, max_queue=128, max_context=1024,
                       served_model_name="tiny")
    rows = []
    with ThreadedServer(create_app(cfg)) as srv:
        asyncio.run(run_level(srv.url, "tiny", clients, 200, image_url, max_tokens))  # warm-up
        gc.collect()
        if trace:
            tracemalloc.start()
        base = rss_mb(os.getpid())
        for wave in progress(waves, "serve_rss waves", range(waves)):
            r = asyncio.run(run_level(srv.url, "tiny", clients, requests, image_url, max_tokens))
            gc.collect()
            rows.append({"wave": wave + 1, "requests_total": (wave + 1) * requests, "errors": r["errors"],
                         "rss_mb": round(rss_mb(os.getpid()), 1),
                         "python_heap_mb": round(tracemalloc.get_traced_memory()[0] / 1e6, 3) if trace else None})
    return {"rss_mb_after_warmup": round(base, 1), "waves": rows,
            "malloc_arena_max": os.environ.get("MALLOC_ARENA_MAX")}


def main(argv=None) -> int:
    from moevl.ascend.device import resolve_device
    from moevl.benchmarks.common import environment, write_results

    ap = argparse.ArgumentParser(prog="python -m moevl.benchmarks.serve_rss", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--waves", type=int, default=6)
    ap.add_argument("--requests", type=int, default=300, help="requests per wave")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--tracemalloc", action="store_true", help="also trace the Python heap (slower)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the clients share the process)")
    ap.add_argument("--tag", default=None, help="suffix of the result files (e.g. arena2)")
    args = ap.parse_args(argv)
    if min(args.waves, args.requests, args.clients, args.max_tokens) < 1:
        print("serve_rss: --waves, --requests, --clients and --max-tokens must be >= 1", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    res = measure(args.waves, args.requests, args.clients, args.max_tokens, args.tracemalloc)
    rss = [w["rss_mb"] for w in res["waves"]]
    lines = ["# Server memory over many requests (CPU)", "", f"`{environment(resolve_device('cpu'))['command']}`"
             f" (MALLOC_ARENA_MAX={res['malloc_arena_max'] or 'unset'})", "",
             f"awaker-tiny, {args.clients} streaming clients, {args.max_tokens}-token answers, half with an image; "
             f"RSS {res['rss_mb_after_warmup']:.0f} MB after a 200-request warm-up.", "",
             "| wave | requests so far | errors | RSS (MB) | Python heap (MB) |", "|---|---|---|---|---|"]
    for w in res["waves"]:
        heap = "-" if w["python_heap_mb"] is None else f"{w['python_heap_mb']:.3f}"
        lines.append(f"| {w['wave']} | {w['requests_total']} | {w['errors']} | {w['rss_mb']:.0f} | {heap} |")
    lines += ["", f"RSS range over the waves: {min(rss):.0f}-{max(rss):.0f} MB; last minus first wave "
              f"{rss[-1] - rss[0]:+.0f} MB."]
    name = "serve-rss" + (f"-{args.tag}" if args.tag else "")
    j, m = write_results(name, resolve_device("cpu"), {"env": environment(resolve_device("cpu")), **res,
                                                       "settings": vars(args)}, "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {j} and {m}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
