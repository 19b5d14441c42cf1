"""The manifest's one schema, as SQLAlchemy Core tables, and its named migrations.

Design facts:
- One `MetaData` describes the manifest for SQLite and PostgreSQL alike; every query in
  the store is built from these tables, so no statement is written twice per dialect.
- The tables match, column for column, what the sqlite-utils era created, so an
  existing home opens with `0001_initial` already recorded and only later migrations run.
- Migrations are named, ordered and append-only: a released one is never edited,
  renamed or reordered. Each is a function of one connection inside the migration
  lock (see manifest.apply_migrations).
- `vectors` carries retrieval's embeddings in the manifest, so a node's FAISS index can
  follow rows that another node added (retrieve/index.py). Its ids only grow, so
  `(COUNT(*), MAX(id))` changes whenever a row is added or removed: the cheap staleness check.
- `calibrations` holds the guard's fitted predictor per (model fingerprint, encoding).
"""

from __future__ import annotations

from typing import Callable

from sqlalchemy import (
    Column, Float, ForeignKeyConstraint, Index, Integer, LargeBinary, MetaData, PrimaryKeyConstraint, Table, Text,
    UniqueConstraint,
)

metadata = MetaData()

migrations = Table(
    "migrations", metadata,
    Column("name", Text, primary_key=True),
    Column("applied_at", Text, nullable=False),
)

tenants = Table(
    "tenants", metadata,
    Column("name", Text, primary_key=True),
    Column("salt", Text),
    Column("created", Text),
)

models = Table(
    "models", metadata,
    Column("fingerprint", Text, primary_key=True),
    Column("name", Text),
    Column("config", Text),
    Column("created", Text),
)

chunks = Table(
    "chunks", metadata,
    Column("key", Text, primary_key=True),
    Column("model_fp", Text, nullable=False),
    Column("context_id", Text, nullable=False),
    Column("owner", Text, nullable=False),
    Column("tokens", Integer, nullable=False),
    Column("bytes", Integer, nullable=False),
    Column("dtype", Text, nullable=False),
    Column("shapes", Text),
    Column("checksum", Text, nullable=False),
    Column("hits", Integer, nullable=False, server_default="0"),
    Column("last_used", Text),
    Column("created", Text),
    Column("text_preview", Text),
    Column("drift_score", Float),
    Column("meta", Text),
    Index("idx_chunks_owner", "owner"),
    Index("idx_chunks_last_used", "last_used"),
)

# AUTOINCREMENT (SQLite) / a sequence (PostgreSQL): a replaced document's id is never
# reused, so ids held elsewhere cannot silently point at another document.
documents = Table(
    "documents", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("path", Text, nullable=False),
    Column("content_hash", Text),
    Column("tenant", Text, nullable=False),
    Column("public", Integer, nullable=False),
    Column("ingested_at", Text),
    Index("idx_documents_tenant_public_path", "tenant", "public", "path", unique=True),
    Index("idx_documents_path", "path"),
    sqlite_autoincrement=True,
)

doc_chunks = Table(
    "doc_chunks", metadata,
    Column("doc_id", Integer, nullable=False),
    Column("chunk_key", Text, nullable=False),
    Column("ord", Integer, nullable=False),
    PrimaryKeyConstraint("doc_id", "ord"),
    ForeignKeyConstraint(["doc_id"], ["documents.id"]),
    ForeignKeyConstraint(["chunk_key"], ["chunks.key"]),
    Index("idx_doc_chunks_chunk_key", "chunk_key"),
)

vectors = Table(
    "vectors", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("chunk_key", Text, nullable=False),
    Column("doc_path", Text, nullable=False),
    Column("owner", Text, nullable=False),
    Column("ord", Integer, nullable=False),
    Column("vector", LargeBinary, nullable=False),  # float32 bytes, L2-normalised
    Column("text", Text, nullable=False, server_default=""),
    UniqueConstraint("chunk_key", "doc_path", "owner", name="uq_vectors_entry"),
    Index("idx_vectors_owner", "owner"),
    sqlite_autoincrement=True,
)

# One calibration of the `guard:B` predictor per model and encoding (kvlib calibrate); a new
# run replaces the old. `payload` is the Calibration as JSON (engine/calibration.py).
calibrations = Table(
    "calibrations", metadata,
    Column("model_fp", Text, nullable=False),
    Column("encoding", Text, nullable=False),
    Column("method", Text, nullable=False),
    Column("confidence", Float, nullable=False),
    Column("payload", Text, nullable=False),
    Column("created", Text, nullable=False),
    PrimaryKeyConstraint("model_fp", "encoding"),
    ForeignKeyConstraint(["model_fp"], ["models.fingerprint"]),
)

_INITIAL = (tenants, models, chunks, documents, doc_chunks)


def _migrate_0001_initial(conn) -> None:
    metadata.create_all(conn, tables=list(_INITIAL), checkfirst=False)


def _migrate_0002_vectors(conn) -> None:
    metadata.create_all(conn, tables=[vectors], checkfirst=True)


def _migrate_0003_calibrations(conn) -> None:
    metadata.create_all(conn, tables=[calibrations], checkfirst=True)


# Append only (see the module docstring).
MIGRATIONS: tuple[tuple[str, Callable], ...] = (
    ("0001_initial", _migrate_0001_initial),
    ("0002_vectors", _migrate_0002_vectors),
    ("0003_calibrations", _migrate_0003_calibrations),
)
