"""The training recipe on tiny random models: what each stage trains, starts from and writes; the training forward
against inference; resuming; MoE-LLaVA's MoE-tuning. (peft interop with transformers: test_train_peft.py.)"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import moevl
from moevl.ascend.device import resolve_device
from moevl.model.family import load_torch
from moevl.train import loop
from moevl.train.examples import IGNORE, forward, load_balancing_loss, make_batch, read_records
from moevl.train.loop import TrainSettings
from moevl.train.recipe import PEFT_FOLDER, StageOptions, experts_from_lora, moe_from_dense, run_stage
from tests.train_fixtures import awaker_base, moellava_dense, shapes

CPU = resolve_device("cpu")
FAST = TrainSettings(steps=3, batch_size=2, lr=5e-3, checkpoint_every=1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return shapes(tmp_path_factory.mktemp("shapes") / "data")


@pytest.fixture(scope="module")
def stages(tmp_path_factory, data):
    """base -> stage 1 -> stage 2 -> stage 3 (a few steps each)."""
    root = tmp_path_factory.mktemp("awaker")
    base = awaker_base(root / "base")
    opts = StageOptions(lora_rank=4, lora_alpha=8.0, experts=3)
    out = {"base": base}
    prev = base
    for st in ("1", "2", "3"):
        prev = out[st] = run_stage(prev, data, st, root / f"s{st}", "cpu", FAST, opts, progress=False,
                                   log=lambda m: None)
    return out


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


def test_loss_is_on_the_answer_tokens_only(data):
    s = moevl.load("awaker-tiny", device="cpu")
    recs = read_records(data)[:3]
    batch, labels = make_batch("awaker", s.processor, recs)
    for row, rec in zip(labels, recs):
        scored = row[row != IGNORE].tolist()
        assert scored[-1] == s.cfg.im_end_token_id
        assert s.tokenizer.decode(scored[:-1]) == rec.answer
        n = len(scored)
        assert (row[-n:] != IGNORE).all() and (row[:-n] == IGNORE).all()  # the answer ends its row


@pytest.mark.parametrize("family", ["awaker", "moe-llava"])
def test_loss_averages_by_token_or_by_record(family, data):
    """"token": the mean over every answer token of the batch; "record": the mean of each record's own mean. The
    oracle: each record alone in its own batch (its token mean), and the cross-entropy written out from the logits."""
    from moevl.train.examples import loss_of

    from moevl.train.recipe import training_kernels

    s = moevl.load("awaker-tiny" if family == "awaker" else "moellava-tiny", device="cpu", dtype="fp32")
    s.model.set_kernels(training_kernels())  # as the training loop runs it
    s.model.train()
    recs = read_records(data)
    recs = sorted(recs, key=lambda r: len(r.answer))[:1] + sorted(recs, key=lambda r: -len(r.answer))[:2]
    alone, lengths = [], []
    with torch.no_grad():
        for r in recs:
            batch, labels = make_batch(family, s.processor, [r])
            loss, _ = loss_of(family, s.model, batch, labels)
            alone.append(loss.item())
            lengths.append(int((labels[:, 1:] != IGNORE).sum()))
        assert len(set(lengths)) > 1  # answers of different lengths, else the two averages agree trivially
        batch, labels = make_batch(family, s.processor, recs)
        by_token, _ = loss_of(family, s.model, batch, labels, average="token")
        by_record, _ = loss_of(family, s.model, batch, labels, average="record")
    expect_record = sum(alone) / len(alone)
    expect_token = sum(a * n for a, n in zip(alone, lengths)) / sum(lengths)
    assert abs(by_record.item() - expect_record) < 1e-4 * max(1.0, expect_record)
    assert abs(by_token.item() - expect_token) < 1e-4 * max(1.0, expect_token)
    assert abs(by_record.item() - by_token.item()) > 1e-6
    with pytest.raises(ValueError, match="loss average"):
        loss_of(family, s.model, batch, labels, average="sequence")


def test_bad_loss_average_is_refused_before_training(tmp_path, data):
    with pytest.raises(ValueError, match="--loss-average"):
        run_stage("awaker-tiny", data, "3", tmp_path / "x", "cpu", TrainSettings(steps=1, loss_average="mean"),
                  progress=False)
    assert not (tmp_path / "x").exists()


def test_record_average_trains_and_is_recorded(tmp_path, data):
    s = TrainSettings(steps=2, batch_size=3, lr=5e-3, loss_average="record")
    out = run_stage("awaker-tiny", data, "3", tmp_path / "s3", "cpu", s, progress=False, log=lambda m: None)
    info = json.loads((out / "train.json").read_text())
    assert info["settings"]["loss_average"] == "record"


def test_training_forward_is_inference_prefill(data):
    """Without a KV cache, the training forward gives the logits and the routing of the session's prefill, and
    the router input excludes the answer: appending the answer changes no routing decision."""
    s = moevl.load("awaker-tiny", device="cpu", dtype="fp32")
    recs = read_records(data)[:3]
    batch, _ = make_batch("awaker", s.processor, recs)
    prompts = s.prepare([r.question for r in recs], [[r.image] for r in recs])
    with torch.no_grad():
        out = forward("awaker", s.model, batch)
        theirs = s.score(batch)
    ours = s.model.logits(out.hidden)
    m = batch.attention_mask.bool()
    assert (ours[m] - theirs[m]).abs().max() < 1e-4
    with torch.no_grad():
        s.score(prompts)  # the prompt alone, as a request at inference
    for i, r in enumerate(s.last_routing):
        assert torch.equal(out.experts[f"layer{i}.attn"], r.attn_expert)
        assert torch.equal(out.experts[f"layer{i}.mlp"], r.mlp_expert)


def test_stage1_is_one_peft_lora_written_merged_and_as_an_adapter(stages):
    s1 = stages["1"]
    conf = json.loads((s1 / PEFT_FOLDER / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["r"] == 4 and conf["lora_alpha"] == 8.0
    ad = load_file(str(s1 / PEFT_FOLDER / "adapter_model.safetensors"))
    key = "base_model.model.model.language_model.layers.0.mlp.down_proj.lora_{}.weight"
    a, b = ad[key.format("A")], ad[key.format("B")]
    assert b.abs().max() > 0  # trained from peft's zero init
    base, merged = weights(stages["base"]), weights(s1)
    w = "model.layers.0.mlp.down_proj.weight"
    torch.testing.assert_close(merged[w], base[w] + 2.0 * b @ a, atol=1e-6, rtol=0)
    # only the LoRA was trained: the vision tower and the embeddings are the base's
    for k in ("visual.blocks.0.attn.qkv.weight", "model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(merged[k], base[k])
    log = [json.loads(line) for line in (s1 / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(r["loss"] > 0 for r in log)
    assert (s1 / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_stage2_experts_start_from_the_stage1_lora(stages):
    s1 = stages["1"]
    model = load_torch(s1, CPU, torch.float32).model
    moe = experts_from_lora(model, s1 / PEFT_FOLDER, StageOptions(experts=3))
    ad = load_file(str(s1 / PEFT_FOLDER / "adapter_model.safetensors"))
    key = "base_model.model.model.language_model.layers.1.self_attn.o_proj.lora_{}.weight"
    o = moe.model.layers[1].self_attn.o_proj
    assert o.lora_A.shape[0] == 4  # 3 task experts + the global expert
    for x in range(4):
        assert torch.equal(o.lora_A[x], ad[key.format("A")]) and torch.equal(o.lora_B[x], ad[key.format("B")])
    # the base weight is back to the one stage 1 started from (the LoRA now lives in the experts)
    base = weights(stages["base"])["model.layers.1.self_attn.o_proj.weight"]
    torch.testing.assert_close(o.weight.detach(), base, atol=1e-6, rtol=0)


def test_stage2_trains_routers_and_stage3_freezes_them(stages):
    s1, s2, s3 = (weights(stages[k]) for k in ("1", "2", "3"))
    router = "model.layers.0.mlp.gate_proj.router.gate.weight"
    lora = "model.layers.0.mlp.gate_proj.lora_B"
    assert router not in s1
    assert torch.equal(s3[router], s2[router]) and not torch.equal(s3[lora], s2[lora])
    info2 = json.loads((stages["2"] / "train.json").read_text())
    assert any(".router." in n for n in info2["trained"])
    info3 = json.loads((stages["3"] / "train.json").read_text())
    assert not any(".router." in n for n in info3["trained"])
    assert torch.equal(s3["model.layers.0.mlp.gate_proj.weight"], s2["model.layers.0.mlp.gate_proj.weight"])


def test_stage3_output_answers_with_moevl_run(stages, data, capsys):
    from moevl.cli import main

    img = read_records(data)[0].image
    assert main(["run", "--model", str(stages["3"]), "--image", str(img), "--prompt", "How many shapes are there?",
                 "--max-new-tokens", "3", "--device", "cpu"]) == 0
    assert "routing:" in capsys.readouterr().err


def test_resume_after_an_interruption_gives_the_same_weights(tmp_path, data, monkeypatch):
    base = awaker_base(tmp_path / "base")
    settings = TrainSettings(steps=4, batch_size=2, lr=5e-3, checkpoint_every=2)
    straight = run_stage(base, data, "0", tmp_path / "straight", "cpu", settings, progress=False, log=print)

    calls = {"n": 0}
    real = loop.make_batch

    def dies_at_step_3(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(loop, "make_batch", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        run_stage(base, data, "0", tmp_path / "resumed", "cpu", settings, progress=False, log=print)
    assert not (tmp_path / "resumed").exists()  # nothing partial where the output goes
    monkeypatch.setattr(loop, "make_batch", real)
    resumed = run_stage(base, data, "0", tmp_path / "resumed", "cpu", settings, resume=True, progress=False,
                        log=print)
    a, b = weights(straight), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (resumed / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


def test_moe_stage_copies_the_ffn_into_every_expert(tmp_path):
    """With every expert a copy of the FFN, top-2 routing (weights renormalised to sum 1) computes the dense FFN."""
    dense = load_torch(moellava_dense(tmp_path / "dense"), CPU, torch.float32).model
    moe = moe_from_dense(dense, StageOptions(experts=4))
    assert moe.moe_layer_indices == [0, 2]
    x = torch.randn(2, 5, dense.cfg.hidden_size)
    for i in moe.moe_layer_indices:
        with torch.no_grad():
            ref, _ = dense.model.layers[i].ffn(x, "deterministic", None)
            ours, _ = moe.model.layers[i].ffn(x, "deterministic", None)
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_moe_stage_trains_routing_with_the_load_balancing_loss(tmp_path, data):
    out = run_stage(moellava_dense(tmp_path / "dense"), data, "moe", tmp_path / "moe", "cpu", FAST,
                    progress=False, log=print)
    rows = [json.loads(line) for line in (out / "loss.jsonl").read_text().splitlines()]
    assert all(r["aux_loss"] > 0 for r in rows)
    assert all(abs(r["loss"] - (r["lm_loss"] + 0.01 * r["aux_loss"])) < 1e-4 for r in rows)
    info = json.loads((out / "train.json").read_text())
    assert any(n.endswith(".mlp.router") for n in info["trained"])
    assert not any("self_attn" in n or "vision" in n for n in info["trained"])
    s = moevl.load(str(out), device="cpu")
    assert s.cfg.moe_layers == (0, 2) and s.cfg.top_k == 2


def test_load_balancing_loss_is_deepspeeds_formula():
    from moevl.kernels.moe import RoutingInfo

    # 4 tokens, 2 experts: mean probs (0.75, 0.25); top-1 fractions (1.0, 0.0) -> 2 * 0.75 = 1.5
    probs = torch.tensor([[0.75, 0.25]] * 4)
    info = RoutingInfo(torch.tensor([[0, 1]] * 4), torch.ones(4, 2) / 2, probs)
    assert load_balancing_loss(info, torch.ones(4, dtype=torch.bool)).item() == pytest.approx(1.5)
    # uniform routing gives 1 (the minimum)
    info = RoutingInfo(torch.tensor([[0, 1], [1, 0]] * 2), torch.ones(4, 2) / 2, torch.full((4, 2), 0.5))
    assert load_balancing_loss(info, torch.ones(4, dtype=torch.bool)).item() == pytest.approx(1.0)
    # padding tokens do not count
    real = torch.tensor([True, True, False, False])
    info = RoutingInfo(torch.tensor([[0, 1], [1, 0], [0, 1], [0, 1]]), torch.ones(4, 2) / 2,
                       torch.full((4, 2), 0.5))
    assert load_balancing_loss(info, real).item() == pytest.approx(1.0)


def test_stage_order_is_checked(tmp_path, data, stages):
    with pytest.raises(ValueError, match="stage 1 starts from a base"):
        run_stage(stages["2"], data, "1", tmp_path / "x", "cpu", FAST, progress=False)
    with pytest.raises(ValueError, match="peft_adapter"):
        run_stage(stages["base"], data, "2", tmp_path / "x", "cpu", FAST, progress=False)
    with pytest.raises(ValueError, match="MoE-tuning"):
        run_stage(stages["base"], data, "moe", tmp_path / "x", "cpu", FAST, progress=False)
    assert not (tmp_path / "x").exists()


def test_cli_bad_data_is_one_line_and_writes_nothing(tmp_path, capsys):
    from moevl.cli import main

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    code = main(["train", "--model", "awaker-tiny", "--data", str(bad), "--stage", "3", "--out",
                 str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "bad.json" in err
    assert not (tmp_path / "out").exists()

from tests.train_fixtures import _no_npu_accelerator_leak  # noqa: E402,F401  (autouse)
