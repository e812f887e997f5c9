"""torch_npu's fused ops, emulated on the CPU, so the kit's NPU code path runs (and is tested) without an NPU.

``EmulatedTorchNpu(chip)`` is a namespace with the same function names as the ``torch_npu`` module; kernels/npu.py
takes either. Every function

1. binds its call against the op's schema string from the torch-npu 2.13.0 wheel (``ascend.npu_schema``): a wrong
   argument name, order, type, or a keyword-only argument passed positionally fails here as it does on the NPU;
2. enforces the documented limits of the emulated chip (``NpuRuleError``): dtypes per chip (310P: fp16 only, no
   bf16 anywhere), which ops exist on which chip, layout/shape limits;
3. computes the documented formula in plain PyTorch (fp32 accumulation, one rounding to the output dtype, as a
   fused kernel does).

Sources, abbreviated in the comments below:
- [wheel-doc]  ``torch_npu/_op_plugin_docs.py`` inside torch_npu-2.13.0 (the docstrings torch-npu installs);
- [wheel-meta] ``torch_npu/op_plugin/meta/_meta_registrations.py`` inside the same wheel (output shapes/dtypes);
- [op-plugin]  github.com/Ascend/op-plugin ``docs/zh/custom_APIs/torch_npu/torch_npu-<op>.md`` (newer than the
  wheel; used where the wheel's docstring is silent, and said so).
Where these disagree or leave something open, the comment says which reading the emulation implements.

Nothing here was compared against real hardware output (we have no NPU): the emulation is as faithful as the
documentation, and no more.
"""
from __future__ import annotations

import functools
import threading

import torch
import torch.nn.functional as F

from moevl.ascend.npu_schema import kit_schemas

ACL_FORMAT_ND = 2
ACL_FORMAT_FRACTAL_NZ = 29
INT_MAX = 2147483647

CHIPS = ("910B", "310P")

# Which chips an op exists on, per its "支持的型号" (supported products) section.
_OP_CHIPS = {
    "npu_rms_norm": ("910B", "310P"),
    "npu_rotary_mul": ("910B", "310P"),  # [op-plugin]: A2 (jit_compile=False and True), 310P (jit_compile=True)
    "npu_swiglu": ("910B",),  # [wheel-doc]: "Atlas A2 训练系列产品" only
    "npu_prompt_flash_attention": ("910B", "310P"),
    "npu_incre_flash_attention": ("910B", "310P"),
    "npu_grouped_matmul": ("910B", "310P"),
    "npu_moe_gating_top_k_softmax": ("910B",),  # [wheel-doc], [op-plugin]: A2/A3 only
    # [wheel-doc] lists A2/A3; [op-plugin] (newer) adds "Atlas 推理系列产品" (310P) with restrictions (see below).
    "npu_moe_init_routing_v2": ("910B", "310P"),
    "npu_moe_finalize_routing": ("910B",),  # [wheel-doc]: A2 only
    "npu_format_cast": ("910B", "310P"),
    "get_npu_format": ("910B", "310P"),
    # [wheel-doc]: A2, A3 and "Atlas 推理系列加速卡产品" (310P: int8 per-tensor/per-channel only, fp16 only)
    "npu_weight_quant_batchmatmul": ("910B", "310P"),
    "npu_convert_weight_to_int4pack": ("910B",),  # [wheel-doc]: A2/A3 only
}


class NpuRuleError(RuntimeError):
    """The call is schema-valid but breaks a documented limit of the emulated chip (it would fail on the NPU)."""


_state = threading.local()


def in_emulated_kernel() -> bool:
    """True while an emulated op's body runs (it stands for a device kernel: host syncs there are not the kit's)."""
    return getattr(_state, "depth", 0) > 0


def _op(fn):
    name = fn.__name__

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        bound = kit_schemas()[name].bind(args, kwargs)
        if "self" in bound:  # the schema's first argument is often named "self"; the bodies call it "self_"
            bound["self_"] = bound.pop("self")
        if self.chip not in _OP_CHIPS[name]:
            raise NpuRuleError(f"torch_npu.{name} is not supported on {self.chip} (supported: "
                               f"{', '.join(_OP_CHIPS[name])}); use the composed form on this chip")
        self.calls[name] = self.calls.get(name, 0) + 1
        _state.depth = getattr(_state, "depth", 0) + 1
        try:
            return fn(self, **bound)
        finally:
            _state.depth -= 1

    wrapper.emulates = name
    return wrapper


def _dtypes(chip: str, op: str, t: torch.Tensor, allowed_910b, allowed_310p=(torch.float16,), what="input"):
    allowed = allowed_310p if chip == "310P" else allowed_910b
    if t.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise NpuRuleError(f"torch_npu.{op} on {chip}: {what} dtype {str(t.dtype).removeprefix('torch.')} is not "
                           f"supported (supported: {names})")


FLOATS = (torch.float16, torch.bfloat16, torch.float32)
HALFS = (torch.float16, torch.bfloat16)


class EmulatedTorchNpu:
    """The torch_npu functions the kit calls, for one emulated chip ("910B" or "310P")."""

    def __init__(self, chip: str = "910B"):
        if chip not in CHIPS:
            raise ValueError(f"unknown chip {chip!r}; emulated chips: {CHIPS}")
        self.chip = chip
        self.calls: dict[str, int] = {}  # op name -> number of calls (tests check which path ran)
        self._formats: dict[int, int] = {}

    def __repr__(self) -> str:
        return f"EmulatedTorchNpu(chip={self.chip!r})"

    # ------------------------------------------------------------------------------------------------ norms
    @_op
    def npu_rms_norm(self, self_, gamma, epsilon):
        # [wheel-doc]: y = x / sqrt(mean(x^2) + eps) * gamma; self and gamma of the same dtype (fp16/bf16/fp32).
        # [wheel-meta]: outputs (y like self, rstd fp32 with shape self.shape[:-gamma.dim()] + [1]*gamma.dim()).
        x = self_
        _dtypes(self.chip, "npu_rms_norm", x, FLOATS, (torch.float16, torch.float32))
        if gamma.dtype != x.dtype:
            raise NpuRuleError(f"torch_npu.npu_rms_norm: gamma dtype {gamma.dtype} must equal input dtype {x.dtype}")
        dims = tuple(range(x.dim() - gamma.dim(), x.dim()))
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(dim=dims, keepdim=True) + epsilon)
        return (xf * rstd * gamma.float()).to(x.dtype), rstd

    # ------------------------------------------------------------------------------------------------ rotary
    @_op
    def npu_rotary_mul(self, self_, r1, r2, rotary_mode, rotate):
        # [wheel-doc]: half mode: x1, x2 = chunk(x, 2, -1); out = r1 * x + r2 * cat(-x2, x1).
        x = self_
        if rotary_mode not in ("half", "interleave"):
            raise NpuRuleError(f"torch_npu.npu_rotary_mul: rotary_mode must be 'half' or 'interleave', "
                               f"not {rotary_mode!r}")
        if rotate is not None:
            raise NotImplementedError("the emulation does not implement npu_rotary_mul(rotate=...)")
        if x.dim() != 4 or r1.dim() != 4 or r2.dim() != 4:
            raise NpuRuleError("torch_npu.npu_rotary_mul: input, r1 and r2 must be 4-D (BNSD/BSND/SBND)")
        _dtypes(self.chip, "npu_rotary_mul", x, FLOATS, (torch.float16, torch.float32))
        b, n, _, d = x.shape
        if self.chip == "310P":
            # [op-plugin] jit_compile=True (the path for 310P): half mode only, 4-D, B and N <= 1000, D == 128.
            if rotary_mode != "half" or d != 128 or b > 1000 or n > 1000:
                raise NpuRuleError(f"torch_npu.npu_rotary_mul on 310P: only half mode with head dim D == 128 and "
                                   f"B, N <= 1000 (got mode {rotary_mode!r}, shape {tuple(x.shape)})")
        elif d >= 896 or d % 2 or b >= 1000 or n >= 1000:
            # [wheel-doc] jit_compile=False (A2): D < 896 and even; B, N < 1000.
            raise NpuRuleError(f"torch_npu.npu_rotary_mul on 910B: needs D < 896 even and B, N < 1000 "
                               f"(got shape {tuple(x.shape)})")
        xf = x.float()
        if rotary_mode == "half":
            x1, x2 = xf.chunk(2, dim=-1)
            rot = torch.cat((-x2, x1), dim=-1)
        else:
            rot = torch.stack((-xf[..., 1::2], xf[..., ::2]), dim=-1).flatten(-2)
        return (r1.float() * xf + r2.float() * rot).to(x.dtype)

    # ------------------------------------------------------------------------------------------------ swiglu
    @_op
    def npu_swiglu(self, self_, dim):
        # [wheel-doc]: A, B = split(x, 2, dim); out = A * sigmoid(A) * B (the first half is the gate).
        x = self_
        _dtypes(self.chip, "npu_swiglu", x, FLOATS)
        if x.shape[dim] % 2:
            raise NpuRuleError(f"torch_npu.npu_swiglu: dim {dim} has odd size {x.shape[dim]}")
        a, b = x.float().chunk(2, dim=dim)
        return (F.silu(a) * b).to(x.dtype)

    # ------------------------------------------------------------------------------------------------ attention
    def _attention(self, op, q, k, v, mask, num_heads, num_kv_heads, scale, layout, pre_tokens, next_tokens,
                   sparse_mode):
        """Shared body: q [B, N, Sq, D], k/v [B, Nkv, Skv, D] after layout; mask True = masked."""
        if layout == "BSH":
            b, sq, h = q.shape
            d = h // num_heads
            nkv = num_kv_heads or num_heads
            q = q.view(b, sq, num_heads, d).transpose(1, 2)
            k = k.view(b, k.shape[1], nkv, d).transpose(1, 2)
            v = v.view(b, v.shape[1], nkv, d).transpose(1, 2)
        elif layout == "BSND":
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        elif layout != "BNSD":
            raise NotImplementedError(f"the emulation implements input_layout BSH, BSND and BNSD, not {layout!r}")
        b, n, sq, d = q.shape
        nkv = k.shape[1]
        if n != num_heads:
            raise NpuRuleError(f"torch_npu.{op}: num_heads={num_heads} but the query has {n} heads")
        if num_kv_heads not in (0, nkv) or (num_kv_heads == 0 and nkv != n):
            # [wheel-doc]: num_key_value_heads 0 means "same as num_heads"; in BNSD/BSND it must equal K's N axis.
            raise NpuRuleError(f"torch_npu.{op}: num_key_value_heads={num_kv_heads} does not match key/value "
                               f"with {nkv} heads (query has {n}; 0 means equal to num_heads)")
        if n % nkv or n // nkv > 64:
            raise NpuRuleError(f"torch_npu.{op}: num_heads must be a multiple of num_key_value_heads with ratio "
                               f"<= 64 (got {n} / {nkv})")
        skv = k.shape[2]
        scores = torch.matmul(q.float().reshape(b, nkv, n // nkv * sq, d), k.float().transpose(-1, -2))
        scores = scores.view(b, n, sq, skv) * scale
        masked = torch.zeros(b, 1, sq, skv, dtype=torch.bool)
        if mask is not None:
            if mask.dtype not in (torch.bool, torch.int8, torch.uint8):
                raise NpuRuleError(f"torch_npu.{op}: atten_mask must be bool, int8 or uint8, not {mask.dtype}")
            # Mask value 1/True = "does not take part" ([wheel-doc] IFA: "取值为1代表该位不参与计算"; PFA: the
            # mask is added as -inf where set). Shapes (Sq, Skv), (B, Sq, Skv), (B, 1, Sq, Skv), (1, ...).
            m = mask.bool()
            while m.dim() < 4:
                m = m.unsqueeze(-3 if m.dim() == 3 else 0)
            masked = masked | m
        if op == "npu_prompt_flash_attention" and mask is not None and sparse_mode == 0:
            # [wheel-doc] sparse_mode 0 with a mask: only the band [i - pre_tokens, i + next_tokens] is computed
            # (without a mask both are ignored). Reading: band measured from the top-left corner (query i vs key j).
            i = torch.arange(sq)[:, None]
            j = torch.arange(skv)[None, :]
            masked = masked | (j > i + next_tokens) | (j < i - pre_tokens)
        scores = scores.masked_fill(masked, float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # fully masked rows: zeros (docs are silent)
        out = torch.matmul(probs.view(b, nkv, n // nkv * sq, skv), v.float()).view(b, n, sq, d)
        if layout == "BSH":
            out = out.transpose(1, 2).reshape(b, sq, n * d)
        elif layout == "BSND":
            out = out.transpose(1, 2)
        return out.to(q.dtype).contiguous()

    @_op
    def npu_prompt_flash_attention(self, query, key, value, padding_mask, atten_mask, pse_shift, actual_seq_lengths,
                                   deq_scale1, quant_scale1, deq_scale2, quant_scale2, quant_offset2, num_heads,
                                   scale_value, pre_tokens, next_tokens, input_layout, num_key_value_heads,
                                   actual_seq_lengths_kv, sparse_mode):
        op = "npu_prompt_flash_attention"
        # [wheel-doc]: fp16/bf16/int8 on A2, fp16 on 310P: no fp32. Q, K, V of one dtype, contiguous.
        for name, t in (("query", query), ("key", key), ("value", value)):
            _dtypes(self.chip, op, t, HALFS, what=name)
            if t.dtype != query.dtype:
                raise NpuRuleError(f"torch_npu.{op}: {name} dtype {t.dtype} differs from query {query.dtype}")
            if not t.is_contiguous():
                raise NpuRuleError(f"torch_npu.{op}: {name} must be contiguous ('不支持非连续的Tensor')")
        if atten_mask is not None and not atten_mask.is_contiguous():
            raise NpuRuleError(f"torch_npu.{op}: atten_mask must be contiguous")
        if any(t is not None for t in (padding_mask, pse_shift, deq_scale1, quant_scale1, deq_scale2,
                                        quant_scale2, quant_offset2)):
            raise NotImplementedError(f"the emulation of {op} implements no pse/quantisation inputs")
        if actual_seq_lengths is not None or actual_seq_lengths_kv is not None:
            raise NotImplementedError(f"the emulation of {op} does not implement actual_seq_lengths(_kv)")
        if sparse_mode != 0:
            raise NotImplementedError(f"the emulation of {op} implements sparse_mode=0 only")
        if self.chip == "310P":
            # [wheel-doc] "Atlas 推理系列加速卡产品": num_key_value_heads only 0 (no GQA), pre_tokens only INT_MAX,
            # next_tokens only 0 or INT_MAX, sparse_mode only 0.
            if num_key_value_heads != 0:
                raise NpuRuleError(f"torch_npu.{op} on 310P supports num_key_value_heads=0 only (no GQA): "
                                   "repeat the key/value heads first")
            if pre_tokens != INT_MAX or next_tokens not in (0, INT_MAX):
                raise NpuRuleError(f"torch_npu.{op} on 310P: pre_tokens must be {INT_MAX} and next_tokens 0 or "
                                   f"{INT_MAX}")
        if input_layout not in ("BSH", "BSND", "BNSD"):
            raise NotImplementedError(f"the emulation of {op} implements BSH/BSND/BNSD, not {input_layout!r}")
        return self._attention(op, query, key, value, atten_mask, num_heads, num_key_value_heads, scale_value,
                               input_layout, pre_tokens, next_tokens, sparse_mode)

    @_op
    def npu_incre_flash_attention(self, query, key, value, padding_mask, atten_mask, pse_shift, actual_seq_lengths,
                                  antiquant_scale, antiquant_offset, block_table, dequant_scale1, quant_scale1,
                                  dequant_scale2, quant_scale2, quant_offset2, kv_padding_size, num_heads,
                                  scale_value, input_layout, num_key_value_heads, block_size, inner_precise):
        op = "npu_incre_flash_attention"
        # [wheel-doc]: query fp16/bf16 on A2, fp16 on 310P; key/value also int8 (antiquant, not emulated).
        for name, t in (("query", query), ("key", key), ("value", value)):
            _dtypes(self.chip, op, t, HALFS, what=name)
            if t.dtype != query.dtype:
                raise NpuRuleError(f"torch_npu.{op}: {name} dtype {t.dtype} differs from query {query.dtype}")
        if key.shape != value.shape or query.dim() != key.dim():
            raise NpuRuleError(f"torch_npu.{op}: query/key/value must have the same rank and key/value one shape")
        if any(t is not None for t in (padding_mask, pse_shift, antiquant_scale, antiquant_offset, block_table,
                                        dequant_scale1, quant_scale1, dequant_scale2, quant_scale2, quant_offset2,
                                        kv_padding_size)):
            raise NotImplementedError(f"the emulation of {op} implements no pse/quantisation/paged-KV inputs")
        if input_layout not in ("BSH", "BSND", "BNSD"):
            raise NpuRuleError(f"torch_npu.{op}: input_layout must be BSH, BSND or BNSD, not {input_layout!r}")
        s_axis = 2 if input_layout == "BNSD" else 1
        if query.shape[s_axis] != 1:
            raise NpuRuleError(f"torch_npu.{op} is the incremental (decode) kernel: query S must be 1, got "
                               f"{query.shape[s_axis]}")
        if actual_seq_lengths is not None:
            # [wheel-doc]: per-batch valid KV length (or one value for all); KV positions >= length are ignored.
            b, skv = key.shape[0], key.shape[s_axis]
            lens = list(actual_seq_lengths) * (b if len(actual_seq_lengths) == 1 else 1)
            tail = torch.arange(skv)[None, :] >= torch.tensor(lens[:b])[:, None]  # [B, Skv]
            tail = tail[:, None, None, :]
            atten_mask = tail if atten_mask is None else (atten_mask.bool().view(b, 1, 1, skv) | tail)
        return self._attention(op, query, key, value, atten_mask, num_heads, num_key_value_heads, scale_value,
                               input_layout, INT_MAX, INT_MAX, 0)

    # ------------------------------------------------------------------------------------------------ grouped mm
    @_op
    def npu_grouped_matmul(self, x, weight, bias, scale, offset, antiquant_scale, antiquant_offset, per_token_scale,
                           group_list, activation_input, activation_quant_scale, activation_quant_offset,
                           split_item, group_type, group_list_type, act_type, tuning_config, output_dtype, x_dtype,
                           weight_dtype, scale_dtype, per_token_scale_dtype):
        op = "npu_grouped_matmul"
        if any(t is not None for t in (scale, offset, antiquant_scale, antiquant_offset, per_token_scale,
                                        activation_input, activation_quant_scale, activation_quant_offset)):
            raise NotImplementedError(f"the emulation of {op} implements the non-quantised case only")
        if act_type != 0:
            # [wheel-doc]: "仅per-token量化场景支持激活函数计算" (activation only with per-token quantisation).
            raise NpuRuleError(f"torch_npu.{op}: act_type={act_type} needs per-token quantisation; use 0")
        for t in list(x) + list(weight):
            _dtypes(self.chip, op, t, FLOATS)
        if self.chip == "310P" and group_type != 0:
            raise NpuRuleError(f"torch_npu.{op} on 310P supports group_type=0 only (got {group_type})")
        if group_type == -1:
            # [wheel-doc] "多多多": x_i @ w_i for lists of equal length, split_item 0/1, no group_list.
            if group_list is not None or split_item not in (0, 1) or len(x) != len(weight):
                raise NpuRuleError(f"torch_npu.{op}: group_type=-1 takes lists x, weight of one length, "
                                   "split_item 0 or 1 and no group_list")
            ys = [xi.float() @ wi.float() for xi, wi in zip(x, weight)]
            if bias is not None:
                ys = [y + bi.float() for y, bi in zip(ys, bias)]
            return [y.to(xi.dtype) for y, xi in zip(ys, x)]
        if group_type != 0:
            raise NpuRuleError(f"torch_npu.{op}: group_type must be -1 or 0 here (got {group_type}; 1 = N-axis "
                               "grouping is not supported with a tensor group_list)")
        # [wheel-doc] group_type 0 "单单单": one x [M, K], one weight [E, K, N] (transposed views allowed), one y,
        # split_item 2/3, group_list required: cumulative ends (group_list_type 0, non-decreasing, last == M) or
        # per-group sizes (group_list_type 1, sum == M). At most 1024 groups.
        if len(x) != 1 or len(weight) != 1 or weight[0].dim() != 3 or split_item not in (2, 3):
            raise NotImplementedError(f"the emulation of {op} group_type=0 implements one x [M, K], one weight "
                                      "[E, K, N] and split_item 2/3 (the MoE form)")
        xs, w = x[0], weight[0]
        if group_list is None:
            raise NpuRuleError(f"torch_npu.{op}: group_type=0 requires group_list")
        if group_list.dim() != 1 or group_list.shape[0] != w.shape[0]:
            raise NpuRuleError(f"torch_npu.{op}: group_list must be 1-D with one entry per weight group "
                               f"({w.shape[0]}), got shape {tuple(group_list.shape)}")
        if w.shape[0] > 1024:
            raise NpuRuleError(f"torch_npu.{op}: at most 1024 groups, got {w.shape[0]}")
        if xs.dim() != 2 or xs.shape[1] != w.shape[1]:
            raise NpuRuleError(f"torch_npu.{op}: x [M, K] and weight [E, K, N] disagree: {tuple(xs.shape)} vs "
                               f"{tuple(w.shape)}")
        n = w.shape[2]
        if self.chip == "310P" and (xs.dtype != torch.float16 or n % 16):
            raise NpuRuleError(f"torch_npu.{op} on 310P: fp16 only and N a multiple of 16 (got "
                               f"{xs.dtype}, N={n})")
        if group_list_type not in (0, 1):
            raise NpuRuleError(f"torch_npu.{op}: group_list_type must be 0 (cumsum) or 1 (counts)")
        gl = group_list.tolist()  # fine here: this body stands for the device kernel
        if any(v < 0 for v in gl):
            raise NpuRuleError(f"torch_npu.{op}: group_list must be non-negative, got {gl}")
        ends = list(gl) if group_list_type == 0 else list(torch.tensor(gl).cumsum(0).tolist())
        if group_list_type == 0 and any(b < a for a, b in zip(ends, ends[1:])):
            raise NpuRuleError(f"torch_npu.{op}: group_list_type=0 needs a non-decreasing cumsum, got {gl}")
        if ends[-1] != xs.shape[0]:
            kind = "last value" if group_list_type == 0 else "sum"
            raise NpuRuleError(f"torch_npu.{op}: group_list {kind} ({ends[-1]}) must equal x's M ({xs.shape[0]})")
        y = torch.empty(xs.shape[0], n, dtype=torch.float32)
        start = 0
        for e, end in enumerate(ends):
            y[start:end] = xs[start:end].float() @ w[e].float()
            start = end
        if bias is not None:
            raise NotImplementedError(f"the emulation of {op} group_type=0 does not implement bias")
        out_dtype = xs.dtype if output_dtype is None else output_dtype
        if out_dtype not in (xs.dtype, None):
            raise NotImplementedError(f"the emulation of {op} keeps the output dtype of x")
        return [y.to(xs.dtype)]

    # ------------------------------------------------------------------------------------------------ MoE routing
    @_op
    def npu_moe_gating_top_k_softmax(self, x, finished, k):
        # [op-plugin]: softmax over the last axis, then top-k; y keeps x's dtype, expert_idx and row_idx int32;
        # row_idx = arange(N*k).reshape(k, N).T (row_idx[n, j] = j*N + n). The k weights are NOT renormalised.
        op = "npu_moe_gating_top_k_softmax"
        _dtypes(self.chip, op, x, FLOATS)
        if x.dim() not in (2, 3):
            raise NpuRuleError(f"torch_npu.{op}: x must be 2-D or 3-D")
        if not 0 < k <= min(x.shape[-1], 1024):
            raise NpuRuleError(f"torch_npu.{op}: need 0 < k <= experts and k <= 1024, got k={k}")
        if finished is not None:
            raise NotImplementedError(f"the emulation of {op} does not implement finished=")
        probs = torch.softmax(x.float(), dim=-1)
        y, idx = probs.topk(k, dim=-1)
        rows = x.shape[:-1].numel()
        row_idx = torch.arange(rows * k, dtype=torch.int32).view(k, rows).t().reshape(*x.shape[:-1], k)
        return y.to(x.dtype), idx.to(torch.int32), row_idx

    @_op
    def npu_moe_init_routing_v2(self, x, expert_idx, scale, offset, active_num, expert_capacity, expert_num,
                                drop_pad_mode, expert_tokens_num_type, expert_tokens_num_flag, quant_mode,
                                active_expert_range, row_idx_type, x_dtype):
        # [op-plugin] formula (the wheel-doc states the same less precisely):
        #   sorted_expert, sorted_pos = stable key-value sort of expert_idx.flatten() (positions n*K + k);
        #   row_idx_type 0 ("gather"): expanded_row_idx[sorted_pos[i]] = i   (source slot -> row of expanded_x);
        #   row_idx_type 1 ("scatter"): expanded_row_idx[i] = sorted_pos[i]  (row of expanded_x -> source slot);
        #   expanded_x[i] = x[sorted_pos[i] // K]; tokens per expert: counts (type 1) / cumsum (type 0) / (id, count)
        #   pairs (type 2), int64, over active_expert_range [start, end).
        op = "npu_moe_init_routing_v2"
        if x.dim() != 2 or expert_idx.dim() != 2 or x.shape[0] != expert_idx.shape[0]:
            raise NpuRuleError(f"torch_npu.{op}: x [N, H] and expert_idx [N, K] required ([wheel-meta])")
        if expert_idx.dtype != torch.int32:
            raise NpuRuleError(f"torch_npu.{op}: expert_idx must be int32, not {expert_idx.dtype}")
        # 310P: [op-plugin] "x 仅支持 float16 和 float32" (and no bf16 on that chip at all).
        _dtypes(self.chip, op, x, FLOATS, (torch.float16, torch.float32))
        if drop_pad_mode != 0:
            raise NotImplementedError(f"the emulation of {op} implements dropless (drop_pad_mode=0) only")
        if quant_mode != -1 or scale is not None or offset is not None:
            raise NotImplementedError(f"the emulation of {op} implements quant_mode=-1 without scale/offset only")
        if row_idx_type not in (0, 1):
            raise NpuRuleError(f"torch_npu.{op}: row_idx_type must be 0 or 1")
        if expert_num <= 0:
            raise NpuRuleError(f"torch_npu.{op}: expert_num must be > 0 ([wheel-doc]), got {expert_num}")
        if self.chip == "910B" and not (expert_tokens_num_flag and expert_tokens_num_type in (1, 2)):
            # [wheel-doc] for 2.13.0: expert_tokens_num_type "当前仅支持1和2", expert_tokens_num_flag "当前仅支持True".
            raise NpuRuleError(f"torch_npu.{op} (torch-npu 2.13.0 docs): expert_tokens_num_flag must be True and "
                               f"expert_tokens_num_type 1 (count) or 2 (key-value)")
        start, end = (active_expert_range if active_expert_range else [0, expert_num])
        if not 0 <= start < end <= expert_num:
            raise NpuRuleError(f"torch_npu.{op}: active_expert_range {active_expert_range} must lie in [0, "
                               f"expert_num={expert_num}]")
        n, k = expert_idx.shape
        flat = expert_idx.reshape(-1).long()
        if flat.numel() and (flat.min() < 0 or flat.max() >= expert_num):
            raise NpuRuleError(f"torch_npu.{op}: expert ids must lie in [0, expert_num)")
        active = (flat >= start) & (flat < end)
        key = torch.where(active, flat, torch.full_like(flat, INT_MAX))
        sorted_pos = key.argsort(stable=True)
        available = int(active.sum())
        rows = available if active_num in (-1, 0) else min(active_num, available)
        expanded_x = x[sorted_pos[:rows] // k]
        if row_idx_type == 0:
            expanded_row_idx = torch.full((n * k,), -1, dtype=torch.int32)
            expanded_row_idx[sorted_pos[:available]] = torch.arange(available, dtype=torch.int32)
        else:
            expanded_row_idx = sorted_pos.to(torch.int32)
        counts = torch.bincount(flat[active] - start, minlength=end - start).long()
        if self.chip == "310P":
            # [op-plugin] "Atlas 推理系列产品": whatever expert_tokens_num_type says, the output is the cumsum.
            tokens = counts.cumsum(0)
        elif expert_tokens_num_type == 1:
            tokens = counts
        else:  # 2: (expert id, count) pairs of experts with tokens, then a (0, 0) terminator if room is left
            ids = torch.nonzero(counts).flatten()
            tokens = torch.zeros(expert_num, 2, dtype=torch.int64)
            tokens[: ids.numel(), 0] = ids + start
            tokens[: ids.numel(), 1] = counts[ids]
        expanded_scale = torch.empty(n * k, dtype=torch.float32)  # undefined without scale ([wheel-doc])
        return expanded_x, expanded_row_idx, tokens, expanded_scale

    @_op
    def npu_moe_finalize_routing(self, expanded_permuted_rows, skip1, skip2, bias, scales, expanded_src_to_dst_row,
                                 export_for_source_row, drop_pad_mode, k):
        # [wheel-doc]: out[i] = skip1[i] + skip2[i] + sum_k scales[i, k] * (rows[src_to_dst[i + k * N]] + bias[e])
        # with e = export_for_source_row[i, k]. NOTE the index i + k*N: source slots are numbered k-major (the
        # layout of npu_moe_init_routing v1 / gating's row_idx), not n*K + k as init_routing_v2 numbers them.
        op = "npu_moe_finalize_routing"
        rows = expanded_permuted_rows
        _dtypes(self.chip, op, rows, FLOATS)
        if drop_pad_mode not in (0, None):
            raise NpuRuleError(f"torch_npu.{op}: drop_pad_mode must be 0 ([wheel-doc] '取值范围为0')")
        if skip2 is not None and skip1 is None:
            raise NpuRuleError(f"torch_npu.{op}: skip1 must be given when skip2 is ([wheel-doc])")
        if expanded_src_to_dst_row.dtype != torch.int32:
            raise NpuRuleError(f"torch_npu.{op}: expanded_src_to_dst_row must be int32")
        kk = scales.shape[1] if scales is not None else k
        n = expanded_src_to_dst_row.shape[0] // kk
        idx = expanded_src_to_dst_row.long().view(kk, n).t()  # [N, K]: slot (n, j) is entry j*N + n
        picked = rows.float()[idx]  # [N, K, H]
        if bias is not None:
            if export_for_source_row is None:
                raise NpuRuleError(f"torch_npu.{op}: bias needs export_for_source_row")
            picked = picked + bias.float()[export_for_source_row.long()]
        w = scales.float() if scales is not None else torch.ones(n, kk)
        out = (picked * w.unsqueeze(-1)).sum(dim=1)
        for s in (skip1, skip2):
            if s is not None:
                out = out + s.float()
        return out.to(rows.dtype)

    # ------------------------------------------------------------------------------------------------ weight quant
    @_op
    def npu_convert_weight_to_int4pack(self, weight, inner_k_tiles):
        # [wheel-doc]: int32 (k, n) or (n, k), values in [-8, 7], last dim a multiple of 8 -> int32 (.., last / 8),
        # eight 4-bit values per int32, "交叠排放" (interleaved). The real interleaving is the device's private
        # layout, read only by npu_weight_quant_batchmatmul: the emulation packs value j of each 8 into bits
        # 4j..4j+3 and its matmul unpacks the same way (consistent, not bit-identical to the NPU).
        op = "npu_convert_weight_to_int4pack"
        if weight.dtype != torch.int32 or weight.dim() != 2:
            raise NpuRuleError(f"torch_npu.{op}: weight must be a 2-D int32 tensor (got {weight.dtype}, "
                               f"{weight.dim()}-D)")
        if not weight.is_contiguous():
            raise NpuRuleError(f"torch_npu.{op}: weight must be contiguous")
        if weight.shape[-1] % 8:
            raise NpuRuleError(f"torch_npu.{op}: the last dimension ({weight.shape[-1]}) must be a multiple of 8")
        if weight.numel() and (int(weight.min()) < -8 or int(weight.max()) > 7):
            raise NpuRuleError(f"torch_npu.{op}: values must be int4, in [-8, 7]")
        nib = (weight & 0xF).view(weight.shape[0], -1, 8)
        packed = torch.zeros(nib.shape[:2], dtype=torch.int64)
        for j in range(8):
            packed |= nib[..., j].to(torch.int64) << (4 * j)
        return torch.where(packed >= 2 ** 31, packed - 2 ** 32, packed).to(torch.int32)

    @staticmethod
    def _unpack_int4(packed):
        # inverse of the emulation's npu_convert_weight_to_int4pack, along the last dimension; values in [-8, 7]
        p = packed.to(torch.int64) & 0xFFFFFFFF
        nib = torch.stack([(p >> (4 * j)) & 0xF for j in range(8)], dim=-1).reshape(*packed.shape[:-1], -1)
        return torch.where(nib >= 8, nib - 16, nib)

    @_op
    def npu_weight_quant_batchmatmul(self, x, weight, antiquant_scale, antiquant_offset, quant_scale, quant_offset,
                                     bias, antiquant_group_size, inner_precise, weight_dtype):
        # [wheel-doc]: y = x @ ((weight + antiquant_offset) * antiquant_scale) + bias; x (M, K) fp16/bf16 (310P:
        # fp16); weight (K, N) int8, or int32 carrying int4 (A2/A3, from npu_convert_weight_to_int4pack), transposed
        # views allowed; antiquant_scale (1,)/(N,)/(1, N) per tensor/channel or (ceil(K / g), N) per group, the
        # dtype of x; antiquant_offset of the same shape and dtype; bias fp32 for bf16 x, fp16 for fp16 x; group
        # size 0 or a multiple of 32 in [32, K - 1] (not on 310P). quant_scale/offset (int8 output) and the int64
        # scale form are not emulated.
        op = "npu_weight_quant_batchmatmul"
        if quant_scale is not None or quant_offset is not None:
            raise NotImplementedError(f"the emulation of {op} does not implement quant_scale/quant_offset")
        _dtypes(self.chip, op, x, HALFS)
        if x.dim() != 2:
            raise NpuRuleError(f"torch_npu.{op}: x must be 2-D (M, K), got {x.dim()}-D")
        m, k = x.shape
        if weight.dtype == torch.int8:
            w = weight.float()
        elif weight.dtype == torch.int32 and self.chip != "310P":
            # int4 packed along the last dim: (K, N / 8), or a transposed view of (N, K / 8)
            w = self._unpack_int4(weight).float() if weight.shape[0] == k else self._unpack_int4(weight.t()).t()
            w = w.float()
        else:
            raise NpuRuleError(f"torch_npu.{op} on {self.chip}: weight dtype {weight.dtype} is not supported "
                               f"(int8{', int32 carrying int4' if self.chip != '310P' else ''})")
        if w.dim() != 2 or w.shape[0] != k:
            raise NpuRuleError(f"torch_npu.{op}: x (M, K) = {tuple(x.shape)} and weight (K, N) = "
                               f"{tuple(w.shape)} disagree on K")
        n = w.shape[1]
        if not (1 <= k <= 65535 and 1 <= n <= 65535):
            raise NpuRuleError(f"torch_npu.{op}: K and N must be in [1, 65535] (K={k}, N={n})")
        if antiquant_scale.dtype != x.dtype:
            raise NpuRuleError(f"torch_npu.{op}: antiquant_scale dtype {antiquant_scale.dtype} must equal x's "
                               f"({x.dtype}) (the int64 form is not emulated)")
        if antiquant_offset is not None and (antiquant_offset.shape != antiquant_scale.shape
                                             or antiquant_offset.dtype != antiquant_scale.dtype):
            raise NpuRuleError(f"torch_npu.{op}: antiquant_offset must have antiquant_scale's shape and dtype")
        g = antiquant_group_size
        if g:
            if self.chip == "310P":
                raise NpuRuleError(f"torch_npu.{op} on 310P: per-group quantisation is not supported "
                                   "(antiquant_group_size must be 0)")
            if g % 32 or not 32 <= g <= k - 1:
                raise NpuRuleError(f"torch_npu.{op}: antiquant_group_size must be a multiple of 32 in [32, K-1] "
                                   f"(got {g}, K={k})")
            groups = -(-k // g)
            if tuple(antiquant_scale.shape) != (groups, n):
                raise NpuRuleError(f"torch_npu.{op}: per-group antiquant_scale must be (ceil(K/g), N) = "
                                   f"({groups}, {n}), got {tuple(antiquant_scale.shape)}")
            expand = (lambda t: t.float().repeat_interleave(g, dim=0)[:k])
        else:
            if antiquant_scale.numel() not in (1, n) or antiquant_scale.dim() > 2 or (
                    antiquant_scale.dim() == 2 and antiquant_scale.shape[0] != 1):
                raise NpuRuleError(f"torch_npu.{op}: per-tensor/per-channel antiquant_scale must be (1,), (N,) or "
                                   f"(1, N) with N={n}, got {tuple(antiquant_scale.shape)}")
            expand = (lambda t: t.float().reshape(1, -1))
        if bias is not None:
            want = torch.float32 if x.dtype == torch.bfloat16 else torch.float16
            if bias.dtype != want:
                raise NpuRuleError(f"torch_npu.{op}: bias must be {want} for {x.dtype} x, got {bias.dtype}")
        if antiquant_offset is not None:
            w = w + expand(antiquant_offset)
        w = w * expand(antiquant_scale)
        y = x.float() @ w
        if bias is not None:
            y = y + bias.float()
        return y.to(x.dtype)

    # ------------------------------------------------------------------------------------------------ formats
    @_op
    def npu_format_cast(self, self_, acl_format, customize_dtype, input_dtype):
        # The format is a physical layout on the device (29 = FRACTAL_NZ, 2 = ND); values are unchanged. The
        # emulation returns a copy and remembers its format by storage address (a tag; good enough for tests).
        out = self_.clone()
        self._formats[out.untyped_storage().data_ptr()] = acl_format
        return out

    @_op
    def get_npu_format(self, self_):
        return self._formats.get(self_.untyped_storage().data_ptr(), ACL_FORMAT_ND)




# --------------------------------------------------------------------------------------------------- strict mode
# ATen ops that return a host value: _local_scalar_dense (.item()/.tolist() outside inference mode), item (inside
# it), is_nonzero (bool(tensor)), equal (torch.equal).
_HOST_SYNC_OPS = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal"}


class NpuStrictGuard(torch.utils._python_dispatch.TorchDispatchMode):
    """What TORCH_NPU_FALLBACK_CPU_DISABLE and the NPU's limits would reject, checked on a CPU run.

    Inside the guard (emulated ops' own bodies excepted, they stand for device kernels) it is an error to:
    - produce a float64 tensor (float64 is partly unsupported on every Ascend chip);
    - run a 3-D convolution (Conv3d fails on 910B with error 500002; the kit computes the patch embedding as a
      matmul);
    - synchronise with the host (``.item()``, ``.tolist()``, ``bool(tensor)``), when ``host_sync_ok`` is False:
      the decode step must not wait for the device.
    """

    def __init__(self, host_sync_ok: bool = False):
        super().__init__()
        self.host_sync_ok = host_sync_ok

    def __enter__(self):
        # Tensor.tolist() reads CPU memory without going through the dispatcher: watch it directly.
        if not self.host_sync_ok:
            self._tolist = torch.Tensor.tolist
            original = self._tolist

            def tolist(t):
                if not in_emulated_kernel():
                    raise NpuRuleError("host synchronisation (.tolist()) inside the decode step; the NPU would "
                                       "stall here: keep the value on the device")
                return original(t)

            torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        if not self.host_sync_ok:
            torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not in_emulated_kernel():
            name = func.name()
            if name.split(".")[0] in _HOST_SYNC_OPS and not self.host_sync_ok:
                raise NpuRuleError("host synchronisation (.item()/.tolist()/bool(tensor)) inside the decode step; "
                                   "the NPU would stall here: keep the value on the device")
            if name.startswith("aten::convolution") and args and args[0].dim() == 5:
                raise NpuRuleError("Conv3d has no working kernel on 910B (error 500002); use a matmul")
        out = func(*args, **kwargs)
        if not in_emulated_kernel():
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                    raise NpuRuleError(f"{func.name()} produced a float64 tensor; float64 is not supported on "
                                       "Ascend NPUs: keep it in float32")
        return out
