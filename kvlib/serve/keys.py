"""API keys: random, shown once, stored only as their sha256 in `<home>/keys.sqlite`.

Design facts:
- A key is `kvl-` + 32 random bytes (urlsafe base64); the home keeps sha256(key) and a
  short random id to name it by (in `keys ls` and `keys revoke`). No part of the key
  itself is stored, so the file is useless to whoever copies it.
- A key belongs to one tenant. An admin key may also write public documents. A key
  for the shared tenant `public` can only be an admin key: every key that writes there
  writes for everyone.
- Revoking marks the row; lookups ignore revoked rows at once (the server reads the
  table on each request, a sub-millisecond indexed query).
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from kvlib.config import DEFAULT_TENANT
from kvlib.errors import InputError, NotFoundError

KEYS_FILE = "keys.sqlite"
PREFIX = "kvl-"


@dataclass(frozen=True)
class KeyInfo:
    id: str
    tenant: str
    admin: bool
    created: str
    revoked: str | None = None


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class KeyStore:
    def __init__(self, home: Path):
        import sqlite_utils

        home.mkdir(parents=True, exist_ok=True)
        # check_same_thread=False: the server looks keys up from its event-loop thread and
        # threadpool; each lookup is one statement and sqlite3 serialises the connection.
        self.db = sqlite_utils.Database(sqlite3.connect(str(home / KEYS_FILE), check_same_thread=False))
        self.db.execute("PRAGMA busy_timeout = 30000")
        if not self.db["keys"].exists():
            self.db["keys"].create({"id": str, "key_sha256": str, "tenant": str, "admin": int,
                                    "created": str, "revoked": str}, pk="id", not_null={"key_sha256", "tenant"})
            self.db["keys"].create_index(["key_sha256"], unique=True, if_not_exists=True)

    def close(self) -> None:
        self.db.close()

    def add(self, tenant: str, admin: bool = False) -> tuple[str, KeyInfo]:
        """A new key (returned once, never stored) and its record."""
        from kvlib.store.manifest import check_tenant, now_iso

        check_tenant(tenant)
        if tenant == DEFAULT_TENANT and not admin:
            raise InputError(f"a key for the shared tenant '{DEFAULT_TENANT}' writes for everyone: add it with --admin")
        key = PREFIX + secrets.token_urlsafe(32)
        info = KeyInfo(id=secrets.token_hex(4), tenant=tenant, admin=admin, created=now_iso())
        self.db["keys"].insert({"id": info.id, "key_sha256": hash_key(key), "tenant": tenant, "admin": int(admin),
                                "created": info.created, "revoked": None})
        return key, info

    def lookup(self, key: str) -> KeyInfo | None:
        """The live key with this secret, or None (unknown and revoked read the same)."""
        row = self.db.execute("SELECT id, tenant, admin, created, revoked FROM keys WHERE key_sha256 = ? "
                              "AND revoked IS NULL", [hash_key(key)]).fetchone()
        return None if row is None else KeyInfo(row[0], row[1], bool(row[2]), row[3], row[4])

    def list(self) -> list[KeyInfo]:
        return [KeyInfo(r["id"], r["tenant"], bool(r["admin"]), r["created"], r["revoked"])
                for r in self.db.query("SELECT * FROM keys ORDER BY created")]

    def revoke(self, key_id: str) -> KeyInfo:
        from kvlib.store.manifest import now_iso

        rows = [k for k in self.list() if k.id == key_id]
        if not rows:
            raise NotFoundError(f"no key with id {key_id!r} (see `kvlib keys ls`)")
        if rows[0].revoked is None:
            self.db.execute("UPDATE keys SET revoked = ? WHERE id = ?", [now_iso(), key_id])
            self.db.conn.commit()
        return next(k for k in self.list() if k.id == key_id)
