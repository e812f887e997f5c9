"""Routing reports say what was used, named for what it is."""
import json
import subprocess
import sys

import torch

import moevl
from moevl.model.awaker.inputs import pooled_prompt
from moevl.model.tiny import DEMO_IMAGE


def test_legacy_routing_reports_the_decode_steps_routing_too():
    vl = moevl.load("awaker-tiny", device="cpu", routing="legacy")
    vl.ask("Describe the image.", images=[DEMO_IMAGE], max_new_tokens=3)
    decisions = vl.routing_decisions()
    first = [d for d in decisions if d.steps == "first token"]
    decode = [d for d in decisions if d.steps == "decode"]
    assert len(first) == len(decode) == 2 * len(vl.model.model.layers) and len(decisions) == 2 * len(first)
    # independent check of the decode set: route the plain token embeddings (no image features) over the span
    batch = vl.prepare(["Describe the image."], [[DEMO_IMAGE]])
    with torch.inference_mode():
        plain = vl.model.route(pooled_prompt(vl.model.embed(batch.input_ids), batch.span))
    want = [e for r in plain for e in (int(r.attn_expert[0]), int(r.mlp_expert[0]))]
    assert [d.expert[0] for d in decode] == want
    assert [d.expert for d in first] != [d.expert for d in decode], "the demo's two routings differ (precondition)"


def test_prefill_routing_is_one_set_for_all_tokens():
    vl = moevl.load("awaker-tiny", device="cpu")
    vl.ask("Describe the image.", images=[DEMO_IMAGE], max_new_tokens=2)
    assert {d.steps for d in vl.routing_decisions()} == {"all"}


def test_moe_llava_reports_the_busiest_experts_share_not_a_probability():
    vl = moevl.load("moellava-tiny", device="cpu")
    res = vl.ask("Describe the image.", images=[DEMO_IMAGE], max_new_tokens=4)
    for d in vl.routing_decisions():
        row = d.to_dict()
        assert "p" not in row and {"busiest", "share", "counts"} <= set(row)
        counts = torch.tensor(row["counts"][0])
        # top-2 routing: two slots per real token (prompt + generated tokens that went through a decode step)
        assert counts.sum() == 2 * (res.prompt_tokens[0] + len(res.token_ids[0]) - 1)
        assert row["busiest"][0] == int(counts.argmax())
        assert abs(row["share"][0] - float(counts.max() / counts.sum())) < 1e-6


def test_cli_labels_each_routing_line():
    out = subprocess.run([sys.executable, "-m", "moevl.cli", "demo", "--routing", "legacy", "--max-new-tokens", "2",
                          "--prompt", "Describe the image."], capture_output=True, text=True)  # one question
    lines = [x for x in out.stderr.splitlines() if x.startswith("routing")]
    assert [x.split(":")[0] for x in lines] == ["routing (first token)", "routing (decode steps)"]
    out = subprocess.run([sys.executable, "-m", "moevl.cli", "demo", "--family", "moe-llava", "--max-new-tokens",
                          "2"], capture_output=True, text=True)
    assert "routing, busiest expert per MoE layer: L" in out.stderr and "% of token slots" in out.stderr
    out = subprocess.run([sys.executable, "-m", "moevl.cli", "demo", "--family", "moe-llava", "--json",
                          "--max-new-tokens", "2"], capture_output=True, text=True)
    assert "share" in json.loads(out.stdout)["routing"][0]


def test_moe_llava_counts_only_the_tokens_of_each_answer_in_a_batch():
    """A request that finished early is fed pad tokens while the batch goes on: they are not its routing."""
    vl = moevl.load("moellava-tiny", device="cpu")
    questions = ["Describe the image.", "描述这张图片。"]  # two long answers (the trained default), no shared tokens
    first = vl.ask(questions[0], images=[DEMO_IMAGE], max_new_tokens=6).token_ids[0]
    other = vl.ask(questions[1], images=[DEMO_IMAGE], max_new_tokens=6).token_ids[0]
    k = next(i for i in range(1, 6) if first[i] not in other and first[i] not in first[:i])
    vl.eos_token_ids = set(vl.eos_token_ids) | {first[k]}  # the first request now ends after k tokens
    res = vl.ask(questions, images=[[DEMO_IMAGE], [DEMO_IMAGE]], max_new_tokens=6)
    assert res.finish_reasons == ["eos", "length"] and len(res.token_ids[0]) == k
    counts = [torch.tensor(d.counts) for d in vl.routing_decisions()]
    for c in counts:  # top-2: two slots per prompt token and per answer token fed to a decode step
        assert int(c[0].sum()) == 2 * (res.prompt_tokens[0] + k)
        assert int(c[1].sum()) == 2 * (res.prompt_tokens[1] + 5)
    alone = vl.ask(questions[0], images=[DEMO_IMAGE], max_new_tokens=6)
    assert alone.token_ids[0] == res.token_ids[0]
    assert [d.counts[0] for d in vl.routing_decisions()] == [c[0].tolist() for c in counts]


def test_ort_int8_leaves_awakers_routers_exact(tmp_path):
    """Dynamic int8 keeps the routers fp32: the router probabilities are the fp32 graph's, bit for bit."""
    from moevl.export.onnx import export_onnx

    out = export_onnx("awaker-tiny", tmp_path / "onnx", validate=False, log=lambda *a: None)
    routing = []
    for quantize in (None, "int8"):
        vl = moevl.load(out, backend="ort", quantize=quantize)
        vl.ask("Describe the image.", images=[DEMO_IMAGE], max_new_tokens=2)
        routing.append([(d.expert, d.p) for d in vl.routing_decisions()])
    assert routing[0] == routing[1]
