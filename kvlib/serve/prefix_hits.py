"""The server's exact prefix cache: a conversation's next turn opens with the KV its last turn left.

Design facts:
- A chat's turn t+1 repeats turn t's prompt and answer before its new message. The library
  serves only the reusable segments of that history (the documents); the glue between them
  (questions, answers, headers, the system prompt) would be computed again every turn.
  Serving engines keep the whole prompt's KV for that (vLLM's automatic prefix caching,
  SGLang's radix cache); so does this cache, in the same way: kvlib/engine/prefix_cache.py,
  16-token blocks under a chained hash, LRU, leaves first.
- What is kept is each answered request's KV as the answer used it: its prompt slots and the
  answer's tokens run through the model (every generated token but the last). The slots are
  the prompt's ids in order at their true positions (rerope composition), so a later prompt
  that starts with the same ids can open with them: positions and neighbours are those the
  answer had. It is the KV the reuse server would otherwise compose again (documents rotated
  from the library, glue computed in context), plus its repair, once more.
- Only answers composed by rerope (plain or repaired) and by mode `prefix` (this cache alone,
  the rest prefilled) keep their KV (pipeline.KEEPS_PREFIX): never full recompute (the
  baseline that reuses nothing, and the degraded path), naive (its keys sit at their encoding
  positions, not at their slots), or a guard (its calibration measured compositions behind
  E). And never a read-only caller's (anonymous callers share one tenant).
- Blocks are hashed under the tenant's name as namespace: one LRU across tenants, and no
  chain of one tenant's ever matches another's, whatever the text (so neither a hit nor a
  TTFT tells B anything about A's prompts). The namespace holds the base too: an answer in
  mode `prefix` (exact prefix caching) opens only with KV that mode kept, never with a rerope
  composition's.
- A segment the hit cuts in two is looked up whole in the library, and its tokens after the hit
  are served from it (prompt_layout.split_at), as replay's accounting counts them (prefix first,
  the library beyond it). A hit no longer than the encoding context E of a prompt that opens
  with E is not used (E's own KV serves that).
- The budget (Settings.prefix_bytes) counts the blocks' KV; 0 turns the cache off.
"""

from __future__ import annotations

import threading

import torch

from kvlib.engine.compose import ContextKV
from kvlib.engine.prefix_cache import PrefixCache

BLOCK = 16


class PrefixHits:
    def __init__(self, lm, max_bytes: int):
        per_block = 2 * lm.n_layers * lm.n_kv_heads * BLOCK * lm.head_dim * torch.tensor([], dtype=lm.dtype).element_size()
        blocks = int(max_bytes) // per_block
        self.block_bytes = per_block
        self.cache = PrefixCache(block_size=BLOCK, max_blocks=blocks, salt=lm.fingerprint) if blocks > 0 else None
        self._lock = threading.Lock()  # the engine thread matches and keeps; /metrics reads the size

    @property
    def enabled(self) -> bool:
        return self.cache is not None

    @property
    def capacity_tokens(self) -> int:
        """Tokens the budget holds (0: off); /healthz reports it, so `kvlib replay --live` models it."""
        return 0 if self.cache is None else self.cache.max_blocks * BLOCK

    @property
    def bytes(self) -> int:
        with self._lock:
            return 0 if self.cache is None else len(self.cache) * self.block_bytes

    def opening(self, tenant: str, base: str, ids: list) -> ContextKV | None:
        """The longest prefix of `ids` kept for `tenant` by answers in `base` (whole blocks, one id at
        least left to prefill), as the context the rest of the prompt follows; None without one."""
        if self.cache is None or len(ids) < 2:
            return None
        with self._lock:
            hit = self.cache.match(ids, max_tokens=len(ids) - 1, namespace=namespace(tenant, base))
        n = hit.n_tokens
        if n == 0:
            return None
        return ContextKV(token_ids=torch.tensor(ids[:n], dtype=torch.long), k_rot=None, v=None,
                         blocks=list(hit.payloads))

    def keep(self, tenant: str, base: str, prompt_ids: list, generated: list, cache) -> int:
        """Keep an answered request's KV: `cache` holds the prompt's slots and then the generated
        tokens that were run through the model. Only new blocks are copied; returns how many."""
        if self.cache is None:
            return 0
        n = cache.length
        if n < len(prompt_ids):  # the answer never got its prompt in (cancelled before the prefill)
            return 0
        ids = list(prompt_ids) + list(generated[: n - len(prompt_ids)])

        def block(i: int):
            at = slice(i * BLOCK, (i + 1) * BLOCK)
            return cache.k[:, :, at].clone(), cache.v[:, :, at].clone()

        with self._lock:
            return self.cache.insert(ids[: len(ids) // BLOCK * BLOCK], block, namespace=namespace(tenant, base))


def namespace(tenant: str, base: str) -> str:
    return f"{tenant}\x00{base}"
