"""benchmarks.ort on the tiny configuration: ours int8 is timed in turn with ONNX Runtime int8, repeat by repeat,
and the reported ratio is the median of the per-repeat ratios."""
import statistics

import pytest

pytest.importorskip("onnxruntime")

from moevl.benchmarks import ort  # noqa: E402


def test_ours_int8_side_by_side_with_ort_int8(monkeypatch):
    monkeypatch.setattr(ort, "SIDE_BY_SIDE", ("tiny",))
    r = ort.run_config("tiny", 16, 4, 3, 1, lambda *a: None)
    for key in ("torch", "ort_fp32", "ort_int8", "torch_int8"):
        assert r[key]["decode_ms_per_token"] > 0 and len(r[key]["tokens"]) == 4
    for key in ("ort_int8", "torch_int8"):
        per = r[key]["per_repeat"]
        assert len(per) == 3
        assert r[key]["decode_ms_per_token"] == pytest.approx(statistics.median(d for _, d in per), abs=1e-3)
    ratios = [a[1] / b[1] for a, b in zip(r["torch_int8"]["per_repeat"], r["ort_int8"]["per_repeat"])]
    assert r["torch_int8_vs_ort_int8_decode"] == pytest.approx(statistics.median(ratios), abs=1e-3)
    assert r["torch_int8_kernels"]  # the kernel the default policy bound, recorded
    assert r["torch_int8_vs_fp32"]["positions_equal"].endswith("/4")
    md = ort.render([r], {"cpu": "test CPU", "command": "c", "torch": "t", "onnxruntime": "o", "threads": 1})
    assert "ours int8 (bf16 activations, default kernel)" in md
    assert f"**{r['torch_int8_vs_ort_int8_decode']:.2f}**" in md


def test_other_configurations_time_ort_int8_alone(monkeypatch):
    monkeypatch.setattr(ort, "SIDE_BY_SIDE", ())
    r = ort.run_config("tiny", 16, 3, 1, 1, lambda *a: None)
    assert "torch_int8" not in r and "torch_int8_vs_ort_int8_decode" not in r
    assert "ours int8 (bf16" not in ort.render([r], {"cpu": "c", "command": "c", "torch": "t", "onnxruntime": "o",
                                               "threads": 1})
