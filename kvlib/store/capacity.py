"""Capacity and garbage: LRU eviction to a byte budget, and orphan collection.

Design facts:
- Only chunks that no document holds are ever evicted, least recently used
  first. If the library is still over budget after that, the shortfall is
  reported (`BudgetReport.over_by`), never "fixed" by dropping held chunks.
- Rows and files are removed while the manifest's write lock is held, just
  before commit. Puts publish blobs under the same lock, so a concurrent put of
  the same key cannot have its fresh file deleted by an eviction or a gc.
  A crash after the unlink but before the commit leaves rows without blobs,
  which `gc` removes and `verify` reports meanwhile.
- `gc` is home-wide maintenance, not a tenant operation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sqlite_utils

from kvlib.store.blobs import BlobStore
from kvlib.store.keys import ChunkKey
from kvlib.store.manifest import placeholders, write_lock

# SQLite caps bound parameters per statement; stay well below every build's cap.
SQL_BATCH = 500


@dataclass(frozen=True)
class BudgetReport:
    """Outcome of an eviction pass against `max_bytes`."""

    max_bytes: int
    total_bytes: int  # after eviction
    evicted: tuple[str, ...] = ()
    freed_bytes: int = 0

    @property
    def over_by(self) -> int:
        """Bytes still above budget: all of it held by documents (or just written)."""
        return max(0, self.total_bytes - self.max_bytes)

    @property
    def ok(self) -> bool:
        return self.over_by == 0

    def message(self) -> str:
        return (
            f"library is {self.over_by} bytes over its {self.max_bytes}-byte budget after evicting "
            f"{len(self.evicted)} unreferenced chunks; the rest is held by documents"
        )


class BudgetWarning(UserWarning):
    """Raised through `warnings.warn` when automatic eviction cannot meet the budget."""

    def __init__(self, report: BudgetReport) -> None:
        super().__init__(report.message())
        self.report = report


@dataclass(frozen=True)
class GcReport:
    """What `gc` removed."""

    orphan_blobs: tuple[str, ...] = ()  # blob files without a manifest row
    orphan_rows: tuple[str, ...] = ()  # manifest rows without a blob file
    temp_files: tuple[str, ...] = ()  # abandoned partial writes
    doc_links: int = 0  # document memberships dropped with orphan rows
    damaged_documents: tuple[str, ...] = field(default=())  # paths that lost chunks

    @property
    def removed(self) -> int:
        return len(self.orphan_blobs) + len(self.orphan_rows) + len(self.temp_files)


def total_bytes(db: sqlite_utils.Database) -> int:
    return db.execute("SELECT COALESCE(SUM(bytes), 0) FROM chunks").fetchone()[0]


def evict_to_budget(db: sqlite_utils.Database, blobs: BlobStore, max_bytes: int, protect: set[str]) -> BudgetReport:
    """Evict unreferenced chunks, least recently used first, until under `max_bytes`.

    `protect` holds keys that must survive this pass (just written, about to be
    claimed by a document) even though no document holds them yet.
    """
    with write_lock(db):
        total = total_bytes(db)
        if total <= max_bytes:
            return BudgetReport(max_bytes, total)
        candidates = db.execute(
            "SELECT key, bytes FROM chunks c"
            " WHERE NOT EXISTS (SELECT 1 FROM doc_chunks dc WHERE dc.chunk_key = c.key)"
            " ORDER BY last_used, rowid"
        ).fetchall()
        victims: list[str] = []
        freed = 0
        for key, size in candidates:
            if total - freed <= max_bytes:
                break
            if key not in protect:
                victims.append(key)
                freed += size
        delete_rows(db, victims)
        for key in victims:
            blobs.delete(ChunkKey(key))
    return BudgetReport(max_bytes, total - freed, tuple(victims), freed)


def delete_rows(db: sqlite_utils.Database, keys: list[str]) -> int:
    """Delete chunk rows and their document memberships; returns memberships dropped."""
    links = 0
    for start in range(0, len(keys), SQL_BATCH):
        batch = keys[start : start + SQL_BATCH]
        marks = placeholders(len(batch))
        links += db.execute(f"DELETE FROM doc_chunks WHERE chunk_key IN ({marks})", batch).rowcount
        db.execute(f"DELETE FROM chunks WHERE key IN ({marks})", batch)
    return links


def _documents_holding(db: sqlite_utils.Database, keys: list[str]) -> set[str]:
    paths: set[str] = set()
    for start in range(0, len(keys), SQL_BATCH):
        batch = keys[start : start + SQL_BATCH]
        rows = db.execute(
            "SELECT DISTINCT d.path FROM documents d JOIN doc_chunks dc ON dc.doc_id = d.id"
            f" WHERE dc.chunk_key IN ({placeholders(len(batch))})",
            batch,
        )
        paths.update(row[0] for row in rows)
    return paths


def collect_garbage(db: sqlite_utils.Database, blobs: BlobStore) -> GcReport:
    """Remove blob files without rows, rows without blob files, and abandoned temp files."""
    with write_lock(db):
        rows = {row[0] for row in db.execute("SELECT key FROM chunks")}
        files = dict(blobs.iter_blobs())
        orphan_blobs = sorted(set(files) - rows)
        orphan_rows = sorted(rows - set(files))
        damaged = _documents_holding(db, orphan_rows)
        links = delete_rows(db, orphan_rows)
        for key in orphan_blobs:
            files[key].unlink(missing_ok=True)
    temps = blobs.remove_abandoned_temps()
    return GcReport(
        orphan_blobs=tuple(orphan_blobs),
        orphan_rows=tuple(orphan_rows),
        temp_files=tuple(str(path) for path in temps),
        doc_links=links,
        damaged_documents=tuple(sorted(damaged)),
    )
