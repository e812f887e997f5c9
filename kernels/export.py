"""The "export" kernel backend: what export/ traces to ONNX (and ATC takes): static shapes, no data-dependent
indexing (NonZero/ScatterND), no Python loop over requests, and no Cast pair that ONNX Runtime would fold away.

Each op has its oracle in :mod:`moevl.kernels.reference` (or :mod:`moevl.kernels.moe`) and a test in
tests/test_export_kernels.py / tests/test_kernels.py that compares the two.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
import torch.nn.functional as F

from moevl.kernels import moe, reference
from moevl.kernels.cpu import patch_embed
from moevl.kernels.dispatch import _BACKENDS, register_backend

class DenseLoraPlan(NamedTuple):
    """All experts of one linear stacked into one rank X*r LoRA, with each request's gate weight per rank block.

    lora_A [X*r, in]; lora_Bt [X*r, out]; gate [B, X*r]: the task scale on the request's expert block, the global
    scale on the global block (0 if the task expert *is* the global one, counted once as in the reference), 0 on
    the others. Every request runs every expert's rank block (X/2 times the LoRA FLOPs of the gathered plan), in
    exchange for a graph with only MatMul/Mul (what ONNX/ATC take well; see shared/notes/onnx.md).
    """

    lora_A: torch.Tensor
    lora_Bt: torch.Tensor
    gate: torch.Tensor


def lora_moe_prepare_dense(lora_A, lora_B, expert, scales):
    """lora_A [X, r, in], lora_B [X, out, r], expert [B] long, scales [B, 2] -> DenseLoraPlan (traceable)."""
    x_experts, r, d_in = lora_A.shape
    g = x_experts - 1
    ids = torch.arange(x_experts, device=expert.device)
    is_task = (ids[None, :] == expert[:, None]).to(scales.dtype)                       # [B, X]
    is_glob = ((ids[None, :] == g) & (expert[:, None] != g)).to(scales.dtype)           # [B, X]
    if x_experts == 1:  # plain LoRA: the single expert once, with the task scale
        is_glob = torch.zeros_like(is_glob)
    w = is_task * scales[:, :1] + is_glob * scales[:, 1:]                               # [B, X]
    gate = w[:, :, None].expand(-1, -1, r).reshape(expert.shape[0], x_experts * r)      # [B, X*r]
    A = lora_A.reshape(x_experts * r, d_in)
    Bt = lora_B.permute(0, 2, 1).reshape(x_experts * r, -1)
    return DenseLoraPlan(A, Bt, gate)


def lora_moe_linear_dense(x, weight, bias, plan):
    """x [B, T, in] -> [B, T, out]: base linear + ((x A^T) * gate) Bt, the branch in fp32 as the reference."""
    y = F.linear(x, weight, bias)
    if plan is None:
        return y
    if isinstance(plan, reference.LoraPlan):
        plan = lora_moe_prepare_dense(*plan)
    h = torch.matmul(x.float(), plan.lora_A.float().t()) * plan.gate.float()[:, None, :]  # [B, T, X*r]
    return (y.float() + torch.matmul(h, plan.lora_Bt.float())).to(y.dtype)


def attention_export(q, k, v, keep_mask, scale):
    """The reference's math with GQA as Expand/Reshape (no repeat_interleave) and masking by Where; fully masked
    rows give zeros. q [B, Hq, T, D]; k, v [B, Hkv, S, D]; keep_mask [B, 1, T, S] bool."""
    b, hkv, s, d = k.shape
    rep = q.shape[1] // hkv
    if rep > 1:
        k = k[:, :, None].expand(b, hkv, rep, s, d).reshape(b, hkv * rep, s, d)
        v = v[:, :, None].expand(b, hkv, rep, s, d).reshape(b, hkv * rep, s, d)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    scores = torch.where(keep_mask, scores, torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1) * keep_mask.any(-1, keepdim=True).float()
    return torch.matmul(probs, v.float()).to(q.dtype)


def layer_norm_export(x, weight, bias, eps):
    # the normalised width as a Python int: a traced size here is a non-constant list the ONNX exporter refuses
    return F.layer_norm(x, (int(weight.shape[0]),), weight, bias, eps)



def round_to_fp16(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> the nearest fp16 value, kept in fp32, by Veltkamp splitting (x * (2^13 + 1) keeps 24 - 13 = 11
    significant bits) instead of Cast(fp16) -> Cast(fp32): ONNX Runtime's CPU provider removes such a Cast pair as
    redundant (measured with ORT 1.32, also with graph optimisations off), which silently skips the rounding the
    released router does. Exact for the normal fp16 range (|x| >= 2^-14); router logits and probabilities there."""
    c = x * 8193.0
    return c - (c - x)


def insert_image_features(embeds, image_features, image_mask):
    """reference.insert_image_features without masked_scatter (NonZero/ScatterND in ONNX): the k-th image
    position (row-major over the batch) takes row k of image_features, found by a CumSum over the mask and a Gather
    from the features with a zero row prepended (so that a text-only call may pass 0 feature rows)."""
    flat = image_mask.reshape(-1).to(torch.int64)                          # [B*T]
    index = torch.cumsum(flat, 0) * flat                                   # 1..M on image positions, else 0
    rows = torch.cat([torch.zeros_like(embeds[0, :1]), image_features.to(embeds.dtype)], dim=0)  # [M+1, H]
    picked = rows[index].reshape(embeds.shape)
    return torch.where(image_mask[..., None], picked, embeds)


register_backend(dataclasses.replace(
    _BACKENDS["reference"], name="export", layer_norm=layer_norm_export, moe_ffn=moe.moe_ffn_dense,
    patch_embed=patch_embed, attention=attention_export, lora_moe_prepare=lora_moe_prepare_dense,
    lora_moe_linear=lora_moe_linear_dense, round_to_fp16=round_to_fp16, insert_image_features=insert_image_features))
