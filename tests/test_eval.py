"""Scoring and evaluation: normalisation and caption parsing against hand-written values, evaluate()'s accuracy and
routing arithmetic against hand-computed figures with a known predictor, a real tiny model end to end, and the
`moevl eval` command's bad-input rows."""
import json
import math
import subprocess
import sys
from types import SimpleNamespace

import pytest

from moevl.train.data import load_records, make_shapes, question_text
from moevl.train.evaluate import evaluate, normalised_mutual_information, render_markdown, write_report
from moevl.train.score import normalise, parse_caption, score


@pytest.mark.parametrize("text,want", [
    (" Red. ", "red"), ("Top Left", "top left"), ("top left.", "top left"), ("3", "3"), ("左上。", "左上"),
    ("红色", "红色"), ("red..", "red."), ("\n circle \t", "circle"), ("3 shapes: a.", "3 shapes: a"),
    ("red .", "red"), (".", ""),
])
def test_normalise(text, want):
    assert normalise(text) == want


EN3 = "3 shapes: red circle at top left, blue square at center, green triangle at bottom right."
ZH3 = "3个图形：左上红色圆形，中间蓝色正方形，右下绿色三角形。"
ITEMS3 = [("red", "circle", "top left"), ("blue", "square", "center"), ("green", "triangle", "bottom right")]


@pytest.mark.parametrize("text,lang,count,items", [
    (EN3, "en", 3, ITEMS3),
    (ZH3, "zh", 3, ITEMS3),
    ("1 shape: red circle at center.", "en", 1, [("red", "circle", "center")]),
    ("1个图形：中间红色圆形。", "zh", 1, [("red", "circle", "center")]),
    ("2个图形：上紫色三角形，左下橙色正方形", "zh", 2, [("purple", "triangle", "top"), ("orange", "square", "bottom left")]),
    ("2 Shapes: Red circle at top, a cat at left", "en", 2, [("red", "circle", "top"), None]),
    ("there are shapes", "en", None, []),
    ("4 shapes:", "en", 4, []),
    ("1个图形：中间红色圆", "zh", 1, [None]),
])
def test_parse_caption(text, lang, count, items):
    assert parse_caption(text, lang) == (count, items)


def test_caption_scores_count_items_and_exactness():
    s = score("caption", "2 shapes: red circle at top left, blue square at top.", EN3, "en")
    assert s["exact"] is False and s["count_ok"] is False
    assert s["items"]["precision"] == 0.5 and s["items"]["recall"] == pytest.approx(1 / 3)
    assert s["items"]["f1"] == pytest.approx(0.4) and s["items"]["equal"] is False
    # the same items in another order: the set is right, the caption is not exact
    s = score("caption", "3个图形：中间蓝色正方形，左上红色圆形，右下绿色三角形", ZH3, "zh")
    assert s["exact"] is False and s["count_ok"] is True and s["items"]["equal"] is True
    assert s["items"]["f1"] == 1.0
    s = score("caption", " 3 Shapes: red circle at top left, blue square at center, green triangle at bottom right ",
              EN3, "en")
    assert s["exact"] is True and s["items"]["equal"] is True
    s = score("caption", "nonsense", EN3, "en")
    assert s["items"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "equal": False} and s["count_ok"] is False


@pytest.mark.parametrize("task,pred,ref,lang,exact", [
    ("count", "3.", "3", "en", True), ("count", "three", "3", "en", False), ("color", "Red", "red", "en", True),
    ("color", "红色。", "红色", "zh", True), ("position", "左", "左上", "zh", False),
    ("position", "top  left", "top left", "en", False),
])
def test_short_answers_are_exact_match(task, pred, ref, lang, exact):
    assert score(task, pred, ref, lang) == {"exact": exact}


def test_nmi_matches_hand_computed_values():
    assert normalised_mutual_information([[3, 0], [0, 5]]) == pytest.approx(1.0)
    assert normalised_mutual_information([[2, 2], [3, 3]]) == pytest.approx(0.0, abs=1e-12)
    assert normalised_mutual_information([[4], [6]]) == 0.0          # one expert: no information
    assert normalised_mutual_information([[7]]) == 1.0               # one task, one expert
    # [[1, 1], [0, 2]]: H(T) = ln 2, H(E) = H(1/4, 3/4), I = ln2/4 + ln(2/3)/4 + ln(4/3)/2 (worked by hand)
    ht = math.log(2)
    he = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    mi = 0.25 * math.log(2) + 0.25 * math.log(2 / 3) + 0.5 * math.log(4 / 3)
    assert normalised_mutual_information([[1, 1], [0, 2]]) == pytest.approx(mi / ((ht + he) / 2))
    assert normalised_mutual_information([[1, 1], [0, 2]]) == pytest.approx(0.343712, abs=1e-6)


class KnownPredictor:
    """A session that answers from a table and routes by a fixed rule, Awaker-style (one expert per request)."""

    family = "awaker"
    dtype_name = "fp32"

    def __init__(self, answers, experts):
        self.answers, self.experts, self.calls, self._last = answers, experts, [], []

    def ask(self, questions, images=None, max_new_tokens=None, temperature=None):
        assert temperature == 0.0 and all(len(i) == 1 and i[0].endswith(".png") for i in images)
        assert not any("<image>" in q for q in questions)
        self.calls.append(len(questions))
        self._last = questions
        return SimpleNamespace(texts=[self.answers[q] for q in questions])

    def routing_decisions(self):
        return [{"layer": 0, "router": "mlp", "expert": [self.experts[q] for q in self._last]},
                {"layer": 1, "router": "mlp", "expert": [0 for _ in self._last]}]

    def describe(self):
        return {"device": "cpu", "chip": "test"}


def _records(tasks_langs_answers):
    """Records of the shapes format whose questions are unique ids (the predictor looks them up)."""
    out = []
    for k, (task, lang, ref) in enumerate(tasks_langs_answers):
        out.append({"id": str(k), "image_path": f"/x/{k}.png", "task": task, "lang": lang,
                    "conversations": [{"from": "human", "value": f"<image>\nq{k}"}, {"from": "gpt", "value": ref}]})
    return out


def test_evaluate_arithmetic_with_a_known_predictor():
    recs = _records([("count", "en", "3"), ("count", "en", "2"), ("count", "zh", "1"),
                     ("color", "en", "red"), ("color", "zh", "红色"), ("color", "zh", "蓝色"),
                     ("caption", "en", EN3), ("caption", "zh", ZH3)])
    answers = {"q0": "3", "q1": "4", "q2": "1.", "q3": "Red", "q4": "绿色", "q5": "蓝色。",
               "q6": "3 shapes: red circle at top left, blue square at center.", "q7": ZH3}
    # router L0: count -> e0, color -> e1 except one e0, caption -> e2
    experts = {"q0": 0, "q1": 0, "q2": 0, "q3": 1, "q4": 1, "q5": 0, "q6": 2, "q7": 2}
    fake = KnownPredictor(answers, experts)
    r = evaluate(fake, recs, batch_size=3)
    assert fake.calls == [3, 3, 2]
    acc = r["accuracy"]
    assert acc["count"]["en"] == {"n": 2, "correct": 1, "accuracy": 0.5}
    assert acc["count"]["zh"] == {"n": 1, "correct": 1, "accuracy": 1.0}
    assert acc["count"]["all"]["accuracy"] == pytest.approx(2 / 3, abs=1e-6)
    assert acc["color"]["zh"]["accuracy"] == 0.5 and acc["color"]["en"]["accuracy"] == 1.0
    assert acc["caption"]["en"]["accuracy"] == 0.0 and acc["caption"]["zh"]["accuracy"] == 1.0
    assert r["overall"] == {"n": 8, "correct": 5, "accuracy": 0.625}
    cap = r["caption"]
    assert cap["en"]["recall"] == pytest.approx(2 / 3, abs=1e-6) and cap["en"]["precision"] == 1.0
    assert cap["en"]["count_ok"] == 1.0 and cap["en"]["items_equal"] == 0.0 and cap["zh"]["items_equal"] == 1.0
    assert cap["all"]["f1"] == pytest.approx((0.8 + 1.0) / 2, abs=1e-6)
    routers = r["routing"]["routers"]
    assert r["routing"]["unit"] == "request"
    assert routers["L0.mlp"]["counts"] == {"count": [3, 0, 0], "color": [1, 2, 0], "caption": [0, 0, 2]}
    assert routers["L0.mlp"]["top"]["color"] == {"expert": 1, "share": pytest.approx(2 / 3, abs=1e-6)}
    # joint [[3,0,0],[1,2,0],[0,0,2]] / 8, worked by hand
    pt, pe = [3 / 8, 3 / 8, 2 / 8], [4 / 8, 2 / 8, 2 / 8]
    joint = {(0, 0): 3 / 8, (1, 0): 1 / 8, (1, 1): 2 / 8, (2, 2): 2 / 8}
    mi = sum(p * math.log(p / (pt[t] * pe[e])) for (t, e), p in joint.items())
    h = lambda ps: -sum(p * math.log(p) for p in ps)  # noqa: E731
    assert routers["L0.mlp"]["nmi"] == pytest.approx(mi / ((h(pt) + h(pe)) / 2), abs=1e-6)
    assert routers["L1.mlp"]["nmi"] == 0.0
    assert len(r["predictions"]) == 8 and r["predictions"][1]["prediction"] == "4"
    assert "| count | 50.0 | 100.0 | 66.7 | 3 |" in render_markdown(r)


def test_moe_llava_style_token_counts_are_summed_per_task():
    recs = _records([("count", "en", "3"), ("shape", "en", "circle"), ("shape", "zh", "圆形")])

    class TokenRouted(KnownPredictor):
        def routing_decisions(self):
            table = {"q0": [5, 1, 0, 0], "q1": [0, 2, 4, 0], "q2": [1, 1, 4, 0]}
            return [{"layer": 3, "router": "moe", "expert": [0] * len(self._last), "p": [0.5] * len(self._last),
                     "counts": [table[q] for q in self._last]}]

    r = evaluate(TokenRouted({"q0": "3", "q1": "x", "q2": "圆形"}, {}), recs, batch_size=2)
    rt = r["routing"]
    assert rt["unit"] == "token-slot"
    assert rt["routers"]["L3.moe"]["counts"] == {"count": [5, 1, 0, 0], "shape": [1, 3, 8, 0]}
    assert rt["routers"]["L3.moe"]["top"]["shape"] == {"expert": 2, "share": pytest.approx(8 / 12, abs=1e-6)}


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("eval") / "val", 10, seed=11)


def test_evaluate_a_tiny_preset_end_to_end(small_set, tmp_path):
    import moevl

    session = moevl.load("awaker-tiny", device="cpu")
    r = evaluate(session, small_set, batch_size=4, max_new_tokens=4)
    assert r["n"] == 10 and set(r["accuracy"]) == {"count", "color", "shape", "position", "caption"}
    assert sum(row["all"]["n"] for row in r["accuracy"].values()) == 10
    routers = r["routing"]["routers"]
    assert len(routers) == 2 * session.model.cfg.num_layers
    assert all(sum(map(sum, x["counts"].values())) == 10 for x in routers.values())
    # the routing kept per answer is the session's for that request: asked alone, request 5 routes the same
    rec = load_records(small_set)[5]
    session.ask([question_text(rec)], images=[[rec["image_path"]]], max_new_tokens=1)
    alone = {f"L{d.layer}.{d.router}": d.expert[0] for d in session.routing_decisions()}
    assert r["predictions"][5]["experts"] == alone
    json_path, md_path = write_report(r, tmp_path / "report")
    assert json.loads(json_path.read_text())["overall"] == r["overall"]
    assert md_path.read_text().startswith("# Evaluation")
    with pytest.raises(FileExistsError):
        write_report(r, tmp_path / "report")
    write_report(r, tmp_path / "report", force=True)


def _moevl(*args, cwd):
    return subprocess.run([sys.executable, "-m", "moevl.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_the_eval_command_prints_and_writes_a_report(small_set, tmp_path):
    out = _moevl("eval", "--model", "moellava-tiny", "--data", str(small_set), "--limit", "3", "--max-new-tokens",
                 "2", "--json", "--out", "rep", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["n"] == 3 and r["family"] == "moe-llava" and r["routing"]["unit"] == "token-slot"
    assert (tmp_path / "rep/eval.json").is_file() and (tmp_path / "rep/eval.md").is_file()


@pytest.mark.parametrize("args,expect", [
    (["--data", "{d}/nope.json"], "nope.json does not exist"),
    (["--data", "{bad}"], "not valid JSON"),
    (["--limit", "0"], "--limit"),
    (["--batch-size", "0"], "--batch-size"),
    (["--model", "{d}/no-model"], "no-model"),
    (["--out", "{taken}"], "taken"),
])
def test_bad_eval_commands_exit_2_with_one_line_and_write_nothing(small_set, tmp_path, args, expect):
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "bad.json").write_text("[{")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep")
    fill = {"d": tmp_path, "bad": tmp_path / "bad.json", "taken": tmp_path / "taken"}
    base = {"--model": "awaker-tiny", "--data": str(small_set), "--max-new-tokens": "1", "--limit": "1"}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v.format(**fill)
    out = _moevl("eval", *[x for kv in base.items() for x in kv], cwd=work)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0] and "Traceback" not in out.stderr
    assert list(work.iterdir()) == [] and [p.name for p in (tmp_path / "taken").iterdir()] == ["mine.txt"]


def test_the_quality_report_runs_its_variants_and_names_what_it_did_not_run(tmp_path):
    from moevl.benchmarks.quality import main

    assert main(["--models", "awaker-tiny", "--variants", "torch fp32,torch bf16,torch fp32 gumbel", "--limit", "2",
                 "--max-new-tokens", "2", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "quality-cpu.json").read_text())
    m = payload["models"]["awaker-tiny"]
    assert list(m["variants"]) == ["torch fp32", "torch bf16"]  # the Gumbel mode is MoE-LLaVA's only
    assert m["variants"]["torch fp32"]["same_answer_as_fp32"] == 1.0
    assert m["variants"]["torch bf16"]["delta_points"]["count/en"] is not None or \
        m["variants"]["torch bf16"]["accuracy"]["count/en"] is None
    assert "om (Ascend OM)" in m["not_run"] and payload["n"] == 2
    assert m["variants"]["torch fp32"]["routing_changed_vs_fp32"]["fraction"] == 0.0
    assert m["variants"]["torch bf16"]["routing_changed_vs_fp32"]["decisions"] == 2 * 8  # 2 questions x 8 routers
    md = (tmp_path / "quality-cpu.md").read_text()
    assert "| count/en |" in md and "| routing decisions changed vs torch fp32" in md


def test_the_quality_report_merges_new_variants_into_an_earlier_one_on_the_same_data(tmp_path):
    from moevl.benchmarks.quality import main

    common = ["--models", "awaker-tiny", "--limit", "2", "--max-new-tokens", "2", "--out", str(tmp_path)]
    assert main(common + ["--variants", "torch fp32,torch bf16"]) == 0
    assert main(common + ["--variants", "torch fp32,torch bf16 int8 mlas", "--merge"]) == 0
    payload = json.loads((tmp_path / "quality-cpu.json").read_text())
    variants = payload["models"]["awaker-tiny"]["variants"]
    assert set(variants) == {"torch fp32", "torch bf16", "torch bf16 int8 mlas"}
    assert "--merge" in payload["command"] and payload["command"].count("moevl.benchmarks.quality") == 2
    assert "| torch bf16 int8 mlas |" in (tmp_path / "quality-cpu.md").read_text()
    # other data: refused with one line and exit status 2, the earlier report kept
    before = (tmp_path / "quality-cpu.json").read_text()
    assert main(["--models", "awaker-tiny", "--limit", "3", "--max-new-tokens", "2", "--out", str(tmp_path),
                 "--variants", "torch fp32", "--merge"]) == 2
    assert (tmp_path / "quality-cpu.json").read_text() == before


def test_a_merged_report_names_for_each_model_the_commands_that_measured_its_rows(tmp_path):
    # a model whose every row was re-measured is credited to the new command only; one that keeps rows of the
    # earlier report keeps its command too; a model not re-run keeps its own
    from moevl.benchmarks.quality import merge_into

    def report(command, models):
        return {"command": command, "data": "validation split", "data_seed": 1, "n": 2,
                "models": {name: {"command": command, "variants": {v: {} for v in vs}, "not_run": {}}
                           for name, vs in models.items()}}

    old = tmp_path / "quality-cpu.json"
    old.write_text(json.dumps(report("A", {"a": ["fp32", "bf16"], "b": ["fp32"], "c": ["fp32"]})))
    new = report("B", {"a": ["fp32", "bf16"], "b": ["fp32", "int8"]})
    merge_into(new, old)
    assert {k: m["command"] for k, m in new["models"].items()} == {"a": "B", "b": "B", "c": "A"}
    new = report("B", {"a": ["fp32"]})
    merge_into(new, old)
    assert new["models"]["a"]["command"] == "A; then B" and set(new["models"]["a"]["variants"]) == {"fp32", "bf16"}
    assert new["command"] == "a: A; then B; b: A; c: A"
    old.write_text(json.dumps(report("A", {"a": ["fp32"]})))
    new = report("B", {"a": ["fp32"]})
    merge_into(new, old)
    assert new["command"] == "B"


def test_routing_changes_counts_question_router_pairs_that_differ():
    from moevl.benchmarks.quality import routing_changes

    ref = [{"L0.attn": 1, "L0.mlp": 2}, {"L0.attn": 0, "L0.mlp": 0}, {"L0.attn": 3, "L0.mlp": 1}]
    got = [{"L0.attn": 1, "L0.mlp": 0}, {"L0.attn": 0, "L0.mlp": 0}, {"L0.attn": 2, "L0.mlp": 2}]
    r = routing_changes(got, ref, "request")
    assert (r["decisions"], r["changed"]) == (6, 3) and r["fraction"] == 0.5
    assert r["questions_with_a_change"] == round(2 / 3, 6) and "request" in r["what"]
    assert routing_changes(ref, ref, "token-slot")["fraction"] == 0.0


def test_routing_tables_have_a_column_per_expert_even_for_a_router_that_picked_one():
    # counts reach only the highest expert a router picked: the summary pads every router to the widest, so the
    # report's columns line up (a router that sent all to expert 0 printed a single column before)
    import numpy as np

    from moevl.train.evaluate import routing_summary

    rows = {"L0.attn": np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]]), "L3.mlp": np.array([[1], [1], [1]])}
    s = routing_summary(rows, ["count", "color", "count"])
    assert s["routers"]["L3.mlp"]["counts"] == {"count": [2, 0, 0], "color": [1, 0, 0]}
    assert s["routers"]["L0.attn"]["counts"] == {"count": [0, 1, 1], "color": [1, 0, 0]}
    assert s["routers"]["L3.mlp"]["nmi"] == 0.0
