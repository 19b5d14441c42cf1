"""A remote blob store with the node's home as a bounded local tier and a durable upload queue.

Design facts:
- Same interface as `BlobStore` (stage, publish, intact, read, status, delete, ...), so the
  facade does not know which one it holds.
- Reads: the local tier (`<home>/blobs/ab/<key>.safetensors`) if its bytes match the
  manifest checksum, else S3, whose bytes are checked against the checksum before use and
  then written to the local tier atomically (temp file, fsync, rename). A missing or
  corrupt object is a CorruptBlobError; an unreachable store a StoreUnavailableError
  (a CorruptBlobError too), warned once per outage: either way the caller recomputes.
- The local tier is bounded by `local_bytes`, least recently used first (a read touches
  the file's mtime). It is a cache: evicting from it never loses data.
- Writes: the blob lands in the local tier, is hard-linked into `<home>/upload-queue/`
  as `<key>.<checksum>.safetensors` (fsynced), then uploaded, then dequeued. If the store is
  unreachable the entry stays, so a crash or an outage loses nothing; `kvlib sync`
  (`drain_queue`) uploads what is queued once the store is back, skipping entries the
  manifest no longer describes (evicted, or re-stored with other bytes by another node).
- gc never deletes a remote object younger than `ORPHAN_GRACE_S`: another node may be
  between its upload and its manifest row.
"""

from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from kvlib.config import resolve_local_bytes
from kvlib.errors import CorruptBlobError, StoreUnavailableError
from kvlib.store.blobs import BLOB_SUFFIX, BLOBS_DIR, BlobStore, StagedBlob, checksum_bytes, checksum_file, fsync_dir
from kvlib.store.keys import ChunkKey
from kvlib.store.s3 import RemoteUnavailable, S3Blobs

QUEUE_DIR = "upload-queue"
ORPHAN_GRACE_S = 3600.0
# Evict down to this share of the budget, so a full tier does not evict on every read.
EVICT_TO = 0.9


@dataclass(frozen=True)
class SyncReport:
    uploaded: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()  # queued blobs the manifest no longer describes
    pending: int = 0  # still queued (the store is unreachable)
    error: str | None = None


_warned_down = False


def store_answered() -> None:
    """The store answered again: the next outage gets its own warning."""
    global _warned_down
    _warned_down = False


def warn_down_once(store: str, exc: Exception) -> None:
    """Say once per outage (per process) that the store is unreachable and what kvlib does instead."""
    global _warned_down
    if not _warned_down:
        _warned_down = True
        warnings.warn(f"blob store {store} is unreachable ({exc}); reading the local tier, recomputing "
                      "what it lacks, queueing writes for `kvlib sync`", RuntimeWarning, stacklevel=3)


def queue_length(home: Path) -> int:
    """Blobs in a home's upload queue, waiting for the store (0 for a home without a remote store)."""
    return sum(1 for _ in (Path(home) / QUEUE_DIR).glob(f"*{BLOB_SUFFIX}"))


class TieredBlobs:
    """S3 behind a bounded local tier, with a durable queue for uploads the store missed."""

    def __init__(self, local: BlobStore, remote: S3Blobs, queue: Path, local_bytes: int) -> None:
        self.local, self.remote, self.queue = local, remote, queue
        self.local_bytes = local_bytes
        self.root = local.root
        self._local_total: int | None = None  # measured on first need
        self._lock = threading.Lock()

    @classmethod
    def open(cls, home: Path, store: str, local_bytes: int) -> "TieredBlobs":
        queue = home / QUEUE_DIR
        queue.mkdir(parents=True, exist_ok=True)
        return cls(BlobStore(home / BLOBS_DIR), S3Blobs(store), queue, local_bytes)

    # -- the BlobStore interface ------------------------------------------------

    def path_for(self, key: ChunkKey) -> Path:
        return self.local.path_for(key)

    def file_checksum(self, key: ChunkKey) -> str | None:
        return self.local.file_checksum(key)

    def stage(self, key: ChunkKey, data: bytes, read_soon: bool = False) -> StagedBlob:
        return self.local.stage(key, data, read_soon)

    def publish(self, staged: StagedBlob, key: ChunkKey, checksum: str) -> None:
        """Into the local tier, into the queue (durably), then to the store if it answers."""
        staged.publish()
        path = self.local.path_for(key)
        entry = self._enqueue(key, checksum, path)
        try:
            self.remote.put(key, path.read_bytes(), checksum)
            entry.unlink(missing_ok=True)
            store_answered()
        except RemoteUnavailable as exc:
            warn_down_once(self.remote.url, exc)
        self._account(path.stat().st_size)

    def intact(self, key: ChunkKey, checksum: str) -> bool:
        """Stored as the manifest says: locally, in the queue, or in the store, bytes checked.

        The store's copy is downloaded and hashed, not judged by its metadata: a put only
        asks when the chunk was just recomputed or written by two nodes at once, and a
        corrupt object must then be replaced, not kept because its HEAD looks right.
        """
        if self.local.file_checksum(key) == checksum or self._queued(key, checksum).is_file():
            return True
        try:
            self._keep_locally(key, self._fetch(key, checksum), checksum)
            return True
        except CorruptBlobError:  # missing, corrupt or unreachable: store ours
            return False

    def read(self, key: ChunkKey, checksum: str, fresh: bool = False):
        """The blob, checked against `checksum`; from the local tier unless `fresh`."""
        if not fresh:
            contents, _ = self.local.try_read(key, checksum)
            if contents is not None:
                _touch(self.local.path_for(key))
                return contents
        data = self._fetch(key, checksum)
        self._keep_locally(key, data, checksum)
        return self.local.read(key, checksum)

    def warm(self, key: ChunkKey, checksum: str) -> None:
        """The local tier's copy mapped and verified now (nothing is downloaded)."""
        self.local.warm(key, checksum)

    def status(self, key: ChunkKey, checksum: str) -> str:
        try:
            self.read(key, checksum)
            return "ok"
        except StoreUnavailableError:
            return "unreachable"
        except CorruptBlobError as exc:
            return "missing" if "missing" in str(exc) else "mismatch"

    def verify_read(self, key: ChunkKey, checksum: str):
        """What verify checks: the copy in the store itself (or, until it is uploaded, the queue's)."""
        if self._queued(key, checksum).is_file():
            raise CorruptBlobError(f"blob {key.short} is queued, not yet in {self.remote.url} (run `kvlib sync`)")
        return self.read(key, checksum, fresh=True)

    def delete(self, key: ChunkKey) -> bool:
        had = self.local.delete(key)
        for entry in self.queue.glob(f"{key.hex}.*{BLOB_SUFFIX}"):
            entry.unlink(missing_ok=True)
        try:
            self.remote.delete(key)
        except RemoteUnavailable as exc:
            warn_down_once(self.remote.url, exc)  # left as an orphan object for a later gc
        return had

    def stored_keys(self) -> set[str]:
        return self._remote_keys(0.0) | {p.name.split(".", 1)[0] for p in self.queue.glob(f"*{BLOB_SUFFIX}")}

    def orphan_candidates(self, rows: set[str]) -> list[str]:
        return sorted(self._remote_keys(ORPHAN_GRACE_S) - rows)

    def remove_abandoned_temps(self) -> list[Path]:
        return self.local.remove_abandoned_temps()

    def iter_blobs(self):
        return self.local.iter_blobs()

    # -- the queue -------------------------------------------------------------

    def queued(self) -> list[tuple[str, str, Path]]:
        """(key hex, checksum, file) of every blob waiting for upload, oldest first."""
        entries = sorted(self.queue.glob(f"*{BLOB_SUFFIX}"), key=lambda p: p.stat().st_mtime)
        return [(*p.name.removesuffix(BLOB_SUFFIX).split(".", 1), p) for p in entries]

    def drain_queue(self, checksum_of: Callable[[str], str | None]) -> SyncReport:
        """Upload queued blobs the manifest still describes; stop at the first outage."""
        uploaded, dropped = [], []
        entries = self.queued()
        for done, (hexkey, checksum, path) in enumerate(entries):
            if checksum_of(hexkey) != checksum or checksum_file(path) != checksum:
                path.unlink(missing_ok=True)
                dropped.append(hexkey)
                continue
            try:
                self.remote.put(ChunkKey(hexkey), path.read_bytes(), checksum)
            except RemoteUnavailable as exc:
                return SyncReport(tuple(uploaded), tuple(dropped), len(entries) - done, str(exc))
            path.unlink(missing_ok=True)
            uploaded.append(hexkey)
            store_answered()
        return SyncReport(tuple(uploaded), tuple(dropped), 0)

    # -- internals -------------------------------------------------------------

    def _queued(self, key: ChunkKey, checksum: str) -> Path:
        return self.queue / f"{key.hex}.{checksum}{BLOB_SUFFIX}"

    def _enqueue(self, key: ChunkKey, checksum: str, path: Path) -> Path:
        """A hard link to the published blob: survives the local tier evicting it."""
        entry = self._queued(key, checksum)
        entry.unlink(missing_ok=True)
        os.link(path, entry)
        fsync_dir(self.queue)
        return entry

    def _fetch(self, key: ChunkKey, checksum: str) -> bytes:
        """The blob's bytes from the store (or the queue), checked against the manifest."""
        queued = self._queued(key, checksum)
        if queued.is_file():
            data = queued.read_bytes()
        else:
            try:
                data = self.remote.get(key)
                store_answered()
            except RemoteUnavailable as exc:
                warn_down_once(self.remote.url, exc)
                raise StoreUnavailableError(f"blob {key.short} is not in the local tier and {self.remote.url} "
                                            "is unreachable") from None
        if data is None:
            raise CorruptBlobError(f"blob {key.short} is missing from {self.remote.url}")
        actual = checksum_bytes(data)
        if actual != checksum:
            raise CorruptBlobError(f"blob {key.short} in {self.remote.url} is corrupt: checksum {actual[:12]} "
                                   f"!= manifest {checksum[:12]}")
        return data

    def _keep_locally(self, key: ChunkKey, data: bytes, checksum: str) -> None:
        """Write a fetched blob to the local tier atomically, then keep the tier in budget."""
        self.local.stage(key, data).publish()
        self._account(len(data))

    def _account(self, added: int) -> None:
        with self._lock:
            if self._local_total is None:
                self._local_total = sum(p.stat().st_size for _, p in self.local.iter_blobs())
            else:
                self._local_total += added
            if self._local_total > self.local_bytes:
                self._local_total = _evict_lru(self.local, int(self.local_bytes * EVICT_TO))

    def _remote_keys(self, older_than_s: float) -> set[str]:
        try:
            return self.remote.list_keys(older_than_s)
        except RemoteUnavailable as exc:
            raise StoreUnavailableError(f"cannot list {self.remote.url}: it is unreachable ({exc})") from None


def _touch(path: Path) -> None:
    try:
        os.utime(path)  # LRU order of the local tier is mtime order
    except FileNotFoundError:
        pass


def open_blobs(home: Path, store: str | None, local_bytes: int | None):
    """The home's blob folder, or an S3 store with that folder as its bounded local tier."""
    if store is None:
        return BlobStore(home / BLOBS_DIR)
    return TieredBlobs.open(home, store, resolve_local_bytes(local_bytes))


def _evict_lru(local: BlobStore, target: int) -> int:
    """Delete local-tier files, least recently used first, down to `target` bytes; the total left."""
    files = []
    for _, path in local.iter_blobs():
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue
        files.append((stat.st_mtime, stat.st_size, path))
    files.sort()
    total = sum(size for _, size, _ in files)
    for _, size, path in files:
        if total <= target:
            break
        path.unlink(missing_ok=True)
        total -= size
    return total
