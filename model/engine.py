"""Continuous batching over a session's static KV cache: requests join the running batch at step boundaries and
leave when they finish, each with its own positions, attention mask and routing.

What happens to one request (top to bottom):
- ``add(batch)``: its prompt (a batch of one, unpadded) is prefilled alone into the next free row of the caches,
  into the slots that end at the shared write cursor ``cur`` (the cursor moves on when the prompt is longer than
  the cursor; the other rows just have a few slots more that they do not see). Its routing is computed there, per
  request, as ``ask`` computes it (the family's ``BatchRows`` keeps it for the decode steps).
- ``step(tokens)``: one decode step for every running row: each row writes its token at slot ``cur`` and attends
  to its own slots (``valid[row]``); its rotary position is its own (``pos[row]``), so where its tokens sit in the
  cache does not change what it computes.
- ``remove(row)``: the row leaves; the last running row moves into its place (rows 0..n-1 are the running ones,
  so a step computes exactly the rows in use).
- When the cursor reaches the end of the cache, every row's tokens are packed to the right end of its used slots
  (``_compact``): the cache is reused indefinitely, never reallocated.

The engine is not thread-safe: one thread (``moevl.serve``'s scheduler) drives it.
"""
from __future__ import annotations

import torch

from moevl.model.session import attention_keep


class BatchEngine:
    """A session's model with a [max_batch, kv_heads, max_len, head_dim] KV cache per layer, shared by up to
    ``max_batch`` requests of up to ``max_len`` tokens each (prompt + generated)."""

    def __init__(self, session, max_batch: int, max_len: int | None = None):
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be a whole number >= 1 (--max-batch), not {max_batch!r}")
        self.session = session
        self.max_batch = max_batch
        self.max_len = max_len or session.max_context
        dev = session.device.torch_device
        self.caches = session.model.new_caches(max_batch, self.max_len)
        self.rows = session.batch_rows(max_batch)  # the family's per-row state (routing, expert counts)
        self.valid = torch.zeros(max_batch, self.max_len, dtype=torch.bool, device=dev)  # slots each row sees
        self.pos = torch.zeros(max_batch, dtype=torch.long, device=dev)  # each row's next text position
        self.cur = 0  # the slot the next decode step writes, for every row
        self.n = 0    # running rows: 0..n-1

    @property
    def free(self) -> int:
        return self.max_batch - self.n

    def _views(self, start: int, stop: int):
        return [c.rows(start, stop) for c in self.caches]

    @torch.inference_mode()
    def add(self, batch) -> tuple[int, torch.Tensor]:
        """Prefill one request (a batch of one, no padding) into a free row -> (row, logits [V] of its last
        prompt position)."""
        if self.n == self.max_batch:
            raise RuntimeError("no free row: remove a finished request first")
        if batch.batch_size != 1 or not bool(batch.attention_mask.all()):
            raise ValueError("the engine takes one request at a time, without padding")
        length = batch.input_ids.shape[1]
        if length >= self.max_len:
            raise ValueError(f"the prompt ({length} tokens) leaves no room in the {self.max_len}-token cache")
        dev = self.valid.device
        if self.n == 0:
            self.cur = 0
        self.cur = max(self.cur, length)  # the prompt ends at the cursor (a full cache is packed at the next step)
        row = self.n
        self.valid[row] = False
        self.valid[row, self.cur - length:self.cur] = True
        cache_pos = torch.arange(self.cur - length, self.cur, device=dev)
        keep = attention_keep(self.valid[row:row + 1], cache_pos)
        session = self.session
        with session.device.step_guard(host_sync_ok=True):
            logits = self.rows.prefill(batch.to(dev), row, cache_pos, keep, self._views(row, row + 1))
        self.pos[row] = batch.next_position[0]
        self.n += 1
        return row, logits[0]

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One decode step: tokens [n] (row i's last token) -> logits [n, V] of each row's next position."""
        n = self.n
        if tokens.shape != (n,):
            raise ValueError(f"step takes one token per running row ({n}), not {tuple(tokens.shape)}")
        if self.cur == self.max_len:
            self._compact()
        dev = self.valid.device
        self.valid[:n, self.cur] = True
        cache_pos = torch.tensor([self.cur], device=dev)
        keep = attention_keep(self.valid[:n], cache_pos)
        with self.session.device.step_guard(host_sync_ok=False):
            logits = self.rows.decode(tokens.to(dev), self.pos[:n], cache_pos, keep, self._views(0, n), n)
        self.cur += 1
        self.pos[:n] += 1
        return logits

    @torch.inference_mode()
    def remove(self, row: int) -> int | None:
        """The request in ``row`` leaves. -> the row that moved into its place (the former last row), or None."""
        if not 0 <= row < self.n:
            raise ValueError(f"row {row} is not running (rows 0..{self.n - 1})")
        last = self.n - 1
        moved = None
        if row != last:
            for c in self.caches:
                c.k[row].copy_(c.k[last])
                c.v[row].copy_(c.v[last])
            self.valid[row] = self.valid[last]
            self.pos[row] = self.pos[last]
            self.rows.move(last, row)
            moved = last
        self.valid[last] = False
        self.rows.clear(last)
        self.n -= 1
        return moved

    def routing_decisions(self, row: int) -> list:
        """The routing of the request in ``row`` (the family's decision records, for a batch of one)."""
        return self.rows.decisions(row)

    def _compact(self) -> None:
        """Pack every running row's tokens (in order) to end at the new cursor = the most tokens any row has.
        Attention does not depend on which slots hold a row's tokens, only on which it sees."""
        n = self.n
        counts = self.valid[:n].sum(-1)  # [n]
        new_cur = int(counts.max()) if n else 0
        if new_cur >= self.cur:
            raise RuntimeError("the KV cache is full: a request outgrew the context it was admitted with")
        dest = torch.arange(new_cur, device=self.valid.device)
        # src[i, j]: the slot that holds row i's token for new slot j (rows shorter than new_cur: slot 0, masked)
        order = torch.sort((~self.valid[:n, :self.cur]).to(torch.int8), dim=-1, stable=True).indices  # valid first
        first = new_cur - counts  # [n] the first new slot row i uses
        k_idx = (dest[None, :] - first[:, None]).clamp(min=0)  # [n, new_cur] index into the row's valid slots
        src = torch.gather(order, 1, k_idx)
        for c in self.caches:
            for buf in (c.k, c.v):
                idx = src[:, None, :, None].expand(-1, buf.shape[1], -1, buf.shape[3])
                buf[:n, :, :new_cur] = torch.gather(buf[:n, :, :self.cur], 2, idx)
        valid = dest[None, :] >= first[:, None]
        self.valid[:n] = False
        self.valid[:n, :new_cur] = valid
        self.cur = new_cur
