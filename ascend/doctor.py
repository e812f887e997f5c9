"""`moevl doctor`: check the Ascend stack of a host, one finding per Check, each with a fix.

Exit-code policy (``exit_code``):
- 0 when nothing is inconsistent. A host with no Ascend software at all (this includes every CPU- or CUDA-only
  machine) gets "skip" for the NPU checks and the summary "no Ascend NPU found on this host" -- that is not an error.
- 1 when a check fails. "fail" is reserved for a partially installed stack that cannot work as it stands: torch and
  torch-npu versions differ, torch-npu is installed but does not import, torch-npu is installed without a CANN
  toolkit, npu-smi exists but does not run. Missing optional pieces next to a working stack are "warn".
- With ``strict`` (``moevl doctor --strict``, for NPU hosts and CI on them), also 1 on any "warn" or when no NPU
  was found.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from moevl.ascend import npu_probe
from moevl.ascend.device import chip_family_of
from moevl.ascend.host import (
    DRIVER_VERSION_FILE,
    Host,
    run_command,
    ascend_soc_name,
    driver_version,
    find_toolkit,
    parse_npu_smi,
    set_env_sourced,
)

STATUSES = ("ok", "warn", "fail", "skip")
NO_NPU = "no Ascend NPU found on this host"


@dataclass
class Check:
    name: str
    status: str  # "ok" | "warn" | "fail" | "skip"
    detail: str
    fix: str = ""
    data: dict = field(default_factory=dict)  # machine-readable findings (versions, chips, npu_count)


def _onnxruntime_providers() -> list[str] | None:
    try:
        import onnxruntime
    except ImportError:
        return None
    return list(onnxruntime.get_available_providers())


def run_checks(
    env: Mapping[str, str] | None = None,
    root: str | Path | None = None,
    which: Callable[[str], str | None] | None = None,
    run: Callable[[list[str]], str | None] | None = None,
    versions: Callable[[str], str | None] | None = None,
    probe: Callable[[], npu_probe.NpuProbe] | None = None,
    ort_providers: Callable[[], list[str] | None] | None = None,
) -> list[Check]:
    """Check the host described by the arguments; each defaults to this machine.

    env: environment variables; root: filesystem root the Ascend paths are read under; which: program name -> path
    (default: search env["PATH"] under root); run: argv -> stdout or None; versions: distribution -> version or None;
    probe: torch-npu import probe; ort_providers: onnxruntime's available providers, None if not installed.
    """
    host = Host(
        root=Path(root) if root is not None else Path("/"),
        env=dict(os.environ) if env is None else dict(env),
        which=which,
        run=run or run_command,
        versions=versions or npu_probe.installed_version,
    )
    if probe is None:
        probe = npu_probe.probe_npu if versions is None else (lambda: npu_probe.probe_npu(versions=host.versions))
    providers = (ort_providers or _onnxruntime_providers)()

    toolkit = find_toolkit(host)
    driver = driver_version(host)
    npu_smi = host.find_program("npu-smi")
    torch_version = host.versions("torch")
    torch_npu_version = host.versions("torch-npu")
    ascend_present = any(x is not None for x in (toolkit, driver, npu_smi, torch_npu_version))

    checks: list[Check] = []

    # CANN toolkit
    if toolkit is not None:
        checks.append(Check(
            "CANN toolkit", "ok", f"{toolkit.home} (version {toolkit.version or 'unknown'}, found via {toolkit.source})",
            data={"home": toolkit.home, "version": toolkit.version},
        ))
    elif torch_npu_version is not None:
        checks.append(Check(
            "CANN toolkit", "fail", f"torch-npu {torch_npu_version} is installed but no CANN toolkit was found",
            "install the CANN toolkit (default /usr/local/Ascend/ascend-toolkit) or set ASCEND_TOOLKIT_HOME",
        ))
    else:
        checks.append(Check(
            "CANN toolkit", "warn" if ascend_present else "skip",
            "not found (looked at $ASCEND_TOOLKIT_HOME, $ASCEND_HOME_PATH, /usr/local/Ascend/ascend-toolkit/latest, "
            "/usr/local/Ascend/cann)",
            "install the CANN toolkit to use an NPU" if ascend_present else "",
        ))

    # set_env.sh
    if toolkit is None:
        checks.append(Check("set_env.sh sourced", "skip", "no CANN toolkit"))
    elif set_env_sourced(host, toolkit):
        checks.append(Check("set_env.sh sourced", "ok", f"LD_LIBRARY_PATH contains {toolkit.home}/lib64"))
    else:
        script = toolkit.set_env or os.path.join(os.path.dirname(toolkit.home), "set_env.sh")
        checks.append(Check(
            "set_env.sh sourced", "warn",
            f"LD_LIBRARY_PATH does not contain {toolkit.home}/lib64, so torch_npu cannot load libhccl.so",
            f"source {script}  (add it to ~/.bashrc)",
        ))

    # driver
    if driver is not None:
        checks.append(Check("Ascend driver", "ok", f"version {driver} ({DRIVER_VERSION_FILE})", data={"version": driver}))
    else:
        checks.append(Check(
            "Ascend driver", "warn" if ascend_present else "skip", f"{DRIVER_VERSION_FILE} not found",
            "install the Ascend driver and firmware (in a container: mount /usr/local/Ascend/driver and "
            "version.info from the host)" if ascend_present else "",
        ))

    # npu-smi
    chips: list[str] = []
    if npu_smi is None:
        checks.append(Check(
            "npu-smi", "warn" if ascend_present else "skip", "npu-smi is not on PATH",
            "it comes with the driver (in a container: -v /usr/local/bin/npu-smi:/usr/local/bin/npu-smi)"
            if ascend_present else "",
        ))
    else:
        output = host.run([npu_smi, "info"])
        if output is None:
            checks.append(Check(
                "npu-smi", "fail", f"`{npu_smi} info` failed",
                "check the driver installation (dmesg, /var/log/npu) and, in a container, the /dev/davinci* mounts",
            ))
        else:
            devices = parse_npu_smi(output)
            chips = [d.name for d in devices]
            if devices:
                listed = ", ".join(f"npu {d.npu_id}: {d.name} ({d.health})" for d in devices)
                unhealthy = [d for d in devices if d.health and d.health.upper() != "OK"]
                checks.append(Check(
                    "npu-smi", "warn" if unhealthy else "ok", f"{len(devices)} NPU(s): {listed}",
                    "npu-smi reports unhealthy NPUs; see `npu-smi info -t health -i <id>`" if unhealthy else "",
                    data={"npu_count": len(devices), "chips": chips,
                          "soc_versions": sorted({ascend_soc_name(c) for c in chips})},
                ))
            else:
                checks.append(Check(
                    "npu-smi", "warn", "`npu-smi info` listed no NPUs",
                    "check that the NPUs are visible (ASCEND_VISIBLE_DEVICES, /dev/davinci* mounts)",
                    data={"npu_count": 0},
                ))

    # torch / torch-npu versions
    if torch_npu_version is None:
        checks.append(Check(
            "torch / torch-npu versions", "warn" if toolkit is not None else "skip",
            f"torch {torch_version or 'not installed'}; torch-npu not installed",
            "pip install 'moevl-ascend[npu]'" if toolkit is not None else "",
            data={"torch": torch_version, "torch_npu": None},
        ))
    else:
        mismatch = npu_probe.version_mismatch(torch_version, torch_npu_version)
        versions_data = {"torch": torch_version, "torch_npu": torch_npu_version}
        if mismatch is not None:
            pin = ".".join(map(str, npu_probe.release(torch_npu_version)))
            checks.append(Check(
                "torch / torch-npu versions", "fail", mismatch,
                f"pip install torch=={pin} --index-url https://download.pytorch.org/whl/cpu "
                "(or the torch-npu release made for your torch)",
                data=versions_data,
            ))
        elif torch_version is not None and "+cu" in torch_version:
            checks.append(Check(
                "torch / torch-npu versions", "fail",
                f"torch {torch_version} is a CUDA build; with torch-npu installed, importing it on a CUDA host fails "
                "with 'Two accelerators cannot be used at the same time'",
                "use the CPU build of torch (--index-url https://download.pytorch.org/whl/cpu) in the NPU environment",
                data=versions_data,
            ))
        else:
            checks.append(Check(
                "torch / torch-npu versions", "ok", f"torch {torch_version}, torch-npu {torch_npu_version}",
                data=versions_data,
            ))

    # torch_npu import
    if torch_npu_version is None:
        checks.append(Check("torch_npu import", "skip", "torch-npu not installed"))
    else:
        result = probe()
        if result.available:
            names = _torch_npu_device_names()
            chips = chips or names
            checks.append(Check(
                "torch_npu import", "ok" if names else "warn",
                f"torch_npu {result.version} imported; {len(names)} NPU(s) visible" + (f": {', '.join(names)}" if names else ""),
                "" if names else "check ASCEND_RT_VISIBLE_DEVICES and the /dev/davinci* mounts",
                data={"npu_count": len(names), "chips": names},
            ))
        else:
            checks.append(Check("torch_npu import", "fail", result.reason, result.fix))

    # bf16
    families = {name: chip_family_of(name) for name in dict.fromkeys(chips)}
    if not families:
        checks.append(Check("bf16 support", "skip", "no NPU chip identified"))
    else:
        parts = []
        for name, family in families.items():
            if family == "310P":
                parts.append(f"{name}: no bf16 (310P), moevl uses fp16")
            elif family in ("910B", "A3"):
                parts.append(f"{name}: bf16 supported ({family}), moevl uses bf16")
            else:
                parts.append(f"{name}: unknown chip family, bf16 not assumed")
        checks.append(Check("bf16 support", "ok", "; ".join(parts),
                            data={"bf16": {n: f in ("910B", "A3") for n, f in families.items()}}))

    # ATC
    atc = atc_on_path = host.find_program("atc")
    if atc is None and toolkit is not None:
        for relative in ("bin/atc", "compiler/bin/atc"):
            if host.path(os.path.join(toolkit.home, relative)).is_file():
                atc = os.path.join(toolkit.home, relative)
                break
    if atc is not None:
        on_path = atc_on_path is not None
        checks.append(Check(
            "ATC (ONNX -> OM)", "ok" if on_path else "warn", f"{atc}" + ("" if on_path else " (not on PATH)"),
            "" if on_path else f"source {toolkit.set_env if toolkit and toolkit.set_env else 'set_env.sh'}",
        ))
    else:
        checks.append(Check(
            "ATC (ONNX -> OM)", "warn" if toolkit is not None else "skip", "atc not found",
            "atc ships with the CANN toolkit; reinstall it or source set_env.sh" if toolkit is not None else "",
        ))

    # onnxruntime CANN execution provider
    if providers is None:
        checks.append(Check("onnxruntime CANNExecutionProvider", "skip", "onnxruntime not installed"))
    elif "CANNExecutionProvider" in providers:
        checks.append(Check("onnxruntime CANNExecutionProvider", "ok", f"providers: {', '.join(providers)}"))
    else:
        checks.append(Check(
            "onnxruntime CANNExecutionProvider", "warn" if ascend_present else "skip",
            f"not available (providers: {', '.join(providers)})",
            "pip uninstall onnxruntime && pip install onnxruntime-cann (same module name: never install both)"
            if ascend_present else "",
        ))
    return checks


def _torch_npu_device_names() -> list[str]:
    import torch

    npu = getattr(torch, "npu", None)
    try:
        if npu is None or not npu.is_available():
            return []
        return [str(npu.get_device_name(i)) for i in range(npu.device_count())]
    except RuntimeError:
        return []


def npu_found(checks: list[Check]) -> bool:
    return any(check.data.get("npu_count", 0) > 0 for check in checks)


def exit_code(checks: list[Check], strict: bool = False) -> int:
    if any(check.status == "fail" for check in checks):
        return 1
    if strict and (not npu_found(checks) or any(check.status == "warn" for check in checks)):
        return 1
    return 0


def summary(checks: list[Check]) -> str:
    counts = {status: sum(check.status == status for check in checks) for status in STATUSES}
    tally = ", ".join(f"{n} {status}" for status, n in counts.items() if n)
    if npu_found(checks):
        chips = next(c.data["chips"] for c in checks if c.data.get("npu_count", 0) > 0)
        head = f"{len(chips)} Ascend NPU(s) found ({', '.join(dict.fromkeys(chips))})"
    else:
        head = NO_NPU
    if counts["fail"]:
        head += "; the Ascend stack is inconsistent, see the failed checks"
    return f"{head} [{tally}]"


def format_report(checks: list[Check], strict: bool = False) -> str:
    width = max(len(check.name) for check in checks)
    lines = []
    for check in checks:
        lines.append(f"[{check.status:^4}] {check.name:<{width}}  {check.detail}")
        if check.fix:
            lines.append(f"       {'':<{width}}  fix: {check.fix}")
    lines.append("")
    lines.append(summary(checks) + (f" -> exit {exit_code(checks, strict)}" if strict else ""))
    return "\n".join(lines)


def report_dict(checks: list[Check], strict: bool = False) -> dict:
    return {
        "checks": [asdict(check) for check in checks],
        "npu_found": npu_found(checks),
        "summary": summary(checks),
        "exit_code": exit_code(checks, strict),
    }
