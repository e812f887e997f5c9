"""``moevl bench report``: one table from the benchmarks' result files. The inputs are small files this test writes
(laid out as quant.py, e2e.py, ort.py, quant.py --only-load-check and quality.py write them), with values it chooses."""
import json

import pytest

from moevl.benchmarks import report

QUANT_ROWS = {  # variant -> (ttft ms, decode ms/token, tok/s batch 8, weight bytes/step, fraction of read bw)
    "transformers fp32": (1500.0, 250.0, None, 4_000_000_000, 0.50),
    "ours fp32": (1400.0, 200.0, 30.5, 4_300_000_000, 0.71),
    "ours fp32 (oneDNN)": (1300.0, 150.0, 35.5, 4_300_000_000, 0.93),
    "ours bf16": (700.0, 110.0, 60.25, 2_150_000_000, 0.62),
    "ours int8 (bf16)": (600.0, 60.0, 90.75, 1_100_000_000, 0.58),
    "ours int4 (bf16)": (550.0, 40.0, 120.5, 600_000_000, 0.48),
}
# plain int8 (ATen) is the "ours int8 (bf16)" row; the forced-MLAS quality variant belongs to the MLAS row
QUALITY = {"torch fp32": 0.52, "torch bf16": 0.515, "torch bf16 int8": 0.505, "torch bf16 int8 mlas": 0.5,
           "ort fp32": 0.52, "ort int8": 0.41, "npu-emulated:910B bf16": 0.51}
MOELLAVA = {"torch fp32": 0.33, "torch bf16": 0.32, "torch fp32 gumbel": 0.21}


def env(cpu="Test CPU A", date="2030-01-02T03:04:05+00:00", command="python -m moevl.benchmarks.x"):
    return {"date": date, "cpu": cpu, "cpu_flags": ["avx2", "avx512_bf16"], "command": command, "torch": "2.13.0",
            "threads": 2, "device": {"chip": cpu}}


def quant_payload():
    rows = [{"variant": v, "ttft_ms": t, "decode_ms_per_token": d, "tokens_per_s_batch1": 1000.0 / d,
             "tokens_per_s_batch8": b8, "weight_bytes_per_step": w, "fraction_of_read_bandwidth": f}
            for v, (t, d, b8, w, f) in QUANT_ROWS.items()]
    return {"benchmark": "quant", "config": {"layers": 2, "rank": 256, "new_tokens": 32, "rounds": 3,
                                             "prompt_tokens": 119, "batch8_tokens": 8},
            "cpu": "Test CPU A", "cpu_flags": ["avx2", "avx512_bf16"],
            "environment": env(command="python -m moevl.benchmarks.quant --rounds 3"), "rows": rows,
            "process_peak_rss_bytes": 30 * 2**30,
            "load_rss_check": {"file_bytes": 2 * 2**30, "rss_before_load": 2**28, "peak_rss_after_load": 3 * 2**30}}


def e2e_payload():
    med = {"ours": {"ttft_ms": 1999.0, "decode_ms_per_token": 299.0, "weight_bytes_per_step": 4_350_000_000,
                    "fraction_of_read_bandwidth": 0.44},
           "baseline": {"ttft_ms": 1888.0, "decode_ms_per_token": 288.0, "weight_bytes_per_step": 4_040_000_000,
                        "fraction_of_read_bandwidth": 0.45}}
    return {"benchmark": "e2e-awaker", "config": {"layers": 2, "rank": 256, "new_tokens": 32, "prompt_tokens": 119,
                                                  "rounds": 7, "dtype": "fp32"},
            "environment": env(cpu="Test CPU B", command="python -m moevl.benchmarks.e2e --rounds 7"),
            "median": med, "process_peak_rss_bytes": 9 * 2**30}


def ort_payload():
    def res(config, t, f, i):
        return {"config": config, "hidden": 3584 if config != "tiny" else 64, "layers": 2, "prompt_tokens": 128,
                "new_tokens": 16, "repeats": 3, "torch": {"ttft_ms": t[0], "decode_ms_per_token": t[1]},
                "ort_fp32": {"ttft_ms": f[0], "decode_ms_per_token": f[1]},
                "ort_int8": {"ttft_ms": i[0], "decode_ms_per_token": i[1]}}
    return {"meta": {"cpu": "Test CPU B", "command": "python -m moevl.benchmarks.ort"},
            "results": [res("tiny", (3.0, 0.8), (1.1, 0.79), (1.2, 0.95)),
                        res("7b-width", (1100.0, 240.0), (1000.0, 125.0), (400.0, 48.0))]}


def quality_payload():
    def variants(acc):
        return {v: {"overall": a, "accuracy": {}, "n": 200} for v, a in acc.items()}
    return {"command": "python -m moevl.benchmarks.quality --limit 200", "environment": env(cpu="Test CPU A"),
            "data": "validation split", "n": 200, "n_per_pair": "20-20 per task and language", "note": None,
            "models": {"moellava-tiny": {"family": "moe-llava", "variants": variants(MOELLAVA), "not_run": {}},
                       "awaker-tiny": {"family": "awaker", "variants": variants(QUALITY),
                                       "not_run": {"torch bf16 int4": "failed: RuntimeError: no int4 kernel",
                                                   "om (Ascend OM)": "needs ATC"}}}}


FILES = {"quant-cpu.json": quant_payload, "e2e-cpu.json": e2e_payload, "ort-cpu.json": ort_payload,
         "quality-cpu.json": quality_payload}


@pytest.fixture
def results(tmp_path):
    for name, make in FILES.items():
        (tmp_path / name).write_text(json.dumps(make()))
    return tmp_path


def run(folder, *extra):
    assert report.main(["--results-dir", str(folder), *extra]) == 0
    return (json.loads((folder / "summary-cpu.json").read_text()), (folder / "summary-cpu.md").read_text())


def by_variant(summary):
    return {r["variant"]: r["cells"] for r in summary["rows"]}


def md_row(md, variant):
    return next(line for line in md.splitlines() if line.startswith(f"| {variant} |")).split(" | ")[1:]


def test_latency_cells_come_from_the_side_by_side_run_first(results):
    rows = by_variant(run(results)[0])
    for variant, (ttft, decode, b8, nbytes, frac) in QUANT_ROWS.items():
        cells = rows[variant]
        assert cells["decode_ms_per_token"]["value"] == decode and cells["decode_ms_per_token"]["file"] == \
            "quant-cpu.json"
        assert cells["ttft_ms"]["value"] == ttft
        assert cells["tokens_per_s_batch1"]["value"] == pytest.approx(1000.0 / decode)
        assert cells["weight_bytes"]["value"] == nbytes
        assert cells["fraction_of_read_bandwidth"]["value"] == frac
        if b8 is not None:
            assert cells["tokens_per_s_batch8"]["value"] == b8
    # e2e's transformers/ours figures are not used while quant-cpu.json has them
    assert rows["transformers fp32"]["decode_ms_per_token"]["value"] == 250.0


def test_ort_rows_come_from_the_7b_width_configuration(results):
    rows = by_variant(run(results)[0])
    assert rows["ORT fp32"]["decode_ms_per_token"]["value"] == 125.0
    assert rows["ORT int8 (dynamic)"]["ttft_ms"]["value"] == 400.0
    assert rows["ORT int8 (dynamic)"]["tokens_per_s_batch1"]["value"] == pytest.approx(1000.0 / 48.0)
    assert "derived" in rows["ORT int8 (dynamic)"]["tokens_per_s_batch1"]["note"]
    assert rows["ORT fp32"]["decode_ms_per_token"]["file"] == "ort-cpu.json"


def test_accuracy_is_the_awaker_defaults_matching_variant(results):
    summary, md = run(results)
    rows = by_variant(summary)
    assert summary["accuracy_model"] == "awaker-tiny"
    assert rows["ours fp32"]["accuracy"]["value"] == 0.52
    assert rows["ours bf16"]["accuracy"]["value"] == 0.515
    assert rows["ours int8 (bf16)"]["accuracy"]["value"] == 0.505
    assert rows["ours int8 (bf16, MLAS where faster)"]["accuracy"]["value"] == 0.5
    assert rows["ORT int8 (dynamic)"]["accuracy"]["value"] == 0.41
    assert rows["npu-emulated:910B bf16"]["accuracy"]["value"] == 0.51
    assert md_row(md, "ours int8 (bf16)")[-1].startswith("50.5 [A]")


def test_without_the_side_by_side_run_e2e_fills_the_fp32_rows(results):
    (results / "quant-cpu.json").unlink()
    rows = by_variant(run(results)[0])
    assert rows["transformers fp32"]["decode_ms_per_token"]["value"] == 288.0
    assert rows["ours fp32"]["decode_ms_per_token"]["value"] == 299.0
    assert rows["ours fp32"]["decode_ms_per_token"]["file"] == "e2e-cpu.json"
    assert "ours bf16" in rows and rows["ours bf16"]["decode_ms_per_token"]["value"] is None


def test_missing_cells_are_dashes_with_a_reason(results):
    summary, md = run(results)
    rows = by_variant(summary)
    missing = rows["transformers fp32"]["tokens_per_s_batch8"]
    assert missing["value"] is None and "batch 8 for the kit's variants only" in missing["why"][0]
    assert rows["transformers fp32"]["accuracy"]["value"] is None
    assert "no LoRA-MoE adapters" in rows["transformers fp32"]["accuracy"]["why"][0]
    assert "failed: RuntimeError" in rows["ours int4 (bf16)"]["accuracy"]["why"][0]
    assert rows["ORT fp32"]["weight_bytes"]["value"] is None
    npu = rows["npu-emulated:910B bf16"]
    assert all(npu[c]["value"] is None and "emulated" in npu[c]["why"][0] for c in report.LATENCY)
    cells = md_row(md, "npu-emulated:910B bf16")
    assert all(c.startswith("- (") for c in cells[:len(report.LATENCY)])
    # every footnote number used in the table is defined under Notes
    notes = md.split("Notes:")[1]
    for c in cells[:len(report.LATENCY)]:
        number = c.split("(")[1].split(")")[0]
        assert f"\n{number}. " in notes
    assert "om (Ascend OM)" not in rows  # a quality 'not run' entry that is no variant of the table


def test_rss_prefers_a_per_variant_figure_over_a_process_upper_bound(results):
    summary, md = run(results)
    rows = by_variant(summary)
    assert rows["ours int4 (bf16)"]["rss_bytes"]["value"] == 3 * 2**30
    assert not rows["ours int4 (bf16)"]["rss_bytes"]["upper_bound"]
    assert rows["ours bf16"]["rss_bytes"]["value"] == 30 * 2**30 and rows["ours bf16"]["rss_bytes"]["upper_bound"]
    assert md_row(md, "ours bf16")[6].startswith("<= 30.00 [Q]")


def test_no_number_in_the_table_is_invented(results):
    summary, _ = run(results)
    leaves = set()

    def walk(x):
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
        elif isinstance(x, (int, float)) and not isinstance(x, bool):
            leaves.add(float(x))
    for make in FILES.values():
        walk(make())
    for row in summary["rows"]:
        for col, cell in row["cells"].items():
            if cell["value"] is None:
                continue
            if cell.get("note") and cell["note"].startswith("derived"):
                assert any(cell["value"] == pytest.approx(1000.0 / v) for v in leaves), (row["variant"], col)
            else:
                assert float(cell["value"]) in leaves, (row["variant"], col, cell)


def test_markdown_says_the_models_differ_and_names_cpus_and_sources(results):
    from moevl.ascend.device import cpu_model_name

    _, md = run(results)
    assert "different models" in md and "`awaker-tiny`" in md and "7B width" in md
    assert cpu_model_name() in md  # this machine's CPU, and its flags
    assert "flags:" in md
    for name in FILES:
        assert f"`{name}`" in md
    assert "python -m moevl.benchmarks.quant --rounds 3" in md and "2030-01-02T03:04:05+00:00" in md
    assert "different CPUs" in md and "Test CPU A" in md and "Test CPU B" in md


def test_the_plot_is_a_png_of_the_variants_with_latency_and_accuracy(results):
    summary, md = run(results)
    png = results / "summary-cpu.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    assert summary["plot"] == "summary-cpu.png" and "summary-cpu.png" in md
    assert set(summary["plotted"]) == {"ours fp32", "ours bf16", "ours int8 (bf16)", "ORT fp32",
                                       "ORT int8 (dynamic)"}


def test_model_option_takes_another_models_accuracy(results):
    summary, md = run(results, "--model", "moellava-tiny")
    rows = by_variant(summary)
    assert rows["ours fp32"]["accuracy"]["value"] == 0.33
    assert rows["torch fp32 gumbel"]["accuracy"]["value"] == 0.21  # a variant only that model has: its own row
    assert "`moellava-tiny`" in md


def test_accuracy_only_results_write_no_plot_and_remove_a_stale_one(results):
    for name in ("quant-cpu.json", "e2e-cpu.json", "ort-cpu.json"):
        (results / name).unlink()
    (results / "summary-cpu.png").write_bytes(b"old")
    summary, md = run(results)
    assert summary["plot"] is None and not (results / "summary-cpu.png").exists() and "No plot" in md
    assert by_variant(summary)["ours bf16"]["accuracy"]["value"] == 0.515


@pytest.mark.parametrize("case", ["no folder", "empty folder", "broken json", "unknown model"])
def test_bad_input_is_one_line_and_exit_2_with_nothing_written(tmp_path, capsys, case):
    folder = tmp_path / "results"
    args = ["--results-dir", str(folder)]
    if case != "no folder":
        folder.mkdir()
    if case == "broken json":
        (folder / "quality-cpu.json").write_text(json.dumps(quality_payload()))
        (folder / "e2e-cpu.json").write_text("{not json")
    if case == "unknown model":
        (folder / "quality-cpu.json").write_text(json.dumps(quality_payload()))
        args += ["--model", "nope-tiny"]
    assert report.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("report: error:")
    assert {"no folder": "no such folder", "empty folder": "none of", "broken json": "e2e-cpu.json",
            "unknown model": "nope-tiny"}[case] in err
    assert not list(tmp_path.rglob("summary-cpu.*"))


def test_cli_moevl_bench_report(results, tmp_path, capsys):
    from moevl.cli import main

    out = tmp_path / "elsewhere"
    assert main(["bench", "report", "--results-dir", str(results), "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"summary-cpu.json", "summary-cpu.md", "summary-cpu.png"}
    assert "| ours int4 (bf16) |" in capsys.readouterr().out
    assert not (results / "summary-cpu.json").exists()
