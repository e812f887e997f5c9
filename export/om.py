"""Ascend OM: ATC command lines for an ONNX export folder, and a runtime adapter with gear padding.

NOTHING HERE HAS RUN ON ASCEND HARDWARE OR WITH ATC. The command lines follow the ATC documentation (CANN 8.x:
--framework=5, --input_format=ND, --input_shape with -1 dims + --dynamic_dims profiles, --precision_mode_v2,
--modify_mixlist, --log); the gear/padding loop is tested on the CPU by running it over ONNX Runtime sessions that
accept exactly the shapes the OM models would (OrtGearRunner).

OM models built from one ONNX folder (static batch, dynamic dims by gears):
  vision.om           Awaker: patches/vision_pos/vision_keep, num_patches from the vision gears (multiples of
                      merge^2); MoE-LLaVA: pixel_values [images, 3, S, S] (NCHW), images from the images gears
                      (one gear = a static model)
  embedding.om        seq from the prefill gears and 1 (decode), image-feature rows from the vision gears (feature
                      rows per gear) and 1
  decoder_prefill.om  seq from the prefill gears; past fixed at ONE slot (a masked dummy: ATC gears cannot be 0)
  decoder_decode.om   seq 1; past length from the decode gears (KV-length buckets)
The decoders differ per family only in position_ids (Awaker M-RoPE [3, batch, seq], MoE-LLaVA [batch, seq]), the
router_input (Awaker) and the routing outputs (router_expert/router_p vs moe_experts).
The runtime pads every call up to the next gear (prompts on the left, the KV cache on the right, masked, padding
images as zero images whose features are dropped), and keeps a compact host-side KV cache between calls (present
minus the padding slots).
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
from export.moe_llava_onnx import ExportedMoeLlavaSession
from export.runtime import ExportedAwakerSession, ProviderError, keep_mask

# vision: patches per call (Awaker); images: images per call (MoE-LLaVA, fixed image size)
DEFAULT_GEARS = {"prefill": [64, 128, 256, 512], "decode": [128, 256, 512, 1024], "vision": [64, 256, 1024],
                 "images": [1, 2, 4]}
FAMILIES = ("awaker", "moe-llava")
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
    input_format: str = "ND"                   # ATC --input_format (NCHW for an image input into a Conv)

    @property
    def static(self) -> bool:
        """One gear: compiled with its shapes filled in and no --dynamic_dims."""
        return len(self.gears) == 1

    def input_shape(self) -> str:
        fill = iter(self.gears[0]) if self.static else None
        return ";".join(f"{n}:{','.join(str(next(fill) if fill and x == -1 else x) for x in d)}"
                        for n, d in self.inputs)

    def dynamic_dims(self) -> str:
        return "" if self.static else ";".join(",".join(map(str, g)) for g in self.gears)

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
    gears = {**DEFAULT_GEARS, **gears}
    for kind, values in gears.items():
        if not values or min(values) < 1:
            raise ValueError(f"{kind} gears must be positive sizes, got {values}")
    if contract["family"] == "moe-llava":
        graphs = _moe_llava_graphs(contract, gears, batch)
    else:
        graphs = _awaker_graphs(contract, gears, batch)
    for gr in graphs:
        if not 1 <= len(gr.gears) <= 100:
            raise ValueError(f"{gr.name}: ATC takes up to 100 --dynamic_dims profiles, this has {len(gr.gears)}; "
                             "change --gears")
    return graphs


def _awaker_graphs(contract: dict, gears: dict, batch: int) -> list[OmGraph]:
    cfg = contract["config"]
    h, merge = cfg["hidden_size"], cfg["vision"]["spatial_merge_size"] ** 2
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
    hd = cfg["hidden_size"] // cfg["num_heads"]
    return graphs + _decoder_graphs(g["decoder"]["file"], gears, batch, h, cfg["num_kv_heads"], hd,
                                    cfg["num_layers"], [3, batch, -1], router)


def _moe_llava_graphs(contract: dict, gears: dict, batch: int) -> list[OmGraph]:
    cfg, g, d = contract["config"], contract["graphs"], contract["decoder"]
    h, size = cfg["hidden_size"], contract["vision"]["image_size"]
    per_image = contract["vision"]["num_image_tokens_per_image"]
    graphs = [OmGraph("vision", g["vision"]["file"], [("pixel_values", [-1, 3, size, size])],
                      [(n,) for n in gears["images"]], input_format="NCHW")]
    seqs = sorted(set(gears["prefill"]) | {1})
    rows = feature_rows(gears["images"], per_image)
    graphs.append(OmGraph("embedding", g["embedding"]["file"],
                          [("input_ids", [batch, -1]), ("image_features", [-1, h])],
                          [(s, m) for s in seqs for m in rows]))
    return graphs + _decoder_graphs(g["decoder"]["file"], gears, batch, h, d["num_kv_heads"], d["head_dim"],
                                    d["num_layers"], [batch, -1], [])


def feature_rows(images: list[int], per_image: int) -> list[int]:
    """MoE-LLaVA embedding gears for image-feature rows: each image gear's rows, and 1 for calls without images
    (a zero row: a gear cannot be 0)."""
    return sorted({n * per_image for n in images} | {1})


def _decoder_graphs(onnx: str, gears: dict, batch: int, h: int, kv: int, hd: int, layers: int,
                    positions: list[int], extra: list) -> list[OmGraph]:
    """decoder_prefill and decoder_decode from one decoder graph. positions: position_ids' dims with -1 for seq
    (Awaker [3, batch, -1], MoE-LLaVA [batch, -1]); extra: inputs after position_ids (Awaker's router_input)."""
    past = [f"past_key_values.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    prefill = OmGraph("decoder_prefill", onnx,
                      [("inputs_embeds", [batch, -1, h]), ("attention_keep", [batch, 1, -1, -1]),
                       ("position_ids", positions)] + extra + [(n, [batch, kv, 1, hd]) for n in past],
                      [(t, t, t + 1, t) for t in gears["prefill"]])
    decode = OmGraph("decoder_decode", onnx,
                     [("inputs_embeds", [batch, 1, h]), ("attention_keep", [batch, 1, 1, -1]),
                      ("position_ids", [1 if x == -1 else x for x in positions])] + extra
                     + [(n, [batch, kv, -1, hd]) for n in past],
                     [(p + 1,) + (p,) * len(past) for p in gears["decode"]])
    return [prefill, decode]


def atc_command(graph: OmGraph, onnx_dir: Path, out_dir: Path, soc: str, precision: str,
                mixlist: Path | None = None) -> list[str]:
    cmd = ["atc", "--framework=5", f"--model={Path(onnx_dir) / graph.onnx}", f"--output={Path(out_dir) / graph.name}",
           f"--soc_version={soc}", f"--input_format={graph.input_format}", f"--input_shape={graph.input_shape()}"]
    if not graph.static:
        cmd.append(f"--dynamic_dims={graph.dynamic_dims()}")
    cmd.append(f"--precision_mode_v2={precision}")
    if precision == "mixed_float16" and mixlist is not None:
        cmd.append(f"--modify_mixlist={mixlist}")
    cmd.append("--log=error")
    return cmd


def build_om(onnx_dir, out=None, soc: str = "Ascend910B2", precision: str = "origin", gears: dict | None = None,
             batch: int = 1, run_atc: bool = True, log=print) -> Path:
    """Write om_config.json (+ mixlist, tokenizer files) and either run ATC (when on PATH) or write build_om.sh."""
    onnx_dir = Path(onnx_dir)
    contract = read_contract(onnx_dir)
    if contract["family"] not in FAMILIES:
        raise ValueError(f"OM gears exist for {', '.join(FAMILIES)} exports; {onnx_dir} is a {contract['family']} "
                         "export (its ONNX graphs run with --backend ort)")
    if not re.fullmatch(r"Ascend[0-9A-Za-z_]+", soc):
        raise ValueError(f"--soc {soc!r}: give ATC's soc_version, 'Ascend' + the chip name from npu-smi info "
                         "(e.g. Ascend910B2, Ascend310P3)")
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {PRECISIONS}")
    if contract["dtype"] == "fp16" and precision == "origin":
        log("note: an fp16 export compiled with origin stays fp16")
    gears = {**{k: list(v) for k, v in DEFAULT_GEARS.items()}, **(gears or {})}
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
                                  "dynamic_dims": g.dynamic_dims(), "inputs": g.inputs, "gears": g.gears,
                                  "input_format": g.input_format}
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
        mode = "static" if self.graph.static else "dymdims"
        return self.session.infer([feeds[n] for n, _ in self.graph.inputs], mode=mode)


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


def _graph(name: str, g: dict) -> OmGraph:
    return OmGraph(name, g["onnx"], [(a, list(d)) for a, d in g["inputs"]], [tuple(x) for x in g["gears"]],
                   g.get("input_format", "ND"))


class _GearLoop:
    """What both families' OM sessions share: opening the runners (ais_bench, or ORT stand-ins for tests) and
    padding a decoder call to a gear. The family's session class supplies the graph calls."""

    def _init_gears(self, runners: dict, config: dict):
        self.runners, self.config = runners, config
        self.batch = config["batch"]
        self.graphs = {n: _graph(n, g) for n, g in config["graphs"].items()}
        self.gears = {**DEFAULT_GEARS, **config["gears"]}
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
        runners = {}
        for n, g in config["graphs"].items():
            found = sorted(folder.glob(f"{n}*.om"))
            if not found:
                raise FileNotFoundError(f"{folder} has no {n}*.om: run build_om.sh there first")
            runners[n] = AisRunner(found[0], device_id, _graph(n, g))
        return cls(folder, runners, config)

    @classmethod
    def emulated(cls, folder, threads: int | None = None):
        """The same loop over ONNX Runtime sessions that accept only the gear shapes (CPU tests)."""
        from export.runtime import make_session

        folder = Path(folder)
        config = _read_config(folder)
        onnx_dir = Path(config["onnx_dir"])
        runners = {n: OrtGearRunner(make_session(onnx_dir / g["onnx"], "cpu", threads), _graph(n, g))
                   for n, g in config["graphs"].items()}
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

    def _empty_past(self, batch):
        return None

    def _pad_embedding_ids(self, input_ids):
        """input_ids [B, T] left-padded to a prefill gear (decode steps embed 1 token) -> (ids, pad)."""
        b, t = input_ids.shape
        self._check_batch(b)
        pad = (1 if t == 1 else _gear(self.gears["prefill"], t, "a prompt")) - t
        return np.concatenate([np.full((b, pad), self.pad_token_id, np.int64), input_ids], 1), pad

    def _pad_decoder(self, embeds, positions, past, valid_past, valid_new):
        """One decoder call padded to a gear -> (OM model name, feeds (the family adds its extra inputs), layout
        for _compact). Prefill (past None): the prompt padded on the left, one masked dummy past slot; decode:
        the cache padded on the right to the KV gear. positions pad on their last axis (seq)."""
        import torch

        b, t, h = embeds.shape
        self._check_batch(b)
        layers = self.cfg.num_layers
        if past is None:
            name, tg = "decoder_prefill", _gear(self.gears["prefill"], t, "a prompt")
            p, pg, pad = 0, 1, tg - t
            embeds = np.concatenate([np.zeros((b, pad, h), embeds.dtype), embeds], 1)
            positions = np.concatenate([np.zeros(positions.shape[:-1] + (pad,), np.int64), positions], -1)
            new = torch.cat([torch.zeros(b, pad, dtype=torch.bool), valid_new], 1)
            slots = torch.zeros(b, 1, dtype=torch.bool)
            feeds_past = [np.zeros(self.kv_shape[:2] + (1,) + self.kv_shape[2:], self.np_dtype)] * (2 * layers)
        else:
            name, p = "decoder_decode", past[0].shape[2]
            pg = _gear(self.gears["decode"], p, "a context")
            new, pad, tg = valid_new, 0, t
            slots = torch.cat([valid_past, torch.zeros(b, pg - p, dtype=torch.bool)], 1)
            feeds_past = [np.concatenate([x, np.zeros(x.shape[:2] + (pg - p,) + x.shape[3:], x.dtype)], 2)
                          for x in past]
        feeds = {"inputs_embeds": np.ascontiguousarray(embeds), "attention_keep": keep_mask(slots, new),
                 "position_ids": np.ascontiguousarray(positions, dtype=np.int64)}
        for i, x in enumerate(feeds_past):
            feeds[f"past_key_values.{i // 2}.{'key' if i % 2 == 0 else 'value'}"] = x
        return name, feeds, (p, pg, pad, tg)

    def _compact(self, present, layout) -> list[np.ndarray]:
        """present outputs -> the real slots only: the cached ones, then the new ones after the padding (prefill
        drops the dummy slot and the left padding, decode the KV gear's padding)."""
        p, pg, pad, tg = layout
        present = [_fit(o, self.kv_shape[:2] + (pg + tg,) + self.kv_shape[2:]) for o in present]
        return [np.concatenate([x[:, :, :p], x[:, :, pg + pad:]], 2) for x in present]


class OmAwakerSession(_GearLoop, ExportedAwakerSession):
    """The generation loop over OM models (or their ORT stand-ins), padding every call to a compiled gear."""

    def __init__(self, folder, runners: dict, config: dict):
        super().__init__(folder, contract=config["contract"])
        self._init_gears(runners, config)
        self.merge = self.cfg.vision.spatial_merge_size ** 2
        self.max_context = max(self.gears["decode"]) + 1

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
        b = input_ids.shape[0]
        h = self.cfg.hidden_size
        ids, pad = self._pad_embedding_ids(input_ids)
        rows = sorted({n // self.merge for n in self.gears["vision"]} | {1})
        mg = _gear(rows, max(image_features.shape[0], 1), "image tokens")
        feeds = {"input_ids": ids,
                 "image_features": np.concatenate(
                     [image_features, np.zeros((mg - image_features.shape[0], h), image_features.dtype)]),
                 "image_mask": np.concatenate([np.zeros((b, pad), np.bool_), image_mask], 1),
                 "router_span": router_span + pad}
        emb, router = self.runners["embedding"].run(feeds)
        return _fit(emb, (b, ids.shape[1], h))[:, pad:], _fit(router, (b, h))

    def _decoder(self, embeds, positions, router_input, past, valid_past, valid_new):
        name, feeds, layout = self._pad_decoder(embeds, positions, past, valid_past, valid_new)
        if self.has_router:
            feeds["router_input"] = np.ascontiguousarray(router_input, dtype=np.float32)
        outs = self.runners[name].run(feeds)
        b, layers = embeds.shape[0], self.cfg.num_layers
        logits = _fit(outs[0], (b, self.cfg.vocab_size))
        routing, k = None, 0
        if self.has_router:
            routing = (_fit(outs[1], (layers, 2, b)), _fit(outs[2], (layers, 2, b)))
            k = 2
        return logits, routing, self._compact(outs[k + 1:], layout)


class OmMoeLlavaSession(_GearLoop, ExportedMoeLlavaSession):
    """MoE-LLaVA's generation loop over OM models (or their ORT stand-ins): images padded with zero images to an
    images gear, prompts and KV cache padded as for Awaker; moe_experts trimmed to the real tokens."""

    def __init__(self, folder, runners: dict, config: dict):
        super().__init__(folder, contract=config["contract"])
        self._init_gears(runners, config)
        self.max_context = max(self.gears["decode"]) + 1
        self.per_image = self.contract["vision"]["num_image_tokens_per_image"]

    def _vision(self, pixel_values):
        n = pixel_values.shape[0]
        g = _gear(self.gears["images"], n, "a number of images")
        feeds = {"pixel_values": np.concatenate(
            [pixel_values, np.zeros((g - n,) + pixel_values.shape[1:], pixel_values.dtype)]).astype(np.float32)}
        out = self.runners["vision"].run(feeds)[0]
        return _fit(out, (g * self.per_image, self.cfg.hidden_size))[: n * self.per_image]

    def _embedding(self, input_ids, image_features):
        b, h = input_ids.shape[0], self.cfg.hidden_size
        ids, pad = self._pad_embedding_ids(input_ids.astype(np.int64))
        m = image_features.shape[0]
        mg = _gear(feature_rows(self.gears["images"], self.per_image), max(m, 1), "image tokens")
        feeds = {"input_ids": ids,
                 "image_features": np.concatenate([image_features, np.zeros((mg - m, h), image_features.dtype)])}
        emb = self.runners["embedding"].run(feeds)[0]
        return _fit(emb, (b, ids.shape[1], h))[:, pad:]

    def _decoder(self, embeds, positions, past, valid_past, valid_new):
        name, feeds, layout = self._pad_decoder(embeds, positions, past, valid_past, valid_new)
        outs = self.runners[name].run(feeds)
        b, pad, tg = embeds.shape[0], layout[2], layout[3]
        logits = _fit(outs[0], (b, self.cfg.vocab_size))
        experts, k = None, 0
        if self.moe_layers:
            experts = _fit(outs[1], (len(self.moe_layers), b, tg, self.cfg.top_k))[:, :, pad:]
            k = 1
        return logits, experts, self._compact(outs[k + 1:], layout)


def open_om_session(folder, device_id: int = 0):
    """The OM session for a build_om folder, by the exported family."""
    family = _read_config(Path(folder))["contract"]["family"]
    return (OmMoeLlavaSession if family == "moe-llava" else OmAwakerSession).open(folder, device_id)


def _read_config(folder: Path) -> dict:
    path = Path(folder) / OM_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {OM_CONFIG}: build it with `moevl export om --onnx <dir>`")
    return json.loads(path.read_text())
