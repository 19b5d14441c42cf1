"""Blob writes that run beside the caller: serialize, checksum and stage off its thread.

Design facts:
- Staging is file work only (safetensors bytes, xxh3, temp file write + fsync); it never
  touches SQLite. The caller's thread publishes (rename + manifest row) in the order it
  began the puts, so the manifest keeps one connection per thread and a row still only
  appears after its blob is whole on disk.
- One worker thread: the disk sees one stream of writes, and while a write waits on the
  disk the caller computes (ingest embeds a document while its KV is being written).
- A pending put that is never finished (Ctrl-C, an error) is discarded by the library: its
  temp file goes. A crash leaves at most an unlocked temp file, which `gc` removes.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from kvlib.store.blobs import StagedBlob


@dataclass
class Staged:
    """A blob written and fsynced to its temp file, with what the manifest row needs."""

    blob: StagedBlob
    nbytes: int
    checksum: str


@dataclass(eq=False)
class PendingPut:
    """A put begun by `Library.put_begin`: publish it with `finish_puts`, or it is discarded."""

    key: Any  # ChunkKey
    record: dict | None  # the manifest row, less bytes and checksum; None when nothing is written
    staged: Future | None  # -> Staged; None when an intact copy was already stored
    existing_bytes: int = 0
    drift_score: float | None = None
    settled: bool = field(default=False)
    kept: Any = None  # the StoredChunk to keep in memory once published (Library recent_bytes), or None


class BlobWriter:
    """A one-thread executor for staging; created on first use, closed with the library."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None

    def submit(self, work: Callable[[], Staged], background: bool) -> Future:
        """Run `work` on the writer thread (background) or here; a Future either way."""
        if background:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvlib-blob-writer")
            return self._pool.submit(work)
        done: Future = Future()
        try:
            done.set_result(work())
        except BaseException as exc:  # noqa: BLE001 - re-raised by .result(), as from the pool
            done.set_exception(exc)
        return done

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def discard(pending: PendingPut) -> None:
    """Drop a pending put's temp file once its staging ends; safe on settled puts."""
    if pending.settled or pending.staged is None:
        pending.settled = True
        return
    pending.settled = True
    try:
        staged = pending.staged.result()
    except BaseException:  # noqa: BLE001 - staging failed: nothing was left behind to discard
        return
    staged.blob.discard()
