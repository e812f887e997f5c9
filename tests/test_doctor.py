"""moevl doctor against fake hosts (filesystem root, environment, PATH, npu-smi output, package versions), plus
moevl info and the two CLI hooks."""

import argparse
import json
import types

import pytest
import torch

from moevl.ascend import cli_commands, npu_probe
from moevl.ascend.doctor import NO_NPU, exit_code, format_report, npu_found, run_checks, summary
from moevl.ascend.host import Host, find_toolkit, parse_npu_smi
from moevl.ascend.info import collect_info, format_info
from moevl.ascend.npu_probe import NpuProbe, install_fix

TOOLKIT = "/usr/local/Ascend/ascend-toolkit/latest"
SOURCED_LD_PATH = f"{TOOLKIT}/lib64:{TOOLKIT}/lib64/plugin/opskernel:/usr/local/Ascend/driver/lib64/driver"

NPU_SMI_910B3 = """\
+------------------------------------------------------------------------------------------------+
| npu-smi 24.1.rc3                 Version: 24.1.rc3                                             |
+---------------------------+---------------+----------------------------------------------------+
| NPU   Name                | Health        | Power(W)    Temp(C)           Hugepages-Usage(page)|
| Chip                      | Bus-Id        | AICore(%)   Memory-Usage(MB)  HBM-Usage(MB)        |
+===========================+===============+====================================================+
| 0     910B3               | OK            | 94.2        41                0    / 0             |
| 0                         | 0000:C1:00.0  | 0           0    / 0          3411 / 65536         |
+===========================+===============+====================================================+
| 1     910B3               | OK            | 96.4        44                0    / 0             |
| 0                         | 0000:C2:00.0  | 0           0    / 0          3404 / 65536         |
+===========================+===============+====================================================+
"""

NPU_SMI_310P3 = """\
| NPU     Name                  | Health          | Power(W)     Temp(C)           Hugepages-Usage(page) |
| Chip    Device                | Bus-Id          | AICore(%)    Memory-Usage(MB)                        |
+===============================+=================+======================================================+
| 8       310P3                 | OK              | NA           52                9762 / 9762           |
| 0       0                     | 0000:82:00.0    | 0            1742 / 21527                            |
| 1       1                     | 0000:82:00.0    | 0            1611 / 21527                            |
+===============================+=================+======================================================+
"""


def write(path, text="", executable=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    if executable:
        path.chmod(0o755)


def make_host(root, toolkit=True, driver=True, npu_smi=True, install_info_only=False):
    """Lay out the files of an Ascend host under root (toolkit, driver version.info, npu-smi, atc)."""
    if toolkit:
        home = root / TOOLKIT.lstrip("/")
        if install_info_only:
            write(home / "aarch64-linux/ascend_toolkit_install.info", "package_name=Ascend-cann-toolkit\nversion=8.0.RC1\n")
        else:
            write(home / "version.cfg", "# version: 1.0\ntoolkit_running_version=[7.7.0.1.238:8.2.RC1]\n")
        write(root / "usr/local/Ascend/ascend-toolkit/set_env.sh", "export ASCEND_TOOLKIT_HOME=...\n")
        write(home / "bin/atc", "#!/bin/sh\n", executable=True)
    if driver:
        write(root / "usr/local/Ascend/driver/version.info", "Version=24.1.rc3\nascendhal_version=7.35.23\n")
    if npu_smi:
        write(root / "usr/local/bin/npu-smi", "#!/bin/sh\n", executable=True)
    return root


def checks_for(root, env=None, versions=None, npu_smi_output=NPU_SMI_910B3, probe=None, providers=("CPUExecutionProvider",)):
    env = {"PATH": "/usr/local/bin:/usr/bin", **(env or {})}
    versions = versions or {"torch": "2.13.0+cpu"}
    return run_checks(
        env=env,
        root=root,
        run=lambda argv: npu_smi_output if argv[-1] == "info" else None,
        versions=versions.get,
        probe=probe or (lambda: pytest.fail("torch_npu must not be probed on this host")),
        ort_providers=lambda: list(providers),
    )


def by_name(checks):
    return {check.name: check for check in checks}


@pytest.fixture
def torch_npu_sees(monkeypatch):
    def install(*names):
        monkeypatch.setattr(torch, "npu", types.SimpleNamespace(
            is_available=lambda: True,
            device_count=lambda: len(names),
            get_device_name=lambda index=0: names[index],
        ), raising=False)

    return install


def test_host_without_any_ascend_software_reports_no_npu_and_exits_zero(tmp_path):
    checks = checks_for(tmp_path)
    assert [c.status for c in checks] == ["skip"] * len(checks)
    assert len(checks) == 9
    assert npu_found(checks) is False
    assert exit_code(checks) == 0
    assert exit_code(checks, strict=True) == 1
    assert summary(checks) == f"{NO_NPU} [9 skip]"
    report = format_report(checks)
    assert "no Ascend NPU found on this host" in report
    assert "fix:" not in report


def test_toolkit_present_but_set_env_not_sourced(tmp_path):
    checks = by_name(checks_for(make_host(tmp_path, driver=False, npu_smi=False), env={"LD_LIBRARY_PATH": "/usr/lib"}))
    assert checks["CANN toolkit"].status == "ok"
    assert checks["CANN toolkit"].data == {"home": TOOLKIT, "version": "8.2.RC1"}
    assert checks["set_env.sh sourced"].status == "warn"
    assert checks["set_env.sh sourced"].fix.startswith("source /usr/local/Ascend/ascend-toolkit/set_env.sh")
    assert checks["Ascend driver"].status == "warn"
    assert checks["ATC (ONNX -> OM)"].status == "warn"
    assert checks["ATC (ONNX -> OM)"].detail == f"{TOOLKIT}/bin/atc (not on PATH)"
    assert checks["torch / torch-npu versions"].status == "warn"
    assert exit_code(list(checks.values())) == 0


def test_set_env_sourced_is_recognised_from_ld_library_path(tmp_path):
    env = {"LD_LIBRARY_PATH": SOURCED_LD_PATH, "ASCEND_TOOLKIT_HOME": TOOLKIT, "PATH": f"{TOOLKIT}/bin:/usr/local/bin"}
    checks = by_name(checks_for(make_host(tmp_path), env=env))
    assert checks["set_env.sh sourced"].status == "ok"
    assert checks["CANN toolkit"].detail.endswith("found via ASCEND_TOOLKIT_HOME)")
    assert checks["ATC (ONNX -> OM)"].status == "ok"
    assert checks["ATC (ONNX -> OM)"].detail == f"{TOOLKIT}/bin/atc"


def test_torch_and_torch_npu_version_mismatch_fails(tmp_path):
    checks = checks_for(
        make_host(tmp_path),
        env={"LD_LIBRARY_PATH": SOURCED_LD_PATH},
        versions={"torch": "2.13.0", "torch-npu": "2.14.0"},
        probe=lambda: npu_probe.probe_npu(versions={"torch": "2.13.0", "torch-npu": "2.14.0"}.get, importer=pytest.fail),
    )
    named = by_name(checks)
    versions = named["torch / torch-npu versions"]
    assert versions.status == "fail"
    assert versions.detail == "torch-npu 2.14.0 requires torch==2.14.0.*, but torch 2.13.0 is installed"
    assert "pip install torch==2.14.0" in versions.fix
    assert named["torch_npu import"].status == "fail"
    assert exit_code(checks) == 1
    assert "inconsistent" in summary(checks)


def test_npu_smi_listing_910b3_chips(tmp_path):
    checks = checks_for(make_host(tmp_path), env={"LD_LIBRARY_PATH": SOURCED_LD_PATH})
    named = by_name(checks)
    npu_smi = named["npu-smi"]
    assert npu_smi.status == "ok"
    assert npu_smi.data == {"npu_count": 2, "chips": ["910B3", "910B3"], "soc_versions": ["Ascend910B3"]}
    assert npu_smi.detail == "2 NPU(s): npu 0: 910B3 (OK), npu 1: 910B3 (OK)"
    assert named["Ascend driver"].detail.startswith("version 24.1.rc3")
    assert named["bf16 support"].status == "ok"
    assert named["bf16 support"].data == {"bf16": {"910B3": True}}
    assert npu_found(checks)
    assert summary(checks).startswith("2 Ascend NPU(s) found (910B3)")


def test_310p_chips_are_reported_without_bf16(tmp_path):
    checks = by_name(checks_for(make_host(tmp_path), npu_smi_output=NPU_SMI_310P3))
    assert checks["npu-smi"].data["chips"] == ["310P3"]
    assert checks["npu-smi"].data["soc_versions"] == ["Ascend310P3"]
    assert checks["bf16 support"].data == {"bf16": {"310P3": False}}
    assert "no bf16" in checks["bf16 support"].detail


def test_parse_npu_smi_skips_chip_rows_and_headers():
    devices = parse_npu_smi(NPU_SMI_910B3 + NPU_SMI_310P3)
    assert [(d.npu_id, d.name, d.health) for d in devices] == [(0, "910B3", "OK"), (1, "910B3", "OK"), (8, "310P3", "OK")]
    assert parse_npu_smi("") == []


def test_npu_smi_that_cannot_run_fails(tmp_path):
    checks = checks_for(make_host(tmp_path), npu_smi_output=None)
    assert by_name(checks)["npu-smi"].status == "fail"
    assert exit_code(checks) == 1


def test_torch_npu_that_does_not_import_fails_with_the_cause(tmp_path):
    reason = "import torch_npu failed: ImportError: libhccl.so: cannot open shared object file"
    checks = checks_for(
        make_host(tmp_path),
        versions={"torch": "2.13.0+cpu", "torch-npu": "2.13.0"},
        probe=lambda: NpuProbe(False, "2.13.0", reason, install_fix("2.13.0"), "2.13.0+cpu"),
    )
    imported = by_name(checks)["torch_npu import"]
    assert imported.status == "fail"
    assert imported.detail == reason
    assert "source /usr/local/Ascend/ascend-toolkit/set_env.sh" in imported.fix
    assert exit_code(checks) == 1


def test_torch_npu_without_toolkit_is_inconsistent(tmp_path):
    checks = checks_for(
        tmp_path,
        versions={"torch": "2.13.0+cpu", "torch-npu": "2.13.0"},
        probe=lambda: NpuProbe(False, "2.13.0", "import torch_npu failed", install_fix("2.13.0"), "2.13.0"),
    )
    assert by_name(checks)["CANN toolkit"].status == "fail"
    assert exit_code(checks) == 1


def test_cuda_torch_next_to_torch_npu_is_explained(tmp_path):
    checks = checks_for(
        make_host(tmp_path),
        versions={"torch": "2.13.0+cu128", "torch-npu": "2.13.0"},
        probe=lambda: NpuProbe(False, "2.13.0", "Two accelerators cannot be used at the same time", "", "2.13.0"),
    )
    versions = by_name(checks)["torch / torch-npu versions"]
    assert versions.status == "fail"
    assert "Two accelerators cannot be used at the same time" in versions.detail
    assert "whl/cpu" in versions.fix


def test_healthy_910b_host_passes_strict(tmp_path, torch_npu_sees):
    torch_npu_sees("Ascend910B3", "Ascend910B3")
    env = {"LD_LIBRARY_PATH": SOURCED_LD_PATH, "PATH": f"{TOOLKIT}/bin:/usr/local/bin"}
    checks = checks_for(
        make_host(tmp_path),
        env=env,
        versions={"torch": "2.13.0+cpu", "torch-npu": "2.13.0"},
        probe=lambda: NpuProbe(True, "2.13.0", "", "", "2.13.0+cpu"),
        providers=("CANNExecutionProvider", "CPUExecutionProvider"),
    )
    assert {c.name: c.status for c in checks} == {c.name: "ok" for c in checks}
    assert by_name(checks)["torch_npu import"].detail == "torch_npu 2.13.0 imported; 2 NPU(s) visible: Ascend910B3, Ascend910B3"
    assert exit_code(checks, strict=True) == 0


def test_toolkit_version_from_install_info(tmp_path):
    toolkit = find_toolkit(Host(root=make_host(tmp_path, install_info_only=True), env={}))
    assert toolkit.home == TOOLKIT
    assert toolkit.version == "8.0.RC1"
    assert toolkit.set_env == "/usr/local/Ascend/ascend-toolkit/set_env.sh"
    assert toolkit.source == "default path"


@pytest.fixture
def cpu_only(monkeypatch):
    probe = NpuProbe(False, None, "torch-npu is not installed", install_fix("2.13.0"), "2.13.0")
    monkeypatch.setattr(npu_probe, "probe_npu", lambda: probe)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_collect_info_and_format_info_describe_a_cpu_host(tmp_path, cpu_only):
    info = collect_info(Host(root=tmp_path, env={"PATH": "/usr/bin"}))
    json.dumps(info)
    assert info["torch"] == torch.__version__
    assert info["torch_npu"]["importable"] is False
    assert info["torch_npu"]["reason"] == "torch-npu is not installed"
    assert info["cann_toolkit"] is None
    assert info["devices"]["cuda"] == [] and info["devices"]["npu"] == []
    assert info["auto"]["kind"] == "cpu"
    assert info["auto"]["dtype"] == "fp32"
    assert "CPUExecutionProvider" in info["onnxruntime"]["providers"]
    text = format_info(info)
    assert "torch_npu     unavailable: torch-npu is not installed" in text
    assert "CANN toolkit  not found" in text
    assert "auto device   cpu" in text


def test_collect_info_sees_a_fake_toolkit_and_npu_smi(tmp_path, cpu_only):
    host = Host(root=make_host(tmp_path), env={"PATH": "/usr/local/bin"}, run=lambda argv: NPU_SMI_910B3)
    info = collect_info(host)
    assert info["cann_toolkit"] == {"home": TOOLKIT, "version": "8.2.RC1"}
    assert info["devices"]["npu_smi_chips"] == ["910B3", "910B3"]
    assert "910B3, 910B3 (not usable from torch)" in format_info(info)


def cli(*argv):
    parser = argparse.ArgumentParser(prog="moevl")
    subparsers = parser.add_subparsers()
    cli_commands.add_info_parser(subparsers)
    cli_commands.add_doctor_parser(subparsers)
    args = parser.parse_args(list(argv))
    return args, args.func(args)


def test_doctor_command_exit_codes_and_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli_commands, "run_checks", lambda: checks_for(tmp_path))
    args, code = cli("doctor", "--json")
    assert (args.json, args.strict, code) == (True, False, 0)
    report = json.loads(capsys.readouterr().out)
    assert report["npu_found"] is False
    assert report["exit_code"] == 0
    assert report["summary"].startswith(NO_NPU)
    _, strict_code = cli("doctor", "--strict")
    assert strict_code == 1
    assert NO_NPU in capsys.readouterr().out


def test_info_command_prints_text_or_json(cpu_only, capsys):
    _, code = cli("info")
    assert code == 0
    assert "auto device   cpu" in capsys.readouterr().out
    _, code = cli("info", "--json")
    assert code == 0
    assert json.loads(capsys.readouterr().out)["auto"]["kind"] == "cpu"
