"""`moevl info`: what this environment has (versions, devices) and what `--device auto` would pick."""

from __future__ import annotations

import platform
import sys

import torch

from moevl.ascend import npu_probe
from moevl.ascend.device import cpu_model_name, resolve_device
from moevl.ascend.errors import DeviceError
from moevl.ascend.host import Host, find_toolkit, parse_npu_smi


def _cuda_devices() -> list[dict]:
    if not torch.cuda.is_available():
        return []
    devices = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        devices.append({"device": f"cuda:{index}", "name": props.name, "memory_total_bytes": int(props.total_memory)})
    return devices


def _npu_devices(probe: npu_probe.NpuProbe) -> list[dict]:
    npu = getattr(torch, "npu", None)
    if not probe.available or npu is None:
        return []
    try:
        if not npu.is_available():
            return []
        devices = []
        for index in range(npu.device_count()):
            _free, total = npu.mem_get_info(index)
            devices.append({"device": f"npu:{index}", "name": str(npu.get_device_name(index)),
                            "memory_total_bytes": int(total)})
        return devices
    except RuntimeError:
        return []


def _onnxruntime() -> dict:
    try:
        import onnxruntime
    except ImportError as exc:
        return {"version": None, "providers": [], "error": str(exc)}
    return {"version": onnxruntime.__version__, "providers": list(onnxruntime.get_available_providers())}


def collect_info(host: Host | None = None) -> dict:
    """Versions, devices and the auto choice, as a JSON-able dict."""
    host = host or Host()
    probe = npu_probe.probe_npu()
    toolkit = find_toolkit(host)
    npu_smi = host.find_program("npu-smi")
    npu_smi_chips = []
    if npu_smi is not None:
        npu_smi_chips = [d.name for d in parse_npu_smi(host.run([npu_smi, "info"]) or "")]
    try:
        auto = resolve_device("auto").describe()
    except DeviceError as exc:  # e.g. an NPU is visible but broken; report instead of crashing `moevl info`
        auto = {"error": str(exc)}
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "transformers": npu_probe.installed_version("transformers"),
        "onnxruntime": _onnxruntime(),
        "torch_npu": {
            "version": probe.version,
            "importable": probe.available,
            "reason": probe.reason or None,
            "fix": probe.fix or None,
        },
        "cann_toolkit": None if toolkit is None else {"home": toolkit.home, "version": toolkit.version},
        "devices": {
            "cpu": {"name": cpu_model_name()},
            "cuda": _cuda_devices(),
            "npu": _npu_devices(probe),
            "npu_smi_chips": npu_smi_chips,
        },
        "auto": auto,
    }


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**30:.1f} GiB"


def format_info(info: dict) -> str:
    ort = info["onnxruntime"]
    npu = info["torch_npu"]
    toolkit = info["cann_toolkit"]
    auto = info["auto"]
    lines = [
        f"python        {info['python']} ({info['platform']})",
        f"torch         {info['torch']}" + (f" (CUDA {info['torch_cuda']})" if info["torch_cuda"] else ""),
        f"transformers  {info['transformers'] or 'not installed'}",
        f"onnxruntime   {ort['version'] or 'not installed'}"
        + (f" (providers: {', '.join(ort['providers'])})" if ort["providers"] else ""),
    ]
    if npu["importable"]:
        lines.append(f"torch_npu     {npu['version']}")
    else:
        lines.append(f"torch_npu     unavailable: {npu['reason']}")
    lines.append(
        f"CANN toolkit  {toolkit['home']} (version {toolkit['version'] or 'unknown'})" if toolkit else "CANN toolkit  not found"
    )
    lines.append("devices")
    lines.append(f"  cpu         {info['devices']['cpu']['name']}")
    for dev in info["devices"]["cuda"] + info["devices"]["npu"]:
        lines.append(f"  {dev['device']:<11} {dev['name']} ({_gib(dev['memory_total_bytes'])})")
    if info["devices"]["npu_smi_chips"] and not info["devices"]["npu"]:
        lines.append(f"  npu-smi     {', '.join(info['devices']['npu_smi_chips'])} (not usable from torch)")
    if "error" in auto:
        lines.append(f"auto device   error: {auto['error']}")
    else:
        lines.append(f"auto device   {auto['device']} ({auto['chip']}), dtype {auto['dtype']}, kernels {auto['kernel_backend']}")
    return "\n".join(lines)
