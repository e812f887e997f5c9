"""The training loop every stage shares: AdamW over the parameters a stage trains, warm-up + cosine schedule, a
tqdm progress bar, a JSONL loss log, a PNG loss plot, and an atomic resumable state.

Determinism: the order of the records is a function of (seed, epoch) only and the networks have no dropout, so a
run interrupted and resumed (``resume=True``) ends with the same weights as one that was not.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path

import torch

from moevl.train.examples import Record, TowerCache, loss_of, make_batch, tower_prefixes

STATE = "state.pt"
LOSS_LOG = "loss.jsonl"
LOSS_PLOT = "loss.png"


@dataclasses.dataclass
class TrainSettings:
    steps: int | None = None        # total optimizer steps (wins over epochs)
    epochs: float = 1.0
    lr: float = 1e-3
    batch_size: int = 16
    seed: int = 0
    warmup: float = 0.05            # fraction of the steps
    weight_decay: float = 0.0
    aux_coef: float = 0.01          # MoE-LLaVA's load-balancing loss coefficient (the original's 0.01)
    grad_clip: float = 1.0
    checkpoint_every: int = 50      # steps between saved states (for --resume)
    autocast: torch.dtype | None = None  # bf16 on chips that prefer it
    tower_cache_mb: int = 4096      # a frozen vision tower's output kept per record (TowerCache); 0: none
    loss_average: str = "token"     # "token" or "record" (moevl.train.examples.loss_of)

    def total_steps(self, n_records: int) -> int:
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil(self.epochs * n_records / self.batch_size))


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """The records of optimizer step ``step``: consecutive slices of a per-epoch permutation seeded by (seed, epoch)."""
    per_epoch = max(1, n // batch_size)
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return perm[k * batch_size:(k + 1) * batch_size].tolist()


def lr_at(step: int, total: int, s: TrainSettings) -> float:
    warm = max(1, int(s.warmup * total))
    if step < warm:
        return s.lr * (step + 1) / warm
    frac = (step - warm) / max(1, total - warm)
    return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def save_state(path: Path, state: dict) -> None:
    """torch.save to a temporary file, then rename: an interruption leaves the previous state whole."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def train(family: str, model, processor, records: list[Record], params: dict[str, torch.nn.Parameter],
          settings: TrainSettings, work: Path, resume: bool = False, device=None, desc: str = "train",
          progress: bool = True, step_loss=None) -> list[dict]:
    """Train ``params`` (name -> parameter; every other parameter is frozen) on ``records``.

    ``step_loss``: records -> (loss, auxiliary loss) in place of the language-model loss on the answers (the vision
    stage's probes).

    ``work``: the folder for the resumable state and the loss log. -> the loss log's rows.
    """
    from tqdm import tqdm

    work.mkdir(parents=True, exist_ok=True)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(list(params.values()), lr=settings.lr, weight_decay=settings.weight_decay,
                            betas=(0.9, 0.98))
    total = settings.total_steps(len(records))
    start, log = 0, []
    state_path = work / STATE
    if resume and state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        if sorted(state["params"]) != sorted(params) or state["total"] != total:
            raise ValueError(f"{state_path} belongs to another run (other parameters or step count): remove "
                             f"{work} or run without --resume")
        with torch.no_grad():
            for name, t in state["params"].items():
                params[name].copy_(t)
        opt.load_state_dict(state["optimizer"])
        start, log = state["step"], state["log"]
    dev = device.torch_device if device is not None else torch.device("cpu")
    cache = None
    if step_loss is None and settings.tower_cache_mb > 0 and not any(n.startswith(tower_prefixes(model))
                                                                     for n in params):
        cache = TowerCache(family, model, processor, settings.tower_cache_mb * 2 ** 20)
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(range(start, total), initial=start, total=total, desc=desc, disable=not progress, dynamic_ncols=True)
    with open(work / LOSS_LOG, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in log)  # a resumed run's rows up to its saved state
        for step in bar:
            keys = batch_indices(len(records), settings.batch_size, settings.seed, step)
            chosen = [records[i] for i in keys]
            lr = lr_at(step, total, settings)
            for g in opt.param_groups:
                g["lr"] = lr
            with torch.autocast(dev.type, dtype=settings.autocast, enabled=settings.autocast is not None):
                if step_loss is not None:
                    lm, aux = step_loss(chosen)
                elif cache is not None:
                    batch, labels, tower = cache.batch(chosen, keys)
                    lm, out = loss_of(family, model, batch.to(dev), labels.to(dev), tower.to(dev),
                                      average=settings.loss_average)
                    aux = out.aux_loss
                else:
                    batch, labels = make_batch(family, processor, chosen)
                    lm, out = loss_of(family, model, batch.to(dev), labels.to(dev),
                                      average=settings.loss_average)
                    aux = out.aux_loss
                loss = lm + settings.aux_coef * aux
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if settings.grad_clip:
                torch.nn.utils.clip_grad_norm_(list(params.values()), settings.grad_clip)
            opt.step()
            row = {"step": step + 1, "loss": round(loss.item(), 6), "lm_loss": round(lm.item(), 6),
                   "aux_loss": round(aux.item(), 6), "lr": lr,
                   "seconds": round(time.perf_counter() - t0, 2)}
            log.append(row)
            f.write(json.dumps(row) + "\n")
            f.flush()
            bar.set_postfix(loss=f"{row['loss']:.4f}")
            if (step + 1) % settings.checkpoint_every == 0 and step + 1 < total:
                save_state(state_path, {"params": {k: v.detach().cpu().clone() for k, v in params.items()},
                                        "optimizer": opt.state_dict(), "step": step + 1, "total": total,
                                        "log": log})
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    plot_losses(log, work / LOSS_PLOT, desc)
    return log


def plot_losses(log: list[dict], path: Path, title: str) -> Path | None:
    """The loss curve as a PNG (matplotlib, the ``train`` extra); None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    steps = [r["step"] for r in log]
    ax.plot(steps, [r["loss"] for r in log], lw=0.8, label="loss")
    if any(r.get("aux_loss") for r in log):
        ax.plot(steps, [r["aux_loss"] for r in log], lw=0.8, label="load-balancing loss")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
