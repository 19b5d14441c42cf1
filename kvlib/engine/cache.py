"""`KVCache`: one sequence's rotated keys and values, preallocated; the only writer of its tensors.

Design facts:
- Slots are in prompt order. A slot's rotary position is whatever its keys were rotated
  to, which is how `naive` composition (keys at their encoding positions) sits at any slot.
- Every write goes through a method: `append` (whole-model KV after the filled slots),
  `write` (one layer's new tokens at a contiguous start, during a forward), `write_slots`
  (one layer's tokens at scattered slots, during a repair), `truncate` (rewind) and `fork`
  (an independent copy). Callers never index `k`/`v` to write.
- `length` counts filled slots; a forward writes its slots layer by layer and then
  `commit`s them, so a partial forward (drift, question attention) leaves `length` alone.
"""

from __future__ import annotations

import torch

from kvlib.errors import KvlibError


class KVCache:
    """k, v: [L, Hkv, capacity, D]; `length` slots are filled."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, capacity: int, dtype, device):
        shape = (n_layers, n_kv_heads, capacity, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0

    @classmethod
    def for_model(cls, lm, capacity: int, n_layers: int | None = None) -> "KVCache":
        """A cache for all layers, or for the first n_layers only (a partial forward)."""
        return cls(n_layers or lm.n_layers, lm.n_kv_heads, lm.head_dim, capacity, lm.dtype, lm.device)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def append(self, k_rot: torch.Tensor, v: torch.Tensor) -> None:
        """Append whole-model KV after the filled slots. k_rot, v: [>= L, Hkv, T, D] (cast to the cache dtype)."""
        t, n = k_rot.shape[2], self.k.shape[0]
        self._check_room(t)
        self.k[:, :, self.length : self.length + t] = k_rot[:n]
        self.v[:, :, self.length : self.length + t] = v[:n]
        self.length += t

    def write(self, layer: int, start: int, k_rot: torch.Tensor, v: torch.Tensor):
        """Write one layer's new KV ([Hkv, T, D]) at slot `start`; return views of slots [0, start+T)."""
        end = start + k_rot.shape[1]
        self._check_room(end - self.length)
        self.k[layer, :, start:end] = k_rot
        self.v[layer, :, start:end] = v
        return self.k[layer, :, :end], self.v[layer, :, :end]

    def write_slots(self, layer: int, slots: torch.Tensor, k_rot: torch.Tensor, v: torch.Tensor) -> None:
        """Overwrite one layer's KV at filled slots (a repair). k_rot, v: [Hkv, S, D]."""
        self.k[layer, :, slots] = k_rot.to(self.k.dtype)
        self.v[layer, :, slots] = v.to(self.v.dtype)

    def rotate(self, start: int, positions: torch.Tensor, rope) -> None:
        """Rotate the pre-RoPE keys in slots [start, start + len(positions)) of every layer, in place."""
        from kvlib.engine.rope import apply_rope_

        apply_rope_(self.k[:, :, start : start + positions.shape[0]], positions, rope)

    def layer(self, layer: int, end: int | None = None):
        """Views of one layer's keys and values over slots [0, end) (default: the filled ones)."""
        end = self.length if end is None else end
        return self.k[layer, :, :end], self.v[layer, :, :end]

    def read(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of every layer's KV over slots [start, end): [L, Hkv, end-start, D]."""
        return self.k[:, :, start:end], self.v[:, :, start:end]

    def commit(self, end: int) -> None:
        """Mark slots up to `end` filled, after a forward wrote them in every layer."""
        self._check_room(end - self.length)
        self.length = end

    def truncate(self, length: int) -> None:
        """Forget every slot from `length` on (their tensors are overwritten by later writes)."""
        if not 0 <= length <= self.length:
            raise KvlibError(f"cannot truncate a cache of {self.length} slots to {length}")
        self.length = length

    def fork(self, extra: int = 0) -> "KVCache":
        """An independent copy of the filled slots, with room for `extra` more."""
        n_layers, n_kv, _, head_dim = self.k.shape
        out = KVCache(n_layers, n_kv, head_dim, self.length + extra, self.k.dtype, self.k.device)
        out.append(*self.read(0, self.length))
        return out

    def _check_room(self, extra: int) -> None:
        if self.length + extra > self.capacity:
            raise KvlibError(f"KV cache full: {self.length} + {extra} > capacity {self.capacity}")
