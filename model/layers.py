"""Building blocks both families share: the static KV cache and the norms."""
from __future__ import annotations

import torch
from torch import nn

from moevl.kernels import KernelRef


class KVCache(nn.Module):
    """Static preallocated key/value buffers for one layer: [batch, kv_heads, max_len, head_dim]."""

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, cache_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        # cache_pos [T]: the slots written by this step (the same for every request of the batch).
        self.k.index_copy_(2, cache_pos, k)
        self.v.index_copy_(2, cache_pos, v)
        return self.k, self.v

    def rows(self, start: int, stop: int) -> "KVCacheRows":
        """Rows [start, stop) of this cache as a cache of their own (views: writes land in this cache)."""
        return KVCacheRows(self.k[start:stop], self.v[start:stop])


class KVCacheRows:
    """A contiguous block of a KVCache's rows (views), for running part of a batch: one request's prefill into
    its row, or a decode step over the rows in use (``moevl.model.engine``)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v

    def update(self, cache_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        self.k.index_copy_(2, cache_pos, k)
        self.v.index_copy_(2, cache_pos, v)
        return self.k, self.v


class KVCacheMemoryError(MemoryError, ValueError):
    """The static KV cache does not fit (a ValueError too, so the CLI reports it as a bad option, exit 2)."""


# Cache lengths are rounded up to a multiple of this, and a cache is reused while it is long enough, so that a
# compiled decode step (static shapes) sees few distinct lengths (gpt-fast grows its caches the same way).
CACHE_LENGTH_STEP = 256


class CachedDecoder(nn.Module):
    """What both families' whole networks share: the kernel handle (``set_kernels`` swaps the set for every module
    at once), static KV caches and the logits. ``setup_caches`` keeps the caches while the batch size is the same
    and they are long enough, else allocates new ones rounded up to CACHE_LENGTH_STEP slots (at most ``limit``).
    Subclasses define ``ops`` (a KernelRef), ``cfg`` (num_kv_heads, head_dim), ``model.layers`` and ``lm_head``."""

    caches: nn.ModuleList | None

    def set_kernels(self, kernels) -> None:
        self.ops.kernels = kernels

    def setup_caches(self, batch: int, max_len: int, limit: int | None = None) -> int:
        """-> the cache length (>= max_len)."""
        p = self.lm_head.weight
        current = self.caches[0].k.shape if self.caches is not None else None
        if (current is not None and current[0] == batch and current[2] >= max_len
                and self.caches[0].k.dtype == p.dtype and self.caches[0].k.device == p.device):
            return current[2]
        length = -(-max_len // CACHE_LENGTH_STEP) * CACHE_LENGTH_STEP
        if limit is not None:
            length = max(min(length, limit), max_len)
        self.caches = None  # the old caches go first: both may not fit
        self.caches = self.new_caches(batch, length)
        return length

    def new_caches(self, batch: int, length: int) -> nn.ModuleList:
        """One zeroed KVCache per layer, [batch, kv_heads, length, head_dim], or a KVCacheMemoryError."""
        p = self.lm_head.weight
        try:
            return nn.ModuleList(
                KVCache(batch, self.cfg.num_kv_heads, length, self.cfg.head_dim, p.dtype, p.device)
                for _ in self.model.layers)
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if "memory" not in str(e).lower():
                raise
            size = 2 * len(self.model.layers) * batch * self.cfg.num_kv_heads * length * self.cfg.head_dim
            gib = size * p.element_size() / 2**30
            raise KVCacheMemoryError(
                f"the KV cache for {batch} request(s) x {length} tokens needs {gib:.2f} GiB on {p.device}, which is "
                "not free: lower --max-new-tokens, --max-context or --max-batch, send fewer requests at once, or "
                "use a smaller dtype") from None

    def logits(self, hidden):
        return self.lm_head(hidden).float()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, ops: KernelRef):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.ops = ops

    def forward(self, x):
        return self.ops.rms_norm(x, self.weight, self.eps)


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float, ops: KernelRef, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None
        self.eps = eps
        self.ops = ops

    def forward(self, x):
        return self.ops.layer_norm(x, self.weight, self.bias, self.eps)
