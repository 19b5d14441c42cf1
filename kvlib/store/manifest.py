"""Manifest: the library's SQLite index, through sqlite-utils.

Design facts:
- WAL mode, so readers never block the one writer, and a 30 s busy timeout, so
  several processes can ingest into one home and simply queue for the lock.
- Multi-statement writes run in `BEGIN IMMEDIATE` transactions (`write_lock`):
  taking the write lock up front avoids the SQLITE_BUSY a deferred transaction
  gets when it tries to upgrade from reading to writing under contention.
- Schema changes are named, ordered migrations recorded in `migrations`
  (name, applied_at). Each runs inside the write lock and is re-checked there,
  so two processes opening a fresh home at once apply it exactly once.
- Visibility is one rule, `owner IN ('public', :tenant)`, kept here so every
  query says it the same way.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import sqlite3
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import sqlite_utils

from kvlib.config import DEFAULT_TENANT
from kvlib.errors import InputError, KvlibError

BUSY_TIMEOUT_MS = 30_000
PUBLIC_OWNER = DEFAULT_TENANT
# Tenant names end up in SQL parameters and file-free places only, but they are
# shown in tables and error lines; keep them plain.
_TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")


def now_iso() -> str:
    """UTC timestamp with microseconds: sorts as text, so LRU order is an ORDER BY."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def check_tenant(tenant: str) -> str:
    """A valid tenant name, or an InputError."""
    if not isinstance(tenant, str) or not _TENANT_NAME.match(tenant):
        raise InputError(f"invalid tenant name {tenant!r}: use 1-64 letters, digits, '_', '.', '@' or '-'")
    return tenant


def visible_owners(tenant: str) -> tuple[str, str]:
    """The two owners a tenant may see: everyone's public chunks and its own."""
    return (PUBLIC_OWNER, check_tenant(tenant))


def _migrate_0001_initial(db: sqlite_utils.Database) -> None:
    db["tenants"].create({"name": str, "salt": str, "created": str}, pk="name")
    db["models"].create({"fingerprint": str, "name": str, "config": str, "created": str}, pk="fingerprint")
    db["chunks"].create(
        {
            "key": str, "model_fp": str, "context_id": str, "owner": str,
            "tokens": int, "bytes": int, "dtype": str, "shapes": str, "checksum": str,
            "hits": int, "last_used": str, "created": str, "text_preview": str,
            "drift_score": float, "meta": str,
        },
        pk="key",
        not_null={"model_fp", "context_id", "owner", "tokens", "bytes", "dtype", "checksum", "hits"},
        defaults={"hits": 0},
    )
    db["chunks"].create_index(["owner"])
    db["chunks"].create_index(["last_used"])
    # AUTOINCREMENT: a replaced document's id is never reused, so ids held
    # elsewhere (an embedding index) cannot silently point at another document.
    db.execute(
        "CREATE TABLE documents (id INTEGER PRIMARY KEY AUTOINCREMENT, path TEXT NOT NULL, content_hash TEXT,"
        " tenant TEXT NOT NULL, public INTEGER NOT NULL, ingested_at TEXT)"
    )
    db["documents"].create_index(["tenant", "public", "path"], unique=True)
    db["documents"].create_index(["path"])
    db["doc_chunks"].create(
        {"doc_id": int, "chunk_key": str, "ord": int},
        pk=("doc_id", "ord"),
        foreign_keys=[("doc_id", "documents", "id"), ("chunk_key", "chunks", "key")],
    )
    db["doc_chunks"].create_index(["chunk_key"])


# Append only: a released migration is never edited, renamed or reordered.
MIGRATIONS: tuple[tuple[str, Callable[[sqlite_utils.Database], None]], ...] = (
    ("0001_initial", _migrate_0001_initial),
)


@contextlib.contextmanager
def write_lock(db: sqlite_utils.Database) -> Iterator[sqlite_utils.Database]:
    """A `BEGIN IMMEDIATE` transaction: holds the database write lock throughout.

    sqlite-utils' own writes inside the block become savepoints of this one
    transaction, so the block commits or rolls back as a whole.
    """
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.rollback()
        raise
    else:
        db.execute("COMMIT")


def open_manifest(path: Path) -> sqlite_utils.Database:
    """Open (creating if needed) the manifest, in WAL mode, fully migrated."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # The driver-level timeout is SQLite's busy timeout; it must be set before
    # the first statement, since switching to WAL itself can meet a locked file.
    db = sqlite_utils.Database(sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_MS / 1000))
    try:
        db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        db.enable_wal()
        db.execute("PRAGMA foreign_keys = ON")
        apply_migrations(db)
    except sqlite3.DatabaseError as exc:
        db.close()
        raise KvlibError(f"cannot open manifest {path}: {exc}") from exc
    return db


def applied_migrations(db: sqlite_utils.Database) -> list[str]:
    """Names of the migrations already applied, in the order they were applied."""
    if not db["migrations"].exists():
        return []
    return [row["name"] for row in db.query("SELECT name FROM migrations ORDER BY rowid")]


def apply_migrations(db: sqlite_utils.Database) -> list[str]:
    """Apply every pending migration, in order, each in its own write lock; idempotent."""
    applied: list[str] = []
    for name, migrate in MIGRATIONS:
        with write_lock(db):
            db.execute("CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)")
            done = db.execute("SELECT 1 FROM migrations WHERE name = ?", [name]).fetchone()
            if done:
                continue  # another process (or an earlier open) got here first
            migrate(db)
            db.execute("INSERT INTO migrations (name, applied_at) VALUES (?, ?)", [name, now_iso()])
            applied.append(name)
    return applied


def tenant_salt(db: sqlite_utils.Database, tenant: str) -> str:
    """The tenant's private-key salt, created on first use.

    INSERT OR IGNORE then SELECT: if two processes create the tenant at once,
    one salt wins and both read that one.
    """
    check_tenant(tenant)
    db.execute(
        "INSERT OR IGNORE INTO tenants (name, salt, created) VALUES (?, ?, ?)",
        [tenant, secrets.token_hex(32), now_iso()],
    )
    row = db.execute("SELECT salt FROM tenants WHERE name = ?", [tenant]).fetchone()
    return row[0]


def placeholders(count: int) -> str:
    """`?, ?, ...` for an IN clause of `count` values."""
    return ", ".join("?" * count)
