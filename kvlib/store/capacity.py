"""Capacity and garbage: LRU eviction to a byte budget, and orphan collection.

Design facts:
- Only chunks that no document holds are ever evicted, least recently used
  first. If the library is still over budget after that, the shortfall is
  reported (`BudgetReport.over_by`), never "fixed" by dropping held chunks.
- Rows and files are removed inside the manifest's write transaction, just before
  commit, holding the victims' key locks (SQLite's file lock; PostgreSQL advisory
  locks). Puts publish blobs under the same locks, so a concurrent put of the same
  key cannot have its fresh blob deleted by an eviction or a gc.
  A crash after the unlink but before the commit leaves rows without blobs,
  which `gc` removes and `verify` reports meanwhile.
- `gc` is home-wide maintenance, not a tenant operation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from typing import Any

import sqlalchemy as sa

from kvlib.store.keys import ChunkKey
from kvlib.store.schema import chunks, doc_chunks, documents

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


def total_bytes(conn: sa.Connection) -> int:
    return int(conn.execute(sa.select(sa.func.coalesce(sa.func.sum(chunks.c.bytes), 0))).scalar_one())


def _unreferenced():
    held = sa.select(doc_chunks.c.chunk_key).where(doc_chunks.c.chunk_key == chunks.c.key).exists()
    return sa.select(chunks.c.key, chunks.c.bytes).where(~held).order_by(chunks.c.last_used, chunks.c.key)


def evict_to_budget(db: Any, blobs: Any, max_bytes: int, protect: set[str]) -> BudgetReport:
    """Evict unreferenced chunks, least recently used first, until under `max_bytes`.

    `protect` holds keys that must survive this pass (just written, about to be
    claimed by a document) even though no document holds them yet.
    """
    with db.write() as conn:
        total = total_bytes(conn)
        if total <= max_bytes:
            return BudgetReport(max_bytes, total)
        victims: list[str] = []
        freed = 0
        for key, size in conn.execute(_unreferenced()).all():
            if total - freed <= max_bytes:
                break
            if key not in protect:
                victims.append(key)
                freed += size
        db.lock_keys(conn, victims)
        delete_rows(conn, victims)
        for key in victims:
            blobs.delete(ChunkKey(key))
    return BudgetReport(max_bytes, total - freed, tuple(victims), freed)


def delete_rows(conn: sa.Connection, keys: list[str]) -> int:
    """Delete chunk rows and their document memberships; returns memberships dropped."""
    links = 0
    for start in range(0, len(keys), SQL_BATCH):
        batch = keys[start : start + SQL_BATCH]
        links += conn.execute(sa.delete(doc_chunks).where(doc_chunks.c.chunk_key.in_(batch))).rowcount
        conn.execute(sa.delete(chunks).where(chunks.c.key.in_(batch)))
    return links


def _documents_holding(conn: sa.Connection, keys: list[str]) -> set[str]:
    paths: set[str] = set()
    for start in range(0, len(keys), SQL_BATCH):
        batch = keys[start : start + SQL_BATCH]
        query = (sa.select(documents.c.path).distinct()
                 .join(doc_chunks, doc_chunks.c.doc_id == documents.c.id)
                 .where(doc_chunks.c.chunk_key.in_(batch)))
        paths.update(conn.execute(query).scalars())
    return paths


def collect_garbage(db: Any, blobs: Any) -> GcReport:
    """Remove blobs without rows, rows without blobs, and abandoned temp files."""
    with db.write() as conn:
        rows = set(conn.execute(sa.select(chunks.c.key)).scalars())
        stored = blobs.stored_keys()
        orphan_blobs = blobs.orphan_candidates(rows)
        orphan_rows = sorted(rows - stored)
        db.lock_keys(conn, orphan_rows)
        damaged = _documents_holding(conn, orphan_rows)
        links = delete_rows(conn, orphan_rows)
        for key in orphan_blobs:
            blobs.delete(ChunkKey(key))
    temps = blobs.remove_abandoned_temps()
    return GcReport(
        orphan_blobs=tuple(orphan_blobs),
        orphan_rows=tuple(orphan_rows),
        temp_files=tuple(str(path) for path in temps),
        doc_links=links,
        damaged_documents=tuple(sorted(damaged)),
    )
