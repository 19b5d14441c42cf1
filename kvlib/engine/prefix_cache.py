"""Exact prefix caching, done the way vLLM's automatic prefix caching and SGLang do it.

Design facts:
- Token ids are cut into blocks of `block_size` (16) tokens. Only full blocks are
  cached; a trailing partial block is always recomputed.
- Each block is keyed by a chained hash: blake2b(parent block's hash || this block's
  token ids as int64 little-endian). A block's key therefore names the whole prefix up
  to and including it, so a match is a walk from the first block that stops at the first
  miss. The same chunk at a different offset, or after different chunks, hashes
  differently: that is exactly why prefix caching loses its hits when RAG passages are
  reordered. Python's `hash()` is not used: it is salted per process and not
  collision-resistant.
- The root hash is derived from `salt` (e.g. the model fingerprint), so caches for
  different models can never share a block, and from a call's `namespace` (the server's
  tenant): one LRU holds every tenant's blocks, and no chain of one tenant's ever matches
  another's, whatever the text.
- Payloads are opaque (the runner stores one block's KV tensors); this module never
  looks inside them.
- Eviction is LRU over blocks, leaves first: when a chain is used, its blocks are
  touched from the last to the first, so a parent is always more recent than its
  children and is evicted after them (vLLM frees a request's blocks in reverse order
  for the same reason). A parent evicted before its child would strand the child.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Sequence

_HASH_BYTES = 16  # 128-bit blake2b: collisions are not a practical concern at cache sizes


@dataclass(frozen=True)
class PrefixMatch:
    n_tokens: int  # tokens covered by the matched blocks: a multiple of block_size
    payloads: list  # one payload per matched block, in prompt order


@dataclass(frozen=True)
class CacheStats:
    lookups: int
    hit_tokens: int
    total_tokens: int  # every token looked up, partial trailing blocks included
    cacheable_tokens: int  # tokens in full blocks, the most a prefix cache could ever hit
    hit_rate: float  # hit_tokens / total_tokens
    block_hit_rate: float  # hit_tokens / cacheable_tokens


def hash_blocks(token_ids: Sequence[int], block_size: int = 16, salt: str = "", namespace: str = "") -> list[bytes]:
    """Chained hashes of every full block of `token_ids`, first block first."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    root = salt if not namespace else f"{salt}\x00{namespace}"  # no namespace: the hashes of before
    parent = hashlib.blake2b(root.encode(), digest_size=_HASH_BYTES, person=b"kvlib-prefix").digest()
    hashes = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        block = token_ids[start : start + block_size]
        h = hashlib.blake2b(parent, digest_size=_HASH_BYTES)
        # int64 so any vocabulary size fits; signed, so a bad negative id still hashes.
        h.update(struct.pack(f"<{len(block)}q", *block))
        parent = h.digest()
        hashes.append(parent)
    return hashes


class PrefixCache:
    """Block-hashed cache of per-block payloads with longest-prefix lookup and LRU eviction."""

    def __init__(self, block_size: int = 16, max_blocks: int | None = None, salt: str = "") -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if max_blocks is not None and max_blocks < 1:
            raise ValueError(f"max_blocks must be >= 1 or None, got {max_blocks}")
        self.block_size = block_size
        self.max_blocks = max_blocks
        self.salt = salt
        self._blocks: OrderedDict[bytes, Any] = OrderedDict()  # least recently used first
        self._lookups = self._hit_tokens = self._total_tokens = self._cacheable_tokens = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def match(self, token_ids: Sequence[int], max_tokens: int | None = None, namespace: str = "") -> PrefixMatch:
        """Longest prefix of `token_ids` made of whole cached blocks; counts towards stats.

        `max_tokens` caps the hit. A runner that needs the last prompt position's logits
        passes `len(token_ids) - 1`, as vLLM does, so at least one token is computed.
        """
        limit = len(token_ids) if max_tokens is None else min(max_tokens, len(token_ids))
        hashes = hash_blocks(token_ids[:limit], self.block_size, self.salt, namespace)
        matched: list[bytes] = []
        for h in hashes:
            if h not in self._blocks:
                break
            matched.append(h)
        self._touch(matched)
        n_tokens = len(matched) * self.block_size
        self._lookups += 1
        self._hit_tokens += n_tokens
        self._total_tokens += len(token_ids)
        self._cacheable_tokens += len(token_ids) // self.block_size * self.block_size
        return PrefixMatch(n_tokens=n_tokens, payloads=[self._blocks[h] for h in matched])

    def insert(self, token_ids: Sequence[int], payloads: Sequence[Any] | Callable[[int], Any],
               namespace: str = "") -> int:
        """Cache one payload per full block of `token_ids`; returns how many blocks were new.

        A block already cached keeps its payload: equal hashes mean equal prefixes, so
        the KV is the same. `payloads` may be a function of the block's index, called only
        for blocks not cached yet (so a caller copies out only new blocks' KV). Does not
        count towards stats.
        """
        hashes = hash_blocks(token_ids, self.block_size, self.salt, namespace)
        if not callable(payloads) and len(payloads) != len(hashes):
            raise ValueError(
                f"{len(token_ids)} tokens make {len(hashes)} full blocks of {self.block_size}, "
                f"but {len(payloads)} payloads were given"
            )
        new = 0
        for i, h in enumerate(hashes):
            if h not in self._blocks:
                self._blocks[h] = payloads(i) if callable(payloads) else payloads[i]
                new += 1
        self._touch(hashes)
        self._evict()
        return new

    def stats(self) -> CacheStats:
        return CacheStats(
            lookups=self._lookups,
            hit_tokens=self._hit_tokens,
            total_tokens=self._total_tokens,
            cacheable_tokens=self._cacheable_tokens,
            hit_rate=self._hit_tokens / self._total_tokens if self._total_tokens else 0.0,
            block_hit_rate=self._hit_tokens / self._cacheable_tokens if self._cacheable_tokens else 0.0,
        )

    def clear(self) -> None:
        """Drop every block and reset the statistics."""
        self._blocks.clear()
        self._lookups = self._hit_tokens = self._total_tokens = self._cacheable_tokens = 0

    def _touch(self, chain: list[bytes]) -> None:
        # Last block first, so that the chain's first block ends up most recent (module docstring).
        for h in reversed(chain):
            self._blocks.move_to_end(h)

    def _evict(self) -> None:
        while self.max_blocks is not None and len(self._blocks) > self.max_blocks:
            self._blocks.popitem(last=False)
