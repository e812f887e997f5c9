"""Shared benchmark helpers: medians, memory bandwidth, result files."""
from __future__ import annotations

import datetime
import json
import os
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


def cpu_flags() -> list[str]:
    """The CPU flags that decide which kernels are fast here (MKL vs oneDNN, bf16, int8)."""
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16", "amx_bf16", "amx_int8", "amx_tile",
              "avx_vnni")
    from moevl.ascend.device import cpu_flag_set

    return [f for f in wanted if f in cpu_flag_set()]


def progress(total: int, desc: str, iterable=None, disable: bool | None = None):
    """The progress bar every benchmark shows over its rounds/configurations: tqdm on stderr (over ``iterable``
    when given), off when stderr is not a terminal (``disable=None``) so logs and captured output stay clean.
    Lines printed while it runs go through ``bar.write(line)`` so they do not tear the bar."""
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="run", file=sys.stderr, disable=disable, dynamic_ncols=True)


def _command() -> str:
    """How this process was started, as a user would type it (``python -m moevl.benchmarks.e2e --rounds 7``)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        return " ".join(["python -m", spec.name.removesuffix(".__main__")] + sys.argv[1:])
    return " ".join([Path(sys.argv[0]).name] + sys.argv[1:]) if sys.argv else ""


def cpu_line() -> str:
    """The line every report carries: which CPU, and the flags that decide its fast kernels."""
    from moevl.ascend.device import cpu_model_name

    return f"CPU: {cpu_model_name()} (flags: {', '.join(cpu_flags()) or 'none of interest'})."


def environment(device) -> dict:
    from moevl.ascend.device import cpu_model_name

    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu": cpu_model_name(), "cpu_flags": cpu_flags(),
            "command": _command(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
            "machine": platform.machine(), "device": device.describe(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(OpenMP's default)"),
            "gomp_spincount": os.environ.get("GOMP_SPINCOUNT", "(libgomp's default)"),
            "npu_note": "no NPU figures: nothing here ran on an Ascend NPU"}


def write_results(name: str, device, payload: dict, markdown: str, out: Path = RESULTS) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    tag = device.kind if device.kind != "cpu" else "cpu"
    j = out / f"{name}-{tag}.json"
    m = out / f"{name}-{tag}.md"
    if "flags" not in markdown:  # every report states the CPU and its flags (MKL vs oneDNN, bf16, int8 differ)
        markdown = markdown.rstrip("\n") + "\n\n" + cpu_line() + "\n"
    j.write_text(json.dumps(payload, indent=2))
    m.write_text(markdown)
    return j, m
