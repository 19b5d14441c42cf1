"""The library facade: what ingest, query and the CLI do with stored chunks.

Design facts:
- Content-addressed: a chunk's key is derived from what it is (model, encoding
  context, token ids, namespace), so `put` of something already stored and
  intact writes nothing (new=False), as sqlite-utils / llm skip known hashes.
- Blob first, row second: a row only ever appears after its blob was fsynced
  and renamed into place, so no crash leaves a row pointing at a partial blob.
  The rename and the row insert happen under the manifest's write lock, so two
  processes putting the same key serialize and the row's checksum always
  describes the file on disk.
- Tenants: a tenant sees chunks owned by "public" or by itself and nothing else.
  Anything it may not see fails with exactly the NotFoundError a missing key
  gets, so no answer reveals that another tenant's chunk exists. The default
  tenant ("public") has no private namespace: what it stores is public.
- Puts can be split: `put_begin(..., background=True)` stages the blob on the library's
  writer thread (store/writer.py) while the caller computes; `finish_puts` publishes begun
  puts in order in one transaction on the caller's thread. `put` is both at once.
- One Library holds one SQLite connection: use one per process or thread.
- torch is imported inside functions only, so importing kvlib stays fast.
"""

from __future__ import annotations

import json
import math
import warnings
from concurrent.futures import wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from kvlib.config import DEFAULT_TENANT
from kvlib.errors import InputError, NotFoundError
from kvlib.store import reports
from kvlib.store.blobs import (
    FORMAT_VERSION, SUPPORTED_DTYPES, BlobStore, checksum_bytes, dtype_name, serialize_blob,
)
from kvlib.store.capacity import BudgetReport, BudgetWarning, GcReport, collect_garbage, evict_to_budget
from kvlib.store.keys import ChunkKey, as_key, compute_key, normalize_prefix, normalize_token_ids, pick_unique, prefix_range
from kvlib.store.manifest import (
    PUBLIC_OWNER, check_tenant, now_iso, open_manifest, placeholders, tenant_salt, visible_owners, write_lock,
)
from kvlib.store.writer import BlobWriter, PendingPut, Staged, discard

MANIFEST_NAME = "manifest.sqlite"
BLOBS_DIR = "blobs"
# Enough text to recognise a chunk in a table; the blob holds the real tokens.
PREVIEW_CHARS = 240
SQL_BATCH = 500

_UPSERT_CHUNK = """
INSERT INTO chunks (key, model_fp, context_id, owner, tokens, bytes, dtype, shapes, checksum,
                    hits, last_used, created, text_preview, drift_score, meta)
VALUES (:key, :model_fp, :context_id, :owner, :tokens, :bytes, :dtype, :shapes, :checksum,
        0, :now, :now, :text_preview, :drift_score, :meta)
ON CONFLICT(key) DO UPDATE SET bytes = excluded.bytes, dtype = excluded.dtype, shapes = excluded.shapes,
    checksum = excluded.checksum, last_used = excluded.last_used,
    drift_score = COALESCE(excluded.drift_score, chunks.drift_score)
"""

_SET_DRIFT = "UPDATE chunks SET drift_score = ? WHERE key = ?"


@dataclass(frozen=True)
class PutResult:
    key: ChunkKey
    new: bool  # True if this call wrote the blob; False if an intact copy was already stored
    bytes: int
    budget: BudgetReport | None = None  # set when the library has a max_bytes


@dataclass(frozen=True, eq=False)
class StoredChunk:
    key: ChunkKey
    k_sem: Any  # torch.Tensor [layers, kv_heads, tokens, head_dim], pre-RoPE
    v: Any  # torch.Tensor [layers, kv_heads, tokens, head_dim_v]
    token_ids: Any  # torch.LongTensor [tokens]
    model_fp: str
    context_id: str
    dtype: str  # "float16" or "bfloat16", exactly as stored
    drift_score: float | None = None  # measured at ingest (kvlib.engine.drift); None if never measured


def not_found(what: str) -> NotFoundError:
    """The one message for 'absent' and 'not yours', so neither can be told apart."""
    return NotFoundError(f"chunk {what} not found")


class Library:
    """A library home: `manifest.sqlite` plus `blobs/ab/<key>.safetensors`."""

    def __init__(self, home: str | Path, max_bytes: int | None = None) -> None:
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0):
            raise InputError(f"max_bytes must be a non-negative int, got {max_bytes!r}")
        self.home = Path(home).expanduser()
        self.max_bytes = max_bytes
        self.db = open_manifest(self.home / MANIFEST_NAME)
        self.blobs = BlobStore(self.home / BLOBS_DIR)
        # Keys this handle wrote that no document claimed yet: automatic eviction
        # must not drop a document's first chunks before set_document names them.
        self._unclaimed: set[str] = set()
        self._writer = BlobWriter()  # stages blobs beside the caller for put_begin(background=True)
        self._pending: set[PendingPut] = set()  # begun, neither published nor discarded

    def close(self) -> None:
        self.discard_puts(list(self._pending))
        self._writer.close()
        self.db.close()

    def __enter__(self) -> "Library":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- models and keys -------------------------------------------------

    def register_model(self, fingerprint: str, name: str, config: dict) -> None:
        """Record a model fingerprint's human name and config (re-registering updates them)."""
        _check_text("fingerprint", fingerprint)
        self.db.execute(
            "INSERT INTO models (fingerprint, name, config, created) VALUES (?, ?, ?, ?)"
            " ON CONFLICT(fingerprint) DO UPDATE SET name = excluded.name, config = excluded.config",
            [fingerprint, name, _to_json(config, "model config"), now_iso()],
        )

    def model(self, fingerprint: str) -> dict | None:
        """A registered model's row (config parsed), or None."""
        row = next(self.db.query("SELECT * FROM models WHERE fingerprint = ?", [fingerprint]), None)
        return None if row is None else {**row, "config": json.loads(row["config"] or "{}")}

    def key_for(self, *, tenant: str, public: bool, model_fp: str, context_id: str, token_ids: Any) -> ChunkKey:
        """The key `put` would give these ids: lets ingest skip encoding known chunks."""
        _check_text("model_fp", model_fp)
        _check_text("context_id", context_id)
        _, salt = self._namespace(tenant, public)
        return compute_key(model_fp=model_fp, context_id=context_id, token_ids=token_ids, salt=salt)

    def has(self, key: ChunkKey | str, tenant: str = DEFAULT_TENANT) -> bool:
        """True if the chunk is stored and this tenant may see it."""
        return bool(self._visible_rows([as_key(key).hex], tenant))

    def resolve(self, prefix: str, tenant: str = DEFAULT_TENANT) -> ChunkKey:
        """Resolve a key prefix (>= 6 hex digits) among the chunks this tenant may see."""
        text = normalize_prefix(prefix)
        low, high = prefix_range(text)
        rows = self.db.execute(
            "SELECT key FROM chunks WHERE key >= ? AND key < ? AND owner IN (?, ?)",
            [low, high, *visible_owners(tenant)],
        )
        return pick_unique(text, (row[0] for row in rows))

    # -- chunks ----------------------------------------------------------

    def put(
        self, *, tenant: str, public: bool, model_fp: str, context_id: str, token_ids: Any,
        k_sem: Any, v: Any, text_preview: str = "", meta: dict | None = None, drift_score: float | None = None,
    ) -> PutResult:
        """Store one chunk's semantic K and V; skips the write if an intact copy exists."""
        return self.finish_puts([self.put_begin(
            tenant=tenant, public=public, model_fp=model_fp, context_id=context_id, token_ids=token_ids,
            k_sem=k_sem, v=v, text_preview=text_preview, meta=meta, drift_score=drift_score)])[0]

    def put_begin(
        self, *, tenant: str, public: bool, model_fp: str, context_id: str, token_ids: Any,
        k_sem: Any, v: Any, text_preview: str = "", meta: dict | None = None, drift_score: float | None = None,
        background: bool = False,
    ) -> PendingPut:
        """Validate a put and stage its blob (on the writer thread when `background`).

        Nothing is visible until `finish_puts` publishes it; `discard_puts` drops it.
        The tensors must not change until then.
        """
        token_tensor = _check_kv(k_sem, v, token_ids)
        _check_text("model_fp", model_fp)
        _check_text("context_id", context_id)
        _check_drift(drift_score)
        owner, salt = self._namespace(tenant, public)
        key = compute_key(model_fp=model_fp, context_id=context_id, token_ids=token_ids, salt=salt)
        self._unclaimed.add(key.hex)
        existing = self._row(key)
        if existing is not None and self._blob_intact(key, existing):
            return PendingPut(key, None, None, existing["bytes"], drift_score)
        dtype = dtype_name(k_sem)
        shapes = {"k_sem": list(k_sem.shape), "v": list(v.shape)}
        header = {
            "kvlib_format": FORMAT_VERSION, "key": key.hex, "model_fp": model_fp, "context_id": context_id,
            "dtype": dtype, "k_sem_shape": json.dumps(shapes["k_sem"]), "v_shape": json.dumps(shapes["v"]),
        }
        record = {
            "key": key.hex, "model_fp": model_fp, "context_id": context_id, "owner": owner,
            "tokens": int(k_sem.shape[2]), "dtype": dtype, "shapes": json.dumps(shapes), "now": now_iso(),
            "text_preview": (text_preview or "")[:PREVIEW_CHARS], "meta": _to_json(meta or {}, "meta"),
            "drift_score": None if drift_score is None else float(drift_score),
        }

        # Copies happen here: a torch op on the writer thread would start a second OpenMP
        # team, whose spinning threads take cores from the caller's compute.
        k_sem, v, token_tensor = (t.detach().cpu().contiguous() for t in (k_sem, v, token_tensor))

        def stage() -> Staged:
            data = serialize_blob(k_sem=k_sem, v=v, token_ids=token_tensor, metadata=header)
            return Staged(self.blobs.stage(key, data), len(data), checksum_bytes(data))

        pending = PendingPut(key, record, self._writer.submit(stage, background), drift_score=drift_score)
        self._pending.add(pending)
        return pending

    def finish_puts(self, pending: list[PendingPut]) -> list[PutResult]:
        """Publish begun puts in order, one manifest transaction; waits for their staging."""
        results: list[PutResult] = []
        try:
            wait([p.staged for p in pending if p.staged is not None])  # not while holding the write lock
            with write_lock(self.db):
                for p in pending:
                    results.append(self._finish(p))
        finally:
            self.discard_puts(pending)  # no-op for the published; drops the rest on any error
        budget = self._auto_evict(set())
        return [PutResult(r.key, r.new, r.bytes, budget) for r in results]

    def discard_puts(self, pending: list[PendingPut]) -> None:
        """Drop begun puts that were not published (their temp files go)."""
        for p in pending:
            discard(p)
            self._pending.discard(p)

    def _finish(self, p: PendingPut) -> PutResult:
        """Inside the write lock: rename the staged blob into place and write its row.

        Re-checks under the lock: another process may have stored the same key since
        put_begin looked, in which case its file and row stay and ours goes.
        """
        if p.staged is None:
            self._touch_locked([p.key.hex], hit=False)
            if p.drift_score is not None:
                self.db.execute(_SET_DRIFT, [float(p.drift_score), p.key.hex])
            return PutResult(p.key, False, p.existing_bytes)
        staged = p.staged.result()
        existing = self._row(p.key)
        if existing is not None and self._blob_intact(p.key, existing):
            return PutResult(p.key, False, existing["bytes"])  # discard_puts drops ours
        staged.blob.publish()
        p.settled = True
        self.db.execute(_UPSERT_CHUNK, {**p.record, "bytes": staged.nbytes, "checksum": staged.checksum})
        return PutResult(p.key, True, staged.nbytes)

    def get(self, key: ChunkKey | str, tenant: str = DEFAULT_TENANT) -> StoredChunk:
        """One chunk, checksum-verified; counts as a use (hits, last_used)."""
        return self.get_many([key], tenant)[0]

    def get_many(self, keys: Iterable[ChunkKey | str], tenant: str = DEFAULT_TENANT) -> list[StoredChunk]:
        """Chunks in the order asked, each checksum-verified; counts one use per distinct key."""
        wanted = [as_key(key) for key in keys]
        rows = self._visible_rows([key.hex for key in wanted], tenant)
        for key in wanted:
            if key.hex not in rows:
                raise not_found(key.hex)
        loaded: dict[str, StoredChunk] = {}
        for key in wanted:
            if key.hex not in loaded:
                loaded[key.hex] = self._load(key, rows[key.hex])
        self._touch(list(loaded))
        return [loaded[key.hex] for key in wanted]

    def set_drift_score(self, key: ChunkKey | str, score: float | None) -> None:
        """Record how far this chunk's cached KV drifts from a full recompute (repair's measure)."""
        _check_drift(score)
        hexkey = as_key(key).hex
        cursor = self.db.execute(_SET_DRIFT, [None if score is None else float(score), hexkey])
        if cursor.rowcount == 0:
            raise not_found(hexkey)

    # -- documents -------------------------------------------------------

    def set_document(
        self, *, tenant: str, public: bool, path: str, content_hash: str, chunk_keys: Iterable[ChunkKey | str]
    ) -> int:
        """Record a document as an ordered list of chunks; replaces the earlier version of
        the same path for this tenant and visibility. Returns the new document id."""
        _check_text("path", path)
        owner, _ = self._namespace(tenant, public)
        keys = [as_key(key).hex for key in chunk_keys]
        with write_lock(self.db):
            rows = self._visible_rows(keys, tenant)
            for hexkey in keys:
                if hexkey not in rows:
                    raise not_found(hexkey)
                if owner == PUBLIC_OWNER and rows[hexkey]["owner"] != PUBLIC_OWNER:
                    raise InputError(f"a public document cannot hold private chunk {hexkey[:12]}")
            is_public = int(owner == PUBLIC_OWNER)
            earlier = self.db.execute(
                "SELECT id FROM documents WHERE tenant = ? AND public = ? AND path = ?", [tenant, is_public, path]
            )
            self._delete_documents([row[0] for row in earlier.fetchall()])
            doc_id = self.db["documents"].insert(
                {"path": path, "content_hash": content_hash, "tenant": tenant, "public": is_public, "ingested_at": now_iso()}
            ).last_pk
            self.db["doc_chunks"].insert_all(
                [{"doc_id": doc_id, "chunk_key": hexkey, "ord": ord_} for ord_, hexkey in enumerate(keys)]
            )
        self._unclaimed.difference_update(keys)
        self._auto_evict(set())
        return doc_id

    def document(self, tenant: str, path: str, public: bool | None = None) -> dict | None:
        """The visible document at `path`, preferring the tenant's own over others' public one."""
        check_tenant(tenant)
        sql = "SELECT * FROM documents WHERE path = ? AND (public = 1 OR tenant = ?)"
        params: list[Any] = [path, tenant]
        if public is not None:
            sql += " AND public = ?"
            params.append(int(bool(public) or tenant == DEFAULT_TENANT))
        sql += " ORDER BY (tenant = ?) DESC, public ASC, ingested_at DESC LIMIT 1"
        row = next(self.db.query(sql, [*params, tenant]), None)
        return None if row is None else reports.document_view(self.db, row, tenant)

    def remove_document(self, *, tenant: str, path: str, public: bool | None = None) -> int:
        """Delete one of this tenant's documents (not its chunks, which become evictable)."""
        check_tenant(tenant)
        sql = "SELECT id, public FROM documents WHERE tenant = ? AND path = ?"
        params: list[Any] = [tenant, path]
        if public is not None:
            sql += " AND public = ?"
            params.append(int(bool(public) or tenant == DEFAULT_TENANT))
        with write_lock(self.db):
            found = self.db.execute(sql, params).fetchall()
            if not found:
                raise NotFoundError(f"document {path} not found")
            if len(found) > 1:
                raise InputError(f"document {path} exists both private and public: say which to remove")
            self._delete_documents([found[0][0]])
        self._auto_evict(set())
        return found[0][0]

    def list_documents(self, tenant: str = DEFAULT_TENANT) -> list[dict]:
        return reports.list_documents(self.db, tenant)

    def list_chunks(self, tenant: str = DEFAULT_TENANT) -> list[dict]:
        return reports.list_chunks(self.db, tenant)

    # -- reports and maintenance ----------------------------------------

    def inspect(self, key_or_prefix: ChunkKey | str, tenant: str = DEFAULT_TENANT) -> dict:
        """Everything known about one visible chunk; its checksum is verified now."""
        key = key_or_prefix if isinstance(key_or_prefix, ChunkKey) else self.resolve(key_or_prefix, tenant)
        row = self._visible_rows([key.hex], tenant).get(key.hex)
        if row is None:
            raise not_found(key.hex)
        return reports.inspect_chunk(self.db, self.blobs, row, tenant)

    def stats(self, tenant: str = DEFAULT_TENANT) -> dict:
        return {**reports.library_stats(self.db, tenant), "home": str(self.home), "max_bytes": self.max_bytes}

    def verify(self, tenant: str | None = None) -> list[reports.Problem]:
        """Re-read every blob (or every one `tenant` may see) against the manifest."""
        return reports.verify_chunks(self.db, self.blobs, None if tenant is None else visible_owners(tenant))

    def evict(self, max_bytes: int | None = None) -> BudgetReport:
        """Evict unreferenced chunks LRU-first down to `max_bytes` (default: the library's)."""
        budget = self.max_bytes if max_bytes is None else max_bytes
        if budget is None or isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
            raise InputError("evict needs a non-negative byte budget (max_bytes)")
        return evict_to_budget(self.db, self.blobs, budget, set())

    def gc(self) -> GcReport:
        """Remove orphan blobs, orphan rows (and their memberships) and abandoned temp files."""
        return collect_garbage(self.db, self.blobs)

    # -- internals -------------------------------------------------------

    def _namespace(self, tenant: str, public: bool) -> tuple[str, str]:
        """(owner, key salt): public chunks share the empty salt; private ones get the tenant's."""
        check_tenant(tenant)
        if public or tenant == DEFAULT_TENANT:
            return PUBLIC_OWNER, ""
        return tenant, tenant_salt(self.db, tenant)

    def _row(self, key: ChunkKey) -> dict | None:
        return next(self.db.query("SELECT * FROM chunks WHERE key = ?", [key.hex]), None)

    def _visible_rows(self, keys: list[str], tenant: str) -> dict[str, dict]:
        owners = visible_owners(tenant)
        unique = sorted(set(keys))
        rows: dict[str, dict] = {}
        for start in range(0, len(unique), SQL_BATCH):
            batch = unique[start : start + SQL_BATCH]
            sql = f"SELECT * FROM chunks WHERE key IN ({placeholders(len(batch))}) AND owner IN (?, ?)"
            rows.update((row["key"], row) for row in self.db.query(sql, [*batch, *owners]))
        return rows

    def _blob_intact(self, key: ChunkKey, row: dict) -> bool:
        return self.blobs.file_checksum(key) == row["checksum"]

    def _load(self, key: ChunkKey, row: dict) -> StoredChunk:
        contents = self.blobs.read(key, row["checksum"])
        return StoredChunk(
            key=key, k_sem=contents.k_sem, v=contents.v, token_ids=contents.token_ids.long(),
            model_fp=row["model_fp"], context_id=row["context_id"], dtype=row["dtype"],
            drift_score=row.get("drift_score"),
        )

    def _touch(self, keys: list[str], hit: bool = True) -> None:
        """Mark keys used now (LRU order); a read also counts a hit, a repeated put does not."""
        with write_lock(self.db):
            self._touch_locked(keys, hit)

    def _touch_locked(self, keys: list[str], hit: bool) -> None:
        now = now_iso()
        for start in range(0, len(keys), SQL_BATCH):
            batch = keys[start : start + SQL_BATCH]
            self.db.execute(
                f"UPDATE chunks SET hits = hits + ?, last_used = ? WHERE key IN ({placeholders(len(batch))})",
                [int(hit), now, *batch],
            )

    def _delete_documents(self, ids: list[int]) -> None:
        """Delete documents and their memberships (memberships first: they reference the row)."""
        for doc_id in ids:
            self.db.execute("DELETE FROM doc_chunks WHERE doc_id = ?", [doc_id])
            self.db.execute("DELETE FROM documents WHERE id = ?", [doc_id])

    def _auto_evict(self, protect: set[str]) -> BudgetReport | None:
        """Keep the library within max_bytes after a write; warn visibly if it cannot."""
        if self.max_bytes is None:
            return None
        report = evict_to_budget(self.db, self.blobs, self.max_bytes, protect | self._unclaimed)
        if not report.ok:
            warnings.warn(BudgetWarning(report), stacklevel=3)
        return report


def _check_text(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise InputError(f"{name} must be a non-empty string, got {value!r}")


def _check_drift(score: Any) -> None:
    if score is not None and (isinstance(score, bool) or not math.isfinite(float(score))):
        raise InputError(f"drift score must be a finite number or None, got {score!r}")


def _to_json(value: Any, what: str) -> str:
    try:
        return json.dumps(value, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{what} must be JSON-serializable: {exc}") from exc


def _check_kv(k_sem: Any, v: Any, token_ids: Any) -> Any:
    """Validate the tensors of one chunk; returns the token ids as a 1-D int tensor."""
    import torch

    if not isinstance(k_sem, torch.Tensor) or not isinstance(v, torch.Tensor):
        raise InputError("k_sem and v must be torch tensors")
    if k_sem.dim() != 4 or v.dim() != 4 or k_sem.shape[:3] != v.shape[:3]:
        raise InputError(
            f"k_sem and v must be [layers, kv_heads, tokens, head_dim] with matching leading dims, "
            f"got {list(k_sem.shape)} and {list(v.shape)}"
        )
    if dtype_name(k_sem) not in SUPPORTED_DTYPES or k_sem.dtype != v.dtype:
        raise InputError(f"k_sem and v must both be float16 or bfloat16, got {k_sem.dtype} and {v.dtype}")
    ids = normalize_token_ids(token_ids)
    if len(ids) != k_sem.shape[2]:
        raise InputError(f"{len(ids)} token ids for a chunk of {k_sem.shape[2]} tokens")
    if isinstance(token_ids, torch.Tensor) and token_ids.dtype in (torch.int32, torch.int64):
        return token_ids.reshape(-1)
    return torch.tensor(ids, dtype=torch.int64)
