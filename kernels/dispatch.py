"""One dispatch point for every hot op.

A backend is a :class:`Kernels` record of callables. ``reference`` is the plain PyTorch oracle; other backends
(``cpu``, ``cuda``, ``npu``, ``npu-emulated``, ``export``) replace the ops they have something better for and
inherit the rest from the reference.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from moevl.kernels import moe, reference


@dataclasses.dataclass(frozen=True)
class Kernels:
    name: str
    rms_norm: Callable          # (x, weight, eps) -> y
    layer_norm: Callable        # (x, weight, bias, eps) -> y
    apply_rotary: Callable      # (q, k, cos, sin) -> (q, k); q/k [B, H, T, D], cos/sin [B, T, D]
    mrope_cos_sin: Callable     # (positions [3, B, T], inv_freq [D/2], mrope_section, dtype) -> cos, sin [B, T, D]
    swiglu: Callable            # (gate, up) -> silu(gate) * up
    attention: Callable         # (q [B,Hq,T,D], k, v [B,Hkv,S,D], keep_mask [B,1,T,S] bool, scale) -> [B,Hq,T,D]
    patch_embed: Callable       # (patches [N, C*t*p*p], weight [E, C, t, p, p]) -> [N, E]
    lora_moe_prepare: Callable  # (lora_A [X,r,i], lora_B [X,o,r], expert [B], scales [B,2]) -> plan
    lora_moe_linear: Callable   # (x [B,T,i], weight [o,i], bias|None, plan|None) -> [B,T,o]
    round_to_fp16: Callable     # (x fp32) -> the nearest fp16 values, kept in fp32 (Awaker's router)
    insert_image_features: Callable  # (embeds [B,T,H], features [M,H], mask [B,T] bool) -> embeds with features
    moe_ffn: Callable | None = None  # token-level top-k MoE (MoE-LLaVA); see kernels.moe
    # (dtype) -> {op: why it cannot run in that dtype, and what to use}: a chip's rules, checked at load time
    unsupported: Callable = lambda dtype: {}
    # (model) -> None, once when a model is placed: binds quantised weights to this backend's kernels and puts
    # dense base weights in the backend's layout (kernels/quant.py); the reference keeps everything as it is
    prepare_weights: Callable = lambda model: None
    # (x [B,T,i], linears) -> their outputs: linears of one input (q/k/v, gate/up), one product where packed together
    linear_group: Callable = reference.linear_group
    # (x [B,T,i], adapted linears, plans) -> their outputs (Awaker's gate/up), likewise
    lora_moe_group: Callable = reference.lora_moe_group


_BACKENDS: dict[str, Kernels] = {}


def register_backend(kernels: Kernels) -> None:
    _BACKENDS[kernels.name] = kernels


def _reference() -> Kernels:
    return Kernels(
        name="reference",
        rms_norm=reference.rms_norm,
        layer_norm=reference.layer_norm,
        apply_rotary=reference.apply_rotary,
        mrope_cos_sin=reference.mrope_cos_sin,
        swiglu=reference.swiglu,
        attention=reference.attention,
        patch_embed=reference.patch_embed,
        lora_moe_prepare=reference.lora_moe_prepare,
        lora_moe_linear=reference.lora_moe_linear,
        round_to_fp16=reference.round_to_fp16,
        insert_image_features=reference.insert_image_features,
        moe_ffn=moe.moe_ffn_reference,
    )


register_backend(_reference())


def available_backends() -> list[str]:
    _load_optional_backends()
    return sorted(_BACKENDS)


def _load_optional_backends() -> None:
    # Backends live in their own modules and register themselves on import.
    import importlib

    # triton_lora after cpu: it extends cpu's "cuda" set (Triton LoRA-MoE where triton runs, else cpu's ops)
    for mod in ("moevl.kernels.cpu", "moevl.kernels.triton_lora", "moevl.kernels.export", "moevl.kernels.npu"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


def get_kernels(backend) -> Kernels:
    """The kernel set for a Device (its ``kernel_backend``, and for NPUs its chip), or for a backend name
    ("reference", "cpu", "cuda", "npu", "npu-emulated", "export"). A Device with ``strict`` set gets its set
    checked: every hot op must be the device's own variant (moevl.kernels.npu.check_no_reference_ops)."""
    if not isinstance(backend, str):
        return _kernels_for_device(backend)
    _load_optional_backends()
    if backend not in _BACKENDS:
        # A backend without its own set yet runs the reference ops.
        if backend in ("cpu", "cuda", "export"):
            return dataclasses.replace(_BACKENDS["reference"], name=backend)
        raise ValueError(f"unknown kernel backend {backend!r}; known: {sorted(_BACKENDS)}")
    return _BACKENDS[backend]


class KernelRef:
    """A shared, swappable handle: modules keep one and call ``self.ops.rms_norm(...)``.

    ``model.set_kernels(k)`` swaps the set for every module at once.
    """

    def __init__(self, kernels: Kernels | None = None):
        self.kernels = kernels or _BACKENDS["reference"]

    def __getattr__(self, name):
        if "kernels" not in self.__dict__:  # mid-construction (copy.deepcopy, pickle): no attribute, not a KeyError
            raise AttributeError(name)
        return getattr(self.__dict__["kernels"], name)


# backend name -> factory(device) -> Kernels, for backends whose set depends on the device (the NPU sets on the chip)
_DEVICE_FACTORIES: dict[str, Callable] = {}


def register_device_kernels(backend: str, factory: Callable) -> None:
    _DEVICE_FACTORIES[backend] = factory


def _kernels_for_device(device) -> Kernels:
    _load_optional_backends()
    factory = _DEVICE_FACTORIES.get(device.kernel_backend)
    return factory(device) if factory is not None else get_kernels(device.kernel_backend)
