"""Chunks this Library handle stored lately, kept in memory so that a read right after the write
skips the blob.

Design facts:
- The server stores a conversation's new documents right after a turn's first token, and the
  next turn asks for them seconds later. Reading a blob written moments ago costs far more than
  reading one read before (on this project's VM ~1.7 ms per MB, against ~0.15 ms: fresh
  page-cache memory), and it is exactly the bytes this process just had.
- Off by default (max_bytes 0): a Library opened for ingest or a query keeps nothing. The
  server opens its Library with a budget (`kvlib serve --recent-mb`, 64 by default).
- It only ever saves the read: find_many asks the manifest first, as for any chunk, so
  visibility (tenants), eviction and deletion are decided there; an entry serves only a row
  whose checksum is the one it was stored with, so a re-stored key is read from its blob.
- Entries own their tensors (a view into a larger encode buffer is copied first, so the
  buffer is not kept alive), and callers treat stored KV as read-only, as they do for blobs.
- Least recently used first out once the budget is exceeded; an entry over the budget is
  never kept.
- An entry pushed out by newer ones leaves its key and checksum behind (`dropped`, newest
  last, at most DROPPED_KEPT): the server's idle time maps and verifies its blob
  (Library.warm_one), so that its next read finds a held mapping (store/mapped.py). A blob's
  first read after its direct write is the slow one: in the server on this VM, 4-9 ms for a
  2.7 MB blob on the request's critical path, against 0.15 ms through a held mapping.
"""

from __future__ import annotations

import collections
from typing import Any


def owned(tensor: Any) -> Any:
    """The tensor itself when it is its storage's only content, else a compact copy."""
    if tensor.untyped_storage().nbytes() == tensor.nbytes and tensor.is_contiguous():
        return tensor
    return tensor.contiguous().clone()


DROPPED_KEPT = 256  # keys of entries pushed out, waiting for idle time to map their blobs


class RecentChunks:
    def __init__(self, max_bytes: int = 0) -> None:
        self.max_bytes, self.used = max_bytes, 0
        self._items: collections.OrderedDict[str, tuple[str, Any, int]] = collections.OrderedDict()
        self.dropped: collections.deque = collections.deque(maxlen=DROPPED_KEPT)  # (ChunkKey, checksum)

    def remember(self, hexkey: str, checksum: str, chunk: Any) -> None:
        """Keep a just-stored chunk (a StoredChunk whose tensors are owned)."""
        size = chunk.k_sem.nbytes + chunk.v.nbytes
        if size > self.max_bytes:
            return
        self.forget(hexkey)
        self._items[hexkey] = (checksum, chunk, size)
        self.used += size
        while self.used > self.max_bytes:
            _, (old_checksum, old, dropped) = self._items.popitem(last=False)
            self.used -= dropped
            self.dropped.append((old.key, old_checksum))

    def next_dropped(self) -> tuple | None:
        """(key, checksum) of the entry pushed out most recently, or None; each is given once."""
        return self.dropped.pop() if self.dropped else None

    def get(self, hexkey: str, checksum: str) -> Any:
        """The chunk stored under this key with this checksum, or None."""
        item = self._items.get(hexkey)
        if item is None or item[0] != checksum:
            return None
        self._items.move_to_end(hexkey)
        return item[1]

    def forget(self, hexkey: str) -> None:
        item = self._items.pop(hexkey, None)
        if item is not None:
            self.used -= item[2]
