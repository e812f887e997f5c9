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
    # fp32 too, where memory allows (tiny: always)
    assert r["fp32_side_by_side"] and len(r["torch"]["per_repeat"]) == len(r["ort_fp32"]["per_repeat"]) == 3
    fp32 = [b[1] / a[1] for a, b in zip(r["torch"]["per_repeat"], r["ort_fp32"]["per_repeat"])]
    assert r["ort_fp32_vs_torch_decode"] == pytest.approx(statistics.median(fp32), abs=1e-3)
    assert f"**{r['ort_fp32_vs_torch_decode']:.2f}**" in md and "tiny: fp32 side by side, int8 side by side" in md
    # the OpenMP wait settings the run had are stated (they move the int8 figure: README, "OpenMP's wait policy")
    md = ort.render([r], {"cpu": "c", "command": "c", "torch": "t", "onnxruntime": "o", "threads": 1,
                          "omp_wait_policy": "PASSIVE", "gomp_spincount": "300000"})
    assert "OMP_WAIT_POLICY PASSIVE, GOMP_SPINCOUNT 300000" in md


def test_fp32_one_after_the_other_when_memory_is_short(monkeypatch):
    monkeypatch.setattr(ort, "SIDE_BY_SIDE", ("tiny",))
    monkeypatch.setattr(ort, "memory_available", lambda: 0)
    r = ort.run_config("tiny", 16, 3, 1, 1, lambda *a: None)
    assert not r["fp32_side_by_side"] and "per_repeat" not in r["torch"] and "ort_fp32_vs_torch_decode" not in r
    assert "torch_int8" in r  # int8 still side by side
    md = ort.render([r], {"cpu": "c", "command": "c", "torch": "t", "onnxruntime": "o", "threads": 1})
    assert "tiny: fp32 one after the other" in md


def test_other_configurations_time_ort_int8_alone(monkeypatch):
    monkeypatch.setattr(ort, "SIDE_BY_SIDE", ())
    r = ort.run_config("tiny", 16, 3, 1, 1, lambda *a: None)
    assert "torch_int8" not in r and "torch_int8_vs_ort_int8_decode" not in r
    assert "ours int8 (bf16" not in ort.render([r], {"cpu": "c", "command": "c", "torch": "t", "onnxruntime": "o",
                                               "threads": 1})


def test_merge_keeps_the_configurations_not_measured_with_their_own_command():
    # a run of one configuration with --merge replaces that configuration's rows only; the report's command line
    # names each command with the configurations it measured (an earlier report's rows keep its command)
    from moevl.benchmarks.ort import merge_results

    old = {"meta": {"command": "python -m moevl.benchmarks.ort --repeats 7", "date": "2026-12-07T18:06:00+00:00"},
           "results": [{"config": "tiny", "x": 1}, {"config": "7b-width", "x": 2}]}
    meta = {"command": "python -m moevl.benchmarks.ort --configs 7b-width", "date": "2026-12-08T00:32:00+00:00"}
    new = [{"config": "7b-width", "x": 3, "command": meta["command"], "date": meta["date"]}]
    rows, merged = merge_results(old, new, meta)
    assert [(r["config"], r["x"]) for r in rows] == [("tiny", 1), ("7b-width", 3)]
    assert rows[0]["command"] == old["meta"]["command"]
    assert merged["command"] == ("python -m moevl.benchmarks.ort --repeats 7 (tiny: 2026-12-07T18:06); "
                                 "python -m moevl.benchmarks.ort --configs 7b-width (7b-width: 2026-12-08T00:32)")
    rows, merged = merge_results(old, new + [{"config": "tiny", "x": 4, **meta}], meta)
    assert [r["x"] for r in rows] == [4, 3] and merged == meta  # nothing kept: the run's own command
