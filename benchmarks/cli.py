"""``moevl bench <name> [args...]``: runs ``python -m moevl.benchmarks.<name>`` in-process."""
from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {"kernels": "moevl.benchmarks.kernels", "e2e": "moevl.benchmarks.e2e", "ort": "moevl.benchmarks.ort",
              "e2e_moellava": "moevl.benchmarks.e2e_moellava", "lora_kernel": "moevl.benchmarks.lora_kernel",
              "quality": "moevl.benchmarks.quality", "quant": "moevl.benchmarks.quant",
              "serve": "moevl.benchmarks.serve", "serve_rss": "moevl.benchmarks.serve_rss",
              "report": "moevl.benchmarks.report", "train_step": "moevl.benchmarks.train_step"}


def run_bench(args) -> int:
    try:
        mod = importlib.import_module(BENCHMARKS[args.name])
    except ModuleNotFoundError as e:
        if e.name == BENCHMARKS[args.name]:
            raise NotImplementedError(f"benchmark {args.name!r} is not part of this build yet") from e
        raise
    return mod.main(args.rest)


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="run a benchmark (kernels | e2e | e2e_moellava | ort | lora_kernel | "
                              "quality | quant | serve), or `report` (one summary table from their results); extra "
                              "args go to it")
    p.add_argument("name", choices=sorted(BENCHMARKS))
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the benchmark (see --help of each)")
    p.set_defaults(func=run_bench)
    return p
