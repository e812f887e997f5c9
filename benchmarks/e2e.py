"""End-to-end latency: our Awaker path vs the baseline users have today (transformers' Qwen2-VL, no adapters).

    python -m moevl.benchmarks.e2e [--layers 2] [--rounds 3] [--new-tokens 32] [--out benchmarks/results]

Configuration (issue 3 §6): 7B width (hidden 3584, MLP 18944, 28/4 heads, vocab 152064), 2 decoder layers, ViT depth
2 at width 1280, fp32 on CPU, one image with grid [1, 16, 16] (64 image tokens) + ~40 text tokens, 32 greedy tokens.
Ours runs with the adapters at r = 256 (4 + 1 experts, q/k/v LoRA merged); the baseline is
Qwen2VLForConditionalGeneration with the same base weights (the tensors are shared, not copied) and no adapters.
Runs alternate ours / baseline; medians over rounds. Not a test: figures on a shared machine are noisy, so read the
ratios, which are measured side by side.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import moevl
from moevl.ascend.device import resolve_device
from moevl.benchmarks.common import (RESULTS, NoProcessor, environment, median, progress, read_bandwidth_gbs,
                                    write_results)
from moevl.model.awaker.config import AdapterConfig, awaker_7b_width
from moevl.model.generate import GenerationConfig, generate
from moevl.model.awaker.inputs import collate
from moevl.model.awaker.checkpoint import build_model
from moevl.model.awaker.session import AwakerSession
from moevl.model.awaker.tiny import init_random_weights


def build_ours(cfg, device, place: bool = True):
    model = build_model(cfg).to_empty(device="cpu")
    init_random_weights(model, seed=0)
    model.init_buffers()
    if place:  # the device's kernels and weight layouts, as moevl.load gives them
        moevl.place(model, device)
    return model


def build_baseline(ours):
    """transformers' Qwen2-VL sharing our base tensors (adapters left out)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    c = ours.cfg
    hf_cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                         num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                         num_key_value_heads=c.num_kv_heads, rms_norm_eps=c.rms_norm_eps,
                         max_position_embeddings=c.max_position_embeddings,
                         rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta,
                                          "mrope_section": list(c.mrope_section)}),
        vision_config=dict(depth=c.vision.depth, embed_dim=c.vision.embed_dim, num_heads=c.vision.num_heads,
                           mlp_ratio=int(c.vision.mlp_ratio), hidden_size=c.hidden_size),
        image_token_id=c.image_token_id, vision_start_token_id=c.vision_start_token_id,
        vision_end_token_id=c.vision_end_token_id, video_token_id=c.video_token_id)
    hf_cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        hf = Qwen2VLForConditionalGeneration(hf_cfg)
    sd = {}
    for k, v in ours.state_dict().items():
        if ".lora_" in k or ".router." in k:
            continue
        if k.startswith("visual."):
            sd["model." + k] = v
        elif k.startswith("model."):
            sd["model.language_model." + k[len("model."):]] = v
        else:
            sd[k] = v
    missing, unexpected = hf.load_state_dict(sd, strict=False, assign=True)
    if [m for m in missing if "inv_freq" not in m] or unexpected:
        raise RuntimeError(f"baseline weights do not line up: missing {missing}, unexpected {unexpected}")
    for mod in hf.modules():  # rotary buffers were on meta
        if hasattr(mod, "inv_freq") and mod.inv_freq.is_meta:
            inv, _ = (mod.compute_default_rope_parameters(mod.config) if hasattr(mod, "compute_default_rope_parameters")
                      else mod.compute_axial_rope_parameters(mod.config))
            mod.inv_freq = inv
            mod.original_inv_freq = inv.clone()
    return hf.eval()


def make_request(cfg, text_tokens=40):
    """One image (grid [1, 16, 16] -> 64 tokens) and ~text_tokens of text in Qwen2-VL's chat layout."""
    g = torch.Generator().manual_seed(1)
    words = torch.randint(1000, 100000, (text_tokens,), generator=g).tolist()
    ids = ([cfg.im_start_token_id, 9125, 198] + words[:6] + [cfg.im_end_token_id, 198, cfg.im_start_token_id, 872, 198,
           cfg.vision_start_token_id] + [cfg.image_token_id] * 64 + [cfg.vision_end_token_id] + words[6:]
           + [cfg.im_end_token_id, 198, cfg.im_start_token_id, 77091, 198])
    v = cfg.vision
    patches = torch.randn(256, v.in_channels * v.temporal_patch_size * v.patch_size ** 2, generator=g)
    return collate([ids], [(1, 16, 16)], [patches], cfg)


def weight_bytes(model, adapters: bool, rank: int) -> int:
    """Bytes of weights one decode step reads: decoder linears + norms + lm_head (+ the selected rank-2r LoRA)."""
    total = model.lm_head.weight.numel()
    for name, p in model.model.layers.named_parameters():
        if ".lora_" not in name and ".router." not in name:
            total += p.numel()
    if adapters:
        for layer in model.model.layers:
            for lin in (layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                total += 2 * rank * (lin.in_features + lin.out_features)
    return total * model.lm_head.weight.element_size()


def run_ours(session, batch, n):
    res = generate(session, batch, GenerationConfig(max_new_tokens=n))
    assert len(res.token_ids[0]) == n, "the benchmark needs exactly n tokens (EOS must not stop it)"
    return res.ttft_ms, res.decode_ms / (n - 1)


def run_baseline(hf, batch, n):
    kw = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.patches,
              image_grid_thw=batch.grid_thw, mm_token_type_ids=(batch.input_ids == hf.config.image_token_id).int(),
              do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.inference_mode():
        t = time.perf_counter()
        hf.generate(**kw, max_new_tokens=1, min_new_tokens=1)
        ttft = (time.perf_counter() - t) * 1000
        t = time.perf_counter()
        out = hf.generate(**kw, max_new_tokens=n, min_new_tokens=n)
        total = (time.perf_counter() - t) * 1000
    assert out.shape[1] - batch.input_ids.shape[1] == n
    return ttft, (total - ttft) / (n - 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moevl.benchmarks.e2e", description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rank", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = resolve_device(args.device, "fp32")
    cfg = awaker_7b_width(num_layers=args.layers)
    cfg.adapters = AdapterConfig(num_experts=4, rank=args.rank, alpha=2.0 * args.rank)
    print(f"building 7B-width model ({args.layers} layers, r={args.rank}) ...", flush=True)
    ours = build_ours(cfg, device, place=False)
    hf = build_baseline(ours)  # shares our plain base tensors
    # counted on the plain weights: after placing, a oneDNN-packed weight is opaque (the same bytes)
    bytes_ours = weight_bytes(ours, True, args.rank)
    bytes_base = weight_bytes(ours, False, args.rank)
    moevl.place(ours, device)  # then ours takes the CPU's layouts (the fastest measured per shape)
    from moevl.kernels import quant

    layouts = dict(getattr(ours, "dense_layouts", {}))
    session = AwakerSession(ours, NoProcessor(), device)
    batch = make_request(cfg)
    bw = read_bandwidth_gbs()
    run_ours(session, batch, 3)  # warm-up both
    run_baseline(hf, batch, 3)
    rows = {"ours": [], "baseline": []}
    round_bw = []  # the read bandwidth again before each round: the machine's bandwidth drifts with its neighbours
    bar = progress(args.rounds, "e2e rounds")
    for r in range(args.rounds):
        round_bw.append(read_bandwidth_gbs(repeats=3)["sum"])
        rows["ours"].append(run_ours(session, batch, args.new_tokens))
        rows["baseline"].append(run_baseline(hf, batch, args.new_tokens))
        bar.update()
        bar.write(f"round {r}: ours ttft {rows['ours'][-1][0]:.0f} ms, decode {rows['ours'][-1][1]:.1f} ms/tok | "
                  f"baseline ttft {rows['baseline'][-1][0]:.0f} ms, decode {rows['baseline'][-1][1]:.1f} ms/tok")
    bar.close()
    med = {k: {"ttft_ms": median([x[0] for x in v]), "decode_ms_per_token": median([x[1] for x in v])}
           for k, v in rows.items()}
    for k, nbytes in (("ours", bytes_ours), ("baseline", bytes_base)):
        med[k]["weight_bytes_per_step"] = nbytes
        med[k]["decode_bandwidth_gbs"] = nbytes / (med[k]["decode_ms_per_token"] / 1000) / 1e9
        med[k]["fraction_of_read_bandwidth"] = med[k]["decode_bandwidth_gbs"] / bw["sum"]
        med[k]["fraction_of_gemv_bandwidth"] = med[k]["decode_bandwidth_gbs"] / bw["gemv"]
    for k, nbytes in (("ours", bytes_ours), ("baseline", bytes_base)):  # per round, against that round's bandwidth
        per_round = [nbytes / (x[1] / 1000) / 1e9 / bw_r for x, bw_r in zip(rows[k], round_bw)]
        med[k]["fraction_of_round_read_bandwidth"] = median(per_round)
        med[k]["fraction_of_round_read_bandwidth_per_round"] = per_round
    paired_ttft = [o[0] / b[0] for o, b in zip(rows["ours"], rows["baseline"])]
    paired_decode = [o[1] / b[1] for o, b in zip(rows["ours"], rows["baseline"])]
    # the headline ratio is the median of the per-round (paired) ratios: under drifting load on a shared
    # machine it is steadier than the ratio of the two medians (which is also kept)
    ratios = {"ttft": median(paired_ttft), "decode": median(paired_decode),
              "ttft_of_medians": med["ours"]["ttft_ms"] / med["baseline"]["ttft_ms"],
              "decode_of_medians": med["ours"]["decode_ms_per_token"] / med["baseline"]["decode_ms_per_token"],
              "decode_bytes_ideal": bytes_ours / bytes_base,
              # the machine is shared and noisy: the spread of the per-round ratios says how much to trust these
              "ttft_per_round": paired_ttft, "decode_per_round": paired_decode}
    import resource

    payload = {"benchmark": "e2e-awaker", "config": {"layers": args.layers, "rank": args.rank,
               "new_tokens": args.new_tokens, "prompt_tokens": int(batch.input_ids.shape[1]), "image_tokens": 64,
               "rounds": args.rounds, "dtype": "fp32"},
               "environment": environment(device), "read_bandwidth_gbs": bw, "read_bandwidth_per_round_gbs": round_bw,
               "median": med, "ratios": ratios,
               "targets": {"ttft": 1.15, "decode": 1.10, "fraction_of_read_bandwidth": 0.95,
                           "issue_13": {"decode": 0.65, "fraction_of_read_bandwidth": 0.85}},
               "original_awaker_reference": {"ttft": 2.16, "decode": 1.17,
                                             "note": "measured by the issue's author on this kind of machine"},
               "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
               "cpu_weight_layouts": layouts,
               "layout_timings": {f"{k[0]}x{k[1]} {str(k[2]).removeprefix('torch.')}": v
                                  for k, v in quant.LAYOUT_TIMES.items()},
               "raw": rows}
    md = [f"# End-to-end: Awaker (ours, r={args.rank}) vs transformers Qwen2-VL base, {device.describe()['chip']}",
          "", f"Command: `python -m moevl.benchmarks.e2e {' '.join(argv if argv is not None else sys.argv[1:])}`".rstrip() + "  ",
          f"7B width, {args.layers} decoder layers, ViT depth 2, fp32, {batch.input_ids.shape[1]} prompt tokens "
          f"(64 image), {args.new_tokens} greedy tokens, medians of {args.rounds} alternating rounds, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads. No NPU figures: nothing ran on an NPU.", "",
          "Ratio = median over rounds of ours/baseline measured in the same round.", "",
          "| | ours | baseline | ratio | target (issue 5) | target (issue 13, fp32) | original Awaker |",
          "|---|---|---|---|---|---|---|",
          f"| time to first token (ms) | {med['ours']['ttft_ms']:.0f} | {med['baseline']['ttft_ms']:.0f} | "
          f"{ratios['ttft']:.3f} | <= 1.15 | | 2.16 |",
          f"| decode (ms/token) | {med['ours']['decode_ms_per_token']:.1f} | "
          f"{med['baseline']['decode_ms_per_token']:.1f} | {ratios['decode']:.3f} (bytes-ideal "
          f"{ratios['decode_bytes_ideal']:.3f}) | <= 1.10 | <= 0.65 | 1.17 |",
          f"| decode bandwidth (GB/s) | {med['ours']['decode_bandwidth_gbs']:.1f} "
          f"({100 * med['ours']['fraction_of_read_bandwidth']:.0f}% of read, "
          f"{100 * med['ours']['fraction_of_gemv_bandwidth']:.0f}% of GEMV bw) | "
          f"{med['baseline']['decode_bandwidth_gbs']:.1f} ({100 * med['baseline']['fraction_of_read_bandwidth']:.0f}%, "
          f"{100 * med['baseline']['fraction_of_gemv_bandwidth']:.0f}%)"
          f" | | >= 95% | >= 85% | |",
          f"| decode bandwidth / read bandwidth of the same round | "
          f"{100 * med['ours']['fraction_of_round_read_bandwidth']:.0f}% | "
          f"{100 * med['baseline']['fraction_of_round_read_bandwidth']:.0f}% | | | >= 85% | |", "",
          f"Per-round ratios (ours/baseline, same round): TTFT "
          f"{', '.join(f'{r:.2f}' for r in ratios['ttft_per_round'])}; decode "
          f"{', '.join(f'{r:.2f}' for r in ratios['decode_per_round'])}. "
          f"Measured in the same run on a 1 GiB fp32 tensor: read bandwidth (sum) {bw['sum']:.1f} GB/s, fp32 GEMV "
          f"{bw['gemv']:.1f} GB/s; again before each round (sum): "
          f"{', '.join(f'{x:.1f}' for x in round_bw)} GB/s. Process peak RSS "
          f"{payload['process_peak_rss_bytes'] / 2**30:.1f} GiB (both models share the plain base tensors; "
          f"oneDNN-packed copies, where chosen, are extra).",
          f"CPU weight layouts chosen at load (measured per shape): "
          f"{', '.join(sorted(set(layouts.values()))) or 'none'} "
          f"({', '.join(f'{sum(v == k for v in layouts.values())} {k}' for k in sorted(set(layouts.values())))} "
          f"of {len(layouts)} base linears; openblas = the plain weight, one-row products through numpy's OpenBLAS "
          f"sgemv, several rows through oneDNN).", ""]
    j, m = write_results("e2e", device, payload, "\n".join(md), out=Path(args.out) if args.out else RESULTS)
    print("\n".join(md))
    print(f"wrote {j} and {m}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
