"""The hot ops expressed the Ascend way; registers backends "npu" (real torch_npu) and "npu-emulated".

One code path, two providers of the ``torch_npu`` functions: the real module (imported lazily, the first time an
op runs on an NPU) or ``ascend.npu_emulation.EmulatedTorchNpu`` on the CPU, which binds every call against the
torch-npu 2.13.0 schema and enforces the documented chip rules. What runs where:

- RMSNorm: ``npu_rms_norm`` (all chips).
- Rotary / M-RoPE: the M-RoPE cos/sin tables are built once per forward in plain PyTorch (they are the same for
  every layer); each layer applies them with ``npu_rotary_mul`` (half mode, BNSD input, B1SD tables). Where the
  docs do not cover the shape (310P needs head dim 128; 910B needs D < 896, B, N < 1000) the same formula runs
  as plain elementwise ops.
- SwiGLU: ``npu_swiglu`` on the concatenated [gate | up] halves (910B; the op is documented for A2 only). The
  concatenation is one copy per MLP; a fused gate_up projection would remove it, but the model keeps gate and up
  separate because each carries its own LoRA plan. 310P: silu(gate) * up.
- Attention: prefill (T > 1) ``npu_prompt_flash_attention``, decode (T == 1) ``npu_incre_flash_attention``, BNSD
  layout, GQA through ``num_key_value_heads``, our keep mask (True = attend) inverted into the NPU's
  atten_mask (True = masked). Both ops take fp16/bf16 only, so an fp32 model runs attention as plain batched
  matmul + softmax (also on the NPU). The 310P prompt kernel has no GQA: K/V heads are repeated first.
  Decode attends over the whole static cache with the mask; ``actual_seq_lengths`` (host ints) could skip the
  unused tail but would tie the step to the host-side length, which graph mode does not want.
- Patch embedding: Conv3d with kernel == stride computed as one matmul (Conv3d fails on 910B, error 500002).
- LoRA-MoE linear (Awaker): the stacked rank-2r plan of kernels/cpu.py, i.e. plain (batched) matmuls on the cube
  unit. ``npu_batch_gather_matmul`` (multi-LoRA BGMV) is not used: it supports ranks 16..128 in fp16 only and
  Awaker's release uses rank 256.
- MoE FFN (MoE-LLaVA): router in fp32 -> ``npu_moe_gating_top_k_softmax`` (910B) -> renormalise the k weights ->
  ``npu_moe_init_routing_v2`` (tokens sorted by expert, per-expert counts) -> ``npu_grouped_matmul`` -> activation
  -> ``npu_grouped_matmul`` -> ``npu_moe_finalize_routing`` (910B) / a gather + weighted sum (310P).
  Index math stays int32 and on the device; no host synchronisation.
- 310P: fp16 only (the device refuses bf16); 2-D linear weights are cast to FRACTAL_NZ (``npu_format_cast(w, 29)``)
  once after loading, the documented practice for fast matmul on that chip.

Nothing here has run on an Ascend NPU yet: the emulation proves the calls are schema-exact and that the numbers
match the reference on the CPU, not how fast or how exactly the real kernels compute.
"""
from __future__ import annotations

import dataclasses
import importlib

import torch
import torch.nn.functional as F

from moevl.kernels import cpu, moe, quant
from moevl.kernels.dispatch import Kernels, _BACKENDS, register_backend, register_device_kernels

INT_MAX = 2147483647
HALFS = (torch.float16, torch.bfloat16)

# Ops that must not be the plain reference on an NPU backend (what strict mode checks).
HOT_OPS = ("rms_norm", "apply_rotary", "swiglu", "attention", "patch_embed", "lora_moe_linear", "moe_ffn")


class _LazyTorchNpu:
    """``torch_npu`` imported on first use, so registering the "npu" backend never imports it."""

    _module = None

    def __getattr__(self, name):
        if _LazyTorchNpu._module is None:
            from moevl.ascend.errors import DeviceError
            from moevl.ascend.npu_probe import probe_npu

            probe = probe_npu()
            if not probe.available:
                raise DeviceError(f"the npu kernels need torch_npu: {probe.reason}. Fix: {probe.fix}")
            _LazyTorchNpu._module = importlib.import_module("torch_npu")
        return getattr(_LazyTorchNpu._module, name)


class NpuKernels:
    """The NPU variants of the hot ops for one chip, calling ``tnpu`` (torch_npu or its emulation)."""

    def __init__(self, tnpu, chip: str = "910B"):
        self.tnpu = tnpu
        self.chip = chip
        self._last_keep = None
        self._last_masked = None

    # ---------------------------------------------------------------------------------------------- norms
    def rms_norm(self, x, weight, eps):
        return self.tnpu.npu_rms_norm(x, weight.to(x.dtype), epsilon=float(eps))[0]

    # ---------------------------------------------------------------------------------------------- rotary
    def _rotary_op_fits(self, x) -> bool:
        b, n, _, d = x.shape
        if self.chip == "310P":
            return d == 128 and b <= 1000 and n <= 1000 and x.dtype in (torch.float16, torch.float32)
        return d < 896 and d % 2 == 0 and b < 1000 and n < 1000

    def apply_rotary(self, q, k, cos, sin):
        """q, k [B, H, T, D] (BNSD); cos, sin [B, T, D] -> B1SD tables."""
        r1 = cos.unsqueeze(1).to(q.dtype)
        r2 = sin.unsqueeze(1).to(q.dtype)
        if self._rotary_op_fits(q) and self._rotary_op_fits(k):
            rot = self.tnpu.npu_rotary_mul
            return rot(q, r1, r2, rotary_mode="half"), rot(k, r1, r2, rotary_mode="half")
        return _rotary_composed(q, r1, r2), _rotary_composed(k, r1, r2)

    # ---------------------------------------------------------------------------------------------- swiglu
    def swiglu(self, gate, up):
        if self.chip == "310P":
            return F.silu(gate) * up
        return self.tnpu.npu_swiglu(torch.cat((gate, up), dim=-1), dim=-1)

    # ---------------------------------------------------------------------------------------------- attention
    def _masked(self, keep):
        # The same keep mask is passed to every layer of one forward: invert it once.
        if keep is not self._last_keep:
            self._last_keep, self._last_masked = keep, (~keep).contiguous()
        return self._last_masked

    def attention(self, q, k, v, keep_mask, scale):
        """q [B, Hq, T, D]; k, v [B, Hkv, S, D]; keep_mask [B, 1, T, S] True = attend -> [B, Hq, T, D]."""
        if q.dtype not in HALFS:
            return _attention_composed(q, k, v, keep_mask, scale)
        b, hq, t, _ = q.shape
        hkv = k.shape[1]
        masked = self._masked(keep_mask)
        if t == 1:
            return self.tnpu.npu_incre_flash_attention(
                q.contiguous(), k.contiguous(), v.contiguous(), atten_mask=masked, num_heads=hq,
                scale_value=float(scale), input_layout="BNSD", num_key_value_heads=0 if hkv == hq else hkv)
        if self.chip == "310P" and hkv != hq:  # the 310P prompt kernel takes num_key_value_heads=0 only
            k, v = k.repeat_interleave(hq // hkv, dim=1), v.repeat_interleave(hq // hkv, dim=1)
            hkv = hq
        # next_tokens=INT_MAX: the mask alone decides (sparse_mode 0 would otherwise also cut a causal band).
        return self.tnpu.npu_prompt_flash_attention(
            q.contiguous(), k.contiguous(), v.contiguous(), atten_mask=masked, num_heads=hq,
            scale_value=float(scale), pre_tokens=INT_MAX, next_tokens=INT_MAX, input_layout="BNSD",
            num_key_value_heads=0 if hkv == hq else hkv, sparse_mode=0)

    # ---------------------------------------------------------------------------------------------- vision
    def patch_embed(self, patches, weight):
        """[N, C*t*p*p] @ weight.view(E, -1)^T: Conv3d with kernel == stride is exactly this matmul."""
        return F.linear(patches.to(weight.dtype), weight.reshape(weight.shape[0], -1))

    # ---------------------------------------------------------------------------------------------- MoE FFN
    def moe_ffn(self, x, router_weight, experts: moe.MoeExperts, top_k=2, routing="deterministic",
                generator=None):
        """x [N, H], router_weight [E, H] -> (y [N, H], RoutingInfo); the same contract as kernels.moe.moe_ffn."""
        if experts.quantized:
            # int8/int4 experts (kernels.quant.QuantizedExperts): every expert's bound npu_weight_quant_batchmatmul
            # on all rows - static shapes, no host sync; E/k times the FLOPs (the grouped matmul is not bound to
            # quantised stacks; emulated, not verified on hardware)
            return moe.moe_ffn(x, router_weight, experts, top_k, routing, generator, impl="dense")
        tnpu = self.tnpu
        n = x.shape[0]
        num_e = experts.num_experts
        logits = F.linear(x.float(), router_weight.float())  # [N, E] fp32, as DeepSpeed's gate
        probs = torch.softmax(logits, dim=-1)
        if routing == "deterministic" and self.chip != "310P":
            top_w, idx, _ = tnpu.npu_moe_gating_top_k_softmax(logits, None, k=top_k)  # idx int32
        elif routing == "deterministic":  # the gating op is A2/A3 only
            top_w, idx = probs.topk(top_k, dim=-1)
            idx = idx.to(torch.int32)
        else:  # DeepSpeed's Gumbel-noised second expert: no fused op for that
            info = moe.route(x, router_weight, top_k, routing, generator)
            top_w, idx = probs.gather(1, info.expert_idx), info.expert_idx.to(torch.int32)
        # The gating op does not renormalise; MoE-LLaVA's top-2 does.
        weights = top_w / top_w.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(top_w.dtype).eps)

        xs, row_idx, tokens, _ = tnpu.npu_moe_init_routing_v2(
            x, idx, active_num=n * top_k, expert_num=num_e, expert_tokens_num_type=1,
            expert_tokens_num_flag=True, active_expert_range=[0, num_e], quant_mode=-1, row_idx_type=0)
        # 910B returns per-expert counts (type 1); the 310P kernel always returns the cumsum ([op-plugin] doc).
        group_list_type = 0 if self.chip == "310P" else 1
        expert_of_row = None
        if experts.b_in is not None or (experts.b_out is not None and self.chip == "310P"):
            # dst -> src slot, then the expert of each sorted row: all int32, on the device
            src = torch.empty_like(row_idx)
            src[row_idx.long()] = torch.arange(row_idx.numel(), dtype=row_idx.dtype, device=row_idx.device)
            expert_of_row = idx.reshape(-1)[src.long()].long()

        def gmm(a, w):  # a [M, K] sorted by expert, w [E, N, K] (torch Linear layout) -> [M, N]
            self._check_gmm_n(w.shape[1])
            return tnpu.npu_grouped_matmul([a], [w.transpose(1, 2)], group_list=tokens, split_item=2,
                                           group_type=0, group_list_type=group_list_type)[0]

        h = gmm(xs, experts.w_in)
        if experts.b_in is not None:
            h = h + experts.b_in[expert_of_row]
        if experts.activation == "swiglu":
            up = gmm(xs, experts.w_up)
            act = F.silu(h) * up if self.chip == "310P" else tnpu.npu_swiglu(torch.cat((h, up), -1), dim=-1)
        elif experts.activation == "gelu_tanh":
            act = F.gelu(h, approximate="tanh")
        else:
            raise ValueError(f"unknown expert activation {experts.activation!r}")
        out = gmm(act, experts.w_out)  # [N*k, H]

        if self.chip == "310P":  # npu_moe_finalize_routing is A2 only: gather + weighted sum
            if experts.b_out is not None:
                out = out + experts.b_out[expert_of_row]
            picked = out[row_idx.long().view(n, top_k)]  # [N, k, H]
            y = (picked.float() * weights.unsqueeze(-1)).sum(dim=1).to(x.dtype)
        else:
            # finalize numbers source slots k-major (entry j*N + n); init_routing_v2's row_idx is n*K + j.
            src_to_dst = row_idx.view(n, top_k).t().contiguous().view(-1)
            y = tnpu.npu_moe_finalize_routing(out, None, None, experts.b_out, weights.to(out.dtype), src_to_dst,
                                              idx, drop_pad_mode=0, k=top_k)
        return y, moe.RoutingInfo(idx.long(), weights, probs)

    def _check_gmm_n(self, n):
        if self.chip == "310P" and n % 16:
            raise ValueError(f"npu_grouped_matmul on 310P needs the output width N to be a multiple of 16 "
                             f"(got {n}); this MoE cannot run on a 310P")

    # ---------------------------------------------------------------------------------------------- quantised linears
    def bind_quantized(self, module) -> None:
        """W8A16 / W4A16 through ``npu_weight_quant_batchmatmul`` (activations fp16/bf16: an fp32 model's are cast
        to bf16, on 310P to fp16). int8: per channel, the weight passed as the (K, N) transposed view of [N, K]
        (the documented fast per-channel form). int4 (A2/A3 only): signed values packed by
        ``npu_convert_weight_to_int4pack``, per-group scale and offset (ceil(K / g), N) with offset = zero / scale,
        since the op computes (w + offset) * scale. Not verified on hardware: emulated on the CPU."""
        tnpu = self.tnpu
        act = module.compute_dtype if module.compute_dtype in HALFS else (
            torch.float16 if self.chip == "310P" else torch.bfloat16)
        bias_dtype = torch.float32 if act == torch.bfloat16 else torch.float16
        if isinstance(module, quant.Int8Weight):
            weight, scale, offset, group = module.qweight.t(), module.scales.to(act), None, 0
        elif isinstance(module, quant.Int4Weight):
            if self.chip == "310P":
                raise ValueError("int4 weights need per-group weight quantisation, which the 310P does not have "
                                 "(npu_weight_quant_batchmatmul there is int8 per channel): use --quantize int8")
            signed = quant.unpack_int4(module.qweight).to(torch.int32) - 8  # [N, K] in [-8, 7]
            weight = tnpu.npu_convert_weight_to_int4pack(signed.contiguous()).t()  # (K / 8, N) view
            scale = module.scales.t().to(act)  # (K / g, N)
            offset = (module.zeros.float() / module.scales.float()).t().to(act)
            group = module.group_size
        else:
            raise TypeError(f"no NPU kernel for {type(module).__name__}")

        def kernel(x2, bias):
            y = tnpu.npu_weight_quant_batchmatmul(x2.to(act), weight, scale, offset, None, None,
                                                  None if bias is None else bias.to(bias_dtype), group)
            return y.to(x2.dtype)
        module.bind(kernel, f"torch_npu.npu_weight_quant_batchmatmul (W{module.mode[3:]}A16)")

    def prepare_weights(self, model) -> None:
        quant.bind_all(model, self.bind_quantized)

    # ---------------------------------------------------------------------------------------------- record
    def unsupported(self, dtype) -> dict:
        """What this chip cannot run in ``dtype`` (checked when a model is placed, not mid-request)."""
        if self.chip == "310P" and dtype != torch.float16:
            return {"moe_ffn": "npu_grouped_matmul on a 310P takes fp16 only: use --dtype fp16 (the 310P default)"}
        return {}

    def kernels(self, name: str) -> Kernels:
        return dataclasses.replace(
            _BACKENDS["reference"],
            name=name,
            rms_norm=self.rms_norm,
            apply_rotary=self.apply_rotary,
            swiglu=self.swiglu,
            attention=self.attention,
            patch_embed=self.patch_embed,
            lora_moe_prepare=cpu.lora_moe_prepare,
            lora_moe_linear=cpu.lora_moe_linear,
            moe_ffn=self.moe_ffn,
            unsupported=self.unsupported,
            prepare_weights=self.prepare_weights,
        )


def _rotary_composed(x, r1, r2):
    # npu_rotary_mul's half-mode formula in plain elementwise ops (for shapes the fused op does not cover).
    x1, x2 = x.chunk(2, dim=-1)
    return x * r1 + torch.cat((-x2, x1), dim=-1) * r2


def _attention_composed(q, k, v, keep, scale):
    """fp32 attention from batched matmuls; GQA by grouping query heads (no K/V copy). Fully masked rows -> 0."""
    b, hq, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    rep = hq // hkv
    scores = torch.matmul(q.reshape(b, hkv, rep * t, d), k.transpose(-1, -2)).view(b, hq, t, s) * scale
    scores = scores.float().masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    out = torch.matmul(probs.to(v.dtype).view(b, hkv, rep * t, s), v)
    return out.view(b, hq, t, d)


# ---------------------------------------------------------------------------------------------- per device
def kernels_for_device(device) -> Kernels:
    """The NPU kernel record for a device's chip (910B and 310P take different paths for some ops); in strict mode
    checked to be the NPU code path throughout."""
    chip = device.chip_family if device.chip_family in ("910B", "310P") else "910B"  # A3 takes the A2 path
    kernels = NpuKernels(device.torch_npu(), chip).kernels(device.kernel_backend)
    if device.strict:
        check_no_reference_ops(kernels)
    return kernels


def check_no_reference_ops(kernels: Kernels) -> None:
    """Strict mode: every hot op of an NPU kernel record must be an NPU variant, not the plain reference."""
    ref = _BACKENDS["reference"]
    plain = [op for op in HOT_OPS if getattr(kernels, op) is getattr(ref, op)
             or getattr(kernels, op) in (moe.moe_ffn_reference, moe.moe_ffn_dropless, moe.moe_ffn_dense)]
    if plain:
        from moevl.ascend.npu_emulation import NpuRuleError

        raise NpuRuleError(f"strict NPU mode: kernel set {kernels.name!r} runs {plain} as the plain reference "
                           "(that is not the NPU code path)")


# The registry entries: "npu" (910B path, torch_npu imported on first use) and "npu-emulated" (910B emulation).
# Loading a model goes through kernels_for_device, which also picks the 310P path.
def _register():
    from moevl.ascend.npu_emulation import EmulatedTorchNpu

    register_backend(NpuKernels(_LazyTorchNpu(), "910B").kernels("npu"))
    register_backend(NpuKernels(EmulatedTorchNpu("910B"), "910B").kernels("npu-emulated"))
    for name in ("npu", "npu-emulated"):
        register_device_kernels(name, kernels_for_device)


_register()
