"""Pre-processing: the routers' prompt span and M-RoPE positions (against transformers' get_rope_index)."""
from __future__ import annotations

import random

import pytest
import torch

from moevl.model.awaker.config import awaker_tiny
from moevl.model.awaker.inputs import InputError, mrope_positions, pooled_prompt, prompt_span, vision_inputs

CFG = awaker_tiny()  # ids: im_start 1, im_end 2, vision_start 3, vision_end 4, image_pad 5
S, E, VS, VE, IMG = 1, 2, 3, 4, 5


def chat(user, system=(20, 21), answer=None, more_turns=()):
    ids = [S, 30, 10, *system, E, 10, S, 31, 10, *user, E, 10]
    if answer is not None:
        ids += [S, 32, 10, *answer, E, 10]
    for turn in more_turns:
        ids += [S, 31, 10, *turn, E, 10]
    return ids + [S, 32, 10]


def test_span_with_image_starts_at_vision_start_and_ends_at_first_user_turn_end():
    ids = chat([VS, IMG, IMG, VE, 40, 41])
    start, end = prompt_span(ids, CFG)
    assert ids[start] == VS and ids[end] == E
    assert ids[start:end] == [VS, IMG, IMG, VE, 40, 41]


def test_text_only_span_skips_im_start_and_role():
    ids = chat([40, 41, 42])
    start, end = prompt_span(ids, CFG)
    # 2nd <|im_start|> + 2: the rule of the original keeps the newline after the role
    assert ids[start - 2:start] == [S, 31] and ids[start:end] == [10, 40, 41, 42]


def test_multi_turn_span_is_the_first_user_turn_only():
    ids = chat([VS, IMG, VE, 40], answer=[50, 51], more_turns=[[60, 61]])
    start, end = prompt_span(ids, CFG)
    assert ids[start:end] == [VS, IMG, VE, 40]


def test_span_needs_a_chat():
    with pytest.raises(InputError, match="chat"):
        prompt_span([40, 41, 42], CFG)


def test_span_property_random_chats():
    rng = random.Random(0)
    for _ in range(200):
        user = [rng.randrange(20, 100) for _ in range(rng.randrange(1, 8))]
        if rng.random() < 0.5:
            k = rng.randrange(len(user) + 1)
            user = user[:k] + [VS] + [IMG] * rng.randrange(1, 5) + [VE] + user[k:]
        system = [rng.randrange(20, 100) for _ in range(rng.randrange(0, 4))]
        ids = chat(user, system=system)
        start, end = prompt_span(ids, CFG)
        if VS in user:
            assert ids[start:end] == user[user.index(VS):]
        else:
            assert ids[start:end] == [10] + user


def test_pooled_prompt_is_the_mean_over_each_span():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(3, 10, 4, generator=g)
    span = torch.tensor([[0, 10], [2, 5], [9, 10]])
    out = pooled_prompt(emb, span)
    for b, (s, e) in enumerate(span.tolist()):
        torch.testing.assert_close(out[b], emb[b, s:e].mean(0))


@pytest.mark.parametrize("grids", [[(1, 4, 6)], [(1, 6, 4), (1, 2, 2)], []])
def test_mrope_positions_match_transformers_get_rope_index(grids):
    from transformers import Qwen2VLConfig, Qwen2VLModel

    ids = [S, 30, 10, 20, E, 10, S, 31, 10]
    for t, h, w in grids:
        ids += [VS] + [IMG] * (t * h * w // 4) + [VE, 40]
    ids += [41, E, 10, S, 32, 10]
    ours, nxt = mrope_positions(ids, grids, CFG)
    if not grids:
        assert torch.equal(ours, torch.arange(len(ids)).expand(3, -1)) and nxt == len(ids)
        return
    hf_cfg = Qwen2VLConfig(image_token_id=IMG, vision_start_token_id=VS,
                           vision_config=dict(spatial_merge_size=2, depth=1, embed_dim=8, num_heads=1, hidden_size=8),
                           text_config=dict(hidden_size=8, num_attention_heads=1, num_hidden_layers=1,
                                            intermediate_size=8, vocab_size=64, num_key_value_heads=1))
    ids_t = torch.tensor([ids])
    theirs, delta = Qwen2VLModel.get_rope_index(
        type("M", (), {"config": hf_cfg, "get_vision_position_ids": Qwen2VLModel.get_vision_position_ids})(),
        ids_t, (ids_t == IMG).int(), image_grid_thw=torch.tensor(grids))
    assert torch.equal(ours, theirs[:, 0])
    assert nxt == len(ids) + int(delta)


def test_image_placeholder_count_must_match():
    with pytest.raises(InputError, match="image"):
        mrope_positions([S, IMG, IMG, IMG, IMG], [(1, 4, 8)], CFG)  # needs 8 image-pad tokens


def test_vision_mask_is_block_diagonal_per_image_and_positions_follow_merge_order():
    pos, keep = vision_inputs(torch.tensor([[1, 2, 4], [1, 2, 2]]), 2)
    assert pos.shape == (12, 2) and keep.shape == (12, 12)
    assert keep[:8, :8].all() and keep[8:, 8:].all() and not keep[:8, 8:].any()
    # merge order: the first 2x2 block of the first image comes first
    assert pos[:4].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]


def test_a_tokenizer_config_without_unk_token_is_still_a_qwen2_vl_tokenizer(tmp_path):
    """Without unk_token, transformers defaults it to <|endoftext|>; that token is Qwen2-VL's pad, not missing."""
    import json
    import shutil

    from moevl.model.awaker.inputs import AwakerProcessor
    from moevl.model.awaker.tiny import TINY_TOKENIZER

    folder = tmp_path / "tok"
    shutil.copytree(TINY_TOKENIZER, folder)
    conf = json.loads((folder / "tokenizer_config.json").read_text())
    conf["unk_token"] = "<|endoftext|>"
    (folder / "tokenizer_config.json").write_text(json.dumps(conf))
    proc = AwakerProcessor.from_folder(folder, awaker_tiny())
    assert proc.cfg.pad_token_id == proc.tokenizer.convert_tokens_to_ids("<|endoftext|>")
