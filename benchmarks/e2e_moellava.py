"""End-to-end MoE-LLaVA (ours, top-2 of 4 experts) vs transformers' dense PhiForCausalLM with the same weights.

Issue 6 §5: Phi-2 width (hidden 2560, MLP 10240, 32 heads, vocab 51200), 4 decoder layers with MoE on 0 and 2, a
CLIP-L/336-width tower (2 layers run by both sides), one 336x336 image (576 tokens) + ~40 text tokens, 32 greedy
tokens, fp32. The baseline is transformers' Phi + CLIPVisionModel + the same projector, expert 0 of each MoE layer
as its dense FFN, driven by ``generate``; ours is ``moevl.model.generate`` on a MoeLlavaSession. Rounds alternate,
medians are reported. ``--dtype bf16`` / ``--quantize int8|int4`` run ours in that precision (weight-only int8/int4
of the linears and the stacked experts, as ``moevl.load(..., quantize=)`` gives it) against the same fp32 baseline.
This is a benchmark, not a test: run ``python -m moevl.benchmarks.e2e_moellava``.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import moevl
from moevl.ascend.device import resolve_device
from moevl.benchmarks.common import NoProcessor, cpu_flags, cpu_line, progress
from moevl.model.generate import GenerationConfig, generate
from moevl.model.moe_llava.config import moellava_phi2_width
from moevl.model.moe_llava.inputs import collate
from moevl.model.moe_llava.checkpoint import random_model
from moevl.model.moe_llava.session import MoeLlavaSession

RESULTS = Path(__file__).parent / "results"


def build_ours(cfg, device):
    model = random_model(cfg, seed=0, dtype=torch.float32, device=device.torch_device)
    moevl.place(model, device)  # the device's kernels, as moevl.load gives them
    return session_of(model, device)


def variant_of(cfg, device, quantize: str | None):
    """Ours in ``device``'s dtype, quantised when asked: the same random weights as ``build_ours`` (same seed), built
    again, so the fp32 model the baseline shares stays as it is."""
    from moevl.kernels import quant

    model = random_model(cfg, seed=0, dtype=torch.float32, device=device.torch_device).to(device.dtype)
    if quantize:
        quant.quantize_model(model, quantize)
    gc.collect()
    moevl.place(model, device)
    return session_of(model, device)


def session_of(model, device):
    s = MoeLlavaSession(model, NoProcessor(), device)
    s.eos_token_ids = {-1}  # the benchmark needs exactly n tokens
    return s


def build_baseline(ours):
    """transformers' Phi + CLIP tower sharing our tensors; expert 0 of each MoE layer is the dense FFN."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, PhiConfig, PhiForCausalLM

    cfg, m = ours.cfg, ours.model
    pc = PhiConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                   num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                   num_key_value_heads=cfg.num_kv_heads,
                   partial_rotary_factor=cfg.partial_rotary_factor, rope_theta=cfg.rope_theta,
                   layer_norm_eps=cfg.layer_norm_eps, max_position_embeddings=cfg.max_position_embeddings,
                   hidden_act="gelu_new", tie_word_embeddings=False)
    sd = {}
    for k, v in m.state_dict().items():
        if k.startswith(("vision_tower.", "mm_projector.")):
            continue
        if ".mlp." in k and k.split(".")[-1] in ("router", "w_in", "b_in", "w_out", "b_out"):
            name = {"w_in": "fc1.weight", "b_in": "fc1.bias", "w_out": "fc2.weight", "b_out": "fc2.bias"}.get(
                k.split(".")[-1])
            if name:
                sd[k.rsplit(".", 1)[0] + "." + name] = v[0]
            continue
        sd[k] = v
    sd["lm_head.bias"] = torch.zeros(cfg.vocab_size)
    v = cfg.vision
    vc = CLIPVisionConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                          num_hidden_layers=v.layers_used, num_attention_heads=v.num_heads, image_size=v.image_size,
                          patch_size=v.patch_size, hidden_act=v.hidden_act, layer_norm_eps=v.layer_norm_eps)
    with torch.device("meta"):
        lm, tower = PhiForCausalLM(pc), CLIPVisionModel(vc)
    lm.load_state_dict(sd, assign=True, strict=True)
    lm.model.rotary_emb.inv_freq = lm.model.rotary_emb.original_inv_freq = ours.model.inv_freq.clone()
    tsd = {k[len("vision_tower."):]: t for k, t in m.state_dict().items() if k.startswith("vision_tower.")}
    tower.load_state_dict(tsd, assign=True, strict=False)  # (post_layernorm is not used for hidden_states)
    tower.vision_model.post_layernorm.to_empty(device="cpu") if hasattr(tower, "vision_model") else \
        tower.post_layernorm.to_empty(device="cpu")
    for mod in tower.modules():  # non-persistent buffers (position_ids) left on meta
        for name, buf in list(mod.named_buffers(recurse=False)):
            if buf.is_meta:
                mod.register_buffer(name, torch.arange(buf.shape[-1]).expand(buf.shape), persistent=False)
    lm.config._attn_implementation = "sdpa"
    tower.config._attn_implementation = "sdpa"
    return lm.eval(), tower.eval(), m.mm_projector


def make_request(cfg, text_tokens=40):
    g = torch.Generator().manual_seed(0)
    before = torch.randint(100, cfg.vocab_size, (text_tokens // 2,), generator=g).tolist()
    after = torch.randint(100, cfg.vocab_size, (text_tokens - text_tokens // 2,), generator=g).tolist()
    ids = before + [-200] * cfg.vision.num_image_tokens + after
    pixels = torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    return collate([ids], pixels, cfg.pad_token_id)


def run_ours(session, batch, n):
    res = generate(session, batch, GenerationConfig(max_new_tokens=n))
    assert len(res.token_ids[0]) == n, "the benchmark needs exactly n tokens"
    return res.ttft_ms, res.decode_ms / (n - 1), res.token_ids[0]


def run_baseline(lm, tower, projector, batch, n):
    ids = batch.input_ids
    kw = dict(attention_mask=batch.attention_mask, do_sample=False, eos_token_id=None, pad_token_id=0)

    def embeds():
        feats = tower(pixel_values=batch.pixels, output_hidden_states=True).hidden_states[-1][:, 1:]
        emb = lm.model.embed_tokens(ids.clamp(min=0))
        emb[ids == -200] = projector(feats).reshape(-1, emb.shape[-1])
        return emb

    with torch.inference_mode():
        t = time.perf_counter()
        lm.generate(inputs_embeds=embeds(), **kw, max_new_tokens=1, min_new_tokens=1)
        ttft = (time.perf_counter() - t) * 1000
        t = time.perf_counter()
        out = lm.generate(inputs_embeds=embeds(), **kw, max_new_tokens=n, min_new_tokens=n)
        total = (time.perf_counter() - t) * 1000
    assert out.shape[1] == n
    return ttft, (total - ttft) / (n - 1), out[0].tolist()


def held_bytes(module: torch.nn.Module, expert_share: float = 1.0) -> int:
    """Bytes of the weights ``module`` holds, in the form they are held (int8/int4 + scales, oneDNN-packed, float);
    an MoE FFN's per-expert stacks (weights, float or quantised, and biases) count ``expert_share`` of their bytes."""
    from moevl.kernels import quant

    total, seen = 0.0, set()
    for name, mod in module.named_modules():
        if any(name.startswith(p + ".") for p in seen):
            continue
        if isinstance(mod, quant.QuantizedExperts):
            total += expert_share * mod.nbytes()
            seen.add(name)
        elif isinstance(mod, quant.QuantizedWeight):
            total += mod.nbytes()
            seen.add(name)
        else:  # an MoE FFN's parameters other than its router are per-expert stacks (weights [E, o, i], biases [E, o])
            stacked = hasattr(mod, "stacked_expert_weights")
            for pname, p in mod.named_parameters(recurse=False):
                total += p.numel() * p.element_size() * (expert_share if stacked and pname != "router" else 1.0)
    return int(total)


def measured_bytes_per_decode_step(model, top_k: int) -> int:
    """What one decode token reads of ``model`` as held: the decoder layers (top_k of each MoE layer's experts)
    and lm_head (the embedding row and the vision tower are not read per token)."""
    return held_bytes(model.model.layers, top_k / model.cfg.num_experts) + held_bytes(model.lm_head)


def weight_bytes_per_decode_step(cfg, top_k: int | None) -> int:
    """Weights read for one decode token: attention + dense FFNs + (top_k experts or the dense FFN) + lm_head."""
    h, f = cfg.hidden_size, cfg.intermediate_size
    attn = 4 * h * h + 3 * h
    ffn = 2 * h * f + f + h
    moe = len(cfg.moe_layers)
    per = cfg.num_layers * attn + (cfg.num_layers - moe) * ffn + moe * ffn * (top_k or 1)
    if top_k:
        per += moe * cfg.num_experts * h  # routers
    return 4 * (per + cfg.vocab_size * h)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moevl.benchmarks.e2e_moellava", description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--text-tokens", type=int, default=40)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="ours (the baseline stays fp32)")
    ap.add_argument("--quantize", default=None, choices=("int8", "int4"), help="ours: weight-only, bf16 activations")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    if args.quantize and args.dtype != "bf16":
        ap.error(f"--quantize {args.quantize} runs with bf16 activations (the CPU int8/int4 kernels): add --dtype bf16")
    device = resolve_device(args.device, "fp32")
    cfg = moellava_phi2_width()
    print("building Phi-2-width MoE-LLaVA (4 layers, MoE on 0 and 2) and the dense baseline ...", flush=True)
    ours = build_ours(cfg, device)
    lm, tower, projector = build_baseline(ours)
    fp32_bytes = measured_bytes_per_decode_step(ours.model, cfg.top_k)
    variant = f"{args.dtype}" + (f" {args.quantize}" if args.quantize else "")
    if variant != "fp32":
        ours = variant_of(cfg, resolve_device(args.device, args.dtype), args.quantize)
    ours_bytes = measured_bytes_per_decode_step(ours.model, cfg.top_k)
    batch = make_request(cfg, args.text_tokens)
    run_ours(ours, batch, 2)  # warm-up both
    run_baseline(lm, tower, projector, batch, 2)
    rows = {"ours": [], "baseline": []}
    bar = progress(args.rounds, "e2e_moellava rounds")
    for r in range(args.rounds):
        o = run_ours(ours, batch, args.new_tokens)
        b = run_baseline(lm, tower, projector, batch, args.new_tokens)
        rows["ours"].append(o[:2])
        rows["baseline"].append(b[:2])
        bar.update()
        bar.write(f"round {r}: ours ttft {o[0]:.0f} ms, decode {o[1]:.1f} ms/tok | baseline ttft {b[0]:.0f} ms, "
                  f"decode {b[1]:.1f} ms/tok")
    bar.close()
    med = {k: {"ttft_ms": statistics.median(x[0] for x in v),
               "decode_ms_per_token": statistics.median(x[1] for x in v)} for k, v in rows.items()}
    ratios = {"ttft": med["ours"]["ttft_ms"] / med["baseline"]["ttft_ms"],
              "decode": med["ours"]["decode_ms_per_token"] / med["baseline"]["decode_ms_per_token"],
              "decode_bytes_ideal": ours_bytes / weight_bytes_per_decode_step(cfg, None),
              "fp32_decode_bytes_ideal": weight_bytes_per_decode_step(cfg, cfg.top_k) / weight_bytes_per_decode_step(
                  cfg, None)}
    command = "python -m moevl.benchmarks.e2e_moellava " + " ".join(argv if argv is not None else sys.argv[1:])
    payload = {"benchmark": "e2e-moellava", "command": command.strip(),
               "config": {"hidden": cfg.hidden_size, "mlp": cfg.intermediate_size, "heads": cfg.num_heads,
                          "vocab": cfg.vocab_size, "layers": cfg.num_layers, "moe_layers": list(cfg.moe_layers),
                          "experts": cfg.num_experts, "top_k": cfg.top_k, "vision_layers_run": cfg.vision.layers_used,
                          "image_tokens": cfg.vision.num_image_tokens,
                          "prompt_tokens": int(batch.input_ids.shape[1]), "new_tokens": args.new_tokens,
                          "rounds": args.rounds, "dtype": args.dtype, "quantize": args.quantize,
                          "moe_routing": "deterministic"},
               "weight_bytes_per_decode_step": {"ours": ours_bytes, "ours_fp32": fp32_bytes,
                                                "baseline": weight_bytes_per_decode_step(cfg, None)},
               "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                               "python": platform.python_version(), "device": device.describe(),
                               "cpu_flags": cpu_flags()},
               "median": med, "ratios": ratios, "targets": {"ttft": 1.4, "decode": 1.3},
               "original_moellava_reference": {"ttft": 2.40, "decode": 1.65,
                                               "note": "DeepSpeed original, measured by the issue's author"},
               "raw": rows}
    md = "\n".join([
        f"# End-to-end: MoE-LLaVA (ours {variant}, top-2 of 4) vs transformers dense Phi fp32, "
        f"{device.describe()['chip']}", "",
        f"Command: `{payload['command']}`  ",
        f"Phi-2 width, {cfg.num_layers} layers (MoE on {list(cfg.moe_layers)}), CLIP-L/336-width tower "
        f"({cfg.vision.layers_used} layers run), ours {variant}, baseline fp32, {batch.input_ids.shape[1]} prompt "
        "tokens "
        f"({cfg.vision.num_image_tokens} image), {args.new_tokens} greedy tokens, medians of {args.rounds} "
        f"alternating rounds, torch {torch.__version__}, {torch.get_num_threads()} threads. "
        "No NPU figures: nothing ran on an NPU. Weights read per decode token (as held; top-2 of each MoE layer's "
        f"experts, lm_head): ours {ours_bytes / 1e6:.0f} MB, baseline "
        f"{payload['weight_bytes_per_decode_step']['baseline'] / 1e6:.0f} MB; bytes-ideal = their ratio.", "",
        "| | ours | dense baseline | ratio | target | original (DeepSpeed) |", "|---|---|---|---|---|---|",
        f"| time to first token (ms) | {med['ours']['ttft_ms']:.0f} | {med['baseline']['ttft_ms']:.0f} | "
        f"{ratios['ttft']:.3f} | <= 1.4 | 2.40 |",
        f"| decode (ms/token) | {med['ours']['decode_ms_per_token']:.1f} | "
        f"{med['baseline']['decode_ms_per_token']:.1f} | {ratios['decode']:.3f} (bytes-ideal "
        f"{ratios['decode_bytes_ideal']:.3f}) | <= 1.3 | 1.65 |", "", cpu_line(), ""])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "e2e-moellava" + ("" if variant == "fp32" else "-" + variant.replace(" ", "-"))
    (out / f"{stem}-cpu.json").write_text(json.dumps(payload, indent=2))
    (out / f"{stem}-cpu.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
