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

import sqlite_utils

from kvlib.errors import CorruptBlobError
from kvlib.store.blobs import BlobStore, checksum_file, dtype_name
from kvlib.store.keys import ChunkKey, compute_key
from kvlib.store.manifest import PUBLIC_OWNER, check_tenant, visible_owners

_VISIBLE_DOC = "(d.public = 1 OR d.tenant = ?)"


@dataclass(frozen=True)
class Problem:
    """One blob that disagrees with the manifest."""

    key: str
    reason: str


def document_view(db: sqlite_utils.Database, row: dict, tenant: str) -> dict:
    """A document row as a tenant may see it, with its chunk keys in order."""
    keys = [r[0] for r in db.execute("SELECT chunk_key FROM doc_chunks WHERE doc_id = ? ORDER BY ord", [row["id"]])]
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


def list_documents(db: sqlite_utils.Database, tenant: str) -> list[dict]:
    """Visible documents with their chunk and token counts, by path."""
    check_tenant(tenant)
    rows = db.query(
        "SELECT d.id, d.path, d.content_hash, d.public, d.tenant = ? AS mine, d.ingested_at,"
        " COUNT(dc.chunk_key) AS chunks, COALESCE(SUM(c.tokens), 0) AS tokens"
        " FROM documents d LEFT JOIN doc_chunks dc ON dc.doc_id = d.id LEFT JOIN chunks c ON c.key = dc.chunk_key"
        f" WHERE {_VISIBLE_DOC} GROUP BY d.id ORDER BY d.path, d.public",
        [tenant, tenant],
    )
    return [
        {**row, "public": bool(row["public"]), "mine": bool(row["mine"]), "owner": PUBLIC_OWNER if row["public"] else tenant}
        for row in rows
    ]


def list_chunks(db: sqlite_utils.Database, tenant: str) -> list[dict]:
    """Visible chunks, oldest first, with how many visible documents hold each."""
    owners = visible_owners(tenant)
    rows = db.query(
        "SELECT c.key, c.owner, c.model_fp, c.context_id, c.tokens, c.bytes, c.dtype, c.hits, c.last_used,"
        " c.created, c.text_preview, c.drift_score,"
        " (SELECT COUNT(*) FROM doc_chunks dc JOIN documents d ON d.id = dc.doc_id"
        f"   WHERE dc.chunk_key = c.key AND {_VISIBLE_DOC}) AS documents"
        " FROM chunks c WHERE c.owner IN (?, ?) ORDER BY c.created, c.rowid",
        [tenant, *owners],
    )
    return list(rows)


def inspect_chunk(db: sqlite_utils.Database, blobs: BlobStore, row: dict, tenant: str) -> dict:
    """Everything about one chunk row the tenant may see; the checksum is checked now."""
    key = ChunkKey(row["key"])
    actual = checksum_file(blobs.path_for(key))
    status = "missing" if actual is None else ("ok" if actual == row["checksum"] else "mismatch")
    model = db.execute("SELECT name FROM models WHERE fingerprint = ?", [row["model_fp"]]).fetchone()
    documents = db.query(
        "SELECT d.id, d.path, d.public, dc.ord FROM doc_chunks dc JOIN documents d ON d.id = dc.doc_id"
        f" WHERE dc.chunk_key = ? AND {_VISIBLE_DOC} ORDER BY d.path, dc.ord",
        [key.hex, tenant],
    )
    return {
        "key": key.hex,
        "owner": row["owner"],
        "model_fp": row["model_fp"],
        "model_name": model[0] if model else None,
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


def library_stats(db: sqlite_utils.Database, tenant: str) -> dict:
    """Sizes and reuse as seen by one tenant.

    dedup ratio = chunk references from visible documents / distinct chunks they
    reference: 1.0 means no sharing; None means no document holds any chunk.
    """
    owners = visible_owners(tenant)
    docs = db.execute(f"SELECT COUNT(*) FROM documents d WHERE {_VISIBLE_DOC}", [tenant]).fetchone()[0]
    chunks, size, tokens, hits = db.execute(
        "SELECT COUNT(*), COALESCE(SUM(bytes), 0), COALESCE(SUM(tokens), 0), COALESCE(SUM(hits), 0)"
        " FROM chunks WHERE owner IN (?, ?)",
        list(owners),
    ).fetchone()
    refs, distinct = db.execute(
        "SELECT COUNT(*), COUNT(DISTINCT dc.chunk_key) FROM doc_chunks dc JOIN documents d ON d.id = dc.doc_id"
        f" WHERE {_VISIBLE_DOC}",
        [tenant],
    ).fetchone()
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


def verify_chunks(db: sqlite_utils.Database, blobs: BlobStore, owners: tuple[str, str] | None) -> list[Problem]:
    """Re-read every blob (of `owners`, or all) and compare it with its manifest row."""
    if owners is None:
        rows = list(db.query("SELECT * FROM chunks ORDER BY key"))
    else:
        rows = list(db.query("SELECT * FROM chunks WHERE owner IN (?, ?) ORDER BY key", list(owners)))
    salts = {row["name"]: row["salt"] for row in db.query("SELECT name, salt FROM tenants")}
    problems = []
    for row in rows:
        reason = check_row(blobs, row, salts)
        if reason:
            problems.append(Problem(row["key"], reason))
    return problems


def check_row(blobs: BlobStore, row: dict, salts: dict[str, str]) -> str | None:
    """Why a blob disagrees with its row, or None when checksum, shapes, dtype and key all agree."""
    key = ChunkKey(row["key"])
    try:
        contents = blobs.read(key, row["checksum"])
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
