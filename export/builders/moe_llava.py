"""MoE-LLaVA -> ONNX: the builder (three graphs + contract section), its ONNX Runtime session and its validation.

Layout (names in ``contract.json``; the same three-graph contract as Awaker, export/onnx_export.py):
  vision.onnx     pixel_values [num_images, 3, S, S] fp32 (the CLIP/SigLIP processor's output, padded to square)
                  -> image_features [num_image_tokens, H]: the tower's second-to-last layer, token 0 dropped,
                  through the mlp2x_gelu projector, images concatenated in request order
  embedding.onnx  input_ids [batch, seq] int64 with the <image> sentinel (-200) expanded to one per image token,
                  image_features [num_image_tokens, H] -> inputs_embeds [batch, seq, H]; the k-th sentinel
                  (row-major over the batch) takes feature row k by CumSum + Gather (no masked_scatter/NonZero)
  decoder.onnx    inputs_embeds, attention_keep [batch, 1, seq, total_seq] bool, position_ids [batch, seq] int64,
                  past_key_values.{i}.key/value [batch, kv_heads, past_seq, head_dim]
                  -> logits [batch, vocab] fp32 (last position), moe_experts [moe_layers, batch, seq, top_k] int64,
                  present.{i}.key/value [batch, kv_heads, total_seq, head_dim]
MoE layers in the decoder: router Linear in fp32, TopK with the constant K = top_k, softmax probabilities
renormalised over the chosen experts, every expert computed on every token as batched MatMul and combined by the
[tokens, experts] weight mask (kernels.moe.experts_dense): static shapes, no data-dependent ops. Deterministic
routing only: the original's Gumbel second expert ("deepspeed") needs random numbers per call, which a graph that
must reproduce PyTorch cannot draw, so such a session is refused.
"""
from __future__ import annotations


import numpy as np
import torch
from torch import nn

from moevl.export.graph import TORCH_TO_ONNX, ExportError, GraphSpec, TensorSpec, TracedDecoder, kv_cache_specs
from moevl.model.moe_llava.config import IMAGE_TOKEN_INDEX, MoeLlavaConfig

# image processor settings that travel in the contract (the tower folder's preprocessor_config.json may not be
# beside the MoE-LLaVA checkpoint, so the export carries them)
_IMAGE_PROCESSOR_KEYS = ("size", "crop_size", "do_center_crop", "do_resize", "do_rescale", "rescale_factor",
                         "do_normalize", "image_mean", "image_std", "resample", "do_convert_rgb")


# --------------------------------------------------------------------------------------------- graphs
class VisionGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        feats = self.model.encode_images(pixel_values)                    # [I, N, H]
        return feats.flatten(0, 1)                                         # [I*N, H]


class EmbeddingGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, image_features):
        return self.model.embed(input_ids, image_features, input_ids == IMAGE_TOKEN_INDEX)


class DecoderGraph(TracedDecoder):
    def forward(self, inputs_embeds, attention_keep, position_ids, *past):
        m = self.model
        b, t = inputs_embeds.shape[:2]

        def step():
            hidden, chosen = m(inputs_embeds, position_ids, None, attention_keep, "deterministic", None,
                              caches=m.caches)
            yield m.logits(hidden[:, -1])                                   # [B, V] fp32
            if chosen:
                k = m.cfg.top_k
                yield torch.stack([chosen[i].reshape(b, t, k) for i in sorted(chosen)])  # [L_moe, B, T, k]

        return self.with_past(past, step)


class Builder:
    """What the MoE-LLaVA family exports: graph wrappers, example inputs, names/shapes, and the contract section."""

    def __init__(self, model):
        self.model = model
        self.cfg = model.cfg
        self.image_processor = None

    def accept(self, session) -> None:
        routing = getattr(session, "moe_routing", "deterministic")
        if routing != "deterministic":
            raise ExportError(
                f"moe_routing={routing!r} cannot be exported: the original's Gumbel-noised second expert draws "
                "random numbers on every forward, which a deterministic graph cannot reproduce. Export with the "
                "default deterministic top-2 routing (load without moe_routing / --moe-routing)")
        proc = getattr(session, "processor", None)
        if proc is not None and getattr(proc, "image_processor", None) is not None:
            d = proc.image_processor.to_dict()
            self.image_processor = {k: (list(v) if isinstance(v, tuple) else v)
                                    for k, v in d.items() if k in _IMAGE_PROCESSOR_KEYS}

    def graph_specs(self) -> list[GraphSpec]:
        cfg, m = self.cfg, self.model
        dt = m.lm_head.weight.dtype
        dname = TORCH_TO_ONNX[dt]
        h, s = cfg.hidden_size, cfg.vision.image_size
        specs = [GraphSpec(
            "vision", VisionGraph(m), (torch.randn(2, 3, s, s),),
            [TensorSpec("pixel_values", "float32", ["num_images", 3, s, s])],
            [TensorSpec("image_features", dname, ["num_image_tokens", h])])]
        # embedding: batch 2, 5 tokens, 2 image tokens in the first request
        ids = torch.randint(1, cfg.vocab_size, (2, 5))
        ids[0, 1:3] = IMAGE_TOKEN_INDEX
        specs.append(GraphSpec(
            "embedding", EmbeddingGraph(m), (ids, torch.randn(2, h, dtype=dt)),
            [TensorSpec("input_ids", "int64", ["batch", "seq"]),
             TensorSpec("image_features", dname, ["num_image_tokens", h])],
            [TensorSpec("inputs_embeds", dname, ["batch", "seq", h])]))
        # decoder: batch 2, seq 3 on a past of 4 (distinct sizes so the tracer cannot confuse the axes)
        b, t, p = 2, 3, 4
        past, past_specs, present_specs = kv_cache_specs(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, b, p, dt,
                                                         dname)
        keep = torch.ones(b, 1, t, p + t, dtype=torch.bool).tril(diagonal=p)
        experts = ([TensorSpec("moe_experts", "int64", [len(m.moe_layer_indices), "batch", "seq", cfg.top_k])]
                   if m.moe_layer_indices else [])
        specs.append(GraphSpec(
            "decoder", DecoderGraph(m),
            (torch.randn(b, t, h, dtype=dt), keep, torch.arange(t).expand(b, t) + p) + tuple(past),
            [TensorSpec("inputs_embeds", dname, ["batch", "seq", h]),
             TensorSpec("attention_keep", "bool", ["batch", 1, "seq", "total_seq"]),
             TensorSpec("position_ids", "int64", ["batch", "seq"])] + past_specs,
            [TensorSpec("logits", "float32", ["batch", cfg.vocab_size])] + experts + present_specs))
        return specs

    def contract_section(self) -> dict:
        cfg, v = self.cfg, self.cfg.vision
        return {
            "decoder": {
                "arch": cfg.arch, "num_layers": cfg.num_layers, "num_kv_heads": cfg.num_kv_heads,
                "head_dim": cfg.head_dim, "rotary_dim": cfg.rotary_dim,
                "past_key": "past_key_values.{i}.key", "past_value": "past_key_values.{i}.value",
                "present_key": "present.{i}.key", "present_value": "present.{i}.value",
                "kv_layout": "[batch, kv_heads, seq, head_dim]; present = Concat(past, new) on axis 2",
                "attention_keep": "bool [batch, 1, seq, past_seq + seq], True = the query may attend to the slot: "
                                  "causal over slots and padding masked (moevl.model.session.attention_keep)",
                "position_ids": "[batch, seq]: 0.. over each request's real tokens (left padding gets 0); decode "
                                "steps continue from the number of real prompt tokens",
                "logits": "the last position only, [batch, vocab] fp32",
            },
            "vision": {"kind": v.kind, "image_size": v.image_size, "num_image_tokens_per_image": v.num_image_tokens,
                       "select_layer": v.select_layer, "select_feature": v.select_feature,
                       "pixel_values": "the CLIP/SigLIP image processor's output after padding to a square with "
                                       "its mean colour (image_aspect_ratio 'pad'); settings in image_processor"},
            "embedding": {"input_ids": f"the <image> sentinel ({IMAGE_TOKEN_INDEX}) expanded to one per image "
                                       "token; the k-th sentinel (row-major over the batch) takes image_features "
                                       "row k"},
            "routing": None,
            "moe": {"layers": list(self.model.moe_layer_indices), "num_experts": cfg.num_experts,
                    "top_k": cfg.top_k, "routing": "deterministic",
                    "semantics": "per token: router Linear (fp32, no bias) -> softmax -> TopK(K constant) -> "
                                 "weights renormalised over the chosen experts; all experts run densely and are "
                                 "combined by the weight mask",
                    "output": "moe_experts [moe_layers, batch, seq, top_k] int64 (column 0 = top-1 expert)"},
            "image_processor": self.image_processor,
            "special_tokens": {"image_token_index": IMAGE_TOKEN_INDEX, "pad_token_id": cfg.pad_token_id,
                               "eos_token_ids": list(cfg.eos_token_ids)},
            "symbolic_dims": {"batch": "requests", "seq": "new tokens this call", "past_seq": "cached tokens",
                              "total_seq": "past_seq + seq", "num_images": "images (all requests)",
                              "num_image_tokens": f"num_images x {v.num_image_tokens}"},
        }


# --------------------------------------------------------------------------------------------- runtime side
class GraphIO:
    """How MoE-LLaVA's batch feeds its graphs and how the per-token expert choices are counted."""

    routing_outputs = ("moe_experts",)
    routing_report_key = "experts_equal"  # in the contract's validation report
    near_ties_in_fp16 = True  # a near-tie flipped by fp16 rounding changes one token's FFN, not a request

    def __init__(self, contract: dict):
        self.contract = contract
        self.cfg = MoeLlavaConfig.from_dict(contract["config"])
        self.np_dtype = np.float16 if contract["dtype"] == "fp16" else np.float32
        self.moe_layers = list(contract["moe"]["layers"])
        self.per_image = contract["vision"]["num_image_tokens_per_image"]

    def processor(self, folder):
        from moevl.model.moe_llava.inputs import MoeLlavaProcessor

        return MoeLlavaProcessor.from_folder(folder, self.cfg, preprocessor=self.contract.get("image_processor"))

    def vision_feeds(self, batch) -> dict | None:
        if batch.pixels is None:
            return None
        return {"pixel_values": np.ascontiguousarray(batch.pixels.numpy(), dtype=np.float32)}

    def image_tokens(self, vision_rows: int) -> int:
        """Rows of image_features for ``vision_rows`` images."""
        return vision_rows * self.per_image

    def embedding_feeds(self, batch) -> dict:
        return {"input_ids": batch.input_ids.numpy().astype(np.int64)}

    def step_embedding_feeds(self, tokens: np.ndarray) -> dict:
        return {"input_ids": tokens.reshape(tokens.shape[0], 1).astype(np.int64)}

    def positions(self, batch) -> np.ndarray:
        return batch.positions.numpy()

    def step_positions(self, pos: torch.Tensor) -> np.ndarray:
        return pos.view(-1, 1).numpy()

    def start(self, session, batch) -> None:
        session.expert_counts = {i: torch.zeros(batch.batch_size, self.cfg.num_experts, dtype=torch.long)
                                 for i in self.moe_layers}
        session.last_experts = None

    def record(self, session, outputs: dict, real: torch.Tensor, prefill: bool) -> None:
        """expert_counts[layer] += token-slots per expert over the real tokens (as MoeLlavaSession does)."""
        from moevl.model.moe_llava.session import count_experts

        experts = outputs.get("moe_experts")
        session.last_experts = experts  # the last call's moe_experts [L_moe, B, T, k]
        if experts is None:
            return
        for j, layer in enumerate(self.moe_layers):
            count_experts(session.expert_counts[layer], torch.from_numpy(np.asarray(experts[j])), real,
                          self.cfg.num_experts)

    def routing_decisions(self, session):
        from moevl.model.moe_llava.session import routing_decisions

        return routing_decisions(session.expert_counts)

    def reference(self, session, batch) -> dict:
        """The PyTorch values the graphs must reproduce for a prefill of ``batch`` (validation)."""
        m = session.model
        out = {}
        feats = None
        if batch.pixels is not None:
            feats = m.encode_images(batch.pixels)
            feats = feats.reshape(-1, feats.shape[-1])
            out["image_features"] = feats
        out["inputs_embeds"] = m.embed(batch.input_ids, feats, batch.image_mask)
        return out

    def om_graphs(self, gears: dict, batch: int):
        from moevl.export.om import OmGraph, decoder_graphs

        contract = self.contract
        g, d = contract["graphs"], contract["decoder"]
        h, size = self.cfg.hidden_size, contract["vision"]["image_size"]
        graphs = [OmGraph("vision", g["vision"]["file"], [("pixel_values", [-1, 3, size, size])],
                          [(n,) for n in gears["images"]], input_format="NCHW")]
        seqs = sorted(set(gears["prefill"]) | {1})
        rows = sorted({self.image_tokens(n) for n in gears["images"]} | {1})  # 1: calls without images
        graphs.append(OmGraph("embedding", g["embedding"]["file"],
                              [("input_ids", [batch, -1]), ("image_features", [-1, h])],
                              [(s, m) for s in seqs for m in rows]))
        return graphs + decoder_graphs(g["decoder"]["file"], gears, batch, h, d["num_kv_heads"], d["head_dim"],
                                       d["num_layers"], [batch, -1], [])


def int8_agreement(folder, batch, tokens: int = 16) -> dict:
    """What int8 does to MoE-LLaVA (as benchmarks.ort reports for Awaker): greedy tokens of the int8 decoder vs fp32,
    and the per-token expert choices of int8 vs fp32 on the same inputs (int8 fed fp32's greedy tokens, so both
    route the same sequence): the share of (layer, token) top-1 experts and of whole top-k sets that agree."""
    from moevl.export.session import open_ort
    from moevl.export.validate import greedy_tokens

    ref, q = open_ort(folder), open_ort(folder, quantize="int8")
    want, got = greedy_tokens(ref, batch, tokens), greedy_tokens(q, batch, tokens)
    real = batch.attention_mask.bool().numpy()
    top1 = sets = total = 0

    def compare(a, b, mask):  # [L, B, T, k] each; mask [B, T] real tokens
        nonlocal top1, sets, total
        m = np.broadcast_to(mask[None], a.shape[:3])
        top1 += int(((a[..., 0] == b[..., 0]) & m).sum())
        sets += int(((np.sort(a, -1) == np.sort(b, -1)).all(-1) & m).sum())
        total += int(m.sum())

    tok = ref.prefill(batch, 0).argmax(-1)
    q.prefill(batch, 0)
    compare(ref.last_experts, q.last_experts, real)
    for _ in range(tokens - 1):
        ref_logits = ref.decode(tok)
        q.decode(tok)
        compare(ref.last_experts, q.last_experts, np.ones((tok.shape[0], 1), bool))
        tok = ref_logits.argmax(-1)
    first = [next((i for i, (a, b) in enumerate(zip(w, g)) if a != b), None) for w, g in zip(want, got)]
    return {"greedy_identical": want == got,
            "greedy_positions_equal": f"{sum(a == b for w, g in zip(want, got) for a, b in zip(w, g))}/"
                                      f"{sum(len(w) for w in want)}",
            "first_divergence": first,
            "top1_expert_agreement": round(top1 / total, 4) if total else None,
            "topk_set_agreement": round(sets / total, 4) if total else None,
            "routed_tokens": total}


