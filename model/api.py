"""The Python API the CLI is a thin layer over: ``load`` a model (preset or local folder) onto a device.

    from model.api import load
    vl = load("awaker-tiny", device="cpu")
    print(vl.ask("What is in the picture?", images=["cat.png"], max_new_tokens=32).texts[0])
"""
from __future__ import annotations

from pathlib import Path

from ascend.device import resolve_device

# family name -> loader(spec, device, dtype, **options) -> session. Families register here.
_FAMILIES = {}
# preset name -> family
PRESET_FAMILIES = {"awaker-tiny": "awaker", "moellava-tiny": "moe-llava"}


def register_family(name: str, loader, presets=()) -> None:
    _FAMILIES[name] = loader
    for p in presets:
        PRESET_FAMILIES[p] = name


def _load_awaker(spec, device, dtype=None, routing="prefill", base=None, max_context=None, **unused):
    from model.loader import load_awaker
    from model.session import AwakerSession

    _reject_unknown_options("awaker", unused)
    model, proc = load_awaker(spec, device, dtype, base=base)
    model.set_kernels(_kernels_for(device))
    return AwakerSession(model, proc, device, routing=routing, max_context=max_context)


def _reject_unknown_options(family, options):
    given = {k: v for k, v in options.items() if v not in (None, False)}
    if given:
        raise ValueError(f"option(s) {sorted(given)} do not apply to the {family} family")


def _kernels_for(device):
    from kernels import get_kernels

    if device.kernel_backend in ("npu", "npu-emulated"):  # the kernel set depends on the chip (910B / 310P)
        from kernels.npu import kernels_for_device

        return kernels_for_device(device)
    return get_kernels(device.kernel_backend)


register_family("awaker", _load_awaker)


def family_of(spec: str | Path) -> str:
    if str(spec) in PRESET_FAMILIES:
        return PRESET_FAMILIES[str(spec)]
    folder = Path(spec)
    if not folder.is_dir():
        from model.loader import CheckpointError

        raise CheckpointError(f"{spec} is neither a preset ({', '.join(sorted(PRESET_FAMILIES))}) nor an "
                              "existing folder")
    from model.loader import detect_format

    fmt = detect_format(folder)
    if fmt == "moevl":
        import json

        return json.loads((folder / "moevl_config.json").read_text())["family"]
    return "moe-llava" if fmt == "moe-llava" else "awaker"


def load(spec: str | Path, device="auto", dtype=None, strict_npu=None, compile=False, **options):
    """Load a model onto a device -> a session with ``ask(...)`` / ``prepare`` / ``prefill`` / ``decode``.

    NPU only: ``strict_npu`` makes an op falling back to the CPU an error (TORCH_NPU_FALLBACK_CPU_DISABLE on an
    NPU; on npu-emulated, hot ops must be NPU variants and steps run under ascend.npu_emulation.NpuStrictGuard).
    None = on for npu-emulated, off for npu. ``compile`` runs the decode step in TorchAir graph mode (NPU only,
    not yet verified on hardware).
    """
    if strict_npu and isinstance(device, str) and device.strip().lower().startswith("npu"):
        from ascend.npu_probe import strict_npu as set_strict

        set_strict(True)  # before torch_npu is imported by resolve_device
    dev = device if hasattr(device, "torch_device") else resolve_device(device, dtype)
    family = family_of(spec)
    if family == "moe-llava" and family not in _FAMILIES:
        import model.moe_llava  # noqa: F401  registers itself
    if family not in _FAMILIES:
        raise NotImplementedError(f"the {family} family is not available in this build")
    session = _FAMILIES[family](spec, dev, dev.dtype if dtype else None, **options)
    if dev.kernel_backend in ("npu", "npu-emulated"):
        from kernels.npu import prepare_session

        prepare_session(session, dev, strict=dev.emulated if strict_npu is None else strict_npu, compile=compile)
    elif compile or strict_npu:
        raise ValueError(f"--compile and --strict-npu apply to NPU devices only, not {dev.kind}")
    return session
