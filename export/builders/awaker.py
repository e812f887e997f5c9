"""Awaker's side of the three-graph contract: the graphs it exports (``Builder``) and how a runtime feeds them and
reads their routing outputs (``GraphIO``). The math is the model's own: the graphs call the model's modules (the
vision tower, ``embed``, the routers through ``route``, the decoder) with the "export" kernel set.

  vision.onnx     patches [num_patches, C*t*p*p], vision_pos [num_patches, 2] int64 (2-D rotary ids),
                  vision_keep [num_patches, num_patches] bool (block-diagonal) -> image_features [num_image_tokens, H]
  embedding.onnx  input_ids [batch, seq] int64, image_features [num_image_tokens, H], image_mask [batch, seq] bool,
                  router_span [batch, 2] int64 -> inputs_embeds [batch, seq, H], router_input [batch, H] fp32
  decoder.onnx    inputs_embeds, attention_keep [batch, 1, seq, total_seq] bool, position_ids [3, batch, seq] int64,
                  router_input [batch, H] fp32, past_key_values.{i}.key/value [batch, kv_heads, past_seq, head_dim]
                  -> logits [batch, vocab] fp32 (last position only), router_expert/router_p [layers, 2, batch],
                  present.{i}.key/value [batch, kv_heads, total_seq, head_dim]   (total_seq = past_seq + seq)
Awaker's routers run inside the decoder on ``router_input`` (the pooled prompt embedding, computed once at prefill by
the embedding graph and fed unchanged at every step): per-request routing is a [batch, H] input, so there is no
data-dependent shape anywhere.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from moevl.export.graph import TORCH_TO_ONNX, GraphSpec, TensorSpec, TracedDecoder, kv_cache_specs
from moevl.model.awaker.config import AwakerConfig
from moevl.model.awaker.inputs import pooled_prompt, vision_inputs


# --------------------------------------------------------------------------------------------- graphs
class VisionGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, patches, vision_pos, vision_keep):
        return self.model.encode_images(patches, vision_pos, vision_keep)


class EmbeddingGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, image_features, image_mask, router_span):
        emb = self.model.embed(input_ids, image_features, image_mask)
        return emb, pooled_prompt(emb, router_span)


class DecoderGraph(TracedDecoder):
    def forward(self, inputs_embeds, attention_keep, position_ids, router_input, *past):
        m = self.model

        def step():
            routing = m.route(router_input) if m.has_adapters else None
            hidden = m(inputs_embeds, position_ids, None, attention_keep, routing, caches=m.caches)
            yield m.logits(hidden[:, -1])                                   # [B, V] fp32
            if routing is not None:
                yield torch.stack([torch.stack([r.attn_expert, r.mlp_expert]) for r in routing])  # [L, 2, B]
                yield torch.stack([torch.stack([r.attn_p, r.mlp_p]) for r in routing]).float()

        return self.with_past(past, step)


class _DropRouterInput(nn.Module):
    """The base model (no adapters): the decoder has no router input."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, inputs_embeds, attention_keep, position_ids, *past):
        return self.inner(inputs_embeds, attention_keep, position_ids, None, *past)


class Builder:
    """What the Awaker family exports: graph wrappers, example inputs, names/shapes, and the contract section."""

    def __init__(self, model):
        self.model = model
        self.cfg = model.cfg

    def accept(self, session) -> None:
        """Raise ExportError if this session cannot be exported (every Awaker session can)."""

    def graph_specs(self) -> list[GraphSpec]:
        cfg, m = self.cfg, self.model
        dt = m.lm_head.weight.dtype
        dname = TORCH_TO_ONNX[dt]
        h, v = cfg.hidden_size, cfg.vision
        patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
        specs = []
        # vision: one 4x4-patch image (the merge groups are consecutive rows)
        n = 16
        pos, keep = vision_inputs(torch.tensor([[1, 4, 4]]), v.spatial_merge_size)
        specs.append(GraphSpec(
            "vision", VisionGraph(m), (torch.randn(n, patch_dim), pos, keep),
            [TensorSpec("patches", "float32", ["num_patches", patch_dim]),
             TensorSpec("vision_pos", "int64", ["num_patches", 2]),
             TensorSpec("vision_keep", "bool", ["num_patches", "num_patches"])],
            [TensorSpec("image_features", dname, ["num_image_tokens", h])]))
        # embedding: batch 2, 5 tokens, 2 image tokens in the first request
        ids = torch.randint(7, cfg.vocab_size, (2, 5))
        mask = torch.zeros(2, 5, dtype=torch.bool)
        mask[0, 1:3] = True
        specs.append(GraphSpec(
            "embedding", EmbeddingGraph(m),
            (ids, torch.randn(2, h, dtype=dt), mask, torch.tensor([[0, 4], [1, 5]])),
            [TensorSpec("input_ids", "int64", ["batch", "seq"]),
             TensorSpec("image_features", dname, ["num_image_tokens", h]),
             TensorSpec("image_mask", "bool", ["batch", "seq"]),
             TensorSpec("router_span", "int64", ["batch", 2])],
            [TensorSpec("inputs_embeds", dname, ["batch", "seq", h]),
             TensorSpec("router_input", "float32", ["batch", h])]))
        # decoder: batch 2, seq 3 on a past of 4 (distinct sizes so the tracer cannot confuse the axes)
        b, t, p = 2, 3, 4
        past, past_specs, present_specs = kv_cache_specs(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, b, p, dt,
                                                         dname)
        keep = torch.ones(b, 1, t, p + t, dtype=torch.bool).tril(diagonal=p)
        routing_in = [TensorSpec("router_input", "float32", ["batch", h])] if m.has_adapters else []
        routing_out = ([TensorSpec("router_expert", "int64", [cfg.num_layers, 2, "batch"]),
                        TensorSpec("router_p", "float32", [cfg.num_layers, 2, "batch"])] if m.has_adapters else [])
        example = (torch.randn(b, t, h, dtype=dt), keep, torch.arange(t).expand(3, b, t) + p,
                   torch.randn(b, h)) + tuple(past)
        module = DecoderGraph(m)
        if not m.has_adapters:
            module = _DropRouterInput(module)
            example = example[:3] + example[4:]
        specs.append(GraphSpec(
            "decoder", module, example,
            [TensorSpec("inputs_embeds", dname, ["batch", "seq", h]),
             TensorSpec("attention_keep", "bool", ["batch", 1, "seq", "total_seq"]),
             TensorSpec("position_ids", "int64", [3, "batch", "seq"])] + routing_in + past_specs,
            [TensorSpec("logits", "float32", ["batch", cfg.vocab_size])] + routing_out + present_specs))
        return specs

    def contract_section(self) -> dict:
        cfg = self.cfg
        routing = None
        if self.model.has_adapters:
            routing = {
                "mode": "prefill",
                "input": "router_input",
                "semantics": "router_input [batch, hidden] fp32 is the mean of the prompt embeddings (image features "
                             "inserted) over each request's router span (embedding graph output of the prefill call); "
                             "feed the same value at every decode step. The decoder runs every layer's two routers "
                             "on it (RMSNorm -> Linear -> fp16 softmax -> top-1) and applies the chosen task expert "
                             "and the global expert of each LoRA-MoE linear with scales (p^2 s, (1-p) s).",
                "outputs": {"router_expert": "[layers, 2 (attn o_proj, mlp gate/up/down), batch] int64 expert index",
                            "router_p": "[layers, 2, batch] fp32 router probability of that expert"},
            }
        return {
            "decoder": {
                "num_layers": cfg.num_layers, "num_kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
                "past_key": "past_key_values.{i}.key", "past_value": "past_key_values.{i}.value",
                "present_key": "present.{i}.key", "present_value": "present.{i}.value",
                "kv_layout": "[batch, kv_heads, seq, head_dim]; present = Concat(past, new) on axis 2",
                "attention_keep": "bool [batch, 1, seq, past_seq + seq], True = the query may attend to the slot: "
                                  "causal over slots and padding masked, and every query sees its own slot "
                                  "(moevl.model.session.attention_keep)",
                "position_ids": "M-RoPE ids [3 (t, h, w), batch, seq] (moevl.model.awaker.inputs.mrope_positions); "
                                "decode steps continue from next_position with all three equal",
                "logits": "the last position only, [batch, vocab] fp32",
            },
            "vision": {"merge": cfg.vision.spatial_merge_size, "patch_order": "Qwen2-VL processor order",
                       "vision_pos": "moevl.model.awaker.inputs.vision_inputs (row, col per patch)",
                       "vision_keep": "block-diagonal, one block per image frame"},
            "embedding": {"image_mask": "True on <|image_pad|> positions; their rows are image_features in "
                                        "row-major order over the batch",
                          "router_span": "[start, end) per request in padded coordinates "
                                         "(moevl.model.awaker.inputs.prompt_span)"},
            "routing": routing,
            "special_tokens": {k: getattr(cfg, k) for k in (
                "image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
                "im_start_token_id", "im_end_token_id", "pad_token_id")} | {"eos_token_ids": list(cfg.eos_token_ids)},
        }


# --------------------------------------------------------------------------------------------- runtime side
class GraphIO:
    """How Awaker's batch feeds its graphs and what its routing outputs mean (moevl.export.session drives)."""

    routing_outputs = ("router_expert", "router_p")
    routing_report_key = "routing_equal"  # in the contract's validation report
    near_ties_in_fp16 = False  # a flipped router decision changes a whole request: always an error

    def __init__(self, contract: dict):
        self.contract = contract
        self.cfg = AwakerConfig.from_dict(contract["config"])
        self.merge = self.cfg.vision.spatial_merge_size ** 2
        self.np_dtype = np.float16 if contract["dtype"] == "fp16" else np.float32

    @staticmethod
    def synthetic_batch(cfg):
        """Two text-only chats of random token ids (12 and 7 words), for a model without a tokenizer."""
        from moevl.model.awaker.inputs import collate

        g = torch.Generator().manual_seed(0)
        lo, hi = 10, min(cfg.vocab_size, 150000)

        def chat(n):
            words = torch.randint(lo, hi, (n + 4,), generator=g).tolist()
            return ([cfg.im_start_token_id, words[0], cfg.im_end_token_id, cfg.im_start_token_id, words[1]]
                    + words[4:] + [cfg.im_end_token_id, cfg.im_start_token_id, words[2]])

        return collate([chat(12), chat(7)], [], [], cfg)

    def processor(self, folder):
        from moevl.model.awaker.inputs import AwakerProcessor

        return AwakerProcessor.from_folder(folder, self.cfg)

    def vision_feeds(self, batch) -> dict | None:
        if batch.patches is None:
            return None
        return {"patches": batch.patches.numpy().astype(np.float32), "vision_pos": batch.vision_pos.numpy(),
                "vision_keep": batch.vision_keep.numpy()}

    def image_tokens(self, vision_rows: int) -> int:
        """Rows of image_features for ``vision_rows`` patches."""
        return vision_rows // self.merge

    def embedding_feeds(self, batch) -> dict:
        return {"input_ids": batch.input_ids.numpy(), "image_mask": batch.image_mask.numpy(),
                "router_span": batch.span.numpy()}

    def step_embedding_feeds(self, tokens: np.ndarray) -> dict:
        """A decode step's one token per request (no image, a router span that is not used: router_input is kept
        from the prefill)."""
        b = tokens.shape[0]
        return {"input_ids": tokens.reshape(b, 1).astype(np.int64), "image_mask": np.zeros((b, 1), np.bool_),
                "router_span": np.tile(np.array([[0, 1]], np.int64), (b, 1))}

    def positions(self, batch) -> np.ndarray:
        return batch.positions.numpy()

    def step_positions(self, pos: torch.Tensor) -> np.ndarray:
        return pos.view(1, -1, 1).expand(3, -1, 1).numpy()  # text tokens: the same position on all three axes

    def start(self, session, batch) -> None:
        session.last_routing = None

    def record(self, session, outputs: dict, real: torch.Tensor, prefill: bool) -> None:
        """Routing is decided at prefill and kept (router_input is fed unchanged)."""
        if prefill and "router_expert" in outputs:
            session.last_routing = (outputs["router_expert"], outputs["router_p"])

    def routing_decisions(self, session):
        from moevl.model.awaker.session import routing_decisions

        return routing_decisions(*session.last_routing) if session.last_routing is not None else []

    def reference(self, session, batch) -> dict:
        """The PyTorch values the graphs must reproduce for a prefill of ``batch`` (validation)."""
        m = session.model
        out = {}
        feats = None
        if batch.patches is not None:
            feats = m.encode_images(batch.patches, batch.vision_pos, batch.vision_keep)
            out["image_features"] = feats
        emb = m.embed(batch.input_ids, feats, batch.image_mask)
        out["inputs_embeds"] = emb
        out["router_input"] = pooled_prompt(emb, batch.span)
        return out

    def om_graphs(self, gears: dict, batch: int):
        from moevl.export.om import OmGraph, decoder_graphs

        contract, cfg = self.contract, self.cfg
        h = cfg.hidden_size
        if any(v % self.merge for v in gears["vision"]):
            raise ValueError(f"vision gears count patches and must be multiples of {self.merge} (merge^2): "
                             f"{gears['vision']}")
        graphs = []
        g = contract["graphs"]
        v = cfg.vision
        patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
        if "vision" in g:
            graphs.append(OmGraph("vision", g["vision"]["file"],
                                  [("patches", [-1, patch_dim]), ("vision_pos", [-1, 2]), ("vision_keep", [-1, -1])],
                                  [(n, n, n, n) for n in gears["vision"]]))
        seqs = sorted(set(gears["prefill"]) | {1})
        rows = sorted({self.image_tokens(n) for n in gears["vision"]} | {1})
        graphs.append(OmGraph("embedding", g["embedding"]["file"],
                              [("input_ids", [batch, -1]), ("image_features", [-1, h]), ("image_mask", [batch, -1]),
                               ("router_span", [batch, 2])],
                              [(s, m, s) for s in seqs for m in rows]))
        router = [("router_input", [batch, h])] if contract.get("routing") else []
        return graphs + decoder_graphs(g["decoder"]["file"], gears, batch, h, cfg.num_kv_heads, cfg.head_dim,
                                       cfg.num_layers, [3, batch, -1], router)
