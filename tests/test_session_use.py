"""Using a session: concurrent callers, ask()'s arguments, options that do not apply, and garbage weights."""
import threading

import pytest
import torch

import moevl
from moevl.model.tiny import DEMO_IMAGE

QUESTIONS = ["What is this?", "Describe the image in detail.", "How many shapes are there?",
             "Where is the triangle?"]


def _run_threads(session, requests, **gen):
    """Every request from its own thread, all started together -> {index: token ids}."""
    out, errors = {}, []
    start = threading.Barrier(len(requests))

    def work(i, q, imgs):
        try:
            start.wait()
            out[i] = session.ask(q, images=imgs, **gen).token_ids
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i, q, imgs)) for i, (q, imgs) in enumerate(requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return out


def _requests():
    # different batch shapes and lengths: one request with an image, one without, and a batch of two
    return [(QUESTIONS[0], [DEMO_IMAGE]), (QUESTIONS[1], None), (QUESTIONS[2:4], [[DEMO_IMAGE], []]),
            (QUESTIONS[3], [DEMO_IMAGE])] * 2


def test_concurrent_asks_on_one_torch_session_each_get_their_own_answer():
    s = moevl.load("awaker-tiny", device="cpu")
    alone = {i: s.ask(q, images=imgs, max_new_tokens=6).token_ids for i, (q, imgs) in enumerate(_requests())}
    assert _run_threads(s, _requests(), max_new_tokens=6) == alone


def test_concurrent_asks_on_one_ort_session_each_get_their_own_answer(tmp_path):
    from moevl.export.onnx import export_onnx

    folder = export_onnx("moellava-tiny", tmp_path / "onnx", validate=False, log=lambda *a: None)
    s = moevl.load(folder, backend="ort")
    alone = {i: s.ask(q, images=imgs, max_new_tokens=5).token_ids for i, (q, imgs) in enumerate(_requests())}
    assert _run_threads(s, _requests(), max_new_tokens=5) == alone


@pytest.fixture(scope="module")
def tiny():
    return moevl.load("awaker-tiny", device="cpu")


@pytest.mark.parametrize("question,images,names", [
    (["a", "b"], [[DEMO_IMAGE]], "images"),          # zip() used to drop the second question
    ([], None, "question"),
    (None, None, "question"),
    (b"bytes", None, "question"),
    ("a", str(DEMO_IMAGE), "images"),                 # a string used to be iterated letter by letter
    ("a", [b"png bytes"], "images"),
    (["a", "b"], [DEMO_IMAGE, DEMO_IMAGE], "images"),  # flat list for two questions
])
def test_ask_refuses_malformed_arguments_by_name(tiny, question, images, names):
    with pytest.raises(ValueError, match=names):
        tiny.ask(question, images=images, max_new_tokens=2)


def test_ask_keeps_every_question(tiny):
    res = tiny.ask(["a", "b"], images=[[DEMO_IMAGE], []], max_new_tokens=2)
    assert len(res.texts) == 2


@pytest.mark.parametrize("gen,option", [
    ({"temperature": float("nan")}, "--temperature"), ({"temperature": float("inf")}, "--temperature"),
    ({"top_p": float("nan")}, "--top-p"), ({"seed": 2 ** 64}, "--seed"), ({"seed": -1}, "--seed"),
    ({"max_new_tokens": 0}, "--max-new-tokens"), ({"top_k": -3}, "--top-k"),
])
def test_bad_sampling_values_name_the_option(tiny, gen, option):
    with pytest.raises(ValueError, match=option):
        tiny.ask("a", max_new_tokens=gen.pop("max_new_tokens", 2), **gen)


def test_options_that_do_not_apply_are_refused(tmp_path):
    with pytest.raises(ValueError, match="--base applies to an Awaker2.5-VL release"):
        moevl.load("awaker-tiny", device="cpu", base=str(tmp_path))
    with pytest.raises(ValueError, match="--max-context"):
        moevl.load("awaker-tiny", device="cpu", max_context=0)
    with pytest.raises(ValueError, match="provider"):  # an ORT option on the torch backend
        moevl.load("awaker-tiny", device="cpu", provider="cpu")
    with pytest.raises(ValueError, match="--provider"):
        moevl.load(tmp_path, backend="ort", device="npu:0")


def test_nan_weights_fail_with_a_clear_error_instead_of_an_empty_answer():
    from moevl.model.generate import NonFiniteLogitsError

    s = moevl.load("awaker-tiny", device="cpu")
    with torch.no_grad():
        s.model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteLogitsError, match="non-finite"):
        s.ask("What is this?", images=[DEMO_IMAGE], max_new_tokens=3)


def test_kv_cache_out_of_memory_says_how_much_and_what_to_lower(monkeypatch):
    from moevl.model import layers

    s = moevl.load("awaker-tiny", device="cpu")

    def no_memory(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory")

    monkeypatch.setattr(layers.KVCache, "__init__", no_memory)
    with pytest.raises(layers.KVCacheMemoryError, match="GiB.*--max-new-tokens"):
        s.ask("What is this?", max_new_tokens=3)


def test_awaker_release_exports_with_base(tmp_path):
    from moevl.export.graph import read_contract
    from moevl.export.onnx import export_onnx
    from tests.awaker_fixtures import random_adapters, tiny_hf_model, write_hf_folder, write_release

    hf = tiny_hf_model(seed=7)
    rel = write_release(hf, random_adapters(hf, seed=8), tmp_path / "rel")
    base = write_hf_folder(hf, tmp_path / "base")
    out = export_onnx(rel, tmp_path / "onnx", base=str(base), validate_tokens=2, log=lambda *a: None)
    assert read_contract(out)["validation"]["greedy"]["equal"]
