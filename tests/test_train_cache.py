"""TowerCache: the training loop's per-record memo of a frozen vision tower's output. It must give the batches and
the loss that ``make_batch`` + ``loss_of`` give (both families), hold no more than its byte limit, be used only when
nothing in the tower trains, and leave training's result as it is without the cache."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import moevl
from moevl.train import examples, loop
from moevl.train.examples import TowerCache, loss_of, make_batch, read_records
from moevl.train.loop import TrainSettings
from moevl.train.recipe import StageOptions, run_stage
from tests.train_fixtures import awaker_base, moellava_dense, shapes


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return shapes(tmp_path_factory.mktemp("shapes") / "data", n=10, seed=5)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {"awaker": awaker_base(root / "awaker"), "moe-llava": moellava_dense(root / "moellava")}


@pytest.mark.parametrize("family", ["awaker", "moe-llava"])
def test_cached_batches_and_loss_equal_make_batch(family, bases, data):
    s = moevl.load(str(bases[family]), device="cpu", dtype="fp32")
    recs = read_records(data)
    keys = [3, 0, 7, 3]  # a record twice in one batch
    chosen = [recs[k] for k in keys]
    ref_batch, ref_labels = make_batch(s.family, s.processor, chosen)
    with torch.no_grad():
        ref_loss, _ = loss_of(s.family, s.model, ref_batch, ref_labels)
    cache = TowerCache(s.family, s.model, s.processor, max_bytes=2 ** 30)
    for attempt in range(2):  # the first computes and stores, the second reads the cache
        batch, labels, tower = cache.batch(chosen, keys)
        assert torch.equal(labels, ref_labels)
        for name in ("input_ids", "attention_mask", "positions", "image_mask"):
            assert torch.equal(getattr(batch, name), getattr(ref_batch, name)), name
        if family == "awaker":
            assert torch.equal(batch.span, ref_batch.span) and torch.equal(batch.grid_thw, ref_batch.grid_thw)
            assert batch.patches is None and tower.shape[0] == ref_batch.patches.shape[0]
        else:
            assert batch.pixels is None and tower.shape[0] == len(keys)
        with torch.no_grad():
            loss, _ = loss_of(s.family, s.model, batch, labels, tower)
        assert abs(loss.item() - ref_loss.item()) < 1e-5 * max(1.0, ref_loss.item())
    assert sorted(cache.entries) == [0, 3, 7]
    # features independent of the tower's own forward: the merger / projector over them gives encode_images'
    with torch.no_grad():
        if family == "awaker":
            ref_feats = examples.encode_images_apart(s.model, ref_batch)
            feats = s.model.visual.merge(tower)
        else:
            ref_feats = s.model.encode_images(ref_batch.pixels)
            feats = s.model.mm_projector(tower)
    assert (feats - ref_feats).abs().max() < 1e-5


def test_cache_keeps_to_its_byte_limit(bases, data):
    s = moevl.load(str(bases["awaker"]), device="cpu", dtype="fp32")
    recs = read_records(data)
    one = TowerCache(s.family, s.model, s.processor, max_bytes=2 ** 30)
    one.batch(recs[:1], [0])
    size = one.bytes
    assert size > 0
    cache = TowerCache(s.family, s.model, s.processor, max_bytes=size * 2)  # room for about two records
    ref = make_batch(s.family, s.processor, recs[:6])
    batch, labels, _ = cache.batch(recs[:6], list(range(6)))
    assert cache.bytes <= size * 2 and 1 <= len(cache.entries) < 6
    assert torch.equal(batch.input_ids, ref[0].input_ids) and torch.equal(labels, ref[1])
    none = TowerCache(s.family, s.model, s.processor, max_bytes=0)
    none.batch(recs[:3], [0, 1, 2])
    assert none.entries == {} and none.bytes == 0


def _cache_calls(monkeypatch) -> dict:
    calls = {"n": 0}
    real = TowerCache.batch

    def counted(self, *a, **k):
        calls["n"] += 1
        return real(self, *a, **k)

    monkeypatch.setattr(TowerCache, "batch", counted)
    return calls


def test_cache_only_when_the_tower_is_frozen(tmp_path, bases, data, monkeypatch):
    calls = _cache_calls(monkeypatch)
    settings = TrainSettings(steps=2, batch_size=2, lr=5e-3)
    run_stage(bases["awaker"], data, "0", tmp_path / "all", "cpu", settings, progress=False, log=print)
    assert calls["n"] == 0  # stage 0 trains the tower: every step encodes the images afresh
    run_stage(bases["awaker"], data, "0", tmp_path / "frozen", "cpu", settings, StageOptions(freeze_vision=True),
              progress=False, log=print)
    assert calls["n"] == 2
    off = TrainSettings(steps=2, batch_size=2, lr=5e-3, tower_cache_mb=0)
    run_stage(bases["awaker"], data, "0", tmp_path / "off", "cpu", off, StageOptions(freeze_vision=True),
              progress=False, log=print)
    assert calls["n"] == 2


@pytest.mark.parametrize("family,stage,opts", [("awaker", "0", StageOptions(freeze_vision=True)),
                                               ("moe-llava", "moe", StageOptions())])
def test_training_with_and_without_the_cache_ends_at_the_same_weights(tmp_path, bases, data, family, stage, opts,
                                                                      monkeypatch):
    # 6 steps of 4 over 10 records: later epochs read the cache
    kw = dict(steps=6, batch_size=4, lr=5e-3, seed=1)
    calls = _cache_calls(monkeypatch)
    made = {"n": 0}
    real = loop.make_batch

    def counted(*a, **k):
        made["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(loop, "make_batch", counted)
    cached = run_stage(bases[family], data, stage, tmp_path / "cached", "cpu", TrainSettings(**kw), opts,
                       progress=False, log=print)
    assert calls["n"] == 6 and made["n"] == 0
    plain = run_stage(bases[family], data, stage, tmp_path / "plain", "cpu", TrainSettings(**kw, tower_cache_mb=0),
                      opts, progress=False, log=print)
    assert made["n"] == 6
    a = load_file(str(cached / "model.safetensors"))
    b = load_file(str(plain / "model.safetensors"))
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst < 1e-4
    # and training moved the weights (the comparison is not between two untouched copies)
    base = load_file(str(bases[family] / "model.safetensors"))
    moved = max((a[k].float() - base[k].float()).abs().max().item() for k in base if k in a and
                a[k].shape == base[k].shape)
    assert moved > 1e-3


def test_cli_tower_cache_flag(tmp_path, data, capsys, monkeypatch):
    from moevl.cli import main

    code = main(["train", "--model", "awaker-tiny", "--data", str(data), "--stage", "3", "--out",
                 str(tmp_path / "bad"), "--quiet", "--tower-cache-mb", "-1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--tower-cache-mb" in err
    assert not (tmp_path / "bad").exists()
    calls = _cache_calls(monkeypatch)
    code = main(["train", "--model", "awaker-tiny", "--data", str(data), "--stage", "3", "--out",
                 str(tmp_path / "off"), "--quiet", "--steps", "1", "--batch-size", "2", "--tower-cache-mb", "0"])
    assert code == 0 and calls["n"] == 0
    code = main(["train", "--model", "awaker-tiny", "--data", str(data), "--stage", "3", "--out",
                 str(tmp_path / "on"), "--quiet", "--steps", "1", "--batch-size", "2"])
    assert code == 0 and calls["n"] == 1


def test_train_step_benchmark_writes_its_report(tmp_path):
    import json

    from moevl.benchmarks import train_step

    assert train_step.main(["--batch", "2", "--repeats", "1", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "train-step-cpu.json").read_text())
    assert [r["preset"] for r in report["rows"]] == list(train_step.PRESETS)
    for r in report["rows"]:
        assert r["seconds"]["make_batch"] > 0 and r["seconds"]["cache"] > 0 and r["cache_bytes_per_record"] > 0
    assert "flags" in (tmp_path / "train-step-cpu.md").read_text()


from tests.train_fixtures import _no_npu_accelerator_leak  # noqa: E402,F401  (autouse)
