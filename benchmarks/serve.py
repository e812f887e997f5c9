"""Serving benchmark: 1, 4, 16 and 64 concurrent streaming clients on loopback against ``moevl serve``.

    python -m moevl.benchmarks.serve                      # the awaker-tiny default
    python -m moevl.benchmarks.serve --config 7b          # 7B width, 2 decoder layers (~8 GB + plans, fp32)

The server runs in a subprocess (this module with --serve-config), so its RSS is its own; the clients are asyncio
+ httpx streams in this process. Per level: requests/s, output tokens/s, time to first token and end-to-end
p50/p99, errors; the server's RSS before the first level and after the last (no growth over 1,000 requests).
Clients and server share this machine's cores, so the figures are a lower bound on what the server alone does.
Results: benchmarks/results/serve-cpu.{json,md}.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

LEVELS = (1, 4, 16, 64)
QUESTIONS = ["What is in the picture?", "Describe the image in detail.", "这是什么？", "图片里有几个形状？",
             "Where is the triangle?", "Count the shapes."]


# ------------------------------------------------------------------------------------------ the server side
def build_7b_session(layers: int = 2):
    """benchmarks/e2e.py's 7B-width Awaker (random weights, r=256 adapters, fp32 on the CPU) with the tiny
    preset's tokenizer and image processor (its token ids moved into the 7B config)."""
    from moevl.ascend.device import resolve_device
    from moevl.benchmarks.e2e import build_ours
    from moevl.model.awaker.config import AdapterConfig, awaker_7b_width, awaker_tiny
    from moevl.model.awaker.inputs import AwakerProcessor
    from moevl.model.awaker.session import AwakerSession
    from moevl.model.awaker.tiny import TINY_TOKENIZER

    device = resolve_device("cpu", "fp32")
    cfg = awaker_7b_width(num_layers=layers)
    cfg.adapters = AdapterConfig(num_experts=4, rank=256, alpha=512.0)
    tiny = awaker_tiny()
    for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
                 "im_start_token_id", "im_end_token_id", "eos_token_ids", "pad_token_id"):
        setattr(cfg, name, getattr(tiny, name))
    model = build_ours(cfg, device)
    session = AwakerSession(model, AwakerProcessor.from_folder(TINY_TOKENIZER, cfg), device, max_context=1024)
    session.tokenizer = WrappingTokenizer(session.tokenizer)
    return session


class WrappingTokenizer:
    """Decodes ids beyond the tiny tokenizer's vocabulary (the 7B-width model samples from 152,064) modulo its
    size, so that every generated token streams some text and time to first token means what it says."""

    def __init__(self, inner):
        self.inner = inner
        self.size = len(inner)

    def decode(self, ids, skip_special_tokens=True):
        return self.inner.decode([i % self.size for i in ids], skip_special_tokens=skip_special_tokens)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def serve_main(config: str, port: int, max_batch: int, max_queue: int) -> int:
    import uvicorn

    from moevl.serve.app import Server, ServerConfig, create_app

    cfg = ServerConfig("awaker-tiny" if config == "tiny" else "awaker-7b-width", device="cpu", dtype="fp32",
                       max_batch=max_batch, max_queue=max_queue, max_context=1024, served_model_name=config)
    session = build_7b_session() if config == "7b" else None
    server = Server(cfg, session=session)
    uvicorn.run(create_app(server=server), host="127.0.0.1", port=port, log_level="warning")
    return 0


# ------------------------------------------------------------------------------------------ the client side
def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentile(xs, q):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
    return xs[k]


def request_body(model: str, i: int, image_url: str, max_tokens: int) -> dict:
    q = QUESTIONS[i % len(QUESTIONS)]
    content = [{"type": "text", "text": q}]
    if i % 2 == 0:
        content.insert(0, {"type": "image_url", "image_url": {"url": image_url}})
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
            "ignore_eos": True}  # every answer max_tokens long, whatever the weights


async def one_request(client, url, body):
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return {"error": f"HTTP {r.status_code}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"error": chunk["error"]["message"]}
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content") and ttft is None:
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"ttft": ttft if ttft is not None else time.perf_counter() - t0, "e2e": time.perf_counter() - t0,
            "tokens": tokens}


async def run_level(url, model, clients, requests, image_url, max_tokens):
    import httpx

    results = []
    counter = iter(range(requests))
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def worker():
            for i in counter:
                try:
                    results.append(await one_request(client, url, request_body(model, i, image_url, max_tokens)))
                except Exception as e:  # noqa: BLE001  counted as an error
                    results.append({"error": repr(e)})

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    tokens = sum(r["tokens"] for r in ok)
    return {"clients": clients, "requests": len(results), "errors": len(results) - len(ok),
            "error_examples": [r["error"] for r in results if "error" in r][:3], "wall_s": round(wall, 3),
            "requests_per_s": len(ok) / wall, "output_tokens_per_s": tokens / wall, "output_tokens": tokens,
            "ttft_p50_ms": 1000 * percentile([r["ttft"] for r in ok], 50),
            "ttft_p99_ms": 1000 * percentile([r["ttft"] for r in ok], 99),
            "e2e_p50_ms": 1000 * percentile([r["e2e"] for r in ok], 50),
            "e2e_p99_ms": 1000 * percentile([r["e2e"] for r in ok], 99)}


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_ready(url: str, proc, timeout: float) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the server was not ready within {timeout} s")


def bench_config(config: str, levels, requests, max_tokens: int, max_batch: int, max_queue: int,
                 repeat_last: int = 0) -> dict:
    from moevl.benchmarks.common import progress
    from moevl.model.tiny import DEMO_IMAGE

    image_url = "data:image/png;base64," + base64.b64encode(DEMO_IMAGE.read_bytes()).decode()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "moevl.benchmarks.serve", "--serve-config", config, "--port", str(port),
           "--max-batch", str(max_batch), "--max-queue", str(max_queue)]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        wait_ready(url, proc, 1800)
        asyncio.run(run_level(url, config, 2, 4, image_url, 4))  # warm-up
        rss_before = rss_mb(proc.pid)
        out = []
        bar = progress(min(len(levels), len(requests)) + repeat_last, f"serve {config} levels")
        for clients, n in zip(levels, requests):
            bar.write(f"[{config}] {clients} clients, {n} requests ...")
            r = asyncio.run(run_level(url, config, clients, n, image_url, max_tokens))
            r["server_rss_mb_after"] = round(rss_mb(proc.pid), 1)
            bar.update()
            bar.write(f"  {r['output_tokens_per_s']:.1f} tok/s, {r['requests_per_s']:.2f} req/s, "
                      f"TTFT p50 {r['ttft_p50_ms']:.0f} ms, errors {r['errors']}")
            out.append(r)
        rss_after = rss_mb(proc.pid)
        repeats = []  # the last level again: does the RSS keep growing, or was it the first taste of that load?
        for _ in range(repeat_last):
            r = asyncio.run(run_level(url, config, levels[-1], requests[-1], image_url, max_tokens))
            repeats.append({"requests": r["requests"], "errors": r["errors"],
                            "output_tokens_per_s": r["output_tokens_per_s"], "server_rss_mb_after": rss_mb(proc.pid)})
            bar.update()
        bar.close()
    finally:
        proc.terminate()
        proc.wait(60)
    one = next((r for r in out if r["clients"] == 1), None)
    sixteen = next((r for r in out if r["clients"] == 16), None)
    speedup = (sixteen["output_tokens_per_s"] / one["output_tokens_per_s"]) if one and sixteen else None
    return {"levels": out, "server_rss_mb_before": round(rss_before, 1), "server_rss_mb_after": round(rss_after, 1),
            "requests_total": sum(r["requests"] for r in out), "speedup_16_vs_1": speedup,
            "repeats_of_last_level": repeats,
            "max_tokens": max_tokens, "max_batch": max_batch, "max_queue": max_queue}


def markdown(payload) -> str:
    lines = ["# Serving benchmark (CPU)", "",
             f"{payload['cpu']}; torch {payload['environment']['torch']}, "
             f"{payload['environment']['threads']} threads. Measured under shared load (other jobs ran on this "
             "machine at the same time; the clients ran on the same cores as the server): a lower bound.", ""]
    for name, res in payload["configs"].items():
        lines += [f"## {name}", "", f"`{res.get('command', payload['environment']['command'])}`", "",
                  f"max_tokens {res['max_tokens']}, --max-batch {res['max_batch']}, --max-queue {res['max_queue']}; "
                  f"server RSS {res['server_rss_mb_before']:.0f} MB before, {res['server_rss_mb_after']:.0f} MB "
                  f"after {res['requests_total']} requests.", "",
                  "| clients | requests | errors | req/s | output tok/s | TTFT p50 / p99 (ms) | e2e p50 / p99 (ms) "
                  "| server RSS after (MB) |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in res["levels"]:
            lines.append(f"| {r['clients']} | {r['requests']} | {r['errors']} | {r['requests_per_s']:.2f} | "
                         f"{r['output_tokens_per_s']:.1f} | {r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} | "
                         f"{r['e2e_p50_ms']:.0f} / {r['e2e_p99_ms']:.0f} | {r.get('server_rss_mb_after', float('nan')):.0f} |")
        for k, r in enumerate(res.get("repeats_of_last_level", [])):
            lines += ["", f"Last level again (repeat {k + 1}): {r['requests']} requests, {r['errors']} errors, "
                          f"{r['output_tokens_per_s']:.1f} tok/s, server RSS after {r['server_rss_mb_after']:.0f} MB."]
        if res["speedup_16_vs_1"]:
            lines += ["", f"Output tokens/s at 16 clients = {res['speedup_16_vs_1']:.1f}x one client."]
        lines.append("")
    if payload.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in payload["notes"]] + [""]
    return "\n".join(lines)


def cpu_model() -> str:
    """The CPU model, cores and the SIMD flags that matter for GEMV/GEMM speed."""
    name, flags = "unknown CPU", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                flags = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
                         if f in have]
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores, flags {' '.join(flags) or 'none of avx2/avx512/amx'}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moevl.benchmarks.serve", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="tiny", choices=["tiny", "7b", "both"])
    ap.add_argument("--levels", default=",".join(map(str, LEVELS)), help="concurrent clients per level")
    ap.add_argument("--requests", default=None,
                    help="requests per level, comma-separated (default tiny: 60,120,300,520 = 1,000; 7b: 4,8,32,64)")
    ap.add_argument("--max-tokens", type=int, default=None, help="tokens per answer (default tiny 32, 7b 16)")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-queue", type=int, default=128)
    ap.add_argument("--repeat-last", type=int, default=None,
                    help="run the last level again this many times, RSS after each (default tiny 2, 7b 0)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--serve-config", default=None, help=argparse.SUPPRESS)  # the server subprocess
    ap.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve_config:
        return serve_main(args.serve_config, args.port, args.max_batch, args.max_queue)

    import torch

    from moevl.ascend.device import resolve_device
    from moevl.benchmarks.common import RESULTS, environment, write_results

    levels = [int(x) for x in args.levels.split(",")]
    configs = ["tiny", "7b"] if args.config == "both" else [args.config]
    env = environment(resolve_device("cpu", "fp32"))
    env["command"] = " ".join(["python -m moevl.benchmarks.serve", *(argv if argv is not None else sys.argv[1:])])
    payload = {"environment": env, "cpu": cpu_model(),
               "shared_load": True, "configs": {},
               "notes": ["The 7B-width model has random weights and the tiny preset's tokenizer; answers are noise, "
                         "only speed is measured.", "No NPU or GPU figures: everything ran on this CPU.",
                         "`transformers serve` (transformers 5.24) is not compared: it loads Qwen2-VL through "
                         "AutoProcessor, whose Qwen2VLVideoProcessor requires torchvision, which is not installed "
                         "beside the torch 2.13 CPU wheel here (ImportError at load).",
                         "A joining request is prefilled between decode steps (no chunked prefill): at 7B width each "
                         "prefill stalls the running batch for seconds, so time to first token grows with the queue. "
                         "Under this machine's shared load the same command has given up to 2x different figures "
                         "from one run to the next."]}
    out = Path(args.out) if args.out else RESULTS
    previous = out / "serve-cpu.json"
    if previous.exists():  # keep the other config's figures from an earlier run
        try:
            payload["configs"].update(json.loads(previous.read_text()).get("configs", {}))
        except ValueError:
            pass
    for config in configs:
        default_requests = "60,120,300,520" if config == "tiny" else "4,8,32,64"
        requests = [int(x) for x in (args.requests or default_requests).split(",")]
        max_tokens = args.max_tokens or (32 if config == "tiny" else 16)
        name = ("awaker-tiny" if config == "tiny" else "awaker 7B width, 2 layers") + f", {max_tokens}-token answers"
        repeat = args.repeat_last if args.repeat_last is not None else (2 if config == "tiny" else 0)
        payload["configs"][name] = bench_config(config, levels, requests, max_tokens, args.max_batch,
                                                args.max_queue, repeat)
        payload["configs"][name]["torch_threads"] = torch.get_num_threads()
        payload["configs"][name]["command"] = env["command"]
        out.mkdir(parents=True, exist_ok=True)
        previous.write_text(json.dumps(payload, indent=2))  # what is measured is kept, whatever happens next
    j, m = write_results("serve", resolve_device("cpu", "fp32"), payload, markdown(payload), out)
    print(f"wrote {j} and {m}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
