"""Tiny base models and data sets built in the training tests (random weights, a few generated records)."""
from __future__ import annotations

from pathlib import Path

import pytest

from moevl.model.awaker.config import AdapterConfig, awaker_tiny
from moevl.model.awaker.tiny import TINY_TOKENIZER
from moevl.model.checkpoint import save


def awaker_base(folder: Path, seed: int = 0) -> Path:
    """awaker-tiny's structure without adapters (what stage 1 starts from), random weights, in the kit's format."""
    from moevl.model.awaker.network import AwakerModel
    from moevl.model.awaker.tiny import init_random_weights

    cfg = awaker_tiny()
    cfg.adapters = AdapterConfig(num_experts=0)
    model = AwakerModel(cfg)
    init_random_weights(model, seed)
    model.init_buffers()
    return save(model, TINY_TOKENIZER, folder)


def moellava_dense(folder: Path, seed: int = 0) -> Path:
    """moellava-tiny's structure with dense FFNs only (what --stage moe starts from), random weights."""
    from moevl.model.moe_llava.checkpoint import TINY_ASSETS, init_random_weights
    from moevl.model.moe_llava.config import moellava_tiny
    from moevl.model.moe_llava.network import MoeLlavaModel

    cfg = moellava_tiny()
    cfg.moe_layers = ()
    model = MoeLlavaModel(cfg)
    init_random_weights(model, seed)
    model.init_buffers()
    return save(model, TINY_ASSETS, folder)


def shapes(folder: Path, n: int = 8, seed: int = 3) -> Path:
    from moevl.train.data import make_shapes

    return make_shapes(folder, n, seed)


@pytest.fixture(autouse=True, scope="module")
def _no_npu_accelerator_leak():
    """test_device's fake NPU renames PyTorch's PrivateUse1 backend to "npu" for the whole process, after which
    torch.accelerator (which every optimizer step asks) looks up a torch.npu that no longer exists. Training tests
    run on the CPU: give that lookup a module that says no NPU is available (module scope: before the modules'
    training fixtures run)."""
    import types

    import torch

    added = torch._C._get_privateuse1_backend_name() == "npu" and not hasattr(torch, "npu")
    if added:
        torch.npu = types.SimpleNamespace(is_available=lambda: False, device_count=lambda: 0)
    yield
    if added:
        del torch.npu
