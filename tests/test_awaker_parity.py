"""Our Awaker/Qwen2-VL against transformers' Qwen2VLForConditionalGeneration with the same weights.

Tolerance: fp32 logits within 2e-4 absolute (observed ~1e-6; the slack covers summation order).
"""
from __future__ import annotations

import pytest
import torch

from moevl.ascend.device import resolve_device
from moevl.model.awaker.checkpoint import load_awaker
from moevl.model.awaker.session import AwakerSession
from moevl.model.tiny import DEMO_IMAGE
from tests.awaker_fixtures import (SCALING, non_square_image, random_adapters, tiny_hf_model, write_hf_folder,
                                   write_release)

TOL = 2e-4
CPU = resolve_device("cpu")


@pytest.fixture(scope="module")
def hf():
    return tiny_hf_model()


@pytest.fixture(scope="module")
def base_session(hf, tmp_path_factory):
    folder = write_hf_folder(hf, tmp_path_factory.mktemp("qwen2vl"))
    model, proc = load_awaker(folder, CPU)
    return AwakerSession(model, proc, CPU)


def hf_inputs(batch, cfg):
    kw = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
              mm_token_type_ids=(batch.input_ids == cfg.image_token_id).int())
    if batch.patches is not None:
        kw.update(pixel_values=batch.patches, image_grid_thw=batch.grid_thw)
    return kw


def hf_logits(hf, batch, cfg):
    with torch.no_grad():
        return hf(**hf_inputs(batch, cfg)).logits


def hf_greedy(hf, batch, cfg, n):
    with torch.no_grad():
        out = hf.generate(**hf_inputs(batch, cfg), max_new_tokens=n, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
    return out[:, batch.input_ids.shape[1]:].tolist()


def assert_close_on_real_tokens(ours, theirs, mask):
    m = mask.bool()
    diff = (ours[m] - theirs[m]).abs().max().item()
    assert diff < TOL, f"max |logit diff| {diff} over real tokens"


@pytest.mark.parametrize("case", ["image", "text", "batch"])
def test_base_model_logits_match_transformers(hf, base_session, tmp_path, case):
    s = base_session
    wide = non_square_image(tmp_path)  # non-square grid (h != w)
    if case == "image":
        batch = s.prepare(["What is in the picture?"], [[wide]])
        assert batch.grid_thw[0, 1] != batch.grid_thw[0, 2]
    elif case == "text":
        batch = s.prepare(["Describe a cat."], [[]])
    else:  # different images and lengths, one text-only: left padding
        batch = s.prepare(["What is in the picture?", "How many shapes are there in this drawing here?", "Yes?"],
                          [[wide], [DEMO_IMAGE], []])
    ours = s.score(batch)
    theirs = hf_logits(hf, batch, s.cfg)
    assert_close_on_real_tokens(ours, theirs, batch.attention_mask)


def test_base_model_greedy_tokens_match_transformers(hf, base_session, tmp_path):
    s = base_session
    batch = s.prepare(["What is in the picture?", "Describe the image in detail."],
                      [[non_square_image(tmp_path)], [DEMO_IMAGE]])
    from moevl.model.generate import GenerationConfig, generate

    ours = generate(s, batch, GenerationConfig(max_new_tokens=6)).token_ids
    theirs = hf_greedy(hf, batch, s.cfg, 6)
    # our loop stops a request at EOS; compare up to our length
    for o, t in zip(ours, theirs):
        assert o == t[: len(o)] and len(o) > 0


# ------------------------------------------------------------------------------------ with adapters
def route_like_the_notes(e, a):
    """Router written from notes/awaker.md: RMSNorm(fp32, gamma) -> Linear+bias -> fp16 softmax -> top-1."""
    z = e.float() * torch.rsqrt(e.float().pow(2).mean(-1, keepdim=True) + 1e-6) * a["ln"]
    probs = torch.softmax((z @ a["w_gate"].t() + a["w_bias"]).half().float(), -1).half()
    p, k = probs.max(-1)
    return k, p.float() ** 2 * SCALING, (1 - p).float() * SCALING


def span_like_the_notes(ids, cfg):
    ids = [t for t in ids if t != cfg.pad_token_id]
    off = None
    starts = [i for i, t in enumerate(ids) if t == cfg.im_start_token_id]
    ends = [i for i, t in enumerate(ids) if t == cfg.im_end_token_id]
    start = ids.index(cfg.vision_start_token_id) if cfg.vision_start_token_id in ids else starts[1] + 2
    return start, ends[1]


def patch_hf_with_adapters(hf, adapters, batch, cfg):
    """Forward hooks adding the adapter terms to transformers' linears; routing from the prefill embeddings."""
    state = {}
    lm = hf.model.language_model
    handles = []

    def capture(module, args, kwargs):
        if "routing" in state:
            return
        emb = kwargs["inputs_embeds"]
        pooled = []
        for b in range(emb.shape[0]):
            ids = batch.input_ids[b].tolist()
            pad = sum(1 for t in ids if t == cfg.pad_token_id)
            s, e = span_like_the_notes(ids, cfg)
            pooled.append(emb[b, pad + s: pad + e].float().mean(0))
        state["e"] = torch.stack(pooled)
        state["routing"] = {}

    handles.append(lm.register_forward_pre_hook(capture, with_kwargs=True))
    modules = dict(hf.named_modules())
    for name, a in adapters.items():
        mod = modules[name]
        if isinstance(a["A"], dict):
            router_name = name if "w_gate" in a else name.replace("up_proj", "gate_proj").replace("down_proj",
                                                                                                  "gate_proj")

            def hook(m, inp, out, a=a, router_name=router_name):
                r = adapters[router_name]
                k, st, sg = route_like_the_notes(state["e"], r)
                x = inp[0].float()
                delta = torch.zeros_like(out, dtype=torch.float32)
                for b in range(x.shape[0]):
                    kb = str(int(k[b]))
                    delta[b] = st[b] * (x[b] @ a["A"][kb].t() @ a["B"][kb].t()) \
                        + sg[b] * (x[b] @ a["A"]["g"].t() @ a["B"]["g"].t())
                return out + delta
        else:
            def hook(m, inp, out, a=a):
                return out + SCALING * (inp[0] @ a["A"].t() @ a["B"].t())
        handles.append(mod.register_forward_hook(hook))
    return handles


@pytest.fixture(scope="module")
def adapted(hf, tmp_path_factory):
    base = write_hf_folder(hf, tmp_path_factory.mktemp("base"))
    adapters = random_adapters(hf)
    rel = write_release(hf, adapters, tmp_path_factory.mktemp("release"))
    model, proc = load_awaker(rel, CPU, base=base)
    return AwakerSession(model, proc, CPU), adapters


@pytest.mark.parametrize("case", ["image", "batch"])
def test_adapted_model_matches_patched_transformers(hf, adapted, tmp_path, case):
    s, adapters = adapted
    if case == "image":
        batch = s.prepare(["What is in the picture?"], [[non_square_image(tmp_path)]])
    else:
        batch = s.prepare(["What is in the picture?", "Is there a cat?", "How many shapes?"],
                          [[non_square_image(tmp_path)], [], [DEMO_IMAGE]])
    ours = s.score(batch)
    handles = patch_hf_with_adapters(hf, adapters, batch, s.cfg)
    try:
        theirs = hf_logits(hf, batch, s.cfg)
    finally:
        for h in handles:
            h.remove()
    base = hf_logits(hf, batch, s.cfg)
    m = batch.attention_mask.bool()
    assert (ours[m] - base[m]).abs().max() > 1e-2, "adapters had no effect: the test would prove nothing"
    assert_close_on_real_tokens(ours, theirs, batch.attention_mask)


def test_routing_differs_across_batch_and_is_reported(adapted, tmp_path):
    s, _ = adapted
    batch = s.prepare(["What is in the picture?", "Is there a cat?"], [[non_square_image(tmp_path)], []])
    s.score(batch)
    dec = s.routing_decisions()
    assert len(dec) == 2 * s.cfg.num_layers
    for d in dec:
        assert len(d.expert) == 2 and all(0 <= k < 4 for k in d.expert)
        assert all(0.25 <= p <= 1.0 for p in d.p)  # top-1 of 4 has p >= 1/4


def test_legacy_routing_reroutes_decode_steps_from_plain_token_embeddings(adapted, tmp_path):
    s, adapters = adapted
    legacy = AwakerSession(s.model, s.processor, CPU, routing="legacy")
    batch = legacy.prepare(["What is in the picture?"], [[non_square_image(tmp_path)]])
    legacy.prefill(batch, batch.input_ids.shape[1] + 4)
    decode_routing = legacy.decode_routing
    # the original's decode steps: embed_tokens(input_ids) with the plain <|image_pad|> embedding, no features
    ids = batch.input_ids[0].tolist()
    start, end = span_like_the_notes(ids, s.cfg)
    plain = s.model.model.embed_tokens(batch.input_ids)[0, start:end].float().mean(0, keepdim=True)
    prefill_routing = legacy.last_routing
    changed = False
    for i, (r_dec, r_pre) in enumerate(zip(decode_routing, prefill_routing)):
        name = f"model.language_model.layers.{i}.self_attn.o_proj"
        k, st, _ = route_like_the_notes(plain, adapters[name])
        assert int(r_dec.attn_expert[0]) == int(k[0])
        torch.testing.assert_close(r_dec.attn_p.float() ** 2 * SCALING, st)
        changed |= bool((r_dec.attn_p != r_pre.attn_p).any())
    assert changed, "image features should change the routing input"
    # default mode keeps the prefill routing for the whole request
    s.prefill(batch, batch.input_ids.shape[1] + 4)
    assert s.decode_routing is s.last_routing
