"""The caches replay simulates, sized in tokens (bytes / KV bytes per token): prefix blocks and library segments.

Design facts:
- The prefix cache is vLLM's: chained block hashes, longest cached run from the first
  block, LRU eviction. A used chain is touched last block first, so a parent is always
  more recent than its children and is evicted after them (a parent evicted first would
  strand its children).
- The library holds segments by content key at any position. `lru` is the library's own
  policy. `cost` is GreedyDual-Size-Frequency: an entry's priority is the clock plus its
  hit count times its recompute cost per stored token, so segments reused often, long
  ones and ones at late positions (whose recompute attends to more context) are kept; the
  clock rises to each evicted priority, so old counts age out.
- An entry larger than the whole capacity is never admitted.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from typing import Callable, Sequence

POLICIES = ("lru", "cost")


class PrefixLRU:
    def __init__(self, capacity_tokens: int | None) -> None:
        self.capacity = capacity_tokens
        self.used = 0
        self.blocks: OrderedDict[bytes, int] = OrderedDict()

    def match(self, nodes: Sequence[tuple[bytes, int]]) -> int:
        """Tokens of the longest cached run of leading nodes; touches them."""
        hit, n = [], 0
        for h, tokens in nodes:
            if h not in self.blocks:
                break
            hit.append(h)
            n += tokens
        for h in reversed(hit):
            self.blocks.move_to_end(h)
        return n

    def insert(self, nodes: Sequence[tuple[bytes, int]]) -> None:
        for h, tokens in reversed(nodes):  # last first: the first block ends most recent
            if h in self.blocks:
                self.blocks.move_to_end(h)
            elif self.capacity is None or tokens <= self.capacity:
                self.blocks[h] = tokens
                self.used += tokens
        while self.capacity is not None and self.used > self.capacity:
            self.used -= self.blocks.popitem(last=False)[1]


class LibraryLRU:
    """Segments by key, least recently used evicted first."""

    def __init__(self, capacity_tokens: int | None) -> None:
        self.capacity = capacity_tokens
        self.used = 0
        self.items: OrderedDict[bytes, int] = OrderedDict()

    def __contains__(self, key: bytes) -> bool:
        return key in self.items

    def hit(self, key: bytes, position: int) -> None:
        self.items.move_to_end(key)

    def add(self, key: bytes, tokens: int, position: int) -> None:
        if key in self.items or (self.capacity is not None and tokens > self.capacity):
            return
        self.items[key] = tokens
        self.used += tokens
        while self.capacity is not None and self.used > self.capacity:
            self.used -= self.items.popitem(last=False)[1]


def flop_cost(attn_per_ctx_token: float) -> Callable[[int, int], float]:
    """Recompute cost per stored token of a segment of n tokens at position p, in units of one
    token's dense compute: 1 + r * (p + n/2), with r the model's attention share per context token."""
    def cost(n: int, position: int) -> float:
        return 1.0 + attn_per_ctx_token * (position + n / 2)

    return cost


class LibraryCost:
    """GreedyDual-Size-Frequency over segments (module docstring)."""

    def __init__(self, capacity_tokens: int | None, cost_per_token: Callable[[int, int], float]) -> None:
        self.capacity = capacity_tokens
        self.cost = cost_per_token
        self.used = 0
        self.clock = 0.0
        self.items: dict[bytes, list] = {}  # key -> [priority, hits, tokens, value per token]
        self.heap: list = []  # (priority, seq, key); stale entries skipped on pop
        self.seq = 0

    def __contains__(self, key: bytes) -> bool:
        return key in self.items

    def _push(self, key: bytes, entry: list) -> None:
        entry[0] = self.clock + entry[1] * entry[3]
        self.seq += 1
        heapq.heappush(self.heap, (entry[0], self.seq, key))

    def hit(self, key: bytes, position: int) -> None:
        entry = self.items[key]
        entry[1] += 1
        entry[3] = max(entry[3], self.cost(entry[2], position))
        self._push(key, entry)

    def add(self, key: bytes, tokens: int, position: int) -> None:
        if key in self.items or (self.capacity is not None and tokens > self.capacity):
            return
        entry = [0.0, 1, tokens, self.cost(tokens, position)]
        self.items[key] = entry
        self.used += tokens
        self._push(key, entry)
        while self.capacity is not None and self.used > self.capacity:
            self._evict_one()
        if len(self.heap) > 4 * len(self.items) + 1024:  # drop stale heap entries now and then
            self.heap = [(p, s, k) for p, s, k in self.heap if k in self.items and self.items[k][0] == p]
            heapq.heapify(self.heap)

    def _evict_one(self) -> None:
        while self.heap:
            priority, _, key = heapq.heappop(self.heap)
            entry = self.items.get(key)
            if entry is not None and entry[0] == priority:
                self.clock = priority
                del self.items[key]
                self.used -= entry[2]
                return


def make_library(policy: str, capacity_tokens: int | None, attn_per_ctx_token: float):
    if policy == "lru":
        return LibraryLRU(capacity_tokens)
    if policy == "cost":
        return LibraryCost(capacity_tokens, flop_cost(attn_per_ctx_token))
    from kvlib.errors import InputError

    raise InputError(f"unknown policy '{policy}'; choose one of {', '.join(POLICIES)}")
