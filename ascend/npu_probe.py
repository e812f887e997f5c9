"""Find out, without crashing, whether torch-npu can be used in this process.

torch-npu is an optional extra. Without the CANN toolkit ``import torch_npu`` raises
``ImportError: libhccl.so: cannot open shared object file``; next to a CUDA build of torch it raises
``RuntimeError: ... Two accelerators cannot be used at the same time``. Both become an ``NpuProbe`` whose ``reason``
is the exception text and whose ``fix`` says what to do. Versions come from ``importlib.metadata`` so a torch /
torch-npu mismatch is reported before anything is imported.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

SET_ENV = "/usr/local/Ascend/ascend-toolkit/set_env.sh"

_cached: NpuProbe | None = None


@dataclass(frozen=True)
class NpuProbe:
    available: bool
    version: str | None  # installed torch-npu distribution version, None when not installed
    reason: str  # why it is not available; "" when it is
    fix: str  # what the user should do; "" when nothing
    torch_version: str | None = None


def installed_version(distribution: str) -> str | None:
    """Version of an installed distribution ("torch", "torch-npu"), None when absent. Imports nothing."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def release(version: str) -> tuple[int, ...]:
    """The numeric release of a version string: "2.13.0+cpu" -> (2, 13, 0), "2.13.0.post1" -> (2, 13, 0)."""
    match = re.match(r"\d+(?:\.\d+)*", version)
    if match is None:
        return ()
    return tuple(int(part) for part in match.group(0).split("."))[:3]


def version_mismatch(torch_version: str | None, torch_npu_version: str | None) -> str | None:
    """Explain a torch / torch-npu pairing that cannot work (each torch-npu release pins one torch), else None."""
    if torch_version is None or torch_npu_version is None:
        return None
    if release(torch_version) == release(torch_npu_version):
        return None
    wanted = ".".join(map(str, release(torch_npu_version)))
    return (
        f"torch-npu {torch_npu_version} requires torch=={wanted}.*, but torch {torch_version} is installed"
    )


def install_fix(torch_version: str | None) -> str:
    pin = ".".join(map(str, release(torch_version))) if torch_version else "<your torch version>"
    return (
        "install the CANN toolkit (https://www.hiascend.com/cann), run "
        f"`source {SET_ENV}`, then `pip install 'moevl-ascend[npu]'` "
        f"(it installs torch-npu=={pin}; torch-npu must equal the torch version)"
    )


def probe_npu(
    versions: Callable[[str], str | None] = installed_version,
    importer: Callable[[str], object] = importlib.import_module,
) -> NpuProbe:
    """Probe torch-npu once per process (an import that failed half-way is not retried)."""
    global _cached
    default = versions is installed_version and importer is importlib.import_module
    if default and _cached is not None:
        return _cached
    result = _probe(versions, importer)
    if default:
        _cached = result
    return result


def _probe(versions: Callable[[str], str | None], importer: Callable[[str], object]) -> NpuProbe:
    torch_version = versions("torch")
    npu_version = versions("torch-npu")
    if npu_version is None:
        return NpuProbe(False, None, "torch-npu is not installed", install_fix(torch_version), torch_version)

    mismatch = version_mismatch(torch_version, npu_version)
    if mismatch is not None:
        pin = ".".join(map(str, release(npu_version)))
        fix = (
            f"install matching versions: `pip install torch=={pin} --index-url https://download.pytorch.org/whl/cpu` "
            f"or a torch-npu release for torch {torch_version}"
        )
        return NpuProbe(False, npu_version, mismatch, fix, torch_version)

    try:
        importer("torch_npu")
    except (ImportError, OSError, RuntimeError) as exc:
        reason = f"import torch_npu failed: {type(exc).__name__}: {exc}".strip()
        if "Two accelerators" in str(exc):
            fix = (
                "this torch is a CUDA build and a CUDA device is visible; torch-npu cannot share a process with it. "
                "Use a separate environment for the NPU with the CPU build of torch "
                "(`pip install torch==<ver> --index-url https://download.pytorch.org/whl/cpu` plus "
                "`pip install 'moevl-ascend[npu]'`), and keep torch-npu out of the CUDA environment"
            )
        else:
            fix = install_fix(torch_version)
        return NpuProbe(False, npu_version, reason, fix, torch_version)
    return NpuProbe(True, npu_version, "", "", torch_version)


def strict_npu(enabled: bool = True) -> None:
    """Make ops without an NPU kernel fail instead of silently running on the CPU.

    Sets TORCH_NPU_FALLBACK_CPU_DISABLE, which torch-npu reads; call it before the NPU device is resolved.
    """
    if enabled:
        os.environ["TORCH_NPU_FALLBACK_CPU_DISABLE"] = "1"
    else:
        os.environ.pop("TORCH_NPU_FALLBACK_CPU_DISABLE", None)
