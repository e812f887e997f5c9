"""Plain PyTorch reference implementations: the oracles for every fast variant."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # As Qwen2/LLaMA: normalise in fp32, cast back, then scale.
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def layer_norm(x, weight, bias, eps):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(q, k, cos, sin):
    """q, k: [B, H, T, D]; cos, sin: [B, T, D] (already laid out for rotate_half)."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def mrope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, mrope_section, dtype):
    """Qwen2-VL multimodal rotary tables.

    positions [3, B, T] (temporal, height, width); inv_freq [D/2]. The D/2 frequencies are split into
    mrope_section chunks; chunk i takes its angle from axis i % 3. Returns cos, sin [B, T, D].
    """
    freqs = positions[..., None].float() * inv_freq.float()  # [3, B, T, D/2]
    chunks = freqs.split(list(mrope_section), dim=-1)
    freqs = torch.cat([c[i % 3] for i, c in enumerate(chunks)], dim=-1)  # [B, T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def swiglu(gate, up):
    return F.silu(gate) * up


def attention(q, k, v, keep_mask, scale):
    """Softmax attention with grouped KV heads.

    q [B, Hq, T, D]; k, v [B, Hkv, S, D]; keep_mask [B, 1, T, S] bool, True = may attend (SDPA convention).
    """
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~keep_mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs)  # rows that see nothing (padding queries) give zeros, not NaN
    return torch.matmul(probs, v.float()).to(q.dtype)


def patch_embed(patches: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Qwen2-VL's Conv3d patch embedding (kernel == stride, no bias), as the original computes it."""
    e, c, t, p, _ = weight.shape
    x = patches.view(-1, c, t, p, p).to(weight.dtype)
    return F.conv3d(x, weight, stride=(t, p, p)).view(-1, e)


class LoraPlan(NamedTuple):
    """Per-request selection of LoRA experts for one linear.

    lora_A [X, r, in], lora_B [X, out, r] hold all experts (the global expert last); expert [B] is the task
    expert chosen for each request; scales [B, 2] are (task scale, global scale) with alpha/r folded in.
    Plain LoRA is X = 1 with expert = 0 and scales (s, 0).
    """

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    expert: torch.Tensor
    scales: torch.Tensor


def lora_moe_prepare(lora_A, lora_B, expert, scales):
    return LoraPlan(lora_A, lora_B, expert, scales)


def lora_moe_linear(x, weight, bias, plan):
    """y = x W^T + b + sum over the request's experts of scale_e * (x A_e^T) B_e^T.

    The obvious loop over requests (the original's semantics); the expert branch is accumulated in fp32 and
    added to the base output, as the original does.
    """
    # a weight module (quantised/packed, kernels/quant.py) computes its own x W^T + b
    y = F.linear(x, weight, bias) if isinstance(weight, torch.Tensor) else weight(x, bias)
    if plan is None:
        return y
    A, B, expert, scales = plan
    g = A.shape[0] - 1
    rows = []
    for b in range(x.shape[0]):
        xb = x[b].float()
        k = int(expert[b])
        delta = scales[b, 0].float() * ((xb @ A[k].float().t()) @ B[k].float().t())
        if g != k:
            delta = delta + scales[b, 1].float() * ((xb @ A[g].float().t()) @ B[g].float().t())
        rows.append((y[b].float() + delta).to(y.dtype))
    return torch.stack(rows)


def linear_group(x, linears):
    """Several linears of the same input (q/k/v; gate/up): each module's own forward. A backend that packed such a
    group as one weight (kernels/cpu.py, FBGEMM int8) computes the group in one product instead."""
    return tuple(m(x) for m in linears)


def lora_moe_group(x, linears, plans):
    """Several adapted linears of the same input (Awaker's gate/up), each with its own plan (or None)."""
    return tuple(m(x, p) for m, p in zip(linears, plans))


def round_to_fp16(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> the nearest fp16 value, kept in fp32 (Awaker's router computes in float16)."""
    return x.half().float()


def insert_image_features(embeds: torch.Tensor, image_features: torch.Tensor, image_mask: torch.Tensor):
    """embeds [B, T, H] with the image positions (image_mask [B, T], row-major over the batch) replaced by the rows
    of image_features [M, H] in order."""
    return embeds.masked_scatter(image_mask[..., None], image_features.to(embeds.dtype))
