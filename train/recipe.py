"""The training stages (``moevl train --stage ...``): what each stage starts from, which weights it trains, and what
it writes.

  vision  the vision tower (+ Awaker's merger / MoE-LLaVA's projector) pretrained on the shapes data set's scene
       annotations by dense linear probes (``moevl.train.vision``): the stand-in for the pretrained ViT / CLIP the
       originals start from; the language model is untouched;
  0    every weight trained (a base from scratch; the built-in defaults' first stage: no Qwen2-VL here);
       ``StageOptions.freeze_vision``: the tower frozen (its merger / projector still trained), as LLaVA keeps a
       pretrained tower;
  1    Awaker: ONE LoRA on the frozen base, made with peft (q/k/v/o/gate/up/down of the decoder); written merged in
       the kit's format, and as a standard peft adapter folder (``peft_adapter/``);
  2    Awaker: every task expert and the global expert initialised from the stage-1 LoRA (o/gate/up/down; q/k/v
       stay merged), routers added; experts + routers trained;
  3    Awaker: routers frozen, experts trained (also the recipe for fine-tuning on one's own data);
  moe  MoE-LLaVA's MoE-tuning: a dense model's FFN copied into every expert of the MoE layers, top-2 routing
       trained with the load-balancing loss (coefficient 0.01, as the original), dropless; the FFNs and routers
       are trained, the rest frozen.

Every stage writes the kit's own format (loads with ``moevl run``) plus ``loss.jsonl``, ``loss.png`` and
``train.json``; its resumable state lives beside the output in ``.<out>.train/`` until the stage completes.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch

from moevl.model.checkpoint import CHECKPOINT, check_output_folder
from moevl.train.examples import LOSS_AVERAGES, has_moe_layers, read_records, routes_per_request, tower_prefixes
from moevl.train.loop import LOSS_LOG, LOSS_PLOT, TrainSettings, train

STAGES = ("vision", "0", "1", "2", "3", "moe")
PEFT_FOLDER = "peft_adapter"
TRAIN_INFO = "train.json"


@dataclasses.dataclass
class StageOptions:
    lora_rank: int = 8
    lora_alpha: float = 16.0
    experts: int = 4               # Awaker task experts (the global expert comes on top); MoE-LLaVA experts
    moe_layers: tuple[int, ...] | None = None  # MoE-LLaVA: None = every other layer from 0 (the original's "sparse")
    router_init_std: float = 1.0   # router weights ~ N(0, std^2 / hidden): logits of order 1 on normalised inputs
    freeze_vision: bool = False    # stage 0: keep a pretrained tower (stage vision) as it is


def work_folder(out: Path) -> Path:
    return out.with_name(f".{out.name}.train")


def run_stage(model: str | Path, data: str | Path, stage: str, out: str | Path, device="cpu",
              settings: TrainSettings | None = None, options: StageOptions | None = None, resume: bool = False,
              force: bool = False, progress: bool = True, records=None, log=print) -> Path:
    """One stage of the recipe: ``model`` (preset or folder) trained on ``data`` (a data set's JSON, or a list of
    them) -> the kit's format in ``out``."""
    from moevl.ascend.device import resolve_device
    from moevl.model.family import load_torch

    settings = settings or TrainSettings()
    options = options or StageOptions()
    if str(stage) not in STAGES:
        raise ValueError(f"--stage must be one of {', '.join(STAGES)}, not {stage!r}")
    if settings.loss_average not in LOSS_AVERAGES:
        raise ValueError(f"--loss-average must be one of {', '.join(LOSS_AVERAGES)}, not {settings.loss_average!r}")
    stage = str(stage)
    out = Path(out)
    check_output_folder(out, CHECKPOINT, force)  # before minutes of work
    several = isinstance(data, (list, tuple))  # several data sets: their records in that order
    if records is None:
        records = [r for d in data for r in read_records(d)] if several else read_records(data)
    dev = resolve_device(device) if isinstance(device, str) else device
    session = load_torch(model, dev, torch.float32)
    family, m, processor = session.family, session.model, session.processor
    if dev.preferred_dtype == torch.bfloat16 and dev.torch_device.type != "cpu" and settings.autocast is None:
        settings = dataclasses.replace(settings, autocast=torch.bfloat16)
    m = m.to(dev.torch_device)
    m.set_kernels(training_kernels())

    peft_model = None
    step_loss = None
    if stage == "vision":
        from moevl.train import vision

        vision.check_records(records, data)
        params = vision.vision_params(m)
        heads = vision.probes(m.cfg.hidden_size).to(dev.torch_device)
        params.update({f"probe.{n}": p for n, p in heads.named_parameters()})
        step_loss = vision.make_step_loss(m, processor, heads, dev.torch_device)
    elif stage == "0":
        params = dict(m.named_parameters())
        if options.freeze_vision:
            params = {n: p for n, p in params.items() if not n.startswith(tower_prefixes(m))}
    elif stage == "1":
        _need(routes_per_request(m), f"--stage 1 is Awaker's recipe; {model} is a {family} model (use --stage moe)")
        _need(not m.has_adapters, f"{model} already has LoRA-MoE adapters: stage 1 starts from a base without them "
                                  "(use --stage 3 to fine-tune the experts)")
        from moevl.train import peft_interop

        peft_model = peft_interop.wrap(m, peft_interop.lora_config(options.lora_rank, options.lora_alpha))
        params = {n: p for n, p in m.named_parameters() if "lora_" in n}
    elif stage == "2":
        _need(routes_per_request(m), f"--stage 2 is Awaker's recipe; {model} is a {family} model")
        m = experts_from_lora(m, Path(model) / PEFT_FOLDER, options)
        params = {n: p for n, p in m.named_parameters() if n.endswith(("lora_A", "lora_B")) or ".router." in n}
    elif stage == "3":
        _need(routes_per_request(m), f"--stage 3 is Awaker's recipe; {model} is a {family} model")
        _need(m.has_adapters, f"{model} has no LoRA-MoE experts: run --stage 2 first")
        params = {n: p for n, p in m.named_parameters() if n.endswith(("lora_A", "lora_B"))}
    else:
        _need(has_moe_layers(m), f"--stage moe is MoE-LLaVA's MoE-tuning; {model} is a {family} model")
        m = moe_from_dense(m, options)
        params = {n: p for n, p in m.named_parameters() if n.startswith("model.layers.") and ".mlp." in n}
    m.set_kernels(training_kernels())

    work = work_folder(out)
    started = time.time()
    rows = train(family, m, processor, records, params, settings, work, resume=resume, device=dev,
                 desc=f"stage {stage}", progress=progress, step_loss=step_loss)
    if stage == "vision":
        from moevl.train import vision

        probe = vision.probe_accuracy(m, processor, heads, records[-min(len(records), 200):], dev.torch_device)
        log(f"stage vision: probe accuracy per shape on the last {min(len(records), 200)} training records "
            f"{json.dumps({k: round(v, 4) for k, v in probe.items()})}")
    extras = {LOSS_LOG: (work / LOSS_LOG).read_text()}
    if (work / LOSS_PLOT).is_file():
        extras[LOSS_PLOT] = (work / LOSS_PLOT).read_bytes()
    if peft_model is not None:
        from moevl.train import peft_interop

        extras.update({f"{PEFT_FOLDER}/{k}": v for k, v in peft_interop.adapter_files(peft_model).items()})
        m = peft_model.merge_and_unload()
    info = {"stage": stage, "from": str(model), "data": [str(d) for d in data] if several else str(data),
            "records": len(records),
            "settings": {k: (str(v) if isinstance(v, torch.dtype) else v)
                         for k, v in dataclasses.asdict(settings).items()},
            "options": dataclasses.asdict(options), "trained": sorted(params), "steps": len(rows),
            "final_loss": rows[-1]["loss"] if rows else None, "seconds": round(time.time() - started, 1)}
    if stage == "vision":
        info["probe_accuracy"] = probe
    extras[TRAIN_INFO] = json.dumps(info, indent=2)
    save_model(family, m, processor, out, force, extras)
    shutil.rmtree(work, ignore_errors=True)
    log(f"stage {stage}: {len(rows)} steps, final loss {info['final_loss']}, wrote {out}")
    return out


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def training_kernels():
    """The reference ops, with the CPU set's SDPA attention, fused RMSNorm, matmul patch embedding and the batched
    LoRA-MoE linear (each tested against the reference, values and gradients; the other fast variants are
    inference-only: in-place). The reference's LoRA-MoE linear loops over the requests of a batch: at batch 64 it
    made Awaker's stages 2 and 3 2-4x slower per step than stage 1."""
    import dataclasses as dc

    from moevl.kernels import cpu, get_kernels

    return dc.replace(get_kernels("reference"), name="training", attention=cpu.attention, rms_norm=cpu.rms_norm,
                      patch_embed=cpu.patch_embed, lora_moe_linear=cpu.lora_moe_linear_autograd)


def save_model(family: str, model, processor, out: Path, force: bool, extras: dict) -> Path:
    model = model.to("cpu")
    if has_moe_layers(model):
        from moevl.model.moe_llava.checkpoint import save_moe_llava

        return save_moe_llava(model, processor, out, overwrite=force, extra_files=extras)
    from moevl.model.checkpoint import save

    return save(model, processor.folder, out, overwrite=force, extra_files=extras)


# ----------------------------------------------------------------------------------------------- stage 2
def experts_from_lora(model, adapter: Path, options: StageOptions):
    """A stage-1 model (q/k/v/o/gate/up/down LoRA merged, adapter in ``adapter``) -> the LoRA-MoE network: o/gate/
    up/down back to the base weight (W - s B A), every task expert and the global expert = that LoRA; q/k/v keep
    the LoRA merged (as Awaker's release merges its q/k/v LoRA); routers new."""
    from moevl.model.awaker.config import AdapterConfig
    from moevl.model.awaker.network import AwakerModel
    from moevl.train.peft_interop import PEFT_PREFIX, read_adapter

    if not adapter.is_dir():
        raise ValueError(f"{adapter.parent} has no {PEFT_FOLDER}/ folder: --stage 2 starts from a --stage 1 output")
    if model.has_adapters:
        raise ValueError(f"{adapter.parent} already has LoRA-MoE experts: --stage 2 starts from a --stage 1 output")
    conf, sd = read_adapter(adapter)
    rank, alpha = conf["r"], conf["lora_alpha"]
    scaling = alpha / rank
    cfg = copy.deepcopy(model.cfg)
    cfg.adapters = AdapterConfig(num_experts=options.experts, rank=rank, alpha=alpha, qkv_rank=rank,
                                 qkv_alpha=alpha)
    new = AwakerModel(cfg)
    state = {k: v for k, v in model.state_dict().items()}
    x = options.experts + 1
    g = torch.Generator().manual_seed(0)
    for name, mod in new.named_modules():
        if not hasattr(mod, "lora_A") or name.endswith(("q_proj", "k_proj", "v_proj")):
            continue
        a = sd.get(f"{PEFT_PREFIX}{name}.lora_A.weight")
        b = sd.get(f"{PEFT_PREFIX}{name}.lora_B.weight")
        if a is None or b is None:
            raise ValueError(f"{adapter} has no LoRA for {name}: stage 1 must adapt o/gate/up/down")
        state[f"{name}.weight"] = state[f"{name}.weight"] - scaling * (b.float() @ a.float())
        state[f"{name}.lora_A"] = a.float().expand(x, -1, -1).clone()
        state[f"{name}.lora_B"] = b.float().expand(x, -1, -1).clone()
        if hasattr(mod, "router"):
            h = mod.router.gate.in_features
            state[f"{name}.router.norm_weight"] = torch.ones(h)
            state[f"{name}.router.gate.weight"] = torch.randn(options.experts, h, generator=g) * (
                options.router_init_std / h ** 0.5)
            state[f"{name}.router.gate.bias"] = torch.zeros(options.experts)
    new.load_state_dict(state, strict=True)
    new.init_buffers()
    return new.to(model.lm_head.weight.device)


# ----------------------------------------------------------------------------------------------- MoE-tuning
def moe_from_dense(model, options: StageOptions):
    """A dense MoE-LLaVA-family model -> the same with MoE layers whose experts are copies of the layer's FFN."""
    from moevl.model.moe_llava.network import MoeLlavaModel

    if model.cfg.moe_layers:
        raise ValueError(f"the model already has MoE layers {list(model.cfg.moe_layers)}: --stage moe starts from "
                         "a dense model")
    cfg = copy.deepcopy(model.cfg)
    n = cfg.num_layers
    cfg.moe_layers = tuple(options.moe_layers) if options.moe_layers is not None else tuple(range(0, n, 2))
    cfg.num_experts = options.experts
    cfg.top_k = 2
    cfg.__post_init__()
    new = MoeLlavaModel(cfg)
    old = model.state_dict()
    state = {}
    g = torch.Generator().manual_seed(0)
    e = cfg.num_experts
    for k in new.state_dict():
        if k in old:
            state[k] = old[k]
    for i in cfg.moe_layers:
        pre = f"model.layers.{i}.mlp."
        if cfg.arch == "phi":
            pairs = {"w_in": "fc1.weight", "b_in": "fc1.bias", "w_out": "fc2.weight", "b_out": "fc2.bias"}
        else:
            pairs = {"w_in": "gate_proj.weight", "w_up": "up_proj.weight", "w_out": "down_proj.weight"}
        for ours, dense in pairs.items():
            state[pre + ours] = old[pre + dense].unsqueeze(0).expand(e, *old[pre + dense].shape).clone()
        h = cfg.hidden_size
        state[pre + "router"] = torch.randn(e, h, generator=g) * (options.router_init_std / h ** 0.5)
    new.load_state_dict(state, strict=True)
    new.init_buffers()
    return new.to(model.lm_head.weight.device)
