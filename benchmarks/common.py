"""Shared benchmark helpers: medians, memory bandwidth, result files."""
from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


class NoTokenizer:
    """Benchmarks feed token ids directly: generation's text decoding is a no-op."""

    def decode(self, ids, skip_special_tokens=True):
        return ""


class NoProcessor:
    tokenizer = NoTokenizer()


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def read_bandwidth_gbs(nbytes: int = 1 << 30, repeats: int = 5) -> dict:
    """Read bandwidth of this machine in GB/s, two ways, medians over repeats on a 1 GiB fp32 tensor:
    ``sum`` (a plain reduction: close to what the memory system gives) and ``gemv`` (a matrix-vector product,
    which is what a decode step does with each weight; torch's fp32 GEMV reaches well below ``sum`` here)."""
    w = torch.ones(nbytes // 4 // 4096, 4096, dtype=torch.float32)
    x = torch.ones(4096, dtype=torch.float32)
    out = {}
    for name, op in (("gemv", lambda: torch.mv(w, x)), ("sum", lambda: w.sum())):
        op()  # touch
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            op()
            times.append(time.perf_counter() - t)
        out[name] = nbytes / median(times) / 1e9
    del w
    return out


def environment(device) -> dict:
    return {"command": " ".join(["python -m", sys.argv[0].replace("/", ".").removesuffix(".py")] + sys.argv[1:])
            if sys.argv and sys.argv[0].endswith(".py") else " ".join(sys.argv),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
            "machine": platform.machine(), "device": device.describe(),
            "npu_note": "no NPU figures: nothing here ran on an Ascend NPU"}


def write_results(name: str, device, payload: dict, markdown: str, out: Path = RESULTS) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    tag = device.kind if device.kind != "cpu" else "cpu"
    j = out / f"{name}-{tag}.json"
    m = out / f"{name}-{tag}.md"
    j.write_text(json.dumps(payload, indent=2))
    m.write_text(markdown)
    return j, m
