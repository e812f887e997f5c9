"""Build the kit's built-in defaults, ``awaker-tiny`` and ``moellava-tiny``, as trained models: one command,
deterministic from a seed, on CPU.

    python -m moevl.train.defaults [--out build/defaults] [--seed 0] [--install] [--smoke]

What it does (every step through the public training API, ``moevl.train.recipe.run_stage``):
  1. data: the synthetic shapes data set (``moevl.train.data.make_shapes``): a caption set for stage 0, a
     multi-task set (5 tasks x 2 languages) for the later stages, two more multi-task sets (other seeds) for the
     later question cycles, per model a set of only its two weakest tasks (FOCUS) and one more multi-task set for
     the last cycle (moellava-tiny: two of each, for two cycles), and a fresh validation split (another seed);
  2. a byte-level BPE trained on the data set's text (English and Chinese), Qwen2-VL's special tokens first;
  3. awaker-tiny: the vision tower pretrained on the captions' scene annotations (stage vision: the stand-in for
     Qwen2-VL's pretrained ViT), then a base (no adapters) trained from scratch on captions with that tower frozen
     (stage 0, in two runs: a second one at a lower peak rate), then on the questions (stage 0, three cycles on
     the mix, then one on each fresh set and one on its focus set + the last multi-task set, every record seen
     once), then stages 1, 2, 3 on the mix; moellava-tiny: its CLIP tower likewise (the stand-in for CLIP), a dense
     base trained on captions likewise, then on the questions (stage 0 again, twice on the mix, once on each fresh
     set and twice on a focus set + a multi-task set: MoE-LLaVA's dense instruction stage), then MoE-tuning
     (stage moe);
  4. each model evaluated on the validation split (``moevl.train.evaluate``);
  5. ``--install``: the final weights + tokenizer + processor + measured quality written to model/assets/<preset>/,
     where the presets load them from.
``--smoke`` runs the same pipeline with a few records and steps (CI: it checks the build, not the quality).
The toy models see 5 kinds of questions about synthetic shapes; they know nothing else.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from moevl.train.loop import TrainSettings
from moevl.train.recipe import StageOptions, run_stage

QUALITY_FILE = "quality.json"
VALIDATION_SEED = 1_000_003   # the validation split's seed (moevl.train.data.VALIDATION_SEED)
CI_SAMPLE = 100               # CI's quality test: this many questions, generated with the validation seed


@dataclasses.dataclass
class BuildPlan:
    """Record counts and steps of each stage (the full build; --smoke shrinks them)."""

    captions: int = 40000         # stage-0 caption records (both languages)
    mix: int = 72000              # multi-task records for both models' question stages
    # the first records of the mix (a smaller set is the first records of a larger one, moevl.train.data.plan):
    # the tokenizer's text
    mix_shared: int = 24000
    # two more multi-task sets, other seeds, for the last full-weight question cycles: every record is seen once
    # (steps x batch of a cycle), where the earlier cycles saw the mix's records 2-3 times each
    fresh: int = 115200
    # the last cycle's records: 2/3 from a set of only the model's two weakest tasks (FOCUS), 1/3 from a balanced
    # set of all five (so that the others are not forgotten), every record seen once
    focus: int = 76800
    general: int = 38400
    validation: int = 1000        # per task and language: 5 x 2 x 1000 = 10000 records, another seed
    batch: int = 16
    # the vision tower learns to see from the scene annotations first (stage vision), then the language model
    # learns to describe what it sees on the captions with that tower frozen, then to answer the mix's questions
    # (the later stages train LoRA adapters on the LLM only). The question stages run at batch 64: at batch 16 the
    # models stall on colour / shape / position whatever the number of steps (measured: the same 19k examples reach
    # 94 % colour at batch 64 and 73 % at batch 16)
    steps: dict = dataclasses.field(default_factory=lambda: {
        "awaker.v": 1600, "awaker.0": 4500, "awaker.0b": 1200, "awaker.0mix": 3000, "awaker.0mix2": 3000,
        "awaker.0mix3": 1800, "awaker.0fresh": 1800, "awaker.0fresh2": 1800, "awaker.0fresh3": 1800,
        "awaker.1": 300, "awaker.2": 250,
        "awaker.3": 250, "moellava.v": 4000, "moellava.0": 6000, "moellava.0b": 2000, "moellava.0mix": 3000,
        "moellava.0mix2": 3000, "moellava.0fresh": 1800, "moellava.0fresh2": 1800,
        "moellava.0fresh3": 1800, "moellava.0fresh4": 1800, "moellava.moe": 400})
    lr: dict = dataclasses.field(default_factory=lambda: {
        "awaker.v": 2e-3, "awaker.0": 3e-3, "awaker.0b": 1.5e-3, "awaker.0mix": 1e-3, "awaker.0mix2": 1e-3,
        "awaker.0mix3": 1e-3, "awaker.0fresh": 1e-3, "awaker.0fresh2": 1e-3, "awaker.0fresh3": 1e-3,
        "awaker.1": 3e-3,
        "awaker.2": 1.5e-3, "awaker.3": 1.5e-3, "moellava.v": 2e-3, "moellava.0": 3e-3, "moellava.0b": 1.5e-3,
        "moellava.0mix": 1e-3, "moellava.0mix2": 1e-3, "moellava.0fresh": 1e-3, "moellava.0fresh2": 1e-3,
        "moellava.0fresh3": 1e-3, "moellava.0fresh4": 1e-3, "moellava.moe": 1e-3})
    batches: dict = dataclasses.field(default_factory=lambda: {  # else ``batch``
        "awaker.v": 32, "moellava.v": 32, "awaker.0mix": 64, "awaker.0mix2": 64, "awaker.0mix3": 64,
        "awaker.0fresh": 64, "awaker.0fresh2": 64, "awaker.0fresh3": 64, "awaker.1": 64, "awaker.2": 64,
        "awaker.3": 64, "moellava.0mix": 64, "moellava.0mix2": 64, "moellava.0fresh": 64, "moellava.0fresh2": 64,
        "moellava.0fresh3": 64, "moellava.0fresh4": 64, "moellava.moe": 64})
    # both models' full-weight question stages weigh every record the same (TrainSettings.loss_average; else the
    # token mean) and run twice 3,000 steps (the second a new cosine cycle, another data order): the question lookups
    # (colour, shape, position: binding the question's words to the right image tokens) were learned in the second
    # (600 validation questions: colour 62 -> 98 %, shape 88 -> 99 %, position 56 -> 78 %); awaker-tiny then runs a
    # third, shorter cycle (1,800 steps, token mean: captions weigh by their length; another data order): position
    # 78 -> 83 % on those 600 questions, overall 89.5 -> 90.5
    loss_average: dict = dataclasses.field(default_factory=lambda: {
        "awaker.0mix": "record", "awaker.0mix2": "record", "moellava.0mix": "record", "moellava.0mix2": "record"})
    lora_rank: int = 32
    lora_alpha: float = 64.0

    @classmethod
    def smoke(cls) -> "BuildPlan":
        return cls(captions=40, mix=60, mix_shared=40, fresh=40, focus=20, general=10, validation=2, batch=4,
                   steps={k: 2 for k in cls().steps}, batches={k: 4 for k in cls().batches}, lora_rank=4,
                   lora_alpha=8.0)


# each model's two weakest tasks after the second fresh cycle (full validation split: awaker-tiny position 87.1 %,
# captions 79.4 %; moellava-tiny colour 69.5 %, position 87.2 %): the focus sets of the last cycles ask only these
# (measured on the full split after stages 1-3 / MoE-tuning: awaker-tiny position 87.1 -> 90.2, captions
# 79.4 -> 80.9 %; moellava-tiny colour 69.5 -> 83.1 -> 85.9, position 87.2 -> 87.4 -> 87.9 % with a third and
# fourth cycle)
FOCUS = {"awaker": ("position", "caption"), "moellava": ("color", "position")}


# --------------------------------------------------------------------------------------------------- configs
# the two defaults this module builds (names of builds, not of families)
BUILDS = ("awaker", "moellava")

def awaker_config():
    """The trained awaker-tiny: the full Awaker structure (M-RoPE decoder, Qwen2-VL tower + merger; 4 task experts +
    the global expert on o/gate/up/down after stage 2) at toy width."""
    from moevl.model.awaker.config import AdapterConfig, AwakerConfig, VisionConfig

    return AwakerConfig(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=4, num_heads=4, num_kv_heads=2,
        rope_theta=10000.0, mrope_section=(4, 6, 6), max_position_embeddings=1024,
        vision=VisionConfig(depth=2, embed_dim=64, num_heads=2, mlp_ratio=2.0),
        adapters=AdapterConfig(num_experts=0),
        image_token_id=5, video_token_id=6, vision_start_token_id=3, vision_end_token_id=4,
        im_start_token_id=1, im_end_token_id=2, eos_token_ids=(2, 0), pad_token_id=0,
    )


def moellava_config():
    """The trained moellava-tiny's dense base: Phi-2 flavour at toy width, a 3-layer CLIP tower on 112 px."""
    from moevl.model.moe_llava.config import MoeLlavaConfig, VisionTowerConfig

    return MoeLlavaConfig(
        arch="phi", vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=4, num_heads=4,
        num_kv_heads=4, partial_rotary_factor=0.5, max_position_embeddings=1024, moe_layers=(),
        mm_hidden_size=64,
        vision=VisionTowerConfig(hidden_size=64, intermediate_size=128, num_layers=3, num_heads=2, image_size=112,
                                 patch_size=16),
        eos_token_ids=(0,), pad_token_id=0,
    )


AWAKER_PIXELS = dict(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 36)  # at most 36 merged image tokens


# --------------------------------------------------------------------------------------------------- assets
def corpus(records: list[dict]) -> list[str]:
    """The tokenizer's training text: every question and answer of the data, and both system prompts."""
    from moevl.model.moe_llava.config import SYSTEM_PROMPT

    # the fixed texts of every prompt repeated as often as the questions, so that they become few tokens each
    fixed = ["system\nYou are a helpful assistant.", "user\n", "assistant\n", SYSTEM_PROMPT, " USER: ", " ASSISTANT:"]
    lines = fixed * max(1, len(records) // 4)
    for r in records:
        lines += [r["conversations"][0]["value"].replace("<image>\n", ""), r["conversations"][1]["value"]]
    return lines


def write_tokenizers(text: list[str], awaker_dir: Path, moellava_dir: Path, moellava_image_size: int) -> None:
    from transformers import PreTrainedTokenizerFast
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from moevl.model.awaker.tiny import QWEN2_VL_CHAT_TEMPLATE
    from moevl.model.tiny import train_tiny_bpe

    bpe = train_tiny_bpe(text, vocab_size=512)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = QWEN2_VL_CHAT_TEMPLATE
    awaker_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(awaker_dir))
    Qwen2VLImageProcessorPil(**AWAKER_PIXELS).save_pretrained(str(awaker_dir))
    tok = PreTrainedTokenizerFast(tokenizer_object=train_tiny_bpe(text, vocab_size=512), eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>")
    moellava_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(moellava_dir))
    s = moellava_image_size
    CLIPImageProcessorPil(size={"shortest_edge": s}, crop_size={"height": s, "width": s}).save_pretrained(
        str(moellava_dir))


def random_checkpoint(family: str, cfg, assets: Path, out: Path, seed: int) -> Path:
    """The from-scratch starting point: deterministic random weights in the kit's format."""
    from moevl.model.checkpoint import save

    from moevl.model.awaker.config import AwakerConfig

    if isinstance(cfg, AwakerConfig):
        from moevl.model.awaker.network import AwakerModel
        from moevl.model.awaker.tiny import init_random_weights

        model = AwakerModel(cfg)
        init_random_weights(model, seed)
        model.init_buffers()
        return save(model, assets, out, overwrite=True)
    from moevl.model.moe_llava.checkpoint import init_random_weights
    from moevl.model.moe_llava.network import MoeLlavaModel

    model = MoeLlavaModel(cfg)
    init_random_weights(model, seed)
    model.init_buffers()
    return save(model, assets, out, overwrite=True,
                extra_files={"preprocessor_config.json": (assets / "preprocessor_config.json").read_text()})


# --------------------------------------------------------------------------------------------------- build
def build(out: Path, seed: int = 0, plan: BuildPlan | None = None, models=("awaker", "moellava"),
          install: bool = False, progress: bool = True, log=print) -> dict:
    from moevl.train.data import TASKS, make_shapes

    plan = plan or BuildPlan()
    torch.manual_seed(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    timings = {}

    def data(name, n, s, tasks=TASKS):
        folder = out / "data" / name
        if (folder / "shapes.json").is_file() and _data_made(folder) == (n, s, tuple(tasks)):
            return folder / "shapes.json"
        return make_shapes(folder, n, s, force=True, tasks=tasks)

    captions = data("captions", plan.captions, seed * 10 + 1, ("caption",))
    mix = data("mix", plan.mix, seed * 10 + 2)
    fresh = data("mix-fresh", plan.fresh, seed * 10 + 3)
    fresh2 = data("mix-fresh2", plan.fresh, seed * 10 + 4)
    general = data("mix-general", plan.general, seed * 10 + 6)
    focus = {name: data(f"focus-{name}", plan.focus, seed * 10 + s, FOCUS[name])
             for name, s in (("awaker", 5), ("moellava", 7)) if name in models}
    if "moellava" in models:  # moellava-tiny's fourth cycle: another focus set and another balanced set
        focus["moellava2"] = data("focus2-moellava", plan.focus, seed * 10 + 8, FOCUS["moellava"])
        general2 = data("mix-general2", plan.general, seed * 10 + 9)
    validation = data("validation", plan.validation * 10, VALIDATION_SEED + seed)
    timings["data"] = round(time.time() - t0, 1)

    from moevl.train.data import load_records

    assets = {"awaker": out / "assets" / "awaker-tiny", "moellava": out / "assets" / "moellava-tiny"}
    mcfg = moellava_config()
    if not (assets["awaker"] / "tokenizer.json").is_file():
        write_tokenizers(corpus(load_records(captions) + load_records(mix)[:plan.mix_shared]), assets["awaker"],
                         assets["moellava"], mcfg.vision.image_size)

    def stage(key, model, data_json, st, dest, seed_offset=0, **opts):
        """data_json: one data set, or a list of them (their records in that order)."""
        if (dest / "moevl_config.json").is_file():  # done by an earlier (interrupted) run of the build
            return dest
        t = time.time()
        settings = TrainSettings(steps=plan.steps[key], lr=plan.lr[key], batch_size=plan.batches.get(key, plan.batch),
                                 seed=seed + seed_offset, checkpoint_every=25,
                                 loss_average=plan.loss_average.get(key, "token"))
        run_stage(model, data_json, st, dest, "cpu", settings,
                  StageOptions(lora_rank=plan.lora_rank, lora_alpha=plan.lora_alpha, **opts), resume=True,
                  force=True, progress=progress, log=log)
        timings[key] = round(time.time() - t, 1)
        return dest

    finals = {}
    if BUILDS[0] in models:  # awaker
        a = out / "awaker"
        init = a / "init"
        if not (init / "moevl_config.json").is_file():
            random_checkpoint("awaker", awaker_config(), assets["awaker"], init, seed)
        sv = stage("awaker.v", init, captions, "vision", a / "stage-vision")
        s0 = stage("awaker.0", sv, captions, "0", a / "stage0", freeze_vision=True)
        s0 = stage("awaker.0b", s0, captions, "0", a / "stage0b", freeze_vision=True)  # a lower peak rate
        # the base also learns to answer the mix's questions (full weights, tower frozen): the stand-in for Qwen2-VL-
        # Instruct, which Awaker's LoRA stages start from
        s0 = stage("awaker.0mix", s0, mix, "0", a / "stage0-mix", freeze_vision=True)
        s0 = stage("awaker.0mix2", s0, mix, "0", a / "stage0-mix2", seed_offset=1, freeze_vision=True)
        s0 = stage("awaker.0mix3", s0, mix, "0", a / "stage0-mix3", seed_offset=2, freeze_vision=True)
        s0 = stage("awaker.0fresh", s0, fresh, "0", a / "stage0-fresh", seed_offset=3, freeze_vision=True)
        s0 = stage("awaker.0fresh2", s0, fresh2, "0", a / "stage0-fresh2", seed_offset=4, freeze_vision=True)
        s0 = stage("awaker.0fresh3", s0, [focus["awaker"], general], "0", a / "stage0-fresh3", seed_offset=5,
                   freeze_vision=True)
        s1 = stage("awaker.1", s0, mix, "1", a / "stage1")
        s2 = stage("awaker.2", s1, mix, "2", a / "stage2")
        finals["awaker"] = stage("awaker.3", s2, mix, "3", a / "stage3")
    if "moellava" in models:
        m = out / "moellava"
        init = m / "init"
        if not (init / "moevl_config.json").is_file():
            random_checkpoint("moe-llava", mcfg, assets["moellava"], init, seed)
        sv = stage("moellava.v", init, captions, "vision", m / "stage-vision")
        s0 = stage("moellava.0", sv, captions, "0", m / "stage0", freeze_vision=True)
        s0 = stage("moellava.0b", s0, captions, "0", m / "stage0b", freeze_vision=True)
        s0 = stage("moellava.0mix", s0, mix, "0", m / "stage0-mix", freeze_vision=True)
        s0 = stage("moellava.0mix2", s0, mix, "0", m / "stage0-mix2", seed_offset=1, freeze_vision=True)
        s0 = stage("moellava.0fresh", s0, fresh, "0", m / "stage0-fresh", seed_offset=3, freeze_vision=True)
        s0 = stage("moellava.0fresh2", s0, fresh2, "0", m / "stage0-fresh2", seed_offset=4, freeze_vision=True)
        s0 = stage("moellava.0fresh3", s0, [focus["moellava"], general], "0", m / "stage0-fresh3",
                   seed_offset=5, freeze_vision=True)
        s0 = stage("moellava.0fresh4", s0, [focus["moellava2"], general2], "0", m / "stage0-fresh4",
                   seed_offset=6, freeze_vision=True)
        finals["moellava"] = stage("moellava.moe", s0, mix, "moe", m / "stage-moe")
    timings["train_total"] = round(time.time() - t0, 1)

    ci = data("ci-sample", CI_SAMPLE, VALIDATION_SEED + seed)
    results = {}
    for name, folder in finals.items():
        done = json.loads((folder / QUALITY_FILE).read_text()) if (folder / QUALITY_FILE).is_file() else {}
        t = time.time()
        results[name] = done if "accuracy" in done else evaluate_folder(folder, validation, log=log)
        if "ci_sample" not in results[name]:
            results[name]["ci_sample"] = ci_sample_quality(folder, ci, VALIDATION_SEED + seed)
        (folder / QUALITY_FILE).write_text(json.dumps(results[name], indent=2) + "\n")
        timings[f"{name}.eval"] = round(time.time() - t, 1)
    timings["total"] = round(time.time() - t0, 1)
    for name in BUILDS:  # a model built by its own process (main() runs one per model) recorded its timings there
        part = out / f"build-{name}.json"
        if name in models and part.is_file() and tuple(models) != (name,):
            timings.update({k: v for k, v in json.loads(part.read_text())["timings_s"].items()
                            if k.startswith(name + ".")})
    summary = {"seed": seed, "plan": dataclasses.asdict(plan), "timings_s": timings, "quality": results}
    name = "build.json" if set(models) == set(BUILDS) else f"build-{'-'.join(models) or 'data'}.json"
    keep_timings(out / name, timings)
    (out / name).write_text(json.dumps(summary, indent=2) + "\n")
    if install:
        for name, folder in finals.items():
            install_preset(folder, name)
        write_demo()
    log(json.dumps({"timings_s": timings, "accuracy": {k: v["accuracy"] for k, v in results.items()}}))
    return summary


def _data_made(folder: Path) -> tuple[int, int, tuple] | None:
    """(record count, seed, tasks) of a data set folder written by make_shapes (its marker), None if unreadable: a
    folder written with another count, seed or task list (another --seed into the same --out) is written anew, not
    reused."""
    from moevl.train.data import MARKER

    try:
        made = json.loads((folder / MARKER).read_text())
        return made["n"], made["seed"], tuple(made["tasks"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def keep_timings(path: Path, timings: dict) -> None:
    """A repeated or resumed build finds its stages done and times them at ~0 s: keep, per step, the longest time
    an earlier run of this folder recorded (the run that did the work)."""
    if path.is_file():
        old = json.loads(path.read_text()).get("timings_s", {})
        for k, v in old.items():
            timings[k] = max(v, timings.get(k, 0.0))


def evaluate_folder(folder: Path, validation: Path, limit: int | None = None, log=None) -> dict:
    """Exact accuracy per task (both languages together and apart) on the validation split."""
    import moevl
    from moevl.train.evaluate import evaluate

    session = moevl.load(str(folder), device="cpu", dtype="fp32")
    report = evaluate(session, validation, batch_size=32, max_new_tokens=40, limit=limit)
    return {"n": report["n"], "accuracy": {t: {lang: v["accuracy"] for lang, v in row.items()}
                                           for t, row in report["accuracy"].items()},
            "overall": report["overall"], "caption": report["caption"], "routing": report["routing"],
            "seconds": report["seconds"]}


DEMO_SEED = 20251126
DEMO_TASKS = (("count", "en"), ("color", "en"), ("shape", "zh"), ("position", "en"), ("caption", "en"),
              ("caption", "zh"))


def write_demo(image: Path | None = None, questions: Path | None = None) -> list[dict]:
    """The bundled demo image: one scene of the data set's distribution (3 shapes, seeded), and questions about
    it with the data set's answers, for ``moevl demo``."""
    import numpy as np

    from moevl.model.tiny import DEMO_IMAGE, DEMO_QUESTIONS
    from moevl.train.data import askable, question, render, sample_scene

    scene = sample_scene(np.random.default_rng([DEMO_SEED]), num_shapes=3)
    rows = []
    for task, lang in DEMO_TASKS:
        targets = askable(scene, task)
        if not targets:
            continue
        q, a = question(scene, task, lang, targets[0])
        rows.append({"task": task, "lang": lang, "question": q, "answer": a})
    render(scene).save(image or DEMO_IMAGE)
    (questions or DEMO_QUESTIONS).write_text(json.dumps({"scene": scene, "questions": rows}, ensure_ascii=False,
                                                        indent=1) + "\n", encoding="utf-8")
    return rows


def ci_sample_quality(folder: Path, sample: Path, seed: int) -> dict:
    """What CI's quality test checks the installed preset against: the exact answers on a fixed sample."""
    import moevl
    from moevl.train.evaluate import evaluate

    report = evaluate(moevl.load(str(folder), device="cpu", dtype="fp32"), sample, batch_size=32, max_new_tokens=40)
    return {"seed": seed, "n": report["n"], "correct": report["overall"]["correct"],
            "accuracy": report["overall"]["accuracy"],
            "predictions": [p["prediction"] for p in report["predictions"]]}


PRESET_FILES = ("moevl_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "chat_template.jinja", "preprocessor_config.json", QUALITY_FILE)


def install_preset(folder: Path, name: str) -> Path:
    """Copy a trained model into model/assets/<preset>/ (what the preset loads)."""
    from moevl.model.tiny import TRAINED

    dest = TRAINED / {"awaker": "awaker-tiny", "moellava": "moellava-tiny"}[name]
    dest.mkdir(parents=True, exist_ok=True)
    for f in dest.iterdir():
        if f.is_file():
            f.unlink()
    for f in PRESET_FILES:
        if (folder / f).is_file():
            shutil.copy2(folder / f, dest / f)
    return dest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m moevl.train.defaults", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="build/defaults", help="work folder (data, every stage's output)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--models", default="awaker,moellava", help="awaker, moellava or both (comma-separated)")
    p.add_argument("--install", action="store_true", help="copy the results into model/assets (the presets)")
    p.add_argument("--smoke", action="store_true", help="a few records and steps: checks the pipeline, not quality")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--jobs", type=int, default=None,
                   help="models built side by side, one process and one torch thread each (default: one per "
                        "model, up to the CPU count)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    bad = [m for m in models if m not in BUILDS]
    if bad:
        print(f"--models: unknown {bad}; choose awaker, moellava", file=sys.stderr)
        return 2
    started = time.time()
    plan = BuildPlan.smoke() if args.smoke else BuildPlan()
    jobs = min(len(models), os.cpu_count() or 1) if args.jobs is None else args.jobs
    if jobs > 1:
        # one process per model, one torch thread each (two small models train faster side by side than one after
        # the other on two threads); the data and the tokenizers first, the evaluation and install at the end
        # (every trained stage and measured quality is found done on disk by then)
        build(Path(args.out), args.seed, plan, (), False, progress=False)
        procs = []
        for m in models:
            cmd = [sys.executable, "-m", "moevl.train.defaults", "--out", args.out, "--seed", str(args.seed),
                   "--models", m, "--threads", "1", "--jobs", "1"] + (["--smoke"] if args.smoke else [])
            procs.append((m, subprocess.Popen(cmd)))
        failed = [m for m, proc in procs if proc.wait() != 0]
        if failed:
            print(f"defaults: building {', '.join(failed)} failed (see above); run again to resume", file=sys.stderr)
            return 1
    summary = build(Path(args.out), args.seed, plan, models, args.install)
    summary["timings_s"]["wall"] = round(time.time() - started, 1)  # the whole command, side-by-side jobs included
    name = "build.json" if set(models) == set(BUILDS) else f"build-{'-'.join(models)}.json"
    keep_timings(Path(args.out) / name, summary["timings_s"])
    (Path(args.out) / name).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
