"""PyTorch -> ONNX: ``export_onnx(model, out)`` traces the family's three graphs (its ``Builder`` in
export/builders/), writes the contract, validates the graphs against PyTorch and moves the folder into place.

    from moevl.export.onnx import export_onnx
    export_onnx("awaker-tiny", "out/awaker-tiny-onnx")           # or a checkpoint folder

Every family exports vision.onnx, embedding.onnx and decoder.onnx with a KV cache as past/present Concat (one
decoder graph serves prefill and decode), names and shapes in ``contract.json`` (onnxruntime-genai's VLM contract,
adapted; see export/graph.py). Everything data-dependent (positions, the causal/padding mask, vision position ids
and mask, Awaker's router span) is computed by the runtime before the graphs run, as the family's inputs module
does for PyTorch.

Exporter: the TorchScript exporter (``dynamo=False``) at opset 17, which ATC accepts (tests/test_export.py checks
that it still works on the installed torch), over the model with the "export" kernel set (dense, static-shape
formulations: moevl/kernels/export.py).
"""
from __future__ import annotations

import json
import shutil
import time
import warnings
from pathlib import Path

import torch

from moevl.export.graph import CONTRACT, FORMAT, FORMAT_VERSION, TOLERANCE, ExportError, GraphSpec, builders_of
from moevl.model.checkpoint import PROCESSOR_FILES, OutputKind, check_output_folder, output_folder

EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # bytes of weights: above it the graph keeps them in <graph>.onnx.data
ONNX_EXPORT = OutputKind("a moevl ONNX export", CONTRACT, FORMAT)  # what --force may replace


# --------------------------------------------------------------------------------------------- export
def _export_graph(spec: GraphSpec, folder: Path, opset: int) -> Path:
    """Trace one graph to folder/<name>.onnx (weights beside it in <name>.onnx.data when large)."""
    import onnx

    raw = folder / f".raw-{spec.name}"
    raw.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about shape arithmetic, the TorchScript deprecation note
        torch.onnx.export(spec.module, spec.example, str(raw / spec.file), dynamo=False, opset_version=opset,
                          input_names=[t.name for t in spec.inputs], output_names=[t.name for t in spec.outputs],
                          dynamic_axes=spec.dynamic_axes(), do_constant_folding=True)
    proto = onnx.load(str(raw / spec.file), load_external_data=True)
    weight_bytes = sum(len(t.raw_data) for t in proto.graph.initializer)
    target = folder / spec.file
    if weight_bytes > EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(proto, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=spec.file + ".data", size_threshold=1024)
    else:
        onnx.save_model(proto, str(target))
    del proto
    shutil.rmtree(raw)
    return target


def _graph_entry(spec: GraphSpec, folder: Path) -> dict:
    data = folder / (spec.file + ".data")
    return {"file": spec.file, "external_data": data.name if data.exists() else None,
            "inputs": [t.to_dict() for t in spec.inputs], "outputs": [t.to_dict() for t in spec.outputs]}


def load_for_export(spec: str | Path, dtype: str, **options):
    """-> the PyTorch session (model on the CPU in dtype) that is traced and that validation compares against.
    ``options`` go to moevl.load (e.g. vision_tower= for a MoE-LLaVA folder)."""
    import moevl
    from moevl.model.family import family_of

    builders_of(family_of(spec).name)  # an unsupported family fails before loading
    return moevl.load(spec, device="cpu", dtype=dtype, **options)


def export_onnx(spec, out, dtype: str = "fp32", opset: int = 17, force: bool = False, validate: bool = True,
                log=print, session=None, processor_folder=None, validate_tokens: int = 8, **load_options) -> Path:
    """Export a model (preset, folder, or a loaded PyTorch session) to an ONNX folder; see the module docstring.

    The folder is written under a temporary name beside ``out``, validated, then renamed; any failure (or Ctrl-C,
    SIGTERM) removes the temporary folder and leaves ``out`` as it was. ``force`` replaces only an earlier ONNX
    export (contract.json with "format": "moevl-onnx"). ``load_options`` go to moevl.load when ``spec`` is loaded
    here.
    """
    if dtype not in TOLERANCE:
        raise ValueError(f"--dtype must be one of {sorted(TOLERANCE)}, not {dtype!r}")
    if not 14 <= opset <= 18:  # the kit supports 14..18 (tested at 17); ATC accepts up to 18
        raise ValueError(f"--opset {opset}: use an opset from 14 to 18 (ATC accepts up to 18; 17 is the default)")
    if validate and validate_tokens < 1:
        raise ValueError(f"--validate-tokens {validate_tokens}: compare at least 1 greedy token, or pass "
                         "--no-validate")
    out = Path(out)
    check_output_folder(out, ONNX_EXPORT, force)  # before the slow part; checked again when moving into place
    if session is None:
        session = load_for_export(spec, dtype, **load_options)
    model = session.model
    from moevl.kernels import quant

    if quant.quantized_weights(model):
        raise ExportError("a model with int8/int4 weights cannot be exported: export the unquantised model, then "
                          "run it with --backend ort --quantize int8")
    # CPU weight layouts (oneDNN-packed, OpenBLAS) back to plain weights for tracing; given back to the session when
    # the export ends, however it ends (the session runs on as fast as before)
    layouts = dict(getattr(model, "dense_layouts", None) or {})
    quant.restore_dense(model)
    try:
        return _export_traced(session, model, out, dtype, opset, validate, validate_tokens, force, processor_folder,
                              log)
    finally:
        if layouts:
            quant.apply_dense_layouts(model, layouts)


def _export_traced(session, model, out, dtype, opset, validate, validate_tokens, force, processor_folder, log):
    from moevl.ascend.device import dtype_name, parse_dtype

    if dtype_name(next(model.parameters()).dtype) != dtype:
        raise ExportError(f"the session's model is {next(model.parameters()).dtype}, not {parse_dtype(dtype)}")
    builder = builders_of(model.cfg.family).Builder(model)
    builder.accept(session)
    if processor_folder is None and getattr(session, "processor", None) is not None:
        processor_folder = getattr(session.processor, "folder", None)
    with output_folder(out, ONNX_EXPORT, force, log=log) as tmp:
        t0 = time.perf_counter()
        saved_kernels = model.ops.kernels
        from moevl.kernels import get_kernels

        model.set_kernels(get_kernels("export"))  # the model's own modules, traced with the static-shape ops
        try:
            specs = builder.graph_specs()
            with torch.no_grad():
                for s in specs:
                    _export_graph(s, tmp, opset)
                    log(f"exported {s.file} ({_size_mb(tmp, s.file):.1f} MB)")
        finally:
            model.set_kernels(saved_kernels)
        files = []
        if processor_folder is not None:
            for name in PROCESSOR_FILES:
                if (Path(processor_folder) / name).is_file():
                    shutil.copy2(Path(processor_folder) / name, tmp / name)
                    files.append(name)
        import onnx

        contract = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "family": model.cfg.family,
            "dtype": dtype, "opset": opset,
            "exporter": f"torch.onnx.export(dynamo=False) torch {torch.__version__}, onnx {onnx.__version__}",
            "kernel_backend": "export",
            "config": model.cfg.to_dict(),
            "graphs": {s.name: _graph_entry(s, tmp) for s in specs},
            "processor_files": files,
            "symbolic_dims": {"batch": "requests", "seq": "new tokens this call", "past_seq": "cached tokens",
                              "total_seq": "past_seq + seq", "num_patches": "vision patches (all images)",
                              "num_image_tokens": "num_patches / merge^2"},
        } | builder.contract_section()
        (tmp / CONTRACT).write_text(json.dumps(contract, indent=2))
        log(f"wrote {CONTRACT} ({time.perf_counter() - t0:.1f} s)")
        if validate:
            from moevl.export.validate import validate_export

            report = validate_export(tmp, session, tokens=validate_tokens, log=log)
            contract["validation"] = report
            (tmp / CONTRACT).write_text(json.dumps(contract, indent=2))
    log(f"ONNX export written to {out}")
    return out


def _size_mb(folder: Path, file: str) -> float:
    total = (folder / file).stat().st_size
    data = folder / (file + ".data")
    if data.exists():
        total += data.stat().st_size
    return total / 2**20
