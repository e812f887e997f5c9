"""Hot ops of the models, each as a reference implementation plus fast variants per backend.

Model code calls ops through a :class:`Kernels` object (``ops.rms_norm(...)``) and never asks which device
it runs on; the Device picks the kernel set once (``get_kernels(device)``).
"""
from moevl.kernels.dispatch import Kernels, KernelRef, get_kernels, available_backends, register_backend

__all__ = ["Kernels", "KernelRef", "get_kernels", "available_backends", "register_backend"]
