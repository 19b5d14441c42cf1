"""The vector index: FAISS inner product over chunk embeddings, with tenant visibility.

Design facts:
- Two files under the index directory:
  - `index.sqlite` is the source of truth. Each row maps an int64 id to (chunk_key, doc_path,
    owner, ord) and also keeps the float32 vector. It is committed on every add and remove.
  - `faiss.index` is an `IndexIDMap2` over `IndexFlatIP` whose ids are the SQLite ids. It is
    written by `save()` (temp file + os.replace, so a crash leaves the old file whole) and
    loaded on open. If it is missing or its ids disagree with SQLite (a crash between a
    commit and `save()`), it is rebuilt from the stored vectors, so the two can never
    drift apart.
- Vectors are expected L2-normalised (see embed.py), so the inner product is cosine similarity.
- `owner` is 'public' or a tenant name. A tenant sees the public rows and its own, nothing else.
  `search` restricts FAISS to the visible ids with an `IDSelectorBatch`, so it returns k visible
  hits whenever k exist. The rows FAISS returns are then re-read from SQLite with the same
  visibility rule, so a hidden row cannot be returned even if the selector misbehaved.
- `add` is idempotent per (chunk_key, doc_path, owner): a repeated entry keeps its id and vector.
- With a shared manifest (`manifest=`, else `KVLIB_MANIFEST`), the manifest's `vectors`
  table is the source of truth for every node and `index.sqlite` is this node's mirror of
  it, with the manifest's ids. `add` and `remove_document` write the manifest; before a
  search, one `SELECT COUNT(*), MAX(id)` says whether anything changed since the last
  sync, and only then are the rows newer than the mirror's fetched (plus an id diff when
  rows were removed or committed late). So a document ingested on node A is retrievable
  on node B without re-embedding, and a quiet index costs one tiny query.
- faiss is imported on first use, so importing kvlib stays fast.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvlib.config import PUBLIC  # noqa: F401  (re-exported: the one spelling of the public tenant)
from kvlib.errors import KvlibError

FAISS_FILE = "faiss.index"
SQLITE_FILE = "index.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    chunk_key TEXT NOT NULL,
    doc_path TEXT NOT NULL,
    owner TEXT NOT NULL,
    ord INTEGER NOT NULL,
    vector BLOB NOT NULL,
    text TEXT NOT NULL DEFAULT '',
    UNIQUE (chunk_key, doc_path, owner)
);
CREATE INDEX IF NOT EXISTS entries_owner ON entries (owner);
CREATE INDEX IF NOT EXISTS entries_doc ON entries (doc_path, owner);
"""


@dataclass(frozen=True)
class IndexEntry:
    chunk_key: str
    doc_path: str
    owner: str
    ord: int
    text: str = ""  # the chunk's text, so a chunk missing from the library can be re-encoded


@dataclass(frozen=True)
class Hit:
    chunk_key: str
    doc_path: str
    score: float
    ord: int
    owner: str
    text: str = ""


def _faiss():
    import faiss

    return faiss


class VectorIndex:
    """Chunk embeddings searchable per tenant, persisted under `directory`."""

    def __init__(self, directory: Path, dim: int | None = None, manifest: str | None = None):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.directory / SQLITE_FILE)
        self._db.executescript(_SCHEMA)
        self.dim = self._resolve_dim(dim)
        self._index = self._open_faiss() if self.dim is not None else None
        self._shared = _open_shared(manifest)
        self._seen: tuple | None = None  # (count, max id) of the shared table at the last sync
        if self._shared is not None:
            self.sync()

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]

    def __enter__(self) -> VectorIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.save()
        self.close()

    def close(self) -> None:
        self._db.close()
        if self._shared is not None:
            self._shared.close()

    def add(self, entries: list[IndexEntry], vectors: np.ndarray) -> int:
        """Index `entries` with their `vectors` [n, dim]; returns how many were new."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[0] != len(entries):
            raise KvlibError(f"add: {len(entries)} entries but vectors of shape {vectors.shape}")
        if not entries:
            return 0
        self._ensure_dim(vectors.shape[1])
        if self._shared is not None:
            added = _shared_add(self._shared, entries, vectors)
            self.sync()
            return added
        new_ids, new_rows = [], []
        with self._db:
            for entry, vector in zip(entries, vectors):
                if entry.owner == "":
                    raise KvlibError(f"add: empty owner for {entry.doc_path}")
                cursor = self._db.execute(
                    "INSERT OR IGNORE INTO entries (chunk_key, doc_path, owner, ord, vector, text) VALUES (?, ?, ?, ?, ?, ?)",
                    (entry.chunk_key, entry.doc_path, entry.owner, entry.ord, vector.tobytes(), entry.text),
                )
                if cursor.rowcount == 1:
                    new_ids.append(cursor.lastrowid)
                    new_rows.append(vector)
        if new_ids:
            self._index.add_with_ids(np.stack(new_rows), np.asarray(new_ids, dtype=np.int64))
        return len(new_ids)

    def remove_document(self, doc_path: str, owner: str) -> int:
        """Drop every chunk of `doc_path` owned by `owner`; returns how many were removed."""
        if self._shared is not None:
            removed = _shared_remove(self._shared, doc_path, owner)
            self.sync()
            return removed
        return self._remove_local(doc_path, owner)

    def _remove_local(self, doc_path: str, owner: str) -> int:
        ids = [r[0] for r in self._db.execute(
            "SELECT id FROM entries WHERE doc_path = ? AND owner = ?", (doc_path, owner))]
        if not ids:
            return 0
        with self._db:
            self._db.execute("DELETE FROM entries WHERE doc_path = ? AND owner = ?", (doc_path, owner))
        selector = _faiss().IDSelectorBatch(np.asarray(ids, dtype=np.int64))
        self._index.remove_ids(selector)
        return len(ids)

    def search(self, query_vec: np.ndarray, k: int, tenant: str) -> list[Hit]:
        """The `k` nearest chunks that `tenant` may see, best first."""
        if self._shared is not None:
            self.sync()
        visible = self._visible_ids(tenant)
        k = min(k, len(visible))
        if k <= 0 or self._index is None:
            return []
        query = np.ascontiguousarray(query_vec, dtype=np.float32).reshape(1, -1)  # [1, dim]
        if query.shape[1] != self.dim:
            raise KvlibError(f"query has dimension {query.shape[1]}, index has {self.dim}")
        faiss = _faiss()
        # The selector is held in a local: SWIG does not keep it alive through `params` alone.
        selector = faiss.IDSelectorBatch(visible)
        scores, ids = self._index.search(query, k, params=faiss.SearchParameters(sel=selector))
        found = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]
        return self._visible_hits(found, tenant)

    def save(self) -> None:
        """Write the FAISS file atomically; SQLite is already committed."""
        if self._index is None:
            return
        final = self.directory / FAISS_FILE
        temp = self.directory / f".{FAISS_FILE}.{os.getpid()}.tmp"
        _faiss().write_index(self._index, str(temp))
        os.replace(temp, final)

    def sync(self) -> int:
        """Bring this node's mirror up to the shared manifest; how many rows changed (0: none)."""
        from kvlib.retrieve.index_sync import fetch_changes, shared_state

        state = shared_state(self._shared)
        if state == self._seen:
            return 0
        local_ids = {r[0] for r in self._db.execute("SELECT id FROM entries")}
        rows, gone = fetch_changes(self._shared, local_ids, state)
        if rows:
            self._ensure_dim(len(rows[0][5]) // 4)
            with self._db:
                self._db.executemany(
                    "INSERT OR REPLACE INTO entries (id, chunk_key, doc_path, owner, ord, vector, text)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
            vectors = np.stack([np.frombuffer(r[5], dtype=np.float32) for r in rows])  # [n, dim]
            self._index.remove_ids(_faiss().IDSelectorBatch(np.asarray([r[0] for r in rows], dtype=np.int64)))
            self._index.add_with_ids(vectors, np.asarray([r[0] for r in rows], dtype=np.int64))
        if gone:
            with self._db:
                self._db.executemany("DELETE FROM entries WHERE id = ?", [(i,) for i in gone])
            self._index.remove_ids(_faiss().IDSelectorBatch(np.asarray(sorted(gone), dtype=np.int64)))
        self._seen = state
        return len(rows) + len(gone)

    def _visible_ids(self, tenant: str) -> np.ndarray:
        rows = self._db.execute("SELECT id FROM entries WHERE owner IN (?, ?)", (PUBLIC, tenant))
        return np.fromiter((r[0] for r in rows), dtype=np.int64)

    def _visible_hits(self, found: list[tuple[int, float]], tenant: str) -> list[Hit]:
        if not found:
            return []
        marks = ",".join("?" * len(found))
        rows = self._db.execute(
            f"SELECT id, chunk_key, doc_path, ord, owner, text FROM entries WHERE id IN ({marks}) AND owner IN (?, ?)",
            [i for i, _ in found] + [PUBLIC, tenant],
        )
        by_id = {row[0]: row[1:] for row in rows}
        return [Hit(r[0], r[1], score, r[2], r[3], r[4]) for i, score in found if (r := by_id.get(i))]

    def _resolve_dim(self, dim: int | None) -> int | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = 'dim'").fetchone()
        stored = int(row[0]) if row else None
        if stored is not None and dim is not None and stored != dim:
            raise KvlibError(f"index at {self.directory} holds {stored}-dimensional vectors, not {dim}")
        if stored is None and dim is not None:
            with self._db:
                self._db.execute("INSERT INTO meta (key, value) VALUES ('dim', ?)", (str(dim),))
        return stored if stored is not None else dim

    def _ensure_dim(self, dim: int) -> None:
        if self.dim is None:
            self.dim = self._resolve_dim(dim)
            self._index = self._open_faiss()
        elif dim != self.dim:
            raise KvlibError(f"vectors have dimension {dim}, index has {self.dim}")

    def _open_faiss(self):
        faiss = _faiss()
        path = self.directory / FAISS_FILE
        try:
            index = faiss.read_index(str(path)) if path.is_file() else None
        except RuntimeError:
            index = None  # unreadable: the vectors in SQLite rebuild it
        ids = np.fromiter((r[0] for r in self._db.execute("SELECT id FROM entries ORDER BY id")), dtype=np.int64)
        if _same_ids(index, self.dim, ids):
            return index
        return self._rebuild()

    def _rebuild(self):
        """A fresh FAISS index from the vectors in SQLite (first open, or after a crash)."""
        faiss = _faiss()
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        rows = self._db.execute("SELECT id, vector FROM entries ORDER BY id").fetchall()
        if rows:
            vectors = np.stack([np.frombuffer(blob, dtype=np.float32) for _, blob in rows])  # [n, dim]
            index.add_with_ids(vectors, np.asarray([i for i, _ in rows], dtype=np.int64))
        return index


def _open_shared(manifest: str | None):
    """The shared manifest named by `manifest` or KVLIB_MANIFEST, or None for a node-local index."""
    target = manifest or os.environ.get("KVLIB_MANIFEST")
    if not target:
        return None
    from kvlib.store.manifest import open_manifest

    return open_manifest(target)


def _shared_add(shared, entries: list[IndexEntry], vectors: np.ndarray) -> int:
    from kvlib.retrieve.index_sync import insert_entries

    return insert_entries(shared, [(e.chunk_key, e.doc_path, e.owner, e.ord, e.text) for e in entries], vectors)


def _shared_remove(shared, doc_path: str, owner: str) -> int:
    from kvlib.retrieve.index_sync import delete_document

    return delete_document(shared, doc_path, owner)


def _same_ids(index, dim: int, ids: np.ndarray) -> bool:
    """Whether a loaded FAISS index holds exactly the ids SQLite has, at the right dimension."""
    if index is None or index.d != dim or not hasattr(index, "id_map"):
        return False
    return np.array_equal(np.sort(_faiss().vector_to_array(index.id_map)), ids)
