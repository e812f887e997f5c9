"""Driving exported graphs with the same generation loop as PyTorch (model.generate).

``ExportedAwakerSession`` holds what every runtime of the three-graph contract shares: pre-processing (the same
AwakerProcessor), the per-request bookkeeping of prefill/decode (valid slots, next M-RoPE position, the router
input) and the user-facing ``ask``/``routing_decisions``. Subclasses only run graphs:
``OrtAwakerSession`` (ONNX Runtime: CPU, CUDA or CANN execution provider; IOBinding keeps the KV cache in ORT's
own buffers between steps) and ``export.om.OmAwakerSession`` (Ascend OM through ais_bench, with gear padding).
MoE-LLaVA's runtimes (the same split) are in export/moe_llava_onnx.py and export/om.py (``OmMoeLlavaSession``).

    from export.runtime import OrtAwakerSession
    s = OrtAwakerSession("out/awaker-tiny-onnx")
    print(s.ask("What is in the picture?", images=["cat.png"], max_new_tokens=16).texts[0])
"""
from __future__ import annotations

import hashlib
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from export.onnx_export import read_contract

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "cann": "CANNExecutionProvider"}
_NP = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "bool": np.bool_}


class ProviderError(RuntimeError):
    """The requested execution provider is not available or not actually used by the session."""


class ExportedAwakerSession:
    """prefill/decode over exported Awaker graphs; see the module docstring. Subclasses implement
    ``_vision``, ``_embedding`` and ``_decoder``."""

    family = "awaker"

    def __init__(self, folder, contract: dict | None = None, max_context: int | None = None):
        from ascend.device import resolve_device
        from model.config import AwakerConfig

        self.folder = Path(folder)
        self.contract = contract or read_contract(folder)
        if self.contract["family"] != "awaker":
            raise ValueError(f"{folder} holds a {self.contract['family']} export, not awaker")
        self.cfg = AwakerConfig.from_dict(self.contract["config"])
        self.dtype = self.contract["dtype"]
        self.np_dtype = _NP["float16" if self.dtype == "fp16" else "float32"]
        self.processor = None
        self.tokenizer = None
        if (self.folder / "tokenizer.json").is_file() or (self.folder / "vocab.json").is_file():
            from model.inputs import AwakerProcessor

            self.processor = AwakerProcessor.from_folder(self.folder, self.cfg)
            self.tokenizer = self.processor.tokenizer
        self.device = resolve_device("cpu")  # where the loop's tensors live (logits come back to the host)
        self.max_context = max_context or self.cfg.max_position_embeddings
        self.eos_token_ids = set(self.cfg.eos_token_ids)
        self.pad_token_id = self.cfg.pad_token_id
        self.has_router = self.contract.get("routing") is not None
        self.last_routing = None  # (expert [L, 2, B], p [L, 2, B]) numpy
        self._state = None

    # ------------------------------------------------------------------ graph calls (subclasses)
    def _vision(self, patches, vision_pos, vision_keep):  # -> image_features np
        raise NotImplementedError

    def _embedding(self, input_ids, image_features, image_mask, router_span):  # -> inputs_embeds, router_input
        raise NotImplementedError

    def _decoder(self, embeds, positions, router_input, past, valid_past, valid_new):
        """-> (logits np [B, V], (router_expert, router_p) | None, past covering valid_past + valid_new)."""
        raise NotImplementedError

    def _empty_past(self, batch: int):
        raise NotImplementedError

    # ------------------------------------------------------------------ the two steps generation drives
    def prefill(self, batch, max_len: int) -> torch.Tensor:
        b = batch.batch_size
        h = self.cfg.hidden_size
        if batch.patches is not None:
            feats = self._vision(batch.patches.numpy().astype(np.float32), batch.vision_pos.numpy(),
                                 batch.vision_keep.numpy())
        else:
            feats = np.zeros((0, h), self.np_dtype)
        embeds, router_input = self._embedding(batch.input_ids.numpy(), feats, batch.image_mask.numpy(),
                                               batch.span.numpy())
        valid = batch.attention_mask.bool()
        logits, routing, past = self._decoder(embeds, batch.positions.numpy(), router_input, self._empty_past(b),
                                              torch.zeros(b, 0, dtype=torch.bool), valid)
        self.last_routing = routing
        self._state = {"past": past, "valid": valid, "pos": batch.next_position.clone(), "router_input": router_input}
        return torch.from_numpy(np.ascontiguousarray(logits))

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        st = self._state
        b = tokens.shape[0]
        ids = tokens.reshape(b, 1).cpu().numpy().astype(np.int64)
        embeds, _ = self._embedding(ids, np.zeros((0, self.cfg.hidden_size), self.np_dtype),
                                    np.zeros((b, 1), np.bool_), np.tile(np.array([[0, 1]], np.int64), (b, 1)))
        positions = st["pos"].view(1, b, 1).expand(3, b, 1).numpy()
        new = torch.ones(b, 1, dtype=torch.bool)
        logits, _, st["past"] = self._decoder(embeds, positions, st["router_input"], st["past"], st["valid"], new)
        st["valid"] = torch.cat([st["valid"], new], dim=1)
        st["pos"] = st["pos"] + 1
        return torch.from_numpy(np.ascontiguousarray(logits))

    # ------------------------------------------------------------------ user-facing (as model.session)
    def routing_decisions(self):
        from model.session import RoutingDecision

        if self.last_routing is None:
            return []
        expert, p = self.last_routing
        out = []
        for i in range(expert.shape[0]):
            for j, name in enumerate(("attn", "mlp")):
                out.append(RoutingDecision(i, name, [int(x) for x in expert[i, j]],
                                           [round(float(x), 6) for x in p[i, j]]))
        return out

    def prepare(self, questions: list[str], images: list[list] | None = None):
        if self.processor is None:
            raise ValueError(f"{self.folder} has no tokenizer files: re-export with a model folder that has them")
        images = images or [[] for _ in questions]
        prompts = [self.processor.chat(q, num_images=len(imgs)) for q, imgs in zip(questions, images)]
        return self.processor(prompts, images, max_length=self.max_context)

    def ask(self, question, images=None, on_text=None, **gen):
        from model.generate import GenerationConfig, generate

        questions = [question] if isinstance(question, str) else list(question)
        if images is not None and len(questions) == 1 and not (images and isinstance(images[0], (list, tuple))):
            images = [list(images)]
        return generate(self, self.prepare(questions, images), GenerationConfig(**gen), on_text)


def keep_mask(valid_past: torch.Tensor, valid_new: torch.Tensor) -> np.ndarray:
    """attention_keep [B, 1, T, P+T] for new tokens after P cached slots (model.session.attention_keep)."""
    from model.session import attention_keep

    p, t = valid_past.shape[1], valid_new.shape[1]
    return attention_keep(torch.cat([valid_past, valid_new], dim=1), torch.arange(p, p + t)).numpy()


# ---------------------------------------------------------------------------------------------- ONNX Runtime
def make_session(path: Path, provider: str = "cpu", threads: int | None = None, device_id: int = 0):
    """An InferenceSession on the requested provider; fails (never silently falls back) if it is not used."""
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {sorted(PROVIDERS)}, not {provider!r}")
    want = PROVIDERS[provider]
    if want not in ort.get_available_providers():
        hint = {"cuda": "pip install onnxruntime-gpu (instead of onnxruntime)",
                "cann": "pip install onnxruntime-cann (instead of onnxruntime) on a host with CANN, and source "
                        "/usr/local/Ascend/ascend-toolkit/set_env.sh"}.get(provider, "")
        raise ProviderError(f"{want} is not in this onnxruntime build (available: "
                            f"{', '.join(ort.get_available_providers())}): {hint}")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    providers = [(want, {"device_id": device_id})] if provider != "cpu" else []
    providers.append("CPUExecutionProvider")
    sess = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    if sess.get_providers()[0] != want:
        # onnxruntime-cann / -gpu fall back to CPU when the device library cannot be loaded
        raise ProviderError(f"{path.name}: asked for {want} but the session runs on {sess.get_providers()}; the "
                            "device runtime did not load (check the driver/CANN/CUDA libraries and the logs)")
    return sess


# ops a router's logits may pass through on their way to the TopK that picks the experts
_ROUTER_PATH_OPS = {"Softmax", "LogSoftmax", "Sigmoid", "Cast", "Identity", "Reshape", "Add", "Sub", "Mul", "Div"}


def router_nodes(graph, max_hops: int = 4) -> list[str]:
    """Names of the decoder's router MatMul/Gemm nodes, which int8 must leave alone.

    Two ways to be one: a traced name with "router" in it (Awaker's modules are named so), or a MatMul/Gemm with a
    constant weight whose output reaches a TopK within ``max_hops`` nodes through softmax/cast/elementwise ops only
    (MoE-LLaVA's gate: MatMul [hidden, num_experts] -> Softmax -> TopK, traced as /model/layers.i/mlp/MatMul)."""
    consts = {i.name for i in graph.initializer}
    consts |= {n.output[0] for n in graph.node if n.op_type == "Constant"}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def reaches_topk(name: str) -> bool:
        frontier = [name]
        for _ in range(max_hops):
            nxt = []
            for t in frontier:
                for c in consumers.get(t, []):
                    if c.op_type == "TopK" and c.input[0] == t:
                        return True
                    if c.op_type in _ROUTER_PATH_OPS:
                        nxt.extend(c.output)
            frontier = nxt
        return False

    return [n.name for n in graph.node
            if "router" in n.name
            or (n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in consts
                and reaches_topk(n.output[0]))]


def quantize_decoder(folder: Path, contract: dict, log=print) -> Path:
    """Dynamic int8 (weights int8, activations quantised per call) of the decoder's MatMuls, the routers excepted
    (router_nodes: a flipped expert changes a whole request for Awaker, a token's FFN for MoE-LLaVA, where exactly
    one router per MoE layer must be found or nothing is quantised). Cached as decoder.int8.onnx in the folder, or
    in the temp directory when the folder is read-only."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    entry = contract["graphs"]["decoder"]
    if contract["dtype"] != "fp32":
        raise ValueError("--quantize int8 needs an fp32 export (dynamic quantisation reads fp32 weights)")
    src = folder / entry["file"]
    stamp = hashlib.sha1(f"{src.resolve()}:{src.stat().st_mtime_ns}".encode()).hexdigest()[:12]
    candidates = [folder / "decoder.int8.onnx",
                  Path(tempfile.gettempdir()) / f"moevl-int8-{stamp}" / "decoder.int8.onnx"]
    for dst in candidates:
        tag = dst.with_suffix(".stamp")
        if dst.is_file() and tag.is_file() and tag.read_text() == stamp:
            return dst
    proto = onnx.load(str(src), load_external_data=False)
    exclude = router_nodes(proto.graph)
    moe = contract.get("moe")
    if moe and moe.get("layers"):
        # MoE-LLaVA: exactly one router MatMul per MoE layer, or int8 would flip experts unnoticed
        if len(exclude) != len(moe["layers"]):
            raise ValueError(f"found {len(exclude)} router MatMuls feeding a TopK in {src.name}, expected one per MoE "
                             f"layer ({len(moe['layers'])}): refusing to quantise (int8 routers would flip experts)")
    large = entry.get("external_data") is not None
    del proto
    for dst in candidates:
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(dst.name + ".partial.onnx")
            log(f"quantising {src.name} to int8 (dynamic, MatMul weights; {len(exclude)} router nodes kept fp32)")
            quantize_dynamic(str(src), str(tmp), weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                             use_external_data_format=large, extra_options={"MatMulConstBOnly": True})
            tmp.replace(dst)  # its external data file (if any) keeps the name the graph refers to
            dst.with_suffix(".stamp").write_text(stamp)
            return dst
        except PermissionError:
            continue
    raise PermissionError(f"no writable place for the int8 decoder ({', '.join(map(str, candidates))})")


class OrtAwakerSession(ExportedAwakerSession):
    def __init__(self, folder, provider: str = "cpu", quantize: str | None = None, threads: int | None = None,
                 max_context: int | None = None, log=lambda *a: None):
        super().__init__(folder, max_context=max_context)
        g = self.contract["graphs"]
        self.provider = provider
        self.quantize = quantize
        decoder_path = self.folder / g["decoder"]["file"]
        if quantize == "int8":
            decoder_path = quantize_decoder(self.folder, self.contract, log)
        elif quantize is not None:
            raise ValueError(f"--quantize {quantize!r}: only int8 is available")
        self.vision = make_session(self.folder / g["vision"]["file"], provider, threads) if "vision" in g else None
        self.embedding = make_session(self.folder / g["embedding"]["file"], provider, threads)
        self.decoder = make_session(decoder_path, provider, threads)
        self.output_names = [o.name for o in self.decoder.get_outputs()]
        # KV outputs stay where the provider computed them (CUDA memory with the CUDA EP) and are bound as the
        # next step's inputs without a copy; CANN binds to host memory (its OrtValue device type is not exposed)
        self.kv_device = "cuda" if provider == "cuda" else "cpu"
        self.num_layers = self.cfg.num_layers

    @property
    def dtype_name(self) -> str:
        return self.dtype

    def describe(self) -> dict:
        import onnxruntime as ort

        return {"kind": "onnxruntime", "device": f"ort-{self.provider}", "chip": self.decoder.get_providers()[0],
                "providers": self.decoder.get_providers(), "dtype": self.dtype, "onnxruntime": ort.__version__,
                "quantize": self.quantize}

    def _vision(self, patches, vision_pos, vision_keep):
        return self.vision.run(None, {"patches": patches, "vision_pos": vision_pos, "vision_keep": vision_keep})[0]

    def _embedding(self, input_ids, image_features, image_mask, router_span):
        emb, router = self.embedding.run(None, {"input_ids": input_ids, "image_features": image_features,
                                                "image_mask": image_mask, "router_span": router_span})
        return emb, router

    def _empty_past(self, batch):
        shape = (batch, self.cfg.num_kv_heads, 0, self.cfg.head_dim)
        return [np.zeros(shape, self.np_dtype) for _ in range(2 * self.num_layers)]

    def _decoder(self, embeds, positions, router_input, past, valid_past, valid_new):
        extra = {"router_input": np.ascontiguousarray(router_input, dtype=np.float32)} if self.has_router else {}
        outs, present = run_decoder_iobinding(self, embeds, positions, past, valid_past, valid_new, extra)
        routing = (outs["router_expert"].numpy(), outs["router_p"].numpy()) if self.has_router else None
        return outs["logits"].numpy(), routing, present


def run_decoder_iobinding(sess, embeds, positions, past, valid_past, valid_new, extra_inputs: dict):
    """One decoder step through IOBinding, shared by the families' ORT sessions: host inputs bound as they are,
    the previous step's KV outputs bound without a copy, KV outputs left where the provider computed them.
    -> (outputs by name as OrtValues, present KV list)."""
    io = sess.decoder.io_binding()
    io.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds))
    io.bind_cpu_input("attention_keep", keep_mask(valid_past, valid_new))
    io.bind_cpu_input("position_ids", np.ascontiguousarray(positions, dtype=np.int64))
    for name, value in extra_inputs.items():
        io.bind_cpu_input(name, value)
    for i, value in enumerate(past):
        name = f"past_key_values.{i // 2}.{'key' if i % 2 == 0 else 'value'}"
        if isinstance(value, np.ndarray):
            io.bind_cpu_input(name, value)
        else:
            io.bind_ortvalue_input(name, value)
    for name in sess.output_names:
        io.bind_output(name, sess.kv_device if name.startswith("present.") else "cpu")
    sess.decoder.run_with_iobinding(io)
    outs = dict(zip(sess.output_names, io.get_outputs()))
    present = [outs[f"present.{i // 2}.{'key' if i % 2 == 0 else 'value'}"] for i in range(len(past))]
    return outs, present


# ---------------------------------------------------------------------------------------------- CLI
def open_ort_session(folder, **options):
    """The ONNX Runtime session for an export folder, by the contract's family (options as OrtAwakerSession)."""
    family = read_contract(folder)["family"]
    if family == "moe-llava":
        from export.moe_llava_onnx import OrtMoeLlavaSession

        return OrtMoeLlavaSession(folder, **options)
    return OrtAwakerSession(folder, **options)


def _open_session(args):
    folder = Path(args.model)
    if args.backend == "ort":
        if getattr(args, "routing", "prefill") != "prefill":
            raise ValueError("exported graphs route once at prefill; --routing legacy is PyTorch-only")
        if getattr(args, "moe_routing", None) not in (None, "deterministic"):
            raise ValueError("exported MoE-LLaVA graphs route deterministically (top-2 of the softmax); "
                             "--moe-routing deepspeed is PyTorch-only")
        return open_ort_session(folder, provider=args.provider, quantize=args.quantize,
                                max_context=args.max_context, log=lambda m: print(m, file=sys.stderr))
    from export.om import open_om_session

    return open_om_session(folder, device_id=_device_id(args.device))


def _device_id(spec: str) -> int:
    return int(spec.split(":")[1]) if spec and ":" in spec and spec.split(":")[1].isdigit() else 0


def run_exported(args) -> int:
    """``moevl run --backend ort|om --model <folder>``: the same output as the PyTorch path (model.cli)."""
    from export.om import GearError

    try:
        vl = _open_session(args)
    except (ProviderError, FileNotFoundError) as e:
        print(f"moevl run --backend {args.backend}: error: {e}", file=sys.stderr)
        return 1
    try:
        return _generate_and_print(vl, args)
    except GearError as e:
        print(f"moevl run --backend {args.backend}: error: {e}", file=sys.stderr)
        return 1


def _generate_and_print(vl, args) -> int:
    from model.cli import answer_and_report

    return answer_and_report(vl, args, backend=args.backend)
