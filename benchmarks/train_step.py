"""Training step time with and without the frozen-tower cache (not a test):
``python -m moevl.benchmarks.train_step [--batch 64] [--repeats 6] [--threads 1] [--out DIR]``.

For each trained default (awaker-tiny, moellava-tiny), with the vision tower frozen as in the defaults build's
question stages: one batch's forward + backward built by ``make_batch`` (image decoding, the processor, the tower
every step) against the same batch from a warm ``TowerCache`` (what every epoch after the first does), interleaved in
each repeat, medians. Data: freshly generated shapes records (a temporary folder). Writes <out>/train-step-cpu.json
and .md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from moevl.benchmarks.common import RESULTS, environment, progress, write_results

PRESETS = ("awaker-tiny", "moellava-tiny")


def measure(preset: str, data: Path, batch: int, repeats: int) -> dict:
    import moevl
    from moevl.train.examples import TowerCache, loss_of, make_batch, read_records, tower_prefixes

    from moevl.train.recipe import training_kernels

    s = moevl.load(preset, device="cpu", dtype="fp32")
    m = s.model
    m.set_kernels(training_kernels())  # as the training loop (train/recipe.py)
    m.train()  # as the training loop (MoE layers keep their routing for the load-balancing loss)
    for n, p in m.named_parameters():
        p.requires_grad_(not n.startswith(tower_prefixes(m)))
    recs = read_records(data)
    cache = TowerCache(s.family, m, s.processor, 2 ** 34)
    slices = [list(range(i * batch, (i + 1) * batch)) for i in range(len(recs) // batch)]
    for keys in slices:  # the first epoch: fills the cache
        cache.batch([recs[k] for k in keys], keys)

    def plain(keys):
        b, labels = make_batch(s.family, s.processor, [recs[k] for k in keys])
        loss, _ = loss_of(s.family, m, b, labels)
        loss.backward()

    def cached(keys):
        b, labels, tower = cache.batch([recs[k] for k in keys], keys)
        loss, _ = loss_of(s.family, m, b, labels, tower)
        loss.backward()

    times = {"make_batch": [], "cache": []}
    plain(slices[0])
    cached(slices[0])
    for r in range(repeats):
        keys = slices[r % len(slices)]
        for name, fn in (("make_batch", plain), ("cache", cached)):
            t0 = time.perf_counter()
            fn(keys)
            times[name].append(time.perf_counter() - t0)
            m.zero_grad(set_to_none=True)
    if hasattr(m, "route"):  # Awaker's LoRA-MoE linears (stages 2, 3): the reference's loop vs the batched op
        import dataclasses

        from moevl.kernels import reference

        batched = training_kernels()
        looped = dataclasses.replace(batched, lora_moe_linear=reference.lora_moe_linear)
        times["cache, LoRA-MoE loop"] = []
        for r in range(repeats):
            keys = slices[r % len(slices)]
            for name, kernels in (("cache, LoRA-MoE loop", looped), ("cache", batched)):
                m.set_kernels(kernels)
                t0 = time.perf_counter()
                cached(keys)
                times[name].append(time.perf_counter() - t0)
                m.zero_grad(set_to_none=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"preset": preset, "family": s.family, "batch": batch, "repeats": repeats,
            "seconds": {k: round(v, 4) for k, v in med.items()},
            "all_seconds": {k: [round(x, 4) for x in v] for k, v in times.items()},
            "speedup": round(med["make_batch"] / med["cache"], 2),
            "cache_bytes_per_record": round(cache.bytes / max(1, len(cache.entries)))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m moevl.benchmarks.train_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the defaults build trains on one each)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from moevl.ascend.device import resolve_device
    from moevl.train.data import make_shapes

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = make_shapes(Path(tmp) / "shapes", args.batch * 4, seed=7)
        for preset in progress(len(PRESETS), "train step", PRESETS):
            rows.append(measure(preset, data, args.batch, args.repeats))
    env = environment(resolve_device("cpu"))
    md = ["# Training step: make_batch vs the frozen-tower cache (CPU)", "",
          f"Command: `{env['command']}`; torch {env['torch']}, {args.threads} thread(s). One forward + backward of "
          f"a batch of {args.batch} shapes records (the vision tower frozen, everything else trainable, as the "
          "defaults build's question stages), medians of "
          f"{args.repeats} repeats, the two variants interleaved in each. `make_batch`: decode, the processor and "
          "the tower every step (the first epoch, or no cache); `cache`: a warm `TowerCache` (every later epoch). "
          "The training kernels (`train.recipe.training_kernels`); for awaker-tiny (its LoRA-MoE linears: stages 2 "
          "and 3) also the cached step with the reference's per-request loop in place of the batched LoRA-MoE "
          "linear, interleaved with the cached step in each repeat.",
          "", "| model | make_batch (s) | cache (s) | speed-up | cache, LoRA-MoE loop (s) | cached bytes per record |",
          "|---|---|---|---|---|---|"]
    for r in rows:
        loop = r["seconds"].get("cache, LoRA-MoE loop")
        md.append(f"| {r['preset']} | {r['seconds']['make_batch']:.3f} | {r['seconds']['cache']:.3f} | "
                  f"{r['speedup']:.2f}x | {'-' if loop is None else f'{loop:.3f}'} | "
                  f"{r['cache_bytes_per_record']:,} |")
    write_results("train-step", resolve_device("cpu"), {"environment": env, "rows": rows}, "\n".join(md) + "\n",
                  Path(args.out))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
