"""The "export" kernel backend (what export/ traces into ONNX) equals the reference ops.

Tolerance: fp32 1e-5 relative to the output scale (the dense LoRA-MoE sums the same products in another order).
"""
import pytest
import torch

from moevl.kernels import get_kernels, reference
from moevl.kernels import export as kexport
from tests.test_kernels import GRID, close, lora_case


@pytest.mark.parametrize("batch,t,d_in,d_out,rank,experts", GRID)
def test_dense_lora_moe_matches_reference(batch, t, d_in, d_out, rank, experts):
    x, W, bias, A, B, expert, scales = lora_case(batch, t, d_in, d_out, rank, experts, torch.float32)
    ref = reference.lora_moe_linear(x, W, bias, reference.lora_moe_prepare(A, B, expert, scales))
    ops = get_kernels("export")
    close(ops.lora_moe_linear(x, W, bias, ops.lora_moe_prepare(A, B, expert, scales)), ref, torch.float32)


def test_dense_lora_moe_counts_the_global_expert_once_when_it_is_the_task_expert():
    x, W, bias, A, B, _, scales = lora_case(3, 2, 16, 24, 4, 5, torch.float32)
    expert = torch.tensor([4, 0, 4])  # the global expert (last) chosen as the task expert
    ref = reference.lora_moe_linear(x, W, bias, reference.lora_moe_prepare(A, B, expert, scales))
    plan = kexport.lora_moe_prepare_dense(A, B, expert, scales)
    close(kexport.lora_moe_linear_dense(x, W, bias, plan), ref, torch.float32)


@pytest.mark.parametrize("hq,hkv", [(4, 2), (2, 2)])
def test_export_attention_matches_reference_with_padding_rows(hq, hkv):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, hq, 3, 8, generator=g)
    k, v = torch.randn(2, hkv, 5, 8, generator=g), torch.randn(2, hkv, 5, 8, generator=g)
    keep = torch.rand(2, 1, 3, 5, generator=g) > 0.4
    keep[1, 0, 0] = False  # a row that sees nothing gives zeros in both
    close(kexport.attention_export(q, k, v, keep, 0.35), reference.attention(q, k, v, keep, 0.35), torch.float32)
