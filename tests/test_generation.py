"""The family-agnostic generation loop: sampling, stopping, streaming, limits."""
from __future__ import annotations

import pytest
import torch

from moevl.ascend.device import resolve_device
from moevl.model.generate import GenerationConfig, generate, sample
from moevl.model.awaker.tiny import TINY_TOKENIZER


class ScriptedSession:
    """A session whose next-token logits follow a script per request (to test the loop, not a model)."""

    def __init__(self, scripts, vocab=512, eos=2, pad=0, max_context=64):
        from transformers import AutoTokenizer

        self.scripts = scripts
        self.vocab = vocab
        self.tokenizer = AutoTokenizer.from_pretrained(str(TINY_TOKENIZER))
        self.eos_token_ids = {eos}
        self.pad_token_id = pad
        self.device = resolve_device("cpu")
        self.max_context = max_context
        self.step = 0
        self.fed = []

    def _logits(self):
        out = torch.full((len(self.scripts), self.vocab), -10.0)
        for i, s in enumerate(self.scripts):
            out[i, s[min(self.step, len(s) - 1)]] = 10.0
        return out

    def prefill(self, batch, max_len):
        self.step = 0
        return self._logits()

    def decode(self, tokens):
        self.fed.append(tokens.tolist())
        self.step += 1
        return self._logits()


class Batch:
    def __init__(self, b, length=5):
        self.input_ids = torch.ones(b, length, dtype=torch.long)
        self.attention_mask = torch.ones(b, length, dtype=torch.long)
        self.batch_size = b


def test_stops_each_request_at_eos_and_pads_finished_ones():
    s = ScriptedSession([[40, 41, 2, 99], [50, 51, 52, 53, 54, 2]])
    res = generate(s, Batch(2), GenerationConfig(max_new_tokens=10))
    assert res.token_ids == [[40, 41], [50, 51, 52, 53, 54]]
    assert res.finish_reasons == ["eos", "eos"]
    # after request 0 finished, it is fed the pad token, not its script
    assert s.fed[2][0] == 2 and all(step[0] == 0 for step in s.fed[3:])


def test_max_new_tokens_limits_length():
    s = ScriptedSession([[40, 41, 42, 43, 44]])
    res = generate(s, Batch(1), GenerationConfig(max_new_tokens=3))
    assert res.token_ids == [[40, 41, 42]] and res.finish_reasons == ["length"]


def test_streamed_text_equals_final_text():
    s = ScriptedSession([[100, 101, 102, 103, 2]])
    pieces = []
    res = generate(s, Batch(1), GenerationConfig(max_new_tokens=8), on_text=lambda i, t: pieces.append(t))
    assert "".join(pieces) == res.texts[0] and res.texts[0]


def test_context_limit_is_enforced_with_a_clear_error():
    s = ScriptedSession([[40]], max_context=8)
    with pytest.raises(ValueError, match="exceeds the context"):
        generate(s, Batch(1, length=6), GenerationConfig(max_new_tokens=4))


@pytest.mark.parametrize("bad", [dict(max_new_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_k=-1)])
def test_invalid_generation_options(bad):
    with pytest.raises(ValueError):
        GenerationConfig(**bad).validate()


def test_top_k_1_and_tiny_top_p_are_greedy():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    assert torch.equal(sample(logits, GenerationConfig(temperature=1.0, top_k=1), g), logits.argmax(-1))
    assert torch.equal(sample(logits, GenerationConfig(temperature=1.0, top_p=1e-6), g), logits.argmax(-1))


def test_sampling_is_reproducible_with_a_seed_and_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1, 0.0]]))
    cfg = GenerationConfig(temperature=1.0)
    a = [int(sample(logits, cfg, torch.Generator().manual_seed(s))) for s in range(5)]
    b = [int(sample(logits, cfg, torch.Generator().manual_seed(s))) for s in range(5)]
    assert a == b
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample(logits.expand(1000, -1), cfg, g) for _ in range(4)]).flatten()
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    assert abs(freq[0] - 0.7) < 0.03 and abs(freq[1] - 0.2) < 0.03 and freq[3] == 0


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = sample(logits.expand(2000, -1), GenerationConfig(temperature=1.0, top_p=0.75), g)
    assert set(draws.tolist()) == {0, 1}  # 0.5 < 0.75 <= 0.8: tokens 0 and 1 only
