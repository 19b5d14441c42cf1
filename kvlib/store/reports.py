"""Read-only views of the library: listings, inspect, stats, verify.

Design facts:
- Every view is filtered by tenant visibility before anything is counted or
  shown, including the documents said to hold a chunk: a public chunk held by
  another tenant's private document must not reveal that document.
- `inspect` and `verify` re-hash the blob now instead of trusting the manifest.
- Values are plain dicts of JSON-ready scalars, so the CLI's `--json` is a dump.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from kvlib.errors import CorruptBlobError
from kvlib.store.blobs import dtype_name
from kvlib.store.keys import ChunkKey, compute_key
from kvlib.store.manifest import PUBLIC_OWNER, check_tenant, visible_owners

# Portable SQL (SQLite and PostgreSQL alike), written once, with named parameters.
_VISIBLE_DOC = "(d.public = 1 OR d.tenant = :tenant)"


def _rows(conn: sa.Connection, sql: str, **params: Any) -> list[dict]:
    return [dict(row) for row in conn.execute(sa.text(sql), params).mappings()]


@dataclass(frozen=True)
class Problem:
    """One blob that disagrees with the manifest."""

    key: str
    reason: str


def document_view(conn: sa.Connection, row: dict, tenant: str) -> dict:
    """A document row as a tenant may see it, with its chunk keys in order."""
    keys = [r["chunk_key"] for r in _rows(conn, "SELECT chunk_key FROM doc_chunks WHERE doc_id = :id ORDER BY ord",
                                          id=row["id"])]
    return {
        "id": row["id"],
        "path": row["path"],
        "content_hash": row["content_hash"],
        "public": bool(row["public"]),
        "owner": PUBLIC_OWNER if row["public"] else tenant,
        "mine": row["tenant"] == tenant,  # which tenant ingested a public document is not shown
        "ingested_at": row["ingested_at"],
        "chunk_keys": keys,
    }


def list_documents(conn: sa.Connection, tenant: str) -> list[dict]:
    """Visible documents with their chunk and token counts, by path."""
    check_tenant(tenant)
    rows = _rows(
        conn,
        "SELECT d.id, d.path, d.content_hash, d.public, d.tenant = :tenant AS mine, d.ingested_at,"
        " COUNT(dc.chunk_key) AS chunks, COALESCE(SUM(c.tokens), 0) AS tokens"
        " FROM documents d LEFT JOIN doc_chunks dc ON dc.doc_id = d.id LEFT JOIN chunks c ON c.key = dc.chunk_key"
        f" WHERE {_VISIBLE_DOC} GROUP BY d.id ORDER BY d.path, d.public",
        tenant=tenant,
    )
    return [
        {**row, "public": bool(row["public"]), "mine": bool(row["mine"]), "owner": PUBLIC_OWNER if row["public"] else tenant}
        for row in rows
    ]


def list_chunks(conn: sa.Connection, tenant: str) -> list[dict]:
    """Visible chunks, oldest first, with how many visible documents hold each."""
    visible_owners(tenant)
    return _rows(
        conn,
        "SELECT c.key, c.owner, c.model_fp, c.context_id, c.tokens, c.bytes, c.dtype, c.hits, c.last_used,"
        " c.created, c.text_preview, c.drift_score,"
        " (SELECT COUNT(*) FROM doc_chunks dc JOIN documents d ON d.id = dc.doc_id"
        f"   WHERE dc.chunk_key = c.key AND {_VISIBLE_DOC}) AS documents"
        " FROM chunks c WHERE c.owner IN (:public, :tenant) ORDER BY c.created, c.key",
        tenant=tenant, public=PUBLIC_OWNER,
    )


def inspect_chunk(conn: sa.Connection, blobs: Any, row: dict, tenant: str) -> dict:
    """Everything about one chunk row the tenant may see; the checksum is checked now."""
    key = ChunkKey(row["key"])
    status = blobs.status(key, row["checksum"])
    model = _rows(conn, "SELECT name FROM models WHERE fingerprint = :fp", fp=row["model_fp"])
    documents = _rows(
        conn,
        "SELECT d.id, d.path, d.public, dc.ord FROM doc_chunks dc JOIN documents d ON d.id = dc.doc_id"
        f" WHERE dc.chunk_key = :key AND {_VISIBLE_DOC} ORDER BY d.path, dc.ord",
        key=key.hex, tenant=tenant,
    )
    return {
        "key": key.hex,
        "owner": row["owner"],
        "model_fp": row["model_fp"],
        "model_name": model[0]["name"] if model else None,
        "context_id": row["context_id"],
        "tokens": row["tokens"],
        "text_preview": row["text_preview"],
        "dtype": row["dtype"],
        "shapes": json.loads(row["shapes"]),
        "bytes": row["bytes"],
        "checksum": row["checksum"],
        "checksum_status": status,
        "hits": row["hits"],
        "last_used": row["last_used"],
        "created": row["created"],
        "drift_score": row["drift_score"],
        "meta": json.loads(row["meta"] or "{}"),
        "documents": [{**doc, "public": bool(doc["public"])} for doc in documents],
    }


def library_stats(conn: sa.Connection, tenant: str) -> dict:
    """Sizes and reuse as seen by one tenant.

    dedup ratio = chunk references from visible documents / distinct chunks they
    reference: 1.0 means no sharing; None means no document holds any chunk.
    """
    visible_owners(tenant)

    def one(sql: str, **params: Any) -> Any:
        return conn.execute(sa.text(sql), {"tenant": tenant, **params}).one()

    docs = one(f"SELECT COUNT(*) FROM documents d WHERE {_VISIBLE_DOC}")[0]
    chunks, size, tokens, hits = (int(x) for x in one(
        "SELECT COUNT(*), COALESCE(SUM(bytes), 0), COALESCE(SUM(tokens), 0), COALESCE(SUM(hits), 0)"
        " FROM chunks WHERE owner IN (:public, :tenant)", public=PUBLIC_OWNER))
    refs, distinct = one(
        "SELECT COUNT(*), COUNT(DISTINCT dc.chunk_key) FROM doc_chunks dc JOIN documents d ON d.id = dc.doc_id"
        f" WHERE {_VISIBLE_DOC}")
    return {
        "tenant": tenant,
        "documents": docs,
        "chunks": chunks,
        "bytes": size,
        "tokens": tokens,
        "bytes_per_token": size / tokens if tokens else None,
        "chunk_references": refs,
        "referenced_chunks": distinct,
        "dedup_ratio": refs / distinct if distinct else None,
        "hits": hits,
    }


def verify_chunks(db: Any, blobs: Any, owners: tuple[str, str] | None) -> list[Problem]:
    """Re-read every blob (of `owners`, or all) and compare it with its manifest row."""
    with db.read() as conn:
        if owners is None:
            rows = _rows(conn, "SELECT * FROM chunks ORDER BY key")
        else:
            rows = _rows(conn, "SELECT * FROM chunks WHERE owner IN (:a, :b) ORDER BY key", a=owners[0], b=owners[1])
        salts = {row["name"]: row["salt"] for row in _rows(conn, "SELECT name, salt FROM tenants")}
    problems = []
    for row in rows:
        reason = check_row(blobs, row, salts)
        if reason:
            problems.append(Problem(row["key"], reason))
    return problems


def check_row(blobs: Any, row: dict, salts: dict[str, str]) -> str | None:
    """Why a blob disagrees with its row, or None when checksum, shapes, dtype and key all agree."""
    key = ChunkKey(row["key"])
    # A tiered store checks the copy in the remote store, not the node's cache of it.
    read = getattr(blobs, "verify_read", blobs.read)
    try:
        contents = read(key, row["checksum"])
    except CorruptBlobError as exc:
        return str(exc)
    found = {"k_sem": list(contents.k_sem.shape), "v": list(contents.v.shape)}
    reasons = []
    if found != json.loads(row["shapes"]):
        reasons.append(f"shapes {found} != manifest {row['shapes']}")
    if {dtype_name(contents.k_sem), dtype_name(contents.v)} != {row["dtype"]}:
        reasons.append(f"dtype {dtype_name(contents.k_sem)}/{dtype_name(contents.v)} != manifest {row['dtype']}")
    if contents.token_ids.dim() != 1 or contents.token_ids.numel() != row["tokens"] or found["k_sem"][2] != row["tokens"]:
        reasons.append(f"token count != manifest {row['tokens']}")
    header = contents.metadata
    for name in ("key", "model_fp", "context_id"):
        if header.get(name) != row[name]:
            reasons.append(f"header {name} {header.get(name)!r} != manifest")
    if not reasons:
        reasons.extend(_key_mismatch(row, contents.token_ids, salts))
    return "; ".join(reasons) or None


def _key_mismatch(row: dict, token_ids: Any, salts: dict[str, str]) -> list[str]:
    """The stored token ids must hash back to the key under the owner's salt."""
    salt = "" if row["owner"] == PUBLIC_OWNER else salts.get(row["owner"])
    if salt is None:
        return [f"owner {row['owner']!r} has no tenant salt"]
    derived = compute_key(model_fp=row["model_fp"], context_id=row["context_id"], token_ids=token_ids, salt=salt)
    return [] if derived.hex == row["key"] else ["token ids do not hash to the key"]
