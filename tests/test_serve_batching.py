"""Continuous batching: a request's greedy tokens do not depend on what else is in the batch.

16 concurrent mixed requests (image / text, English / Chinese, different lengths and max_tokens) go through the
scheduler with fewer rows than requests (so requests queue, join the running batch at step boundaries and leave
it) and a small KV cache (so the cache is packed several times); each must give exactly the tokens it gives alone
through ``session.ask``. torch fp32, both families.
"""
import threading

import pytest
import torch

import moevl
from moevl.model.tiny import DEMO_IMAGE

pytest.importorskip("fastapi")

from moevl.serve.scheduler import Request, Scheduler  # noqa: E402

QUESTIONS = ["What is this?", "Describe the image in detail, every shape and every colour.", "这是什么？",
             "图片里有几个形状？请详细描述它们的颜色。", "Where is the triangle?", "hi", "请用一句话回答。",
             "Count the shapes, then name them one by one."]


def wide_image():
    from PIL import Image

    im = Image.new("RGB", (96, 40), (20, 200, 60))
    for x in range(30, 60):
        for y in range(5, 30):
            im.putpixel((x, y), (250, 10, 10))
    return im


def mixed_requests():
    out = []
    for i in range(16):
        q = QUESTIONS[i % len(QUESTIONS)]
        images = [[DEMO_IMAGE], [], [wide_image()], []][i % 4]
        out.append((q, images, 3 + (5 * i) % 11))
    return out


def run_concurrently(scheduler, session, requests):
    """Submit every request at once -> {index: (token ids, routing records)}, via the scheduler's events."""
    done, results, errors = threading.Event(), {}, []
    lock = threading.Lock()

    def events(i):
        def on(kind, data):
            with lock:
                if kind == "done":
                    results[i] = (data["token_ids"], data["routing"])
                elif kind == "error":
                    errors.append(data)
                if len(results) + len(errors) == len(requests):
                    done.set()
        return on

    for i, (q, imgs, n) in enumerate(requests):
        batch = session.prepare([q], [imgs])
        cfg, _ = session.generation_config(max_new_tokens=n, temperature=0.0)
        scheduler.submit(Request(batch, cfg, [], events(i), prompt_tokens=batch.input_ids.shape[1]))
    assert done.wait(300), "the scheduler did not finish the requests"
    assert not errors, errors
    return results


# the random-weights presets: their long answers make the KV cache pack (the trained defaults answer in few tokens)
@pytest.mark.parametrize("preset,kernels", [("awaker-tiny-random", None), ("moellava-tiny-random", None),
                                             ("awaker-tiny-random", "reference")])
def test_16_concurrent_mixed_requests_give_the_tokens_each_gives_alone(preset, kernels):
    """kernels "reference": Awaker plans that are not the fast kernels' stacked ones are re-planned per batch."""
    torch.manual_seed(0)
    session = moevl.load(preset, device="cpu", dtype="fp32")
    if kernels:
        from moevl.kernels import get_kernels

        session.model.set_kernels(get_kernels(kernels))
    requests = mixed_requests()
    alone = {}
    for i, (q, imgs, n) in enumerate(requests):
        tokens = session.ask(q, images=imgs, max_new_tokens=n, temperature=0.0).token_ids[0]
        alone[i] = (tokens, [d.to_dict() for d in session.routing_decisions()])
    # a cache just long enough for the longest request: the cursor reaches its end and the rows get packed
    max_len = max(session.prepare([q], [imgs]).input_ids.shape[1] + n for q, imgs, n in requests) + 4
    sched = Scheduler(session, max_batch=5, max_queue=16, max_len=max_len)
    packed = []
    original = sched.engine._compact
    sched.engine._compact = lambda: (packed.append(sched.engine.cur), original())[1]
    sched.start()
    try:
        together = run_concurrently(sched, session, requests)
    finally:
        sched.stop(10)
    assert {i: t for i, (t, _) in together.items()} == {i: t for i, (t, _) in alone.items()}  # tokens
    assert together == alone  # and each request's own routing (Awaker: its experts; MoE-LLaVA: its token counts)
    assert packed, "the test should pack the KV cache at least once (lower max_len)"
    assert sched.engine.n == 0  # every row was freed


def test_rows_are_reused_and_a_cancelled_request_frees_its_row():
    session = moevl.load("awaker-tiny", device="cpu", dtype="fp32")
    engine = session.batch_engine(2, max_len=96)
    a = session.prepare(["What is this?"], [[DEMO_IMAGE]])
    b = session.prepare(["hi"], None)
    ra, _ = engine.add(a)
    rb, _ = engine.add(b)
    assert (ra, rb) == (0, 1) and engine.free == 0
    engine.step(torch.tensor([1, 2]))
    assert engine.remove(0) == 1  # the last row moves into the hole
    assert engine.n == 1 and engine.free == 1
    assert engine.valid[1].sum() == 0 and engine.valid[0].sum() == b.input_ids.shape[1] + 1


def test_moellava_deepspeed_routing_is_refused_for_batching():
    session = moevl.load("moellava-tiny", device="cpu", moe_routing="deepspeed")
    with pytest.raises(NotImplementedError, match="deterministic"):
        session.batch_engine(2, max_len=64)


def test_legacy_routing_keeps_each_requests_decode_routing_in_the_batch():
    """--routing legacy: the prompt is routed with image features, the decode steps with plain embeddings; both
    per request, in the batch as alone."""
    session = moevl.load("awaker-tiny", device="cpu", dtype="fp32", routing="legacy")
    requests = mixed_requests()[:6]
    alone = {}
    for i, (q, imgs, n) in enumerate(requests):
        tokens = session.ask(q, images=imgs, max_new_tokens=n, temperature=0.0).token_ids[0]
        alone[i] = (tokens, [d.to_dict() for d in session.routing_decisions()])
    assert any(d["steps"] == "decode" for d in alone[0][1])
    sched = Scheduler(session, max_batch=3, max_queue=8, max_len=256)
    sched.start()
    try:
        assert run_concurrently(sched, session, requests) == alone
    finally:
        sched.stop(10)
