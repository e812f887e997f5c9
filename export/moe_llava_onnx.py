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

from pathlib import Path

import numpy as np
import torch
from torch import nn

from export.onnx_export import (_TORCH_TO_ONNX, ConcatCache, ExportError, GraphSpec, TensorSpec, embed_with_images,
                                kv_cache_specs, read_contract)
from export.runtime import make_session, run_decoder_iobinding
from model.moe_llava_config import IMAGE_TOKEN_INDEX
from model.session import SessionBase

# image processor settings that travel in the contract (the tower folder's preprocessor_config.json may not be
# beside the MoE-LLaVA checkpoint, so the export carries them)
_IMAGE_PROCESSOR_KEYS = ("size", "crop_size", "do_center_crop", "do_resize", "do_rescale", "rescale_factor",
                         "do_normalize", "image_mean", "image_std", "resample", "do_convert_rgb")


# --------------------------------------------------------------------------------------------- graphs
class MoeLlavaVisionGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        feats = self.model.encode_images(pixel_values)                    # [I, N, H]
        return feats.flatten(0, 1)                                         # [I*N, H]


class MoeLlavaEmbeddingGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, image_features):
        image_mask = input_ids == IMAGE_TOKEN_INDEX
        ids = torch.where(image_mask, torch.zeros_like(input_ids), input_ids)  # the sentinel is not a vocab id
        return embed_with_images(self.model.model.embed_tokens, ids, image_features, image_mask)


class MoeLlavaDecoderGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model
        self.num_layers = len(model.model.layers)

    def forward(self, inputs_embeds, attention_keep, position_ids, *past):
        m = self.model
        b, t = inputs_embeds.shape[:2]
        caches = nn.ModuleList(ConcatCache(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers))
        saved, m.caches = m.caches, caches
        try:
            hidden, chosen = m(inputs_embeds, position_ids, None, attention_keep, "deterministic", None)
        finally:
            m.caches = saved
        outs = [m.logits(hidden[:, -1])]                                   # [B, V] fp32
        if chosen:
            k = self.model.cfg.top_k
            outs.append(torch.stack([chosen[i].reshape(b, t, k) for i in sorted(chosen)]))  # [L_moe, B, T, k]
        for c in caches:
            outs.extend(c.present)
        return tuple(outs)


class MoeLlavaOnnxBuilder:
    """What the MoE-LLaVA family exports: graph wrappers, example inputs, names/shapes, and the contract section."""

    family = "moe-llava"

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
        dname = _TORCH_TO_ONNX[dt]
        h, s = cfg.hidden_size, cfg.vision.image_size
        specs = [GraphSpec(
            "vision", MoeLlavaVisionGraph(m), (torch.randn(2, 3, s, s),),
            [TensorSpec("pixel_values", "float32", ["num_images", 3, s, s])],
            [TensorSpec("image_features", dname, ["num_image_tokens", h])])]
        # embedding: batch 2, 5 tokens, 2 image tokens in the first request
        ids = torch.randint(1, cfg.vocab_size, (2, 5))
        ids[0, 1:3] = IMAGE_TOKEN_INDEX
        specs.append(GraphSpec(
            "embedding", MoeLlavaEmbeddingGraph(m), (ids, torch.randn(2, h, dtype=dt)),
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
            "decoder", MoeLlavaDecoderGraph(m),
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
                                  "causal over slots and padding masked (model.session.attention_keep)",
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


# --------------------------------------------------------------------------------------------- runtimes
class ExportedMoeLlavaSession(SessionBase):
    """prefill/decode over exported MoE-LLaVA graphs (same interface as model.moe_llava_session.MoeLlavaSession, so
    model.generate.generate drives it). Subclasses only run graphs: ``OrtMoeLlavaSession`` (ONNX Runtime) and
    ``export.om.OmMoeLlavaSession`` (Ascend OM with gear padding); they implement ``_vision``, ``_embedding``,
    ``_decoder`` and ``_empty_past``."""

    family = "moe-llava"

    def __init__(self, folder, contract: dict | None = None, max_context: int | None = None):
        from ascend.device import resolve_device
        from model.moe_llava_config import MoeLlavaConfig

        self.folder = Path(folder)
        self.contract = contract or read_contract(folder)
        if self.contract["family"] != self.family:
            raise ValueError(f"{folder} holds a {self.contract['family']} export, not {self.family}")
        self.cfg = MoeLlavaConfig.from_dict(self.contract["config"])
        self.dtype = self.contract["dtype"]
        self.np_dtype = np.float16 if self.dtype == "fp16" else np.float32
        self.processor = self.tokenizer = None
        if (self.folder / "tokenizer.json").is_file() or (self.folder / "vocab.json").is_file():
            from model.moe_llava_inputs import MoeLlavaProcessor

            self.processor = MoeLlavaProcessor.from_folder(self.folder, self.cfg,
                                                           preprocessor=self.contract.get("image_processor"))
            self.tokenizer = self.processor.tokenizer
        self.device = resolve_device("cpu")  # where the loop's tensors live (logits come back to the host)
        self.max_context = max_context or self.cfg.max_position_embeddings
        self.eos_token_ids = set(self.cfg.eos_token_ids)
        self.pad_token_id = self.cfg.pad_token_id
        self.moe_layers = list(self.contract["moe"]["layers"])
        self.expert_counts: dict[int, torch.Tensor] = {}
        self.last_experts = None  # the last call's moe_experts [L_moe, B, T, k] numpy
        self._state = None

    @property
    def dtype_name(self) -> str:
        return self.dtype

    # ------------------------------------------------------------------ graph calls (subclasses)
    def _vision(self, pixel_values: np.ndarray) -> np.ndarray:  # -> image_features [I*N, H]
        raise NotImplementedError

    def _embedding(self, input_ids: np.ndarray, image_features: np.ndarray) -> np.ndarray:  # -> inputs_embeds
        raise NotImplementedError

    def _decoder(self, embeds, positions, past, valid_past, valid_new):
        """-> (logits np [B, V], moe_experts np [L_moe, B, T, k] | None, past covering valid_past + valid_new)."""
        raise NotImplementedError

    def _empty_past(self, batch: int):
        raise NotImplementedError

    def _count(self, experts, real: torch.Tensor) -> None:
        """expert_counts[layer] += token-slots per expert over the real tokens (as MoeLlavaSession._run)."""
        self.last_experts = experts
        if experts is None:
            return
        onehot = torch.nn.functional.one_hot(torch.from_numpy(experts), self.cfg.num_experts).sum(-2)  # [L,B,T,E]
        for j, layer in enumerate(self.moe_layers):
            self.expert_counts[layer] += (onehot[j] * real[..., None]).sum(1)

    # ------------------------------------------------------------------ the two steps generation drives
    def prefill(self, batch, max_len: int) -> torch.Tensor:
        b = batch.batch_size
        if batch.pixels is not None:
            feats = self._vision(batch.pixels.numpy())
        else:
            feats = np.zeros((0, self.cfg.hidden_size), self.np_dtype)
        embeds = self._embedding(batch.input_ids.numpy(), feats)
        valid = batch.attention_mask.bool()
        logits, experts, past = self._decoder(embeds, batch.positions.numpy(), self._empty_past(b),
                                              torch.zeros(b, 0, dtype=torch.bool), valid)
        self.expert_counts = {i: torch.zeros(b, self.cfg.num_experts, dtype=torch.long) for i in self.moe_layers}
        self._count(experts, valid)
        self._state = {"past": past, "valid": valid, "pos": batch.next_position.clone()}
        return torch.from_numpy(np.ascontiguousarray(logits))

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        st = self._state
        b = tokens.shape[0]
        embeds = self._embedding(tokens.reshape(b, 1).cpu().numpy().astype(np.int64),
                                 np.zeros((0, self.cfg.hidden_size), self.np_dtype))
        new = torch.ones(b, 1, dtype=torch.bool)
        logits, experts, st["past"] = self._decoder(embeds, st["pos"].view(b, 1).numpy(), st["past"], st["valid"],
                                                    new)
        self._count(experts, new)
        st["valid"] = torch.cat([st["valid"], new], dim=1)
        st["pos"] = st["pos"] + 1
        return torch.from_numpy(np.ascontiguousarray(logits))

    def prepare(self, questions, images=None):
        if self.processor is None:
            raise ValueError(f"{self.folder} has no tokenizer files: re-export with a model folder that has them")
        return super().prepare(questions, images)

    def routing_decisions(self):
        from model.moe_llava_session import MoeLlavaSession

        return MoeLlavaSession.routing_decisions(self)  # reads only expert_counts: the same summary as PyTorch


class OrtMoeLlavaSession(ExportedMoeLlavaSession):
    """The exported graphs in ONNX Runtime; ``quantize="int8"``: the decoder's MatMul weights in int8, the router
    MatMuls kept fp32 (export.runtime.quantize_decoder)."""

    def __init__(self, folder, provider: str = "cpu", quantize: str | None = None, threads: int | None = None,
                 max_context: int | None = None, log=lambda *a: None):
        from export.runtime import quantize_decoder

        super().__init__(folder, max_context=max_context)
        g = self.contract["graphs"]
        decoder_path = self.folder / g["decoder"]["file"]
        if quantize == "int8":
            decoder_path = quantize_decoder(self.folder, self.contract, log)
        elif quantize is not None:
            raise ValueError(f"--quantize {quantize!r}: only int8 is available")
        self.provider, self.quantize = provider, quantize
        self.vision = make_session(self.folder / g["vision"]["file"], provider, threads)
        self.embedding = make_session(self.folder / g["embedding"]["file"], provider, threads)
        self.decoder = make_session(decoder_path, provider, threads)
        self.output_names = [o.name for o in self.decoder.get_outputs()]
        self.kv_device = "cuda" if provider == "cuda" else "cpu"

    def describe(self) -> dict:
        import onnxruntime as ort

        return {"kind": "onnxruntime", "device": f"ort-{self.provider}", "chip": self.decoder.get_providers()[0],
                "providers": self.decoder.get_providers(), "dtype": self.dtype, "onnxruntime": ort.__version__,
                "quantize": self.quantize}

    def _vision(self, pixel_values: np.ndarray) -> np.ndarray:
        return self.vision.run(None, {"pixel_values": np.ascontiguousarray(pixel_values, dtype=np.float32)})[0]

    def _embedding(self, input_ids: np.ndarray, image_features: np.ndarray) -> np.ndarray:
        return self.embedding.run(None, {"input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
                                         "image_features": image_features})[0]

    def _empty_past(self, batch: int):
        shape = (batch, self.cfg.num_kv_heads, 0, self.cfg.head_dim)
        return [np.zeros(shape, self.np_dtype) for _ in range(2 * self.cfg.num_layers)]

    def _decoder(self, embeds, positions, past, valid_past, valid_new):
        """-> (logits np [B, V], moe_experts np [L_moe, B, T, k] | None, present KV as OrtValues)."""
        outs, present = run_decoder_iobinding(self, embeds, positions, past, valid_past, valid_new, {})
        experts = outs["moe_experts"].numpy() if "moe_experts" in outs else None
        return outs["logits"].numpy(), experts, present


def int8_agreement(folder, batch, tokens: int = 16) -> dict:
    """What int8 does to MoE-LLaVA (as benchmarks.ort reports for Awaker): greedy tokens of the int8 decoder vs fp32,
    and the per-token expert choices of int8 vs fp32 on the same inputs (int8 fed fp32's greedy tokens, so both
    route the same sequence): the share of (layer, token) top-1 experts and of whole top-k sets that agree."""
    from export.validate import greedy_tokens

    ref, q = OrtMoeLlavaSession(folder), OrtMoeLlavaSession(folder, quantize="int8")
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


# --------------------------------------------------------------------------------------------- validation
def sample_batch(session):
    """Two requests of different lengths: the demo image with a question, and a text-only question."""
    from model.tiny import DEMO_IMAGE

    return session.prepare(["Describe the image.", "What colour is the circle? Answer in one word."],
                           [[str(DEMO_IMAGE)], []])


@torch.inference_mode()
def validate_moe_llava(folder: Path, session, tokens: int = 8, log=print) -> dict:
    """Each graph in ONNX Runtime (CPU EP) against the PyTorch model on the same inputs, the experts every token
    chose, then greedy generation (export.validate.validate_export runs the checker and ATC check first)."""
    from export.onnx_export import TOLERANCE
    from export.validate import ValidationError, _errors, check_decode_and_greedy

    contract = read_contract(folder)
    tol = TOLERANCE[contract["dtype"]]
    report = {"tolerance_rel": tol, "graphs": {}}
    errs = report["graphs"]
    ort = OrtMoeLlavaSession(folder)
    m = session.model
    batch = sample_batch(session)
    feats = m.encode_images(batch.pixels)
    feats = feats.reshape(-1, feats.shape[-1])
    got = ort._vision(batch.pixels.numpy())
    _errors("vision.image_features", got, feats, tol, log, errs)
    emb = m.embed(batch.input_ids, feats, batch.image_mask)
    _errors("embedding.inputs_embeds", ort._embedding(batch.input_ids.numpy(), feats.numpy()), emb, tol, log, errs)
    ref = session.prefill(batch, batch.input_ids.shape[1] + 2)
    _errors("decoder.prefill_logits", ort.prefill(batch, 0), ref, tol, log, errs)
    want = {k: v.tolist() for k, v in session.expert_counts.items()}
    have = {k: v.tolist() for k, v in ort.expert_counts.items()}
    report["experts_equal"] = want == have
    if want != have:  # a near-tie flipped by rounding; the logit bound and the tokens still decide
        log(f"  expert choices differ on near-ties: PyTorch {want} vs ONNX Runtime {have}")
        if contract["dtype"] == "fp32":
            raise ValidationError(f"expert choices differ: PyTorch {want} vs ONNX Runtime {have}")
    else:
        log("  expert choices (per token, top-2): equal")
    return check_decode_and_greedy(session, ort, batch, ref, tokens, tol, log, errs, report)

