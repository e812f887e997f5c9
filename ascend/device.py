"""One class per kind of device, chosen once by ``resolve_device``.

Everything model, kernel and benchmark code needs to know about where it runs is an attribute or method here:
``torch_device``, the preferred ``dtype``, the ``kernel_backend`` that ``kernels/`` dispatches on, how to
``synchronize``, time (``timer``) and measure memory. ``npu-emulated`` runs on the CPU but carries the chip family and
dtype rules of a 910B or 310P, so NPU code paths (and the 310P's lack of bf16) can be exercised without hardware.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import platform
import re
import resource
import sys
import time

import torch

from moevl.ascend import npu_probe
from moevl.ascend.errors import DeviceError

ACL_FORMAT_FRACTAL_NZ = 29  # torch_npu.npu_format_cast's id of the FRACTAL_NZ layout

VALID_SPECS = (
    "auto",
    "cpu",
    "cuda",
    "cuda:N",
    "npu",
    "npu:N",
    "npu-emulated",
    "npu-emulated:910B",
    "npu-emulated:310P",
)

_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
}
_SHORT_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_NO_BF16_ON_310P = (
    "{chip} is a 310P, which has no bf16 support (torch.npu.is_bf16_supported() is False there); "
    "use --dtype fp16 (the 310P default)"
)


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """"bf16" / "bfloat16" / torch.bfloat16 -> torch.bfloat16 (also fp32 and fp16 spellings)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _SHORT_NAMES:
            raise DeviceError(f"unsupported dtype {dtype}; use one of fp32, bf16, fp16")
        return dtype
    key = str(dtype).strip().lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise DeviceError(f"unknown dtype {dtype!r}; use one of fp32, bf16, fp16 (or float32, bfloat16, float16)")
    return _DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bf16", torch.float16 -> "fp16", torch.float32 -> "fp32"; others as torch names them."""
    return _SHORT_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def chip_family_of(name: str | None) -> str | None:
    """Family of an Ascend chip name: "Ascend910B3" / "910B3" -> "910B", "310P3" -> "310P", "Ascend910_9391" -> "A3"."""
    if not name:
        return None
    upper = name.upper()
    if "310P" in upper:
        return "310P"
    if "910B" in upper:
        return "910B"
    if re.search(r"910_?93", upper):
        return "A3"
    return None


def chip_family_of_soc(soc_version: int) -> str | None:
    """torch_npu.npu.get_soc_version() values: 200-205 310P, 220-225 910B (A2), 250-256 A3."""
    if 200 <= soc_version <= 205:
        return "310P"
    if 220 <= soc_version <= 225:
        return "910B"
    if 250 <= soc_version <= 256:
        return "A3"
    return None


@functools.cache
def cpu_flag_set() -> frozenset:
    """This CPU's feature flags from /proc/cpuinfo (x86 "flags", aarch64 "Features"; the first processor's), read
    once; empty where there is no /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                # x86 says "model name"; some aarch64 kernels only say "Hardware" / "CPU part".
                if key.strip() in ("model name", "Hardware") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


class Timer:
    """``with device.timer() as t: ...`` then ``t.elapsed_ms``. Device events where the device has them."""

    def __init__(self, device: Device):
        self.device = device
        self.elapsed_ms: float | None = None
        self._events = device._event_module()

    def __enter__(self) -> Timer:
        # Work queued before the block must not be counted.
        self.device.synchronize()
        if self._events is None:
            self._start = time.perf_counter()
        else:
            self._start = self._events.Event(enable_timing=True)
            self._end = self._events.Event(enable_timing=True)
            self._start.record(self._events.current_stream(self.device.torch_device))
        return self

    def __exit__(self, *exc_info) -> None:
        if self._events is None:
            self.elapsed_ms = (time.perf_counter() - self._start) * 1000.0
            return
        self._end.record(self._events.current_stream(self.device.torch_device))
        self._end.synchronize()
        self.elapsed_ms = float(self._start.elapsed_time(self._end))


class Device:
    """A resolved device. Subclasses fill in the facts; the base class implements the host-side (CPU) behaviour."""

    kind: str = ""
    kernel_backend: str = ""
    emulated: bool = False
    # strict NPU mode (``moevl.load(strict_npu=...)``): every hot op must be the device's own kernel, and on the
    # emulation each step runs under NpuStrictGuard. Only NPU devices accept it (set_strict).
    strict: bool = False

    def __init__(
        self,
        torch_device: torch.device,
        chip: str,
        chip_family: str | None,
        dtype: str | torch.dtype | None,
    ):
        self.torch_device = torch_device
        self.index = torch_device.index
        self.chip = chip
        self.chip_family = chip_family
        self.dtype = self.check_dtype(self.preferred_dtype() if dtype is None else dtype)

    # --- facts -------------------------------------------------------------------------------------------------
    @property
    def supports_bf16(self) -> bool:
        return True

    def preferred_dtype(self) -> torch.dtype:
        return torch.float32

    def check_dtype(self, dtype: str | torch.dtype) -> torch.dtype:
        """A dtype this device can run (any common spelling), or a DeviceError that says which to use."""
        dtype = parse_dtype(dtype)
        if dtype == torch.bfloat16 and not self.supports_bf16:
            if self.chip_family == "310P":
                raise DeviceError(_NO_BF16_ON_310P.format(chip=self.chip))
            raise DeviceError(f"{self.chip} does not support bf16; use --dtype fp16 or fp32")
        return dtype

    def to_dtype_name(self) -> str:
        return dtype_name(self.dtype)

    def memory_total_bytes(self) -> int | None:
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None

    # --- behaviour ---------------------------------------------------------------------------------------------
    def set_strict(self, strict: bool) -> None:
        if strict:
            raise ValueError(f"--strict-npu applies to NPU devices only, not {self.kind}")

    def prepare_model(self, model) -> None:
        """Put a loaded model's weights in the layout this device's kernels want (nothing on CPU/CUDA)."""

    def step_guard(self, host_sync_ok: bool):
        """A context each prefill (host_sync_ok) / decode step runs under: checks of what a step may do."""
        return contextlib.nullcontext()

    def compile_step(self, fn):
        """``fn`` compiled for this device's graph mode (``--compile``)."""
        raise ValueError(f"--compile applies to NPU devices only, not {self.kind}")

    def _event_module(self):
        """torch.cuda / torch.npu for devices with timing events; None times on the host clock."""
        return None

    def synchronize(self) -> None:
        """Host work is synchronous; nothing to wait for."""

    def timer(self) -> Timer:
        return Timer(self)

    def reset_peak_memory(self) -> None:
        """The process peak RSS cannot be reset; memory_stats reports it since process start."""

    def memory_stats(self) -> dict:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # ru_maxrss is KiB on Linux, bytes on macOS.
        peak_rss_bytes = peak if sys.platform == "darwin" else peak * 1024
        return {"peak_allocated_bytes": None, "peak_rss_bytes": peak_rss_bytes}

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "device": str(self.torch_device),
            "chip": self.chip,
            "chip_family": self.chip_family,
            "dtype": dtype_name(self.dtype),
            "kernel_backend": self.kernel_backend,
            "supports_bf16": self.supports_bf16,
            "memory_total_bytes": self.memory_total_bytes(),
            "torch": torch.__version__,
            "torch_npu": npu_probe.installed_version("torch-npu"),
            "emulated": self.emulated,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.torch_device}, chip={self.chip!r}, dtype={dtype_name(self.dtype)})"


class CpuDevice(Device):
    kind = "cpu"
    kernel_backend = "cpu"

    def __init__(self, dtype: str | torch.dtype | None = None):
        super().__init__(torch.device("cpu"), cpu_model_name(), None, dtype)


class _NpuBehaviour:
    """What real and emulated NPUs share: strict mode, the 310P weight layout. Mixed into both Device classes."""

    def set_strict(self, strict: bool) -> None:
        self.strict = bool(strict)

    def torch_npu(self):
        """The provider of the torch_npu functions (the real module, or the emulation on npu-emulated)."""
        raise NotImplementedError(f"{type(self).__name__} must say where its torch_npu functions come from")

    def prepare_model(self, model) -> None:
        if self.chip_family == "310P":
            cast_weights_nz(model, self.torch_npu())


def cast_weights_nz(model, tnpu) -> int:
    """310P: cast every 2-D linear weight to FRACTAL_NZ once (vllm-ascend's 310P practice). -> number cast."""
    count = 0
    for module in model.modules():
        w = getattr(module, "weight", None)
        if isinstance(module, torch.nn.Embedding) or not isinstance(w, torch.nn.Parameter) or w.dim() != 2:
            continue
        if isinstance(module, torch.nn.Linear) or hasattr(module, "in_features"):
            w.data = tnpu.npu_format_cast(w.data, ACL_FORMAT_FRACTAL_NZ)
            count += 1
    return count


class EmulatedNpuDevice(_NpuBehaviour, Device):
    """Runs on the CPU with an Ascend chip's dtype rules, for testing NPU code paths without an NPU."""

    kind = "npu-emulated"
    kernel_backend = "npu-emulated"
    emulated = True
    CHIPS = {"910B": "Ascend910B2", "310P": "Ascend310P3"}

    def __init__(self, family: str = "910B", dtype: str | torch.dtype | None = None):
        if family not in self.CHIPS:
            raise DeviceError(f"unknown emulated chip {family!r}; use npu-emulated:910B or npu-emulated:310P")
        super().__init__(torch.device("cpu"), f"{self.CHIPS[family]} (emulated)", family, dtype)

    @property
    def supports_bf16(self) -> bool:
        return self.chip_family != "310P"

    def preferred_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.supports_bf16 else torch.float16

    def torch_npu(self):
        """One emulation per device: it tracks tensor formats (FRACTAL_NZ) across the kernels and the weights."""
        if getattr(self, "_tnpu", None) is None:
            from moevl.ascend.npu_emulation import EmulatedTorchNpu

            self._tnpu = EmulatedTorchNpu(self.chip_family)
        return self._tnpu

    def step_guard(self, host_sync_ok: bool):
        """Strict emulation: no float64, no Conv3d, and (decode) no host synchronisation inside a step."""
        if not self.strict:
            return contextlib.nullcontext()
        from moevl.ascend.npu_emulation import NpuStrictGuard

        return NpuStrictGuard(host_sync_ok=host_sync_ok)

    def compile_step(self, fn):
        _torchair()  # says what is missing when TorchAir cannot be imported
        raise DeviceError(f"--compile (TorchAir) needs a real NPU, not {self.kind}")


def _torchair():
    try:
        importlib.import_module("torch_npu")
        return importlib.import_module("torchair")
    except (ImportError, OSError, RuntimeError) as exc:
        raise DeviceError(
            f"--compile uses TorchAir graph mode, which ships inside torch-npu, but it cannot be imported here "
            f"({type(exc).__name__}: {exc}). Run on an Ascend host with the CANN toolkit sourced and "
            "`pip install 'moevl-ascend[npu]'`, or drop --compile") from exc


class _AcceleratorDevice(Device):
    """CUDA and NPU share one API shape (torch.npu mirrors torch.cuda); only the module differs."""

    def _module(self):
        raise NotImplementedError

    def _event_module(self):
        return self._module()

    def synchronize(self) -> None:
        self._module().synchronize(self.torch_device)

    def reset_peak_memory(self) -> None:
        self._module().reset_peak_memory_stats(self.torch_device)

    def memory_stats(self) -> dict:
        module = self._module()
        return {
            "peak_allocated_bytes": int(module.max_memory_allocated(self.torch_device)),
            "allocated_bytes": int(module.memory_allocated(self.torch_device)),
            "total_bytes": self.memory_total_bytes(),
        }

    def memory_total_bytes(self) -> int | None:
        try:
            _free, total = self._module().mem_get_info(self.torch_device)
            return int(total)
        except (RuntimeError, AttributeError):
            return None


class CudaDevice(_AcceleratorDevice):
    kind = "cuda"
    kernel_backend = "cuda"

    def __init__(self, index: int = 0, dtype: str | torch.dtype | None = None):
        count = torch.cuda.device_count()
        if index >= count:
            raise DeviceError(f"cuda:{index} requested but {count} CUDA device(s) are visible")
        super().__init__(torch.device("cuda", index), torch.cuda.get_device_name(index), None, dtype)

    def _module(self):
        return torch.cuda

    @property
    def supports_bf16(self) -> bool:
        return bool(torch.cuda.is_bf16_supported())

    def preferred_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.supports_bf16 else torch.float16


class NpuDevice(_NpuBehaviour, _AcceleratorDevice):
    kind = "npu"
    kernel_backend = "npu"

    def __init__(self, index: int = 0, dtype: str | torch.dtype | None = None):
        count = torch.npu.device_count()
        if index >= count:
            raise DeviceError(
                f"npu:{index} requested but {count} NPU(s) are visible; check `npu-smi info`, "
                "ASCEND_RT_VISIBLE_DEVICES and, in a container, the /dev/davinci* device mounts"
            )
        # torch-npu binds streams and events to the current device; set it once here, as vllm-ascend's worker does.
        torch.npu.set_device(index)
        chip = str(torch.npu.get_device_name(index))
        family = chip_family_of(chip)
        get_soc_version = getattr(torch.npu, "get_soc_version", None)
        if family is None and get_soc_version is not None:
            family = chip_family_of_soc(int(get_soc_version()))
        super().__init__(torch.device("npu", index), chip, family, dtype)

    def _module(self):
        return torch.npu

    @property
    def supports_bf16(self) -> bool:
        if self.chip_family == "310P":
            return False
        is_bf16_supported = getattr(torch.npu, "is_bf16_supported", None)
        return bool(is_bf16_supported()) if is_bf16_supported is not None else self.chip_family in ("910B", "A3")

    def preferred_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.supports_bf16 else torch.float16

    def torch_npu(self):
        return importlib.import_module("torch_npu")

    def set_strict(self, strict: bool) -> None:
        super().set_strict(strict)
        if strict:  # the real NPU's own check: an op falling back to the CPU is an error
            npu_probe.strict_npu(True)

    def compile_step(self, fn):
        """TorchAir graph mode (not verified on hardware): written from TorchAir's documented usage
        ``torch.compile(m, backend=torchair.get_npu_backend(compiler_config=torchair.CompilerConfig()))``."""
        torchair = _torchair()
        backend = torchair.get_npu_backend(compiler_config=torchair.CompilerConfig())
        return torch.compile(fn, backend=backend, dynamic=False)


_SPEC = re.compile(r"^(auto|cpu|cuda|npu|npu-emulated)(?::([A-Za-z0-9]+))?$")


def npu_usable() -> bool:
    """True when torch-npu imports and sees at least one NPU. Never raises."""
    if not npu_probe.probe_npu().available:
        return False
    npu = getattr(torch, "npu", None)
    try:
        return bool(npu is not None and npu.is_available() and npu.device_count() > 0)
    except RuntimeError:
        return False


def _require_npu() -> None:
    probe = npu_probe.probe_npu()
    if not probe.available:
        raise DeviceError(
            f"NPU requested but torch_npu cannot be used: {probe.reason}.\n"
            f"  torch {probe.torch_version or 'not installed'}, torch-npu {probe.version or 'not installed'}\n"
            f"  Fix: {probe.fix}"
        )
    if not npu_usable():
        raise DeviceError(
            "torch_npu imported but no NPU is visible; check `npu-smi info`, ASCEND_RT_VISIBLE_DEVICES and, "
            "in a container, the /dev/davinci*, /dev/davinci_manager, /dev/devmm_svm and /dev/hisi_hdc mounts"
        )


def resolve_device(spec: str = "auto", dtype: str | torch.dtype | None = None) -> Device:
    """Turn a user's device spec into a Device. "auto" picks an NPU if usable, else CUDA, else the CPU.

    ``dtype`` overrides the device's preferred dtype (fp32 / bf16 / fp16 in any common spelling).
    """
    match = _SPEC.match(spec.strip().lower()) if isinstance(spec, str) else None
    if match is None:
        raise DeviceError(f"unknown device {spec!r}; valid devices: {', '.join(VALID_SPECS)}")
    kind, suffix = match.groups()

    unknown = DeviceError(f"unknown device {spec!r}; valid devices: {', '.join(VALID_SPECS)}")
    if kind == "npu-emulated":
        family = (suffix or "910B").upper()
        if family not in EmulatedNpuDevice.CHIPS:
            raise unknown
        return EmulatedNpuDevice(family, dtype)
    if suffix is not None and (kind in ("auto", "cpu") or not suffix.isdigit()):
        raise unknown
    index = int(suffix) if suffix is not None else 0

    if kind == "auto":
        if npu_usable():
            return NpuDevice(0, dtype)
        if torch.cuda.is_available():
            return CudaDevice(0, dtype)
        return CpuDevice(dtype)
    if kind == "cpu":
        return CpuDevice(dtype)
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"{spec} requested but CUDA is not available (torch {torch.__version__}, "
                f"built for CUDA {torch.version.cuda or 'none'}); install a CUDA build of torch or use --device cpu"
            )
        return CudaDevice(index, dtype)
    _require_npu()
    return NpuDevice(index, dtype)


