"""One generation loop over exported graphs, for every family and runtime: ``ExportedSession``.

It reads the contract, lets the family's ``GraphIO`` (export/builders/<family>.py) turn a batch into graph feeds and
read the routing outputs, keeps the per-request state (valid cache slots, next position, the embedding graph's
extra outputs that every decode step is fed again: Awaker's router_input), and leaves running a graph to a runner:
``moevl.export.ort.OrtRunner`` (ONNX Runtime: CPU, CUDA or CANN execution provider) or
``moevl.export.om.OmRunner`` (Ascend OM through ais_bench, padding every call to a compiled gear).
``moevl.model.generate.generate`` drives it like a PyTorch session.

    vl = moevl.load("out/awaker-tiny-onnx", backend="ort")
    print(vl.ask("What is in the picture?", images=["cat.png"], max_new_tokens=16).texts[0])
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from moevl.export.graph import GearError, ProviderError, builders_of, read_contract
from moevl.model.session import Session, check_max_context

# what a runtime may raise that is about the runtime, not the request (the CLI exits 1 on these)
RUNTIME_ERRORS = (ProviderError, GearError, FileNotFoundError)


class ExportedSession(Session):
    """prefill/decode over the three exported graphs (vision, embedding, decoder) of any family."""

    def __init__(self, folder, runner, contract: dict | None = None, max_context: int | None = None):
        from moevl.ascend.device import resolve_device

        self.folder = Path(folder)
        self.contract = contract or read_contract(folder)
        self.family = self.contract["family"]
        self.io = builders_of(self.family).GraphIO(self.contract)
        self.cfg = self.io.cfg
        self.dtype = self.contract["dtype"]
        self.np_dtype = self.io.np_dtype
        self.processor = self.tokenizer = None
        if (self.folder / "tokenizer.json").is_file() or (self.folder / "vocab.json").is_file():
            self.processor = self.io.processor(self.folder)
            self.tokenizer = self.processor.tokenizer
        self.device = resolve_device("cpu")  # where the loop's tensors live (logits come back to the host)
        self.runner = runner
        runner.bind(self)
        self.max_context = check_max_context(max_context) or runner.max_context or self.cfg.max_position_embeddings
        self.eos_token_ids = set(self.cfg.eos_token_ids)
        self.pad_token_id = self.cfg.pad_token_id
        self._state = None
        self.io.start(self, _EmptyBatch())

    @property
    def dtype_name(self) -> str:
        return self.dtype

    def describe(self) -> dict:
        return self.runner.describe()

    # ------------------------------------------------------------------ the two steps generation drives
    def _image_features(self, batch) -> np.ndarray:
        feeds = self.io.vision_feeds(batch)
        if feeds is None:
            return np.zeros((0, self.cfg.hidden_size), self.np_dtype)
        return self.runner.vision(feeds)

    def prefill(self, batch, max_len: int) -> torch.Tensor:
        b = batch.batch_size
        self.io.start(self, batch)
        emb = self.runner.embedding({**self.io.embedding_feeds(batch), "image_features": self._image_features(batch)})
        embeds = emb.pop("inputs_embeds")
        valid = batch.attention_mask.bool()
        outs, past = self.runner.decoder(embeds, self.io.positions(batch), emb, None,
                                         torch.zeros(b, 0, dtype=torch.bool), valid)
        self.io.record(self, outs, valid, prefill=True)
        self._state = {"past": past, "valid": valid, "pos": batch.next_position.clone(), "kept": emb}
        return torch.from_numpy(np.ascontiguousarray(outs["logits"]))

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        st = self._state
        b = tokens.shape[0]
        feeds = self.io.step_embedding_feeds(tokens.cpu().numpy())
        feeds["image_features"] = np.zeros((0, self.cfg.hidden_size), self.np_dtype)
        embeds = self.runner.embedding(feeds)["inputs_embeds"]
        new = torch.ones(b, 1, dtype=torch.bool)
        outs, st["past"] = self.runner.decoder(embeds, self.io.step_positions(st["pos"]), st["kept"], st["past"],
                                               st["valid"], new)
        # only tokens of an answer are counted: not a finished request's pad nor the end-of-sequence token
        stop = torch.tensor(sorted(set(self.eos_token_ids) | {self.pad_token_id}))
        self.io.record(self, outs, ~torch.isin(tokens.cpu(), stop)[:, None], prefill=False)
        st["valid"] = torch.cat([st["valid"], new], dim=1)
        st["pos"] = st["pos"] + 1
        return torch.from_numpy(np.ascontiguousarray(outs["logits"]))

    # ------------------------------------------------------------------ user-facing
    def prepare(self, questions, images=None):
        if self.processor is None:
            raise ValueError(f"{self.folder} has no tokenizer files: re-export with a model folder that has them")
        return super().prepare(questions, images)

    def routing_decisions(self):
        return self.io.routing_decisions(self)


class _EmptyBatch:
    batch_size = 0


# ---------------------------------------------------------------------------------------------- opening
def open_ort(folder, provider: str = "cpu", quantize: str | None = None, threads: int | None = None,
             max_context: int | None = None, log=None) -> ExportedSession:
    """An ONNX export folder in ONNX Runtime."""
    from moevl.export.ort import OrtRunner

    contract = read_contract(folder)
    return ExportedSession(folder, OrtRunner(folder, contract, provider or "cpu", quantize, threads,
                                             log or (lambda *a: None)), contract, max_context)


def open_om(folder, device_id: int = 0, emulated: bool = False, threads: int | None = None) -> ExportedSession:
    """A folder written by ``moevl export om``: its OM models through ais_bench, or (``emulated``, for tests on the
    CPU) ONNX Runtime sessions that accept exactly the shapes the OM models would."""
    from moevl.export.om import OmRunner, read_om_config

    config = read_om_config(Path(folder))
    runner = OmRunner.emulated(folder, config, threads) if emulated else OmRunner.open(folder, config, device_id)
    return ExportedSession(folder, runner, config["contract"])


def load_exported(spec, backend: str, device="auto", dtype=None, strict_npu=None, compile=False, routing=None,
                  moe_routing=None, **options) -> ExportedSession:
    """moevl.load for backend "ort" / "om": the options of PyTorch-only features are refused by name."""
    if dtype is not None:
        raise ValueError("--dtype is fixed at export time (moevl export onnx --dtype); drop it with --backend "
                         f"{backend}")
    if compile or strict_npu:
        raise ValueError("--compile and --strict-npu apply to the torch backend only")
    if routing not in (None, "prefill"):
        raise ValueError("exported graphs route once at prefill; --routing legacy is PyTorch-only")
    if moe_routing not in (None, "deterministic"):
        raise ValueError("exported MoE-LLaVA graphs route deterministically (top-2 of the softmax); "
                         "--moe-routing deepspeed is PyTorch-only")
    if backend == "ort":
        if str(device or "auto") not in ("auto", "cpu"):
            raise ValueError(f"--device {device} does not apply to --backend ort: ONNX Runtime runs where its "
                             "execution provider is, chosen with --provider cpu|cuda|cann")
        return open_ort(spec, **options)
    unknown = sorted(k for k, v in options.items() if v is not None and k not in ("log", "max_context"))
    if unknown:
        raise ValueError(f"option(s) {unknown} do not apply to the om backend")
    return open_om(spec, device_id=_device_id(device))


def _device_id(spec) -> int:
    spec = str(spec or "")
    return int(spec.split(":")[1]) if ":" in spec and spec.split(":")[1].isdigit() else 0
