"""ONNX Runtime: sessions on a chosen execution provider (never a silent fallback), the int8 decoder, and the runner
that ``moevl.export.session.ExportedSession`` drives exported graphs with.

    vl = moevl.load("out/awaker-tiny-onnx", backend="ort", provider="cpu")   # or quantize="int8"
"""
from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import numpy as np

from moevl.export.graph import ExportFolderError, ProviderError, keep_mask, past_name, present_name

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "cann": "CANNExecutionProvider"}


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
    if not Path(path).is_file():
        raise ExportFolderError(f"{path} is missing: the export folder is incomplete; re-export it")
    try:
        sess = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as e:  # onnxruntime raises its own InvalidProtobuf / Fail / NoSuchFile types
        raise ExportFolderError(f"{path} could not be loaded by ONNX Runtime ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:200]}); the file is corrupt or truncated: re-export it") from e
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
    routers = router_nodes(proto.graph)
    # quantize_dynamic first rewrites a Gemm as MatMul + Add named "<gemm>_MatMul" (ONNXModel.replace_gemm_with_
    # matmul): exclude that name too, or Awaker's router Gemms are quantised after all
    gemms = {n.name for n in proto.graph.node if n.op_type == "Gemm"}
    exclude = routers + [f"{n}_MatMul" for n in routers if n in gemms]
    moe = contract.get("moe")
    if moe and moe.get("layers"):
        # MoE-LLaVA: exactly one router MatMul per MoE layer, or int8 would flip experts unnoticed
        if len(routers) != len(moe["layers"]):
            raise ValueError(f"found {len(routers)} router MatMuls feeding a TopK in {src.name}, expected one per MoE "
                             f"layer ({len(moe['layers'])}): refusing to quantise (int8 routers would flip experts)")
    large = entry.get("external_data") is not None
    del proto
    for dst in candidates:
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(dst.name + ".partial.onnx")
            log(f"quantising {src.name} to int8 (dynamic, MatMul weights; {len(routers)} router nodes kept fp32)")
            quantize_dynamic(str(src), str(tmp), weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                             use_external_data_format=large, extra_options={"MatMulConstBOnly": True})
            tmp.replace(dst)  # its external data file (if any) keeps the name the graph refers to
            dst.with_suffix(".stamp").write_text(stamp)
            return dst
        except PermissionError:
            continue
    raise PermissionError(f"no writable place for the int8 decoder ({', '.join(map(str, candidates))})")


class OrtRunner:
    """The three graphs in ONNX Runtime. ``quantize="int8"``: the decoder's MatMul weights in int8, the router
    MatMuls kept fp32 (quantize_decoder). The decoder runs through IOBinding: host inputs bound as they are, the
    previous step's KV outputs bound without a copy, KV outputs left where the provider computed them (CUDA memory
    with the CUDA EP; CANN binds to host memory, its OrtValue device type is not exposed)."""

    max_context = None

    def __init__(self, folder, contract: dict, provider: str = "cpu", quantize: str | None = None,
                 threads: int | None = None, log=lambda *a: None):
        folder = Path(folder)
        g = contract["graphs"]
        decoder_path = folder / g["decoder"]["file"]
        if quantize == "int8":
            decoder_path = quantize_decoder(folder, contract, log)
        elif quantize is not None:
            raise ValueError(f"--quantize {quantize!r}: only int8 is available")
        self.provider, self.quantize, self.dtype = provider, quantize, contract["dtype"]
        self.sessions = {name: make_session(folder / g[name]["file"], provider, threads)
                         for name in ("vision", "embedding") if name in g}
        self.sessions["decoder"] = make_session(decoder_path, provider, threads)
        self.output_names = [o.name for o in self.sessions["decoder"].get_outputs()]
        self.input_names = {name: [i.name for i in s.get_inputs()] for name, s in self.sessions.items()}
        self.kv_device = "cuda" if provider == "cuda" else "cpu"
        self.np_dtype = np.float16 if self.dtype == "fp16" else np.float32
        self.kv_shape = None

    def bind(self, session) -> None:
        cfg = session.cfg
        self.num_past = 2 * cfg.num_layers
        self.kv_shape = (cfg.num_kv_heads, cfg.head_dim)

    def describe(self) -> dict:
        import onnxruntime as ort

        dec = self.sessions["decoder"]
        return {"kind": "onnxruntime", "device": f"ort-{self.provider}", "chip": dec.get_providers()[0],
                "providers": dec.get_providers(), "dtype": self.dtype, "onnxruntime": ort.__version__,
                "quantize": self.quantize}

    def _run(self, name: str, feeds: dict) -> dict:
        sess = self.sessions[name]
        outs = sess.run(None, {k: feeds[k] for k in self.input_names[name]})
        return dict(zip([o.name for o in sess.get_outputs()], outs))

    def vision(self, feeds: dict) -> np.ndarray:
        return self._run("vision", feeds)["image_features"]

    def embedding(self, feeds: dict) -> dict:
        return self._run("embedding", feeds)

    def decoder(self, embeds, positions, extra: dict, past, valid_past, valid_new):
        """One decoder call -> (outputs by name as numpy, present KV to feed back). past None = empty (prefill)."""
        b = embeds.shape[0]
        if past is None:
            past = [np.zeros((b, self.kv_shape[0], 0, self.kv_shape[1]), self.np_dtype)] * self.num_past
        dec = self.sessions["decoder"]
        io = dec.io_binding()
        io.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds))
        io.bind_cpu_input("attention_keep", keep_mask(valid_past, valid_new))
        io.bind_cpu_input("position_ids", np.ascontiguousarray(positions, dtype=np.int64))
        for name in self.input_names["decoder"]:
            if name in extra:  # e.g. Awaker's router_input, fed unchanged at every step
                io.bind_cpu_input(name, np.ascontiguousarray(extra[name], dtype=np.float32))
        for i, value in enumerate(past):
            if isinstance(value, np.ndarray):
                io.bind_cpu_input(past_name(i), value)
            else:
                io.bind_ortvalue_input(past_name(i), value)
        for name in self.output_names:
            io.bind_output(name, self.kv_device if name.startswith("present.") else "cpu")
        dec.run_with_iobinding(io)
        outs = dict(zip(self.output_names, io.get_outputs()))
        present = [outs[present_name(i)] for i in range(len(past))]
        return {k: v.numpy() for k, v in outs.items() if not k.startswith("present.")}, present
