"""Manifest: the library's index of chunks, documents, tenants and vectors, through SQLAlchemy Core.

Design facts:
- One schema (store/schema.py) and one set of Core statements serve both backends:
  - SQLite (the default, `<home>/manifest.sqlite`): WAL mode, so readers never block the
    one writer, and a 30 s busy timeout, so several processes can ingest into one home
    and simply queue for the lock. Write transactions start with `BEGIN IMMEDIATE`:
    taking the lock up front avoids the SQLITE_BUSY a deferred transaction gets when
    it upgrades from reading to writing under contention.
  - PostgreSQL (`postgresql://...`, psycopg 3 under SQLAlchemy's connection pool), for many
    machines. A write transaction takes per-key advisory locks (`lock_keys`) where
    SQLite's whole-file lock did the serializing, so two nodes putting the same key
    still publish exactly one row, and `ON CONFLICT` keeps dedup exact.
- Schema changes are named, ordered migrations recorded in `migrations` (name,
  applied_at). Each runs inside the migration lock and is re-checked there, so two
  processes opening a fresh manifest at once apply it exactly once.
- Visibility is one rule, `owner IN ('public', :tenant)`, kept here so every query says it
  the same way.
- An unreachable PostgreSQL is a ManifestUnavailableError naming the manifest (password
  hidden): the CLI prints that one line and exits 1, and nothing was changed.
- sqlalchemy is imported here; the CLI imports the store inside commands only.
"""

from __future__ import annotations

import contextlib
import re
import secrets
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import sqlalchemy as sa
from sqlalchemy import event, exc as sa_exc

from kvlib.config import DEFAULT_TENANT, PUBLIC
from kvlib.errors import InputError, KvlibError, ManifestUnavailableError
from kvlib.store import schema
from kvlib.store.schema import MIGRATIONS

__all__ = [
    "MIGRATIONS", "Manifest", "PUBLIC_OWNER", "applied_migrations", "apply_migrations", "check_tenant",
    "create_database", "now_iso", "open_manifest", "tenant_salt", "visible_owners",
]

BUSY_TIMEOUT_MS = 30_000
PG_CONNECT_TIMEOUT_S = 5
PUBLIC_OWNER = PUBLIC
# Tenant names end up in SQL parameters and file-free places only, but they are
# shown in tables and error lines; keep them plain.
_TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
_MIGRATION_LOCK = 0x6B766C6962  # "kvlib": PostgreSQL advisory lock id for migrations


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


class RawResult:
    """The rows and rowcount of one raw statement, read before its connection went back."""

    def __init__(self, rows: list, rowcount: int) -> None:
        self._rows, self.rowcount = rows, rowcount

    def fetchone(self):
        return self._rows[0] if self._rows else None

    def fetchall(self) -> list:
        return list(self._rows)

    def __iter__(self):
        return iter(self._rows)


class Manifest:
    """One manifest database: an engine, its dialect, and transactions that mean the same on both."""

    def __init__(self, engine: sa.Engine, display: str) -> None:
        self.engine = engine
        self.url = display  # for error lines: never holds a password
        self.dialect = engine.dialect.name  # "sqlite" or "postgresql"

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    @contextlib.contextmanager
    def write(self) -> Iterator[sa.Connection]:
        """A write transaction: the whole file's lock on SQLite; on PostgreSQL, `lock_keys` inside."""
        with self._errors(), self.engine.connect() as conn:
            conn.execution_options(kvlib_write=True)
            with conn.begin():
                yield conn

    @contextlib.contextmanager
    def read(self) -> Iterator[sa.Connection]:
        """A short read transaction (deferred on SQLite: it never waits for the writer)."""
        with self._errors(), self.engine.connect() as conn:
            with conn.begin():
                yield conn

    def lock_keys(self, conn: sa.Connection, keys: list[str]) -> None:
        """Serialize writers of these keys across machines until the transaction ends.

        SQLite needs nothing: `BEGIN IMMEDIATE` already holds the one write lock.
        Sorted, so two writers of overlapping key sets cannot deadlock.
        """
        if self.is_sqlite:
            return
        for key in sorted(set(keys)):
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtextextended(:k, 0))"), {"k": key})

    def insert(self, table: sa.Table):
        """The dialect's INSERT, which knows `on_conflict_do_nothing` / `on_conflict_do_update`."""
        if self.is_sqlite:
            from sqlalchemy.dialects.sqlite import insert
        else:
            from sqlalchemy.dialects.postgresql import insert
        return insert(table)

    # -- raw SQL, for maintenance scripts and tests that look at the file directly --

    def execute(self, sql: str, params: Any = ()) -> RawResult:
        """Run one statement in the driver's own SQL and parameter style, committed."""
        with self.write() as conn:
            result = conn.exec_driver_sql(sql, tuple(params) if isinstance(params, list) else params)
            rows = [tuple(r) for r in result] if result.returns_rows else []
            return RawResult(rows, result.rowcount)

    def query(self, sql: str, params: Any = ()) -> Iterator[dict]:
        """Rows of one raw read as dicts."""
        with self.read() as conn:
            result = conn.exec_driver_sql(sql, tuple(params) if isinstance(params, list) else params)
            rows = [dict(r._mapping) for r in result]
        return iter(rows)

    def ping(self) -> None:
        """One `SELECT 1`: ManifestUnavailableError when the database cannot be reached."""
        with self.read() as conn:
            conn.execute(sa.text("SELECT 1"))

    @property
    def journal_mode(self) -> str:
        with self.read() as conn:
            return conn.exec_driver_sql("PRAGMA journal_mode").scalar()

    def close(self) -> None:
        self.engine.dispose()

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """A lost or refused PostgreSQL connection becomes one line naming the manifest."""
        try:
            yield
        except (sa_exc.OperationalError, sa_exc.InterfaceError) as exc:
            if self.is_sqlite and not getattr(exc, "connection_invalidated", False):
                raise
            first = str(exc.orig or exc).strip().splitlines()[0] if str(exc.orig or exc).strip() else type(exc).__name__
            raise ManifestUnavailableError(f"cannot reach manifest {self.url}: {first}") from None


def _sqlite_engine(path: Path) -> sa.Engine:
    path.parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(f"sqlite:///{path}", connect_args={"timeout": BUSY_TIMEOUT_MS / 1000})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:
        dbapi_conn.isolation_level = None  # SQLAlchemy, not the driver, says BEGIN (see _on_begin)
        dbapi_conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        dbapi_conn.execute("PRAGMA journal_mode = WAL")
        dbapi_conn.execute("PRAGMA foreign_keys = ON")

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("kvlib_write") else "BEGIN")

    return engine


def _postgres_engine(url: str) -> tuple[sa.Engine, str]:
    parsed = sa.engine.make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    # pre_ping: a pooled connection that died with a server restart is replaced, not used.
    engine = sa.create_engine(parsed, pool_size=4, max_overflow=4, pool_pre_ping=True,
                              connect_args={"connect_timeout": PG_CONNECT_TIMEOUT_S})
    return engine, parsed.set(drivername="postgresql").render_as_string(hide_password=True)


def open_manifest(target: str | Path) -> Manifest:
    """Open (creating if needed) the manifest at a SQLite path or a `postgresql://` URL, fully migrated."""
    text = str(target)
    if text.startswith(("postgresql://", "postgres://", "postgresql+psycopg://")):
        engine, display = _postgres_engine(text)
    elif text.startswith("sqlite:///"):
        engine, display = _sqlite_engine(Path(text.removeprefix("sqlite:///"))), text
    elif "://" in text:
        raise InputError(f"unsupported manifest {text!r}: use a SQLite path or postgresql://...")
    else:
        engine, display = _sqlite_engine(Path(text)), text
    manifest = Manifest(engine, display)
    try:
        apply_migrations(manifest)
    except ManifestUnavailableError:
        manifest.close()
        raise
    except sa_exc.DatabaseError as exc:
        manifest.close()
        raise KvlibError(f"cannot open manifest {display}: {exc.orig or exc}") from None
    return manifest


def create_database(server_url: str, name: str) -> str:
    """CREATE DATABASE `name` on the PostgreSQL server of `server_url`; the new database's URL.

    For a fresh, empty manifest beside others on one server (a test, a benchmark run)."""
    import psycopg

    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
        raise InputError(f"invalid database name {name!r}: use lower-case letters, digits and '_'")
    parsed = sa.engine.make_url(server_url).set(drivername="postgresql")
    admin = parsed.set(database="postgres").render_as_string(hide_password=False)
    try:
        with psycopg.connect(admin, autocommit=True, connect_timeout=PG_CONNECT_TIMEOUT_S) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        raise ManifestUnavailableError(f"cannot reach manifest {parsed.set(database='postgres').render_as_string()}: "
                                       f"{str(exc).strip().splitlines()[0]}") from None
    return parsed.set(database=name).render_as_string(hide_password=False)


def applied_migrations(db: Manifest) -> list[str]:
    """Names of the migrations already applied, in order (names are ordered by design)."""
    with db.read() as conn:
        if not sa.inspect(conn).has_table("migrations"):
            return []
        return list(conn.execute(sa.select(schema.migrations.c.name).order_by(schema.migrations.c.name)).scalars())


def apply_migrations(db: Manifest) -> list[str]:
    """Apply every pending migration, in order, each in its own write lock; idempotent."""
    applied: list[str] = []
    for name, migrate in MIGRATIONS:
        with db.write() as conn:
            if not db.is_sqlite:  # SQLite's BEGIN IMMEDIATE already excludes every other writer
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:id)"), {"id": _MIGRATION_LOCK})
            schema.metadata.create_all(conn, tables=[schema.migrations], checkfirst=True)
            table = schema.migrations
            done = conn.execute(sa.select(table.c.name).where(table.c.name == name)).first()
            if done:
                continue  # another process (or an earlier open) got here first
            migrate(conn)
            conn.execute(table.insert().values(name=name, applied_at=now_iso()))
            applied.append(name)
    return applied


def tenant_salt(db: Manifest, conn: sa.Connection, tenant: str) -> str:
    """The tenant's private-key salt, created on first use.

    INSERT ... ON CONFLICT DO NOTHING then SELECT: if two processes create the tenant at
    once, one salt wins and both read that one.
    """
    check_tenant(tenant)
    table = schema.tenants
    conn.execute(db.insert(table).values(name=tenant, salt=secrets.token_hex(32), created=now_iso())
                 .on_conflict_do_nothing(index_elements=["name"]))
    return conn.execute(sa.select(table.c.salt).where(table.c.name == tenant)).scalar_one()
