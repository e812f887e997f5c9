"""Ascend OM: ATC command lines for an ONNX export folder, and a runtime adapter with gear padding.

NOTHING HERE HAS RUN ON ASCEND HARDWARE OR WITH ATC. The command lines follow the ATC documentation (CANN 8.x:
--framework=5, --input_format=ND, --input_shape with -1 dims + --dynamic_dims profiles, --precision_mode_v2,
--modify_mixlist, --log); the gear/padding loop is tested on the CPU by running it over ONNX Runtime sessions that
accept exactly the shapes the OM models would (OrtGearRunner).

OM models built from one ONNX folder (static batch, dynamic dims by gears):
  vision.om           patches/vision_pos/vision_keep: num_patches from the vision gears (multiples of merge^2)
  embedding.om        seq from the prefill gears and 1 (decode), image-feature rows from vision gears / merge^2 and 1
  decoder_prefill.om  seq from the prefill gears; past fixed at ONE slot (a masked dummy: ATC gears cannot be 0)
  decoder_decode.om   seq 1; past length from the decode gears (KV-length buckets)
The runtime pads every call up to the next gear (prompts on the left, the KV cache on the right, masked), and keeps
a compact host-side KV cache between calls (present minus the padding slots).
"""
from __future__ import annotations

import dataclasses
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import numpy as np

from export.onnx_export import read_contract
from export.runtime import ExportedAwakerSession, ProviderError, keep_mask

DEFAULT_GEARS = {"prefill": [64, 128, 256, 512], "decode": [128, 256, 512, 1024], "vision": [64, 256, 1024]}
PRECISIONS = ("origin", "fp16", "mixed_float16")
OM_CONFIG = "om_config.json"
# Ascend IR op types of RMSNorm (x * rsqrt(mean(x^2) + eps)) and of the router's softmax, kept in fp32 under
# mixed_float16 (ATC --modify_mixlist takes Ascend IR OpTypes, not ONNX op types)
FP32_OPS = ["Pow", "Square", "ReduceMean", "ReduceMeanD", "Sqrt", "Rsqrt", "RealDiv", "SoftmaxV2"]


class GearError(ValueError):
    """A call whose shapes fit no compiled gear."""


@dataclasses.dataclass
class OmGraph:
    name: str
    onnx: str                                  # source graph file in the ONNX folder
    inputs: list[tuple[str, list[int]]]        # ATC --input_shape, -1 = dynamic
    gears: list[tuple[int, ...]]               # one value per -1, in --input_shape order

    def input_shape(self) -> str:
        return ";".join(f"{n}:{','.join(map(str, d))}" for n, d in self.inputs)

    def dynamic_dims(self) -> str:
        return ";".join(",".join(map(str, g)) for g in self.gears)

    def gear_of(self, shapes: dict) -> tuple:
        """The -1 values a set of input shapes fills in; GearError unless static dims match and it is a gear."""
        values = []
        for name, dims in self.inputs:
            shape = tuple(shapes[name])
            if len(shape) != len(dims):
                raise GearError(f"{self.name}: input {name} has rank {len(shape)}, the OM model {len(dims)}")
            for want, got in zip(dims, shape):
                if want == -1:
                    values.append(got)
                elif want != got:
                    raise GearError(f"{self.name}: input {name} shape {shape} does not match {dims}")
        gear = tuple(values)
        if gear not in self.gears:
            raise GearError(f"{self.name}: dims {gear} are not a compiled gear ({self.dynamic_dims()})")
        return gear


def parse_gears(specs: list[str]) -> dict:
    gears = {k: list(v) for k, v in DEFAULT_GEARS.items()}
    for spec in specs or []:
        kind, _, values = spec.partition("=")
        if kind not in gears or not values:
            raise ValueError(f"--gears {spec!r}: expected KIND=N1,N2,... with KIND in {sorted(gears)}")
        try:
            gears[kind] = sorted({int(v) for v in values.split(",")})
        except ValueError as e:
            raise ValueError(f"--gears {spec!r}: the sizes must be integers") from e
    return gears


def om_graphs(contract: dict, gears: dict, batch: int = 1) -> list[OmGraph]:
    cfg = contract["config"]
    h, merge = cfg["hidden_size"], cfg["vision"]["spatial_merge_size"] ** 2
    kv, hd, layers = cfg["num_kv_heads"], cfg["hidden_size"] // cfg["num_heads"], cfg["num_layers"]
    for kind, values in gears.items():
        if not values or min(values) < 1:
            raise ValueError(f"{kind} gears must be positive sizes, got {values}")
    if any(v % merge for v in gears["vision"]):
        raise ValueError(f"vision gears count patches and must be multiples of {merge} (merge^2): {gears['vision']}")
    graphs = []
    g = contract["graphs"]
    v = cfg["vision"]
    patch_dim = v["in_channels"] * v["temporal_patch_size"] * v["patch_size"] ** 2
    if "vision" in g:
        graphs.append(OmGraph("vision", g["vision"]["file"],
                              [("patches", [-1, patch_dim]), ("vision_pos", [-1, 2]), ("vision_keep", [-1, -1])],
                              [(n, n, n, n) for n in gears["vision"]]))
    seqs = sorted(set(gears["prefill"]) | {1})
    rows = sorted({n // merge for n in gears["vision"]} | {1})
    graphs.append(OmGraph("embedding", g["embedding"]["file"],
                          [("input_ids", [batch, -1]), ("image_features", [-1, h]), ("image_mask", [batch, -1]),
                           ("router_span", [batch, 2])],
                          [(s, m, s) for s in seqs for m in rows]))
    router = [("router_input", [batch, h])] if contract.get("routing") else []
    past = [(f"past_key_values.{i}.{k}", [batch, kv, None, hd]) for i in range(layers) for k in ("key", "value")]
    graphs.append(OmGraph("decoder_prefill", g["decoder"]["file"],
                          [("inputs_embeds", [batch, -1, h]), ("attention_keep", [batch, 1, -1, -1]),
                           ("position_ids", [3, batch, -1])] + router
                          + [(n, [d if d is not None else 1 for d in dims]) for n, dims in past],
                          [(t, t, t + 1, t) for t in gears["prefill"]]))
    graphs.append(OmGraph("decoder_decode", g["decoder"]["file"],
                          [("inputs_embeds", [batch, 1, h]), ("attention_keep", [batch, 1, 1, -1]),
                           ("position_ids", [3, batch, 1])] + router
                          + [(n, [d if d is not None else -1 for d in dims]) for n, dims in past],
                          [(p + 1,) + (p,) * len(past) for p in gears["decode"]]))
    for gr in graphs:
        if not 1 < len(gr.gears) <= 100:
            raise ValueError(f"{gr.name}: ATC takes 2 to 100 --dynamic_dims profiles, this has {len(gr.gears)}; "
                             "change --gears")
    return graphs


def atc_command(graph: OmGraph, onnx_dir: Path, out_dir: Path, soc: str, precision: str,
                mixlist: Path | None = None) -> list[str]:
    cmd = ["atc", "--framework=5", f"--model={Path(onnx_dir) / graph.onnx}", f"--output={Path(out_dir) / graph.name}",
           f"--soc_version={soc}", "--input_format=ND", f"--input_shape={graph.input_shape()}",
           f"--dynamic_dims={graph.dynamic_dims()}", f"--precision_mode_v2={precision}"]
    if precision == "mixed_float16" and mixlist is not None:
        cmd.append(f"--modify_mixlist={mixlist}")
    cmd.append("--log=error")
    return cmd


def build_om(onnx_dir, out=None, soc: str = "Ascend910B2", precision: str = "origin", gears: dict | None = None,
             batch: int = 1, run_atc: bool = True, log=print) -> Path:
    """Write om_config.json (+ mixlist, tokenizer files) and either run ATC (when on PATH) or write build_om.sh."""
    onnx_dir = Path(onnx_dir)
    contract = read_contract(onnx_dir)
    if contract["family"] != "awaker":
        raise ValueError(f"OM gears and the OM runtime exist for Awaker exports only; {onnx_dir} is a "
                         f"{contract['family']} export (its ONNX graphs run with --backend ort)")
    if not re.fullmatch(r"Ascend[0-9A-Za-z_]+", soc):
        raise ValueError(f"--soc {soc!r}: give ATC's soc_version, 'Ascend' + the chip name from npu-smi info "
                         "(e.g. Ascend910B2, Ascend310P3)")
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {PRECISIONS}")
    if contract["dtype"] == "fp16" and precision == "origin":
        log("note: an fp16 export compiled with origin stays fp16")
    gears = gears or {k: list(v) for k, v in DEFAULT_GEARS.items()}
    out = Path(out) if out else onnx_dir.with_name(f"{onnx_dir.name}-om-{soc}")
    out.mkdir(parents=True, exist_ok=True)
    graphs = om_graphs(contract, gears, batch)
    mixlist = None
    if precision == "mixed_float16":
        mixlist = out / "mixlist.json"
        mixlist.write_text(json.dumps({"black-list": {"to-add": FP32_OPS}}, indent=2))
    commands = [atc_command(g, onnx_dir.resolve(), out.resolve(), soc, precision, mixlist and mixlist.resolve())
                for g in graphs]
    for name in contract.get("processor_files", []):
        shutil.copy2(onnx_dir / name, out / name)
    config = {"format": "moevl-om", "soc": soc, "precision": precision, "batch": batch, "gears": gears,
              "onnx_dir": str(onnx_dir.resolve()), "contract": contract,
              "graphs": {g.name: {"om": f"{g.name}.om", "onnx": g.onnx, "input_shape": g.input_shape(),
                                  "dynamic_dims": g.dynamic_dims(), "inputs": g.inputs, "gears": g.gears}
                         for g in graphs},
              "commands": [shlex.join(c) for c in commands],
              "status": "ATC not run yet", "hardware_verified": False}
    atc = shutil.which("atc")
    if atc and run_atc:
        for g, c in zip(graphs, commands):
            log(f"running {shlex.join(c)}")
            res = subprocess.run(c, capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"atc failed for {g.name} (exit {res.returncode}):\n{res.stdout}\n{res.stderr}")
        config["status"] = "built by atc"
    else:
        script = out / "build_om.sh"
        script.write_text("#!/usr/bin/env bash\n# Build the OM models; run on a host with CANN (source "
                          "/usr/local/Ascend/ascend-toolkit/set_env.sh first).\nset -euo pipefail\n"
                          + "".join(shlex.join(c) + "\n" for c in commands))
        script.chmod(0o755)
        log(f"atc is not on PATH: wrote {script}; run it on an Ascend host with CANN to build the OM models"
            if not atc else f"wrote {script} (--script-only)")
        config["status"] = "build_om.sh written; ATC not run"
    (out / OM_CONFIG).write_text(json.dumps(config, indent=2))
    return out


# ---------------------------------------------------------------------------------------------- runtime
class AisRunner:
    """One OM model through ais_bench's InferSession in dymdims mode (UNVERIFIED: never run on hardware)."""

    def __init__(self, path: Path, device_id: int, graph: OmGraph):
        from ais_bench.infer.interface import InferSession

        self.session = InferSession(device_id, str(path))
        self.graph = graph

    def run(self, feeds: dict) -> list[np.ndarray]:
        self.graph.gear_of({k: v.shape for k, v in feeds.items()})
        return self.session.infer([feeds[n] for n, _ in self.graph.inputs], mode="dymdims")


class OrtGearRunner:
    """The CPU stand-in for an OM model: ONNX Runtime on the source graph, refusing shapes that are not a gear."""

    def __init__(self, session, graph: OmGraph):
        self.session, self.graph = session, graph
        self.calls = []

    def run(self, feeds: dict) -> list[np.ndarray]:
        self.calls.append(self.graph.gear_of({k: v.shape for k, v in feeds.items()}))
        return self.session.run(None, feeds)


def _fit(arr: np.ndarray, shape) -> np.ndarray:
    """An output as the expected shape (ais_bench may return buffers sized for the largest gear)."""
    arr = np.asarray(arr)
    if tuple(arr.shape) == tuple(shape):
        return arr
    n = int(np.prod(shape))
    return arr.reshape(-1)[:n].reshape(shape)


def _gear(values, n: int, what: str) -> int:
    for v in sorted(values):
        if v >= n:
            return v
    raise GearError(f"{what} of {n} exceeds the largest gear {max(values)}: rebuild the OM models with larger "
                    "--gears")


class OmAwakerSession(ExportedAwakerSession):
    """The generation loop over OM models (or their ORT stand-ins), padding every call to a compiled gear."""

    def __init__(self, folder, runners: dict, config: dict):
        super().__init__(folder, contract=config["contract"])
        self.runners, self.config = runners, config
        self.batch = config["batch"]
        self.graphs = {n: OmGraph(n, g["onnx"], [(a, list(d)) for a, d in g["inputs"]], [tuple(x) for x in g["gears"]])
                       for n, g in config["graphs"].items()}
        self.gears = config["gears"]
        self.merge = self.cfg.vision.spatial_merge_size ** 2
        self.max_context = max(self.gears["decode"]) + 1
        self.kv_shape = (self.batch, self.cfg.num_kv_heads, self.cfg.head_dim)

    @classmethod
    def open(cls, folder, device_id: int = 0):
        folder = Path(folder)
        config = _read_config(folder)
        try:
            import ais_bench.infer.interface  # noqa: F401
        except ImportError as e:
            raise ProviderError("running OM models needs ais_bench (from msit / the Ascend tools, not on PyPI) on "
                                "an Ascend host with CANN") from e
        graphs = {n: OmGraph(n, g["onnx"], g["inputs"], [tuple(x) for x in g["gears"]])
                  for n, g in config["graphs"].items()}
        runners = {}
        for n, g in graphs.items():
            found = sorted(folder.glob(f"{n}*.om"))
            if not found:
                raise FileNotFoundError(f"{folder} has no {n}*.om: run build_om.sh there first")
            runners[n] = AisRunner(found[0], device_id, g)
        return cls(folder, runners, config)

    @classmethod
    def emulated(cls, folder, threads: int | None = None):
        """The same loop over ONNX Runtime sessions that accept only the gear shapes (CPU tests)."""
        from export.runtime import make_session

        folder = Path(folder)
        config = _read_config(folder)
        onnx_dir = Path(config["onnx_dir"])
        runners = {}
        for n, g in config["graphs"].items():
            graph = OmGraph(n, g["onnx"], g["inputs"], [tuple(x) for x in g["gears"]])
            runners[n] = OrtGearRunner(make_session(onnx_dir / g["onnx"], "cpu", threads), graph)
        return cls(folder, runners, config)

    @property
    def dtype_name(self) -> str:
        return self.dtype

    def describe(self) -> dict:
        return {"kind": "om", "device": "ascend-om", "chip": self.config["soc"], "dtype": self.dtype,
                "precision": self.config["precision"], "quantize": None, "hardware_verified": False}

    def _check_batch(self, b):
        if b != self.batch:
            raise GearError(f"the OM models were compiled for batch {self.batch}, the request has {b}")

    def _vision(self, patches, vision_pos, vision_keep):
        n = patches.shape[0]
        g = _gear(self.gears["vision"], n, "an image of patches")
        pad = g - n
        keep = np.zeros((g, g), np.bool_)
        keep[:n, :n] = vision_keep
        keep[np.arange(n, g), np.arange(n, g)] = True  # padding patches attend to themselves only
        feeds = {"patches": np.concatenate([patches, np.zeros((pad, patches.shape[1]), patches.dtype)]),
                 "vision_pos": np.concatenate([vision_pos, np.zeros((pad, 2), np.int64)]), "vision_keep": keep}
        out = self.runners["vision"].run(feeds)[0]
        return _fit(out, (g // self.merge, self.cfg.hidden_size))[: n // self.merge]

    def _embedding(self, input_ids, image_features, image_mask, router_span):
        b, t = input_ids.shape
        self._check_batch(b)
        h = self.cfg.hidden_size
        tg = 1 if t == 1 else _gear(self.gears["prefill"], t, "a prompt")  # decode steps embed 1 token
        rows = sorted({n // self.merge for n in self.gears["vision"]} | {1})
        mg = _gear(rows, max(image_features.shape[0], 1), "image tokens")
        pad = tg - t
        feeds = {"input_ids": np.concatenate([np.full((b, pad), self.pad_token_id, np.int64), input_ids], 1),
                 "image_features": np.concatenate(
                     [image_features, np.zeros((mg - image_features.shape[0], h), image_features.dtype)]),
                 "image_mask": np.concatenate([np.zeros((b, pad), np.bool_), image_mask], 1),
                 "router_span": router_span + pad}
        emb, router = self.runners["embedding"].run(feeds)
        return _fit(emb, (b, tg, h))[:, pad:], _fit(router, (b, h))

    def _empty_past(self, batch):
        return None

    def _decoder(self, embeds, positions, router_input, past, valid_past, valid_new):
        import torch

        b, t, h = embeds.shape
        self._check_batch(b)
        layers = self.cfg.num_layers
        if past is None:  # prefill: pad the prompt on the left, one masked dummy past slot
            name, tg = "decoder_prefill", _gear(self.gears["prefill"], t, "a prompt")
            pad = tg - t
            embeds = np.concatenate([np.zeros((b, pad, h), embeds.dtype), embeds], 1)
            positions = np.concatenate([np.zeros((3, b, pad), np.int64), positions], 2)
            new = torch.cat([torch.zeros(b, pad, dtype=torch.bool), valid_new], 1)
            slots = torch.zeros(b, 1, dtype=torch.bool)
            feeds_past = [np.zeros(self.kv_shape[:2] + (1,) + self.kv_shape[2:], self.np_dtype)] * (2 * layers)
            pg = 1
        else:  # decode: pad the cache on the right to the KV gear
            name, p = "decoder_decode", past[0].shape[2]
            pg = _gear(self.gears["decode"], p, "a context")
            new, pad, tg = valid_new, 0, t
            slots = torch.cat([valid_past, torch.zeros(b, pg - p, dtype=torch.bool)], 1)
            feeds_past = [np.concatenate([x, np.zeros(x.shape[:2] + (pg - p,) + x.shape[3:], x.dtype)], 2)
                          for x in past]
        feeds = {"inputs_embeds": np.ascontiguousarray(embeds), "attention_keep": keep_mask(slots, new),
                 "position_ids": np.ascontiguousarray(positions, dtype=np.int64)}
        if self.has_router:
            feeds["router_input"] = np.ascontiguousarray(router_input, dtype=np.float32)
        for i, x in enumerate(feeds_past):
            feeds[f"past_key_values.{i // 2}.{'key' if i % 2 == 0 else 'value'}"] = x
        outs = self.runners[name].run(feeds)
        k = 0
        logits = _fit(outs[k], (b, self.cfg.vocab_size))
        routing = None
        if self.has_router:
            routing = (_fit(outs[1], (layers, 2, b)), _fit(outs[2], (layers, 2, b)))
            k = 2
        total = pg + tg
        present = [_fit(o, self.kv_shape[:2] + (total,) + self.kv_shape[2:]) for o in outs[k + 1:]]
        if past is None:  # drop the dummy slot and the left padding: the real prompt slots remain
            compact = [x[:, :, 1 + pad:] for x in present]
        else:  # the real cached slots + the new one
            compact = [np.concatenate([x[:, :, :p], x[:, :, pg:]], 2) for x in present]
        return logits, routing, compact


def _read_config(folder: Path) -> dict:
    path = Path(folder) / OM_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {OM_CONFIG}: build it with `moevl export om --onnx <dir>`")
    return json.loads(path.read_text())
