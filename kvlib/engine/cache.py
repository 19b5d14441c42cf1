"""`KVCache`: one sequence's rotated keys and values, preallocated; the only writer of its tensors.

Design facts:
- Slots are in prompt order. A slot's rotary position is whatever its keys were rotated
  to, which is how `naive` composition (keys at their encoding positions) sits at any slot.
- Every write goes through a method: `append` (whole-model KV after the filled slots),
  `append_rotated` (a run of stored pre-RoPE keys, rotated into their slots),
  `write` (one layer's new tokens at a contiguous start, during a forward; `write_projected`
  the same straight from the fused q/k/v product, rotating as it writes), `write_slots`
  (one layer's tokens at scattered slots, during a repair), `truncate` (rewind) and `fork`
  (an independent copy). Callers never index `k`/`v` to write.
- `length` counts filled slots; a forward writes its slots layer by layer and then
  `commit`s them, so a partial forward (drift, question attention) leaves `length` alone.
"""

from __future__ import annotations

import threading

import torch

from kvlib.engine import rope_kernel
from kvlib.engine.rope import rope_into_
from kvlib.engine.stages import stage
from kvlib.errors import KvlibError


# Idle KV buffers kept for reuse: eight 4k-token SmolLM2 caches (serve's batch) fit.
POOL_BYTES = 1 << 30


class BufferPool:
    """KV buffers reused across requests, so that a request's cache is memory already mapped.

    A fresh cache of tens to hundreds of MB is fresh pages, and on CPU every first touch of
    a 4 KiB page is a fault: allocating and filling a 4k-token SmolLM2 cache cost 38.6 ms
    measured here, refilling a warm buffer 3.3 ms. (Transparent huge pages for every torch
    allocation, `THP_MEM_ALLOC_ENABLE=1`, fixed that but made each few-MB temporary fault a
    fresh 2 MiB page instead: softmax over 30 x 4k scores went from 0.25 to 4.2 ms.)

    A buffer is free when nothing but the pool references its storage: no cache and no view
    of one is alive. Ownership needs no release call, so a cache forgotten anywhere (a
    stream dropped mid-decode, a bench state) can never be handed out twice. Free buffers
    are kept up to `max_bytes`; a buffer holds K and V: [2, L, Hkv, C, D].
    """

    def __init__(self, max_bytes: int = POOL_BYTES):
        self.max_bytes, self.buffers = max_bytes, []
        self._lock = threading.Lock()

    @staticmethod
    def _free(buf: torch.Tensor) -> bool:
        # torch's count of tensors sharing the storage (private, stable under the exact torch pin):
        # buf itself and the wrapper made for this query
        return torch._C._storage_Use_Count(buf.untyped_storage()._cdata) <= 2

    def take(self, n_layers: int, n_kv: int, capacity: int, head_dim: int, dtype, device) -> torch.Tensor:
        """A buffer with room for `capacity` slots: [2, L, Hkv, >= capacity, D]."""
        with self._lock:
            fits = [b for b in self.buffers if b.shape[:3] == (2, n_layers, n_kv) and b.shape[4] == head_dim
                    and b.dtype == dtype and b.device == device and capacity <= b.shape[3] <= 2 * capacity + 1024
                    and self._free(b)]
            if fits:
                return min(fits, key=lambda b: b.shape[3])
            slots = -(-capacity // 1024) * 1024
            with torch.inference_mode(False):  # a normal tensor: reused later in or out of inference mode
                buf = torch.empty((2, n_layers, n_kv, slots, head_dim), dtype=dtype, device=device)
            self._keep(buf)
            return buf

    def _keep(self, buf: torch.Tensor) -> None:
        size = buf.numel() * buf.element_size()
        total = sum(b.numel() * b.element_size() for b in self.buffers)
        for old in sorted((b for b in self.buffers if self._free(b)), key=lambda b: -b.numel()):
            if total + size <= self.max_bytes:
                break
            self.buffers = [b for b in self.buffers if b is not old]  # by identity: == on tensors compares values
            total -= old.numel() * old.element_size()
        if total + size <= self.max_bytes:
            self.buffers.append(buf)


POOL = BufferPool()


class KVCache:
    """k, v: [L, Hkv, capacity, D] (views of a pooled buffer); `length` slots are filled."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, capacity: int, dtype, device):
        buf = POOL.take(n_layers, n_kv_heads, capacity, head_dim, dtype, device)
        self.k, self.v = buf[0, :, :, :capacity], buf[1, :, :, :capacity]
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

    def write_projected(self, layer: int, start: int, qkv: torch.Tensor, n_q: int, tables):
        """`write` for new tokens' projections qkv [1, T, (n_q + 2 Hkv) D] taken as they come out of the
        fused product: keys rotated (`tables`: rope.HalfTables of their positions) and values written
        at slot `start` in one pass (rope_kernel). Returns (rotated queries [1, n_q, T, D], views of
        slots [0, start+T)), or None, nothing written, where the kernel does not take them."""
        end = start + qkv.shape[1]
        self._check_room(end - self.length)
        q = rope_kernel.rope_qkv_into(qkv, n_q, tables.cos, tables.sin, self.k, self.v, layer, start)
        return None if q is None else (q, self.k[layer, :, :end], self.v[layer, :, :end])

    def write_slots(self, layer: int, slots: torch.Tensor, k_rot: torch.Tensor, v: torch.Tensor) -> None:
        """Overwrite one layer's KV at filled slots (a repair). k_rot, v: [Hkv, S, D]."""
        self.k[layer, :, slots] = k_rot.to(self.k.dtype)
        self.v[layer, :, slots] = v.to(self.v.dtype)

    def moved(self, layer: int, slots: torch.Tensor, k_rot: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """How far new KV for filled `slots` (k_rot, v: [Hkv, S, D]) lies from what those slots hold in
        `layer`: per slot, the L2 change of its key plus its value, summed over KV heads ([S], float32).
        Blend and auto pick the tokens to recompute by it."""
        old_k, old_v = self.layer(layer)
        return ((k_rot - old_k[:, slots]).float().norm(dim=-1) + (v - old_v[:, slots]).float().norm(dim=-1)).sum(0)

    def append_rotated(self, chunks: list, tables) -> None:
        """Append a run of chunks' whole-model pre-RoPE keys and values, [>= L, Hkv, T_i, D] each,
        with the run's keys rotated, `tables` covering the run's slots. Stored float16 KV into a
        float32 cache has its keys read once and written rotated by rope_kernel (the same bits)
        where it is built; otherwise the run is copied in and rotated in
        place, layer by layer (rope.rope_into_): one pass per layer on the whole run costs half of
        rotating each chunk on its way in (18 against 35 ms for 4k keys: 30 calls instead of 30 per chunk)."""
        start, n = self.length, self.k.shape[0]
        self._check_room(sum(k.shape[2] for k, _ in chunks))
        if self._append_by_kernel(chunks, tables):
            return
        with stage("assemble"):
            for k_sem, v in chunks:
                t = k_sem.shape[2]
                self.k[:, :, self.length : self.length + t] = k_sem[:n]
                self.v[:, :, self.length : self.length + t] = v[:n]
                self.length += t
        with stage("rotate"):
            run = self.k[:, :, start : self.length]
            rope_into_(run, run, tables)

    def _append_by_kernel(self, chunks: list, tables) -> bool:
        """append_rotated through rope_kernel: a bf16 run in one pass (keys rotated and values copied
        together, marked as rotation), else chunk by chunk; False, nothing written, where the kernel
        does not take every chunk of the run."""
        n, runs, row = self.k.shape[0], [], 0
        with stage("rotate"):
            run = [(k_sem[:n], v[:n]) for k_sem, v in chunks]
            if rope_kernel.rope_run_into(self.k, self.v, self.length, run, tables.cos, tables.sin):
                self.length += sum(k.shape[2] for k, _ in run)
                return True
        for k_sem, v in chunks:
            t = k_sem.shape[2]
            part, slots = tables.slice(row, t), slice(self.length + row, self.length + row + t)
            if not rope_kernel.accepts(self.k[:, :, slots], k_sem[:n], part.cos, part.sin):
                return False
            runs.append((k_sem, v, part, slots))
            row += t
        for k_sem, v, part, slots in runs:
            with stage("rotate"):
                rope_kernel.rope_into(self.k[:, :, slots], k_sem[:n], part.cos, part.sin)
            with stage("assemble"):
                # torch's converting copy: the same conversion in C measured 7 against 5 ms for 4k values
                self.v[:, :, slots] = v[:n]
        self.length += row
        return True

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
