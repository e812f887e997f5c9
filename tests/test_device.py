"""resolve_device and the Device classes: specs, dtypes per chip, NPU errors, timer, memory, describe."""

import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from moevl.ascend import npu_probe
from moevl.ascend.device import (
    CpuDevice,
    EmulatedNpuDevice,
    NpuDevice,
    chip_family_of,
    chip_family_of_soc,
    dtype_name,
    parse_dtype,
    resolve_device,
)
from moevl.ascend.errors import DeviceError
from moevl.ascend.npu_probe import NpuProbe, install_fix, probe_npu, strict_npu

REPO_ROOT = Path(__file__).resolve().parents[1]
LIBHCCL = "import torch_npu failed: ImportError: libhccl.so: cannot open shared object file: No such file or directory"


@pytest.fixture
def no_npu(monkeypatch):
    probe = NpuProbe(False, None, "torch-npu is not installed", install_fix("2.13.0"), "2.13.0")
    monkeypatch.setattr(npu_probe, "probe_npu", lambda: probe)


@pytest.fixture
def fake_npu(monkeypatch):
    """Pretend torch-npu loaded and torch.npu reports the given chips (one per NPU)."""

    def install(*names, soc_version=None):
        monkeypatch.setattr(npu_probe, "probe_npu", lambda: NpuProbe(True, "2.13.0", "", "", "2.13.0"))
        # What `import torch_npu` does first: name PyTorch's PrivateUse1 backend "npu" so torch.device("npu") parses.
        if torch._C._get_privateuse1_backend_name() != "npu":
            torch.utils.rename_privateuse1_backend("npu")
        selected = []
        fake = types.SimpleNamespace(
            is_available=lambda: True,
            device_count=lambda: len(names),
            set_device=selected.append,
            get_device_name=lambda index=0: names[index],
            is_bf16_supported=lambda: "310P" not in names[0],
        )
        if soc_version is not None:
            fake.get_soc_version = lambda: soc_version
        fake.calls = calls = []

        class Event:
            def __init__(self, enable_timing=False):
                assert enable_timing
                self.name = "start" if not any(c.startswith("new") for c in calls) else "end"
                calls.append(f"new {self.name}")

            def record(self, stream):
                calls.append(f"record {self.name} on {stream}")

            def synchronize(self):
                calls.append(f"wait {self.name}")

            def elapsed_time(self, end):
                return 12.5

        fake.Event = Event
        fake.current_stream = lambda device: f"stream of {device}"
        fake.synchronize = lambda device: calls.append(f"synchronize {device}")
        monkeypatch.setattr(torch, "npu", fake, raising=False)
        return selected, calls

    return install


def test_cpu_spec_gives_fp32_cpu_device():
    device = resolve_device("cpu")
    assert isinstance(device, CpuDevice)
    assert device.kind == "cpu"
    assert device.torch_device == torch.device("cpu")
    assert device.index is None
    assert device.dtype == torch.float32
    assert device.kernel_backend == "cpu"
    assert device.chip_family is None
    assert device.chip and device.chip != "unknown CPU"


def test_auto_without_npu_or_cuda_picks_cpu(no_npu, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    device = resolve_device("auto")
    assert device.kind == "cpu"
    assert device.dtype == torch.float32


def test_auto_prefers_a_usable_npu(fake_npu, monkeypatch):
    fake_npu("Ascend910B3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    device = resolve_device("auto")
    assert device.kind == "npu"
    assert device.torch_device == torch.device("npu", 0)


@pytest.mark.parametrize("spec", ["tpu", "gpu", "cpu:1", "cuda:x", "npu-emulated:910C", ""])
def test_unknown_spec_raises_device_error_listing_valid_specs(spec):
    with pytest.raises(DeviceError) as info:
        resolve_device(spec)
    message = str(info.value)
    assert isinstance(info.value, RuntimeError)
    for valid in ("auto", "cpu", "cuda:N", "npu:N", "npu-emulated:910B", "npu-emulated:310P"):
        assert valid in message


@pytest.mark.parametrize(
    "requested, expected",
    [
        ("fp32", torch.float32),
        ("float32", torch.float32),
        ("bf16", torch.bfloat16),
        ("bfloat16", torch.bfloat16),
        ("fp16", torch.float16),
        ("float16", torch.float16),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16),
    ],
)
def test_dtype_argument_overrides_the_preferred_dtype(requested, expected):
    assert resolve_device("cpu", dtype=requested).dtype == expected


def test_unknown_dtype_is_a_device_error():
    with pytest.raises(DeviceError, match="unknown dtype 'int8'"):
        parse_dtype("int8")
    with pytest.raises(DeviceError, match="unsupported dtype torch.float64"):
        resolve_device("cpu", dtype=torch.float64)


def test_dtype_name_uses_short_names():
    assert [dtype_name(d) for d in (torch.float32, torch.bfloat16, torch.float16)] == ["fp32", "bf16", "fp16"]
    assert dtype_name(torch.int8) == "int8"
    assert resolve_device("cpu", "bf16").to_dtype_name() == "bf16"


def test_emulated_910b_runs_on_cpu_with_bf16():
    device = resolve_device("npu-emulated")
    assert isinstance(device, EmulatedNpuDevice)
    assert device.kind == "npu-emulated"
    assert device.torch_device == torch.device("cpu")
    assert device.chip == "Ascend910B2 (emulated)"
    assert device.chip_family == "910B"
    assert device.dtype == torch.bfloat16
    assert device.supports_bf16 is True
    assert device.kernel_backend == "npu-emulated"


def test_emulated_310p_defaults_to_fp16():
    device = resolve_device("npu-emulated:310P")
    assert device.chip == "Ascend310P3 (emulated)"
    assert device.chip_family == "310P"
    assert device.dtype == torch.float16
    assert device.supports_bf16 is False
    assert resolve_device("npu-emulated:310p", dtype="fp32").dtype == torch.float32


def test_bf16_on_310p_is_refused_with_an_explanation():
    with pytest.raises(DeviceError) as info:
        resolve_device("npu-emulated:310P", dtype="bf16")
    assert "310P" in str(info.value)
    assert "no bf16" in str(info.value)
    assert "fp16" in str(info.value)


def test_npu_without_torch_npu_names_the_cause_and_the_fix(monkeypatch):
    probe = NpuProbe(False, "2.13.0", LIBHCCL, install_fix("2.13.0+cpu"), "2.13.0+cpu")
    monkeypatch.setattr(npu_probe, "probe_npu", lambda: probe)
    with pytest.raises(DeviceError) as info:
        resolve_device("npu:0")
    message = str(info.value)
    assert "libhccl.so: cannot open shared object file" in message
    assert "source /usr/local/Ascend/ascend-toolkit/set_env.sh" in message
    assert "pip install 'moevl-ascend[npu]'" in message
    assert "torch-npu==2.13.0" in message
    assert "torch 2.13.0+cpu, torch-npu 2.13.0" in message


def test_npu_not_installed_says_so(no_npu):
    with pytest.raises(DeviceError, match="torch-npu is not installed"):
        resolve_device("npu")


def test_fake_910b_npu_prefers_bf16(fake_npu):
    selected, _ = fake_npu("Ascend910B3", "Ascend910B3")
    device = resolve_device("npu:1")
    assert isinstance(device, NpuDevice)
    assert device.torch_device == torch.device("npu", 1)
    assert device.index == 1
    assert selected == [1]
    assert device.chip == "Ascend910B3"
    assert device.chip_family == "910B"
    assert device.dtype == torch.bfloat16
    assert device.kernel_backend == "npu"


def test_fake_310p_npu_prefers_fp16_and_refuses_bf16(fake_npu):
    fake_npu("Ascend310P3")
    device = resolve_device("npu")
    assert device.chip_family == "310P"
    assert device.dtype == torch.float16
    with pytest.raises(DeviceError, match="no bf16"):
        resolve_device("npu", dtype="bf16")


def test_npu_family_falls_back_to_soc_version(fake_npu):
    fake_npu("Ascend910_9391", soc_version=251)
    assert resolve_device("npu").chip_family == "A3"
    assert chip_family_of_soc(202) == "310P"
    assert chip_family_of_soc(223) == "910B"
    assert chip_family_of_soc(100) is None
    assert chip_family_of("910B4") == "910B"
    assert chip_family_of("Ascend310P3") == "310P"


def test_npu_index_beyond_visible_devices_is_explained(fake_npu):
    fake_npu("Ascend910B3")
    with pytest.raises(DeviceError, match="npu:3 requested but 1 NPU"):
        resolve_device("npu:3")


def test_cuda_requested_without_cuda_is_a_device_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="CUDA is not available"):
        resolve_device("cuda:0")


def test_probe_without_torch_npu_installed():
    probe = probe_npu(versions={"torch": "2.13.0+cpu"}.get, importer=pytest.fail)
    assert probe.available is False
    assert probe.version is None
    assert probe.reason == "torch-npu is not installed"
    assert "torch-npu==2.13.0" in probe.fix


def test_probe_detects_version_mismatch_without_importing():
    versions = {"torch": "2.13.0", "torch-npu": "2.14.0"}.get
    probe = probe_npu(versions=versions, importer=pytest.fail)
    assert probe.available is False
    assert probe.reason == "torch-npu 2.14.0 requires torch==2.14.0.*, but torch 2.13.0 is installed"
    assert "torch==2.14.0" in probe.fix


def test_probe_turns_an_import_error_into_reason_and_fix():
    def importer(name):
        raise ImportError("libhccl.so: cannot open shared object file: No such file or directory")

    probe = probe_npu(versions={"torch": "2.13.0+cpu", "torch-npu": "2.13.0.post1"}.get, importer=importer)
    assert probe.available is False
    assert probe.version == "2.13.0.post1"
    assert "ImportError: libhccl.so" in probe.reason
    assert "set_env.sh" in probe.fix


def test_probe_explains_two_accelerators():
    def importer(name):
        raise RuntimeError("Two accelerators cannot be used at the same time in PyTorch")

    probe = probe_npu(versions={"torch": "2.13.0", "torch-npu": "2.13.0"}.get, importer=importer)
    assert probe.available is False
    assert "Two accelerators" in probe.reason
    assert "CUDA build" in probe.fix
    assert "whl/cpu" in probe.fix


def test_probe_success_when_torch_npu_imports():
    imported = []
    probe = probe_npu(versions={"torch": "2.13.0", "torch-npu": "2.13.0"}.get, importer=imported.append)
    assert probe == NpuProbe(True, "2.13.0", "", "", "2.13.0")
    assert imported == ["torch_npu"]


def test_strict_npu_toggles_the_fallback_switch(monkeypatch):
    monkeypatch.delenv("TORCH_NPU_FALLBACK_CPU_DISABLE", raising=False)
    strict_npu()
    assert os.environ["TORCH_NPU_FALLBACK_CPU_DISABLE"] == "1"
    strict_npu(False)
    assert "TORCH_NPU_FALLBACK_CPU_DISABLE" not in os.environ


def test_timer_measures_wall_time_on_cpu():
    device = resolve_device("cpu")
    with device.timer() as timer:
        time.sleep(0.02)
    assert 15.0 <= timer.elapsed_ms < 2000.0


def test_npu_timer_waits_for_queued_work_then_times_with_events(fake_npu):
    _, calls = fake_npu("Ascend910B3")
    device = resolve_device("npu")
    with device.timer() as timer:
        calls.append("work")
    assert timer.elapsed_ms == 12.5
    assert calls == [
        "synchronize npu:0",
        "new start",
        "new end",
        "record start on stream of npu:0",
        "work",
        "record end on stream of npu:0",
        "wait end",
    ]


def test_cpu_memory_stats_report_peak_rss():
    device = resolve_device("npu-emulated")
    device.reset_peak_memory()
    stats = device.memory_stats()
    assert stats["peak_allocated_bytes"] is None
    assert stats["peak_rss_bytes"] > 10 * 2**20  # torch alone is larger than 10 MiB


def test_describe_is_json_serialisable():
    described = json.loads(json.dumps(resolve_device("cpu", "bf16").describe()))
    assert described["kind"] == "cpu"
    assert described["device"] == "cpu"
    assert described["dtype"] == "bf16"
    assert described["kernel_backend"] == "cpu"
    assert described["torch"] == torch.__version__
    assert described["emulated"] is False
    assert described["memory_total_bytes"] > 0
    emulated = json.loads(json.dumps(resolve_device("npu-emulated:310P").describe()))
    assert emulated["emulated"] is True
    assert emulated["chip"] == "Ascend310P3 (emulated)"
    assert emulated["dtype"] == "fp16"


def test_importing_ascend_disables_backend_autoload_unless_set():
    env = {k: v for k, v in os.environ.items() if k != "TORCH_DEVICE_BACKEND_AUTOLOAD"}
    code = "import os, ascend; print(os.environ['TORCH_DEVICE_BACKEND_AUTOLOAD'])"
    default = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert default.stdout.strip() == "0", default.stderr
    env["TORCH_DEVICE_BACKEND_AUTOLOAD"] = "1"
    kept = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert kept.stdout.strip() == "1", kept.stderr
