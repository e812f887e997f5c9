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

from moevl.export.graph import ExportError, GearError, ProviderError, builders_of, keep_mask, past_name, present_name, read_contract
from moevl.model.checkpoint import OutputKind, check_output_folder, output_folder

# vision: patches per call (Awaker); images: images per call (MoE-LLaVA, fixed image size)
DEFAULT_GEARS = {"prefill": [64, 128, 256, 512], "decode": [128, 256, 512, 1024], "vision": [64, 256, 1024],
                 "images": [1, 2, 4]}
PRECISIONS = ("origin", "fp16", "mixed_float16")
OM_CONFIG = "om_config.json"
OM_FORMAT = "moevl-om"
OM_FOLDER = OutputKind("a moevl OM folder", OM_CONFIG, OM_FORMAT)  # what --force may replace
# Ascend IR op types of RMSNorm (x * rsqrt(mean(x^2) + eps)) and of the router's softmax, kept in fp32 under
# mixed_float16 (ATC --modify_mixlist takes Ascend IR OpTypes, not ONNX op types)
FP32_OPS = ["Pow", "Square", "ReduceMean", "ReduceMeanD", "Sqrt", "Rsqrt", "RealDiv", "SoftmaxV2"]


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
    graphs = builders_of(contract["family"]).GraphIO(contract).om_graphs(gears, batch)
    for gr in graphs:
        if not 1 <= len(gr.gears) <= 100:
            raise ValueError(f"{gr.name}: ATC takes up to 100 --dynamic_dims profiles, this has {len(gr.gears)}; "
                             "change --gears")
    return graphs


def decoder_graphs(onnx: str, gears: dict, batch: int, h: int, kv: int, hd: int, layers: int,
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
             batch: int = 1, run_atc: bool = True, log=print, force: bool = False) -> Path:
    """Write om_config.json (+ mixlist, tokenizer files) and either run ATC (when on PATH) or write build_om.sh.

    Every argument is checked before anything is written; the folder is written atomically like an ONNX export,
    and ``force`` replaces only an earlier OM folder (om_config.json with "format": "moevl-om")."""
    onnx_dir = Path(onnx_dir)
    contract = read_contract(onnx_dir)
    if not re.fullmatch(r"Ascend[0-9A-Za-z_]+", soc):
        raise ValueError(f"--soc {soc!r}: give ATC's soc_version, 'Ascend' + the chip name from npu-smi info "
                         "(e.g. Ascend910B2, Ascend310P3)")
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {PRECISIONS}")
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"--batch {batch!r}: the static batch size must be a positive integer")
    gears = {**{k: list(v) for k, v in DEFAULT_GEARS.items()}, **(gears or {})}
    graphs = om_graphs(contract, gears, batch)
    out = Path(out) if out else onnx_dir.with_name(f"{onnx_dir.name}-om-{soc}")
    check_output_folder(out, OM_FOLDER, force)
    if contract["dtype"] == "fp16" and precision == "origin":
        log("note: an fp16 export compiled with origin stays fp16")

    def commands_into(folder: Path) -> list[list[str]]:
        mixlist = folder / "mixlist.json" if precision == "mixed_float16" else None
        return [atc_command(g, onnx_dir.resolve(), folder, soc, precision, mixlist) for g in graphs]

    commands = commands_into(out.resolve())  # what the script and om_config.json record: the final folder
    config = {"format": OM_FORMAT, "soc": soc, "precision": precision, "batch": batch, "gears": gears,
              "onnx_dir": str(onnx_dir.resolve()), "contract": contract,
              "graphs": {g.name: {"om": f"{g.name}.om", "onnx": g.onnx, "input_shape": g.input_shape(),
                                  "dynamic_dims": g.dynamic_dims(), "inputs": g.inputs, "gears": g.gears,
                                  "input_format": g.input_format}
                         for g in graphs},
              "commands": [shlex.join(c) for c in commands],
              "status": "ATC not run yet", "hardware_verified": False}
    atc = shutil.which("atc")
    with output_folder(out, OM_FOLDER, force, log=log) as tmp:
        if precision == "mixed_float16":
            (tmp / "mixlist.json").write_text(json.dumps({"black-list": {"to-add": FP32_OPS}}, indent=2))
        for name in contract.get("processor_files", []):
            shutil.copy2(onnx_dir / name, tmp / name)
        if atc and run_atc:
            for g, c in zip(graphs, commands_into(tmp.resolve())):  # ATC writes into the temporary folder
                log(f"running {shlex.join(c)}")
                res = subprocess.run(c, capture_output=True, text=True)
                if res.returncode != 0:
                    said = [x.strip() for x in (res.stderr + "\n" + res.stdout).splitlines() if x.strip()]
                    raise ExportError(f"atc failed for {g.name} (exit {res.returncode}): "
                                      f"{said[0] if said else 'no output'}; run `{shlex.join(c)}` by hand for all "
                                      "of its output")
            config["status"] = "built by atc"
        else:
            script = tmp / "build_om.sh"
            script.write_text("#!/usr/bin/env bash\n# Build the OM models; run on a host with CANN (source "
                              "/usr/local/Ascend/ascend-toolkit/set_env.sh first).\nset -euo pipefail\n"
                              + "".join(shlex.join(c) + "\n" for c in commands))
            script.chmod(0o755)
            config["status"] = "build_om.sh written; ATC not run"
        (tmp / OM_CONFIG).write_text(json.dumps(config, indent=2))
    if not (atc and run_atc):
        script = out / "build_om.sh"
        log(f"atc is not on PATH: wrote {script}; run it on an Ascend host with CANN to build the OM models"
            if not atc else f"wrote {script} (--script-only)")
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


def _graph(name: str, g: dict) -> OmGraph:
    return OmGraph(name, g["onnx"], [(a, list(d)) for a, d in g["inputs"]], [tuple(x) for x in g["gears"]],
                   g.get("input_format", "ND"))


def _fit_gear(graph: OmGraph, actual: tuple, what: str) -> tuple:
    """The smallest compiled gear whose every dynamic dim is at least ``actual``'s."""
    fits = [g for g in graph.gears if all(a >= b for a, b in zip(g, actual))]
    if not fits:
        raise GearError(f"{what} of {max(actual)} exceeds the largest gear {max(max(g) for g in graph.gears)}: "
                        "rebuild the OM models with larger --gears")
    return min(fits, key=sum)


class OmRunner:
    """The exported graphs as OM models (or their ORT stand-ins), every call padded up to a compiled gear: images
    (or patches) with zeros, whose features are dropped; embedding calls on the right (the embedding is per token,
    so the padding changes nothing before it); decoder prompts on the left with one masked dummy past slot (a gear
    cannot be 0); the KV cache on the right, masked. A compact host-side KV cache is kept between calls."""

    def __init__(self, runners: dict, config: dict):
        self.runners, self.config = runners, config
        self.batch = config["batch"]
        self.graphs = {n: _graph(n, g) for n, g in config["graphs"].items()}
        self.gears = {**DEFAULT_GEARS, **config["gears"]}
        self.max_context = max(self.gears["decode"]) + 1
        self.dtype = config["contract"]["dtype"]

    def bind(self, session) -> None:
        self.io, cfg = session.io, session.cfg
        self.hidden, self.vocab, self.layers = cfg.hidden_size, cfg.vocab_size, cfg.num_layers
        self.pad_token_id = cfg.pad_token_id
        self.np_dtype = session.np_dtype
        self.kv_shape = (self.batch, cfg.num_kv_heads, cfg.head_dim)
        self.decoder_outputs = [t["name"] for t in config_outputs(self.config, "decoder")]

    @classmethod
    def open(cls, folder, config: dict, device_id: int = 0):
        folder = Path(folder)
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
        return cls(runners, config)

    @classmethod
    def emulated(cls, folder, config: dict, threads: int | None = None):
        """The same loop over ONNX Runtime sessions that accept only the gear shapes (CPU tests)."""
        from moevl.export.ort import make_session

        onnx_dir = Path(config["onnx_dir"])
        runners = {n: OrtGearRunner(make_session(onnx_dir / g["onnx"], "cpu", threads), _graph(n, g))
                   for n, g in config["graphs"].items()}
        return cls(runners, config)

    def describe(self) -> dict:
        return {"kind": "om", "device": "ascend-om", "chip": self.config["soc"], "dtype": self.dtype,
                "precision": self.config["precision"], "quantize": None, "hardware_verified": False}

    def _check_batch(self, b):
        if b != self.batch:
            raise GearError(f"the OM models were compiled for batch {self.batch}, the request has {b}")

    def vision(self, feeds: dict) -> np.ndarray:
        """Every input's first dim (patches or images) padded with zeros to a gear; a square mask over them gets
        the identity on the padding (padding patches attend to themselves only)."""
        graph = self.graphs["vision"]
        n = next(iter(feeds.values())).shape[0]
        g = _fit_gear(graph, (n,) * len(graph.gears[0]), "an image batch")[0]
        padded = {}
        for name, x in feeds.items():
            if x.ndim == 2 and x.shape[0] == x.shape[1] == n and x.dtype == np.bool_:
                y = np.zeros((g, g), np.bool_)
                y[:n, :n] = x
                y[np.arange(n, g), np.arange(n, g)] = True
            else:
                y = np.concatenate([x, np.zeros((g - n,) + x.shape[1:], x.dtype)])
            padded[name] = y
        out = self.runners["vision"].run(padded)[0]
        return _fit(out, (self.io.image_tokens(g), self.hidden))[: self.io.image_tokens(n)]

    def embedding(self, feeds: dict) -> dict:
        """Token inputs [batch, seq] padded on the right to a prefill gear (1 for a decode step), image features
        padded with zero rows to a gear of rows (1 for none)."""
        graph = self.graphs["embedding"]
        b, t = feeds["input_ids"].shape
        self._check_batch(b)
        m = feeds["image_features"].shape[0]
        dynamic = [name for name, dims in graph.inputs for d in dims if d == -1]  # one name per gear value
        gear = _fit_gear(graph, tuple(max(m, 1) if n == "image_features" else t for n in dynamic), "a prompt")
        seq, rows = gear[dynamic.index("input_ids")], gear[dynamic.index("image_features")]
        padded = {}
        for name, dims in graph.inputs:
            x = feeds[name]
            if name == "image_features":
                padded[name] = np.concatenate([x, np.zeros((rows - m, x.shape[1]), x.dtype)])
            elif dims[1:] == [-1]:  # [batch, seq] token inputs (by the compiled shape, not by name)
                fill = self.pad_token_id if name == "input_ids" else 0
                padded[name] = np.concatenate([x, np.full((b, seq - t), fill, x.dtype)], 1)
            else:
                padded[name] = x
        outs = self.runners["embedding"].run(padded)
        names = [o["name"] for o in config_outputs(self.config, "embedding")]
        result = {}
        for name, out in zip(names, outs):
            if name == "inputs_embeds":
                result[name] = _fit(out, (b, seq, self.hidden))[:, :t]
            else:
                result[name] = _fit(out, (b, self.hidden))
        return result

    def decoder(self, embeds, positions, extra: dict, past, valid_past, valid_new):
        """One decoder call padded to a gear -> (outputs by name, compact present KV). Prefill (past None): the
        prompt padded on the left, one masked dummy past slot; decode: the cache padded on the right to the KV
        gear. positions pad on their last axis (seq); outputs with a seq axis are trimmed to the real tokens."""
        import torch

        b, t, h = embeds.shape
        self._check_batch(b)
        if past is None:
            name = "decoder_prefill"
            tg = _fit_gear(self.graphs[name], (t, t, t + 1, t), "a prompt")[0]
            p, pg, pad = 0, 1, tg - t
            embeds = np.concatenate([np.zeros((b, pad, h), embeds.dtype), embeds], 1)
            positions = np.concatenate([np.zeros(positions.shape[:-1] + (pad,), np.int64), positions], -1)
            new = torch.cat([torch.zeros(b, pad, dtype=torch.bool), valid_new], 1)
            slots = torch.zeros(b, 1, dtype=torch.bool)
            feeds_past = [np.zeros(self.kv_shape[:2] + (1,) + self.kv_shape[2:], self.np_dtype)] * (2 * self.layers)
        else:
            name, p = "decoder_decode", past[0].shape[2]
            pg = _fit_gear(self.graphs[name], (p + 1,) + (p,) * len(past), "a context")[1]
            new, pad, tg = valid_new, 0, t
            slots = torch.cat([valid_past, torch.zeros(b, pg - p, dtype=torch.bool)], 1)
            feeds_past = [np.concatenate([x, np.zeros(x.shape[:2] + (pg - p,) + x.shape[3:], x.dtype)], 2)
                          for x in past]
        feeds = {"inputs_embeds": np.ascontiguousarray(embeds), "attention_keep": keep_mask(slots, new),
                 "position_ids": np.ascontiguousarray(positions, dtype=np.int64)}
        for input_name, _ in self.graphs[name].inputs:
            if input_name in extra:
                feeds[input_name] = np.ascontiguousarray(extra[input_name], dtype=np.float32)
        for i, x in enumerate(feeds_past):
            feeds[past_name(i)] = x
        outs = dict(zip(self.decoder_outputs, self.runners[name].run(feeds)))
        result = {}
        for spec in config_outputs(self.config, "decoder"):
            if spec["name"].startswith("present."):
                continue
            shape = [{"batch": b, "seq": tg}.get(d, d) for d in spec["shape"]]
            value = _fit(outs[spec["name"]], shape)
            if "seq" in spec["shape"]:  # e.g. moe_experts: the real tokens only
                value = np.take(value, range(pad, tg), axis=spec["shape"].index("seq"))
            result[spec["name"]] = value
        present = [_fit(outs[present_name(i)],
                        self.kv_shape[:2] + (pg + tg,) + self.kv_shape[2:]) for i in range(2 * self.layers)]
        return result, [np.concatenate([x[:, :, :p], x[:, :, pg + pad:]], 2) for x in present]


def config_outputs(config: dict, graph: str) -> list[dict]:
    return config["contract"]["graphs"][graph]["outputs"]


def read_om_config(folder: Path) -> dict:
    path = Path(folder) / OM_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {OM_CONFIG}: build it with `moevl export om --onnx <dir>`")
    return json.loads(path.read_text())
