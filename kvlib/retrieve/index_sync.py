"""The shared manifest's side of the vector index: the `vectors` table (store/schema.py).

Design facts:
- Inserts are `ON CONFLICT DO NOTHING` on (chunk_key, doc_path, owner), so two nodes
  indexing the same document keep one row and one id, and a repeated add is a no-op.
- Ids only grow, so `(COUNT(*), MAX(id))` changes whenever a row is added or removed:
  that pair is the cheap check a node runs before each search.
- A sync fetches the rows above the mirror's highest id; only when the counts still
  disagree (rows removed, or a lower id committed after a higher one) does it diff the
  id sets, fetching ids alone before any vector.
"""

from __future__ import annotations

import numpy as np
import sqlalchemy as sa

from kvlib.store.schema import vectors as table

BATCH = 500


def shared_state(shared) -> tuple[int, int]:
    with shared.read() as conn:
        count, top = conn.execute(sa.select(sa.func.count(), sa.func.coalesce(sa.func.max(table.c.id), 0))).one()
    return int(count), int(top)


def insert_entries(shared, entries: list[tuple], vectors: np.ndarray) -> int:
    """Insert (chunk_key, doc_path, owner, ord, text) rows with their vectors; how many were new."""
    added = 0
    with shared.write() as conn:
        for (chunk_key, doc_path, owner, ord_, text), vector in zip(entries, vectors):
            statement = shared.insert(table).values(
                chunk_key=chunk_key, doc_path=doc_path, owner=owner, ord=int(ord_),
                vector=np.ascontiguousarray(vector, dtype=np.float32).tobytes(), text=text or "",
            ).on_conflict_do_nothing(index_elements=["chunk_key", "doc_path", "owner"]).returning(table.c.id)
            # RETURNING, not rowcount: under SQLAlchemy's implicit returning psycopg reports -1.
            added += len(conn.execute(statement).all())
    return added


def delete_document(shared, doc_path: str, owner: str) -> int:
    with shared.write() as conn:
        return conn.execute(sa.delete(table).where(table.c.doc_path == doc_path, table.c.owner == owner)).rowcount


def fetch_changes(shared, local_ids: set[int], state: tuple[int, int]) -> tuple[list[tuple], set[int]]:
    """(rows to add locally as (id, chunk_key, doc_path, owner, ord, vector, text), ids to drop)."""
    columns = (table.c.id, table.c.chunk_key, table.c.doc_path, table.c.owner, table.c.ord, table.c.vector, table.c.text)
    top = max(local_ids, default=0)
    with shared.read() as conn:
        rows = [tuple(r) for r in conn.execute(sa.select(*columns).where(table.c.id > top).order_by(table.c.id))]
        known = local_ids | {r[0] for r in rows}
        if len(known) == state[0] and max(known, default=0) == state[1]:
            return _plain(rows), set()
        remote = set(conn.execute(sa.select(table.c.id)).scalars())
        missing = sorted(remote - known)
        for start in range(0, len(missing), BATCH):
            batch = missing[start : start + BATCH]
            rows += [tuple(r) for r in conn.execute(sa.select(*columns).where(table.c.id.in_(batch)))]
    return _plain(rows), known - remote


def _plain(rows: list[tuple]) -> list[tuple]:
    """Rows as sqlite3 takes them (the driver may hand the vector back as a memoryview)."""
    return [(r[0], r[1], r[2], r[3], r[4], bytes(r[5]), r[6]) for r in rows]
