"""Device layer: every fact about NPUs, CUDA GPUs and CPUs lives here.

Model and kernel code ask this package *what* device they run on (``resolve_device``) and never probe hardware
themselves.

Why the environment variable below: torch-npu registers itself as an autoloaded PyTorch backend. When the wheel is
installed but the CANN toolkit is not (or ``set_env.sh`` was not sourced), a plain ``import torch`` then dies with
``RuntimeError: Failed to load the backend extension: torch_npu`` -- even for users who only want the CPU. With
``TORCH_DEVICE_BACKEND_AUTOLOAD=0`` torch imports cleanly and we import torch_npu ourselves, inside a try/except,
only when an NPU is asked for (see ``ascend.npu_probe``). ``setdefault`` keeps an explicit user choice. This only
works if ``ascend`` is imported before anything imports torch, so entry points import ``ascend`` first.
"""

import os

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")

from moevl.ascend.errors import DeviceError  # noqa: E402
from moevl.ascend.device import (  # noqa: E402
    CpuDevice,
    CudaDevice,
    Device,
    EmulatedNpuDevice,
    NpuDevice,
    dtype_name,
    parse_dtype,
    resolve_device,
)
from moevl.ascend.npu_probe import NpuProbe, probe_npu, strict_npu  # noqa: E402

__all__ = [
    "CpuDevice",
    "CudaDevice",
    "Device",
    "DeviceError",
    "EmulatedNpuDevice",
    "NpuDevice",
    "NpuProbe",
    "dtype_name",
    "parse_dtype",
    "probe_npu",
    "resolve_device",
    "strict_npu",
]
