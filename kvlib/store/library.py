"""The library facade: what ingest, query and the CLI do with stored chunks.

Design facts:
- Content-addressed: a chunk's key is derived from what it is (model, encoding
  context, token ids, namespace), so `put` of something already stored and
  intact writes nothing (new=False), as sqlite-utils / llm skip known hashes.
- Blob first, row second: a row only ever appears after its blob was fsynced
  and renamed into place (and, with a remote store, uploaded or durably queued),
  so no crash leaves a row pointing at a partial blob. The publish and the row
  insert happen inside the manifest's write transaction, holding the keys' locks
  (SQLite's file lock, PostgreSQL advisory locks), so two writers of the same key
  serialize and the row's checksum always describes the stored blob.
- Backends sit behind this facade (DESIGN.md §3): the manifest is SQLite at
  `<home>/manifest.sqlite` or PostgreSQL (`manifest=`, `KVLIB_MANIFEST`); blobs are the
  home's `blobs/` folder or an S3 bucket (`store=`, `KVLIB_STORE`) with the home's
  folder as a bounded local tier in front (store/tiered.py). Nothing above the store
  knows which is in use.
- Tenants: a tenant sees chunks owned by "public" or by itself and nothing else.
  Anything it may not see fails with exactly the NotFoundError a missing key
  gets, so no answer reveals that another tenant's chunk exists. The default
  tenant ("public") has no private namespace: what it stores is public.
- Puts can be split: `put_begin(..., background=True)` stages the blob on the library's
  writer thread (store/writer.py) while the caller computes; `finish_puts` publishes begun
  puts in order in one transaction on the caller's thread. `put` is both at once.
- One Library per process or thread.
- torch is imported inside functions only, so importing kvlib stays fast.
"""

from __future__ import annotations

import json
import warnings
from concurrent.futures import wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import sqlalchemy as sa

from kvlib.config import DEFAULT_TENANT, resolve_manifest, resolve_store
from kvlib.errors import CorruptBlobError, InputError, NotFoundError
from kvlib.store import calibrations as calib
from kvlib.store import documents as docs
from kvlib.store import reports
from kvlib.store.blobs import FORMAT_VERSION, checksum_bytes, serialize_blob
from kvlib.store.capacity import BudgetReport, BudgetWarning, GcReport, collect_garbage, evict_to_budget
from kvlib.store.keys import ChunkKey, as_key, compute_key, compute_keys, normalize_prefix, pick_unique, prefix_range
from kvlib.store.manifest import PUBLIC_OWNER, check_tenant, now_iso, open_manifest, tenant_salt, visible_owners
from kvlib.store.recent import RecentChunks, owned
from kvlib.store.schema import chunks, models
from kvlib.store.tiered import SyncReport, open_blobs
from kvlib.store.validate import check_drift, check_kv, check_text, to_json
from kvlib.store.writer import BlobWriter, PendingPut, Staged, discard

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


def library_exists(home: Path, manifest: str | None = None) -> bool:
    """Whether a library is there to open: a shared manifest (PostgreSQL) always is, since
    a node joins it by naming it; a SQLite one only once its file exists."""
    target = resolve_manifest(manifest, Path(home).expanduser())
    return "://" in target or Path(target).is_file()


class Library:
    """A library home: a manifest plus blobs (`manifest.sqlite` and `blobs/ab/<key>.safetensors` by default)."""

    def __init__(self, home: str | Path, max_bytes: int | None = None, *, store: str | None = None,
                 manifest: str | None = None, local_bytes: int | None = None, recent_bytes: int = 0) -> None:
        """recent_bytes: how much just-stored KV to keep in memory for the next read (store/recent.py)."""
        for name, value in (("max_bytes", max_bytes), ("local_bytes", local_bytes), ("recent_bytes", recent_bytes)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise InputError(f"{name} must be a non-negative int, got {value!r}")
        self.home = Path(home).expanduser()
        self.max_bytes = max_bytes
        self.store_url = resolve_store(store)
        self.db = open_manifest(resolve_manifest(manifest, self.home))
        try:
            self.blobs = open_blobs(self.home, self.store_url, local_bytes)
        except BaseException:
            self.db.close()
            raise
        # Keys this handle wrote that no document claimed yet: automatic eviction
        # must not drop a document's first chunks before set_document names them.
        self._unclaimed: set[str] = set()
        self._writer = BlobWriter()  # stages blobs beside the caller for put_begin(background=True)
        self._pending: set[PendingPut] = set()  # begun, neither published nor discarded
        self._salts: dict[str, str] = {}  # tenant -> key salt; a tenant's salt never changes once made
        self._recent = RecentChunks(recent_bytes)

    def close(self) -> None:
        self.discard_puts(list(self._pending))
        self._writer.close()
        getattr(self.blobs, "close", lambda: None)()
        self.db.close()

    def ping(self) -> None:
        """A cheap check that the manifest answers (ManifestUnavailableError if not); touches no blob."""
        self.db.ping()

    def __enter__(self) -> "Library":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- models and keys -------------------------------------------------

    def register_model(self, fingerprint: str, name: str, config: dict) -> None:
        """Record a model fingerprint's human name and config (re-registering updates them)."""
        check_text("fingerprint", fingerprint)
        statement = self.db.insert(models).values(
            fingerprint=fingerprint, name=name, config=to_json(config, "model config"), created=now_iso())
        statement = statement.on_conflict_do_update(
            index_elements=["fingerprint"], set_={"name": statement.excluded.name, "config": statement.excluded.config})
        with self.db.write() as conn:
            conn.execute(statement)

    def model(self, fingerprint: str) -> dict | None:
        """A registered model's row (config parsed), or None."""
        with self.db.read() as conn:
            row = conn.execute(sa.select(models).where(models.c.fingerprint == fingerprint)).mappings().first()
        return None if row is None else {**row, "config": json.loads(row["config"] or "{}")}

    def put_calibration(self, model_fp: str, encoding: str, payload: dict, *, method: str, confidence: float) -> None:
        """Store (replacing) the guard's calibration of a registered model for one encoding."""
        check_text("model_fp", model_fp)
        check_text("encoding", encoding)
        with self.db.write() as conn:
            calib.put_calibration(self.db, conn, model_fp, encoding, payload, method=method, confidence=confidence,
                                  created=now_iso())

    def calibration(self, model_fp: str, encoding: str) -> dict | None:
        """The guard's calibration payload for this model and encoding, or None."""
        with self.db.read() as conn:
            return calib.get_calibration(conn, model_fp, encoding)

    def calibrations(self) -> list[dict]:
        with self.db.read() as conn:
            return calib.list_calibrations(conn)

    def key_for(self, *, tenant: str, public: bool, model_fp: str, context_id: str, token_ids: Any) -> ChunkKey:
        """The key `put` would give these ids: lets ingest skip encoding known chunks."""
        return self._keys(model_fp, context_id, token_ids, [self._namespace(tenant, public)[1]])[0]

    def keys_for(self, *, tenant: str, model_fp: str, context_id: str, token_ids: Any) -> list[ChunkKey]:
        """[the tenant's private key, the public key] of these ids, hashed together (a lookup tries both)."""
        return self._keys(model_fp, context_id, token_ids, [self._namespace(tenant, public)[1] for public in (False, True)])

    @staticmethod
    def _keys(model_fp: str, context_id: str, token_ids: Any, salts: list[str]) -> list[ChunkKey]:
        check_text("model_fp", model_fp)
        check_text("context_id", context_id)
        return compute_keys(model_fp=model_fp, context_id=context_id, token_ids=token_ids, salts=salts)

    def has(self, key: ChunkKey | str, tenant: str = DEFAULT_TENANT) -> bool:
        """True if the chunk is stored and this tenant may see it."""
        return bool(self._visible_rows([as_key(key).hex], tenant))

    def resolve(self, prefix: str, tenant: str = DEFAULT_TENANT) -> ChunkKey:
        """Resolve a key prefix (>= 6 hex digits) among the chunks this tenant may see."""
        text = normalize_prefix(prefix)
        low, high = prefix_range(text)
        query = sa.select(chunks.c.key).where(
            chunks.c.key >= low, chunks.c.key < high, chunks.c.owner.in_(visible_owners(tenant)))
        with self.db.read() as conn:
            found = list(conn.execute(query).scalars())
        return pick_unique(text, found)

    # -- chunks ----------------------------------------------------------

    def put(
        self, *, tenant: str, public: bool, model_fp: str, context_id: str, token_ids: Any,
        k_sem: Any, v: Any, text_preview: str = "", meta: dict | None = None, drift_score: float | None = None,
        read_soon: bool = False,
    ) -> PutResult:
        """Store one chunk's semantic K and V; skips the write if an intact copy exists.
        read_soon: it will be read again shortly (put_begin)."""
        return self.finish_puts([self.put_begin(
            tenant=tenant, public=public, model_fp=model_fp, context_id=context_id, token_ids=token_ids,
            k_sem=k_sem, v=v, text_preview=text_preview, meta=meta, drift_score=drift_score, read_soon=read_soon)])[0]

    def put_begin(
        self, *, tenant: str, public: bool, model_fp: str, context_id: str, token_ids: Any,
        k_sem: Any, v: Any, text_preview: str = "", meta: dict | None = None, drift_score: float | None = None,
        background: bool = False, read_soon: bool = False,
    ) -> PendingPut:
        """Validate a put and stage its blob (on the writer thread when `background`).

        read_soon: the blob will be read again shortly (the server's new documents, which a
        conversation's next turn asks for), so it is read back into the page cache in the
        background rather than left to the next read (store/blobs.py).

        Nothing is visible until `finish_puts` publishes it; `discard_puts` drops it.
        The tensors must not change until then.
        """
        token_tensor = check_kv(k_sem, v, token_ids)
        check_text("model_fp", model_fp)
        check_text("context_id", context_id)
        check_drift(drift_score)
        owner, salt = self._namespace(tenant, public)
        key = compute_key(model_fp=model_fp, context_id=context_id, token_ids=token_ids, salt=salt)
        self._unclaimed.add(key.hex)
        existing = self._row(key)
        if existing is not None and self.blobs.intact(key, existing["checksum"]):
            return PendingPut(key, None, None, existing["bytes"], drift_score)
        record = docs.chunk_record(key, owner, model_fp, context_id, k_sem, v, text_preview, meta, drift_score)
        header = {
            "kvlib_format": FORMAT_VERSION, "key": key.hex, "model_fp": model_fp, "context_id": context_id,
            "dtype": record["dtype"], "k_sem_shape": json.dumps(list(k_sem.shape)), "v_shape": json.dumps(list(v.shape)),
        }
        # Copies happen here: a torch op on the writer thread would start a second OpenMP
        # team, whose spinning threads take cores from the caller's compute.
        k_sem, v, token_tensor = (t.detach().cpu().contiguous() for t in (k_sem, v, token_tensor))

        def stage() -> Staged:
            data = serialize_blob(k_sem=k_sem, v=v, token_ids=token_tensor, metadata=header)
            return Staged(self.blobs.stage(key, data, read_soon), len(data), checksum_bytes(data))

        kept = None
        if self._recent.max_bytes:
            kept = StoredChunk(key=key, k_sem=owned(k_sem), v=owned(v), token_ids=token_tensor.long(), model_fp=model_fp,
                               context_id=context_id, dtype=record["dtype"], drift_score=drift_score)
        pending = PendingPut(key, record, self._writer.submit(stage, background), drift_score=drift_score, kept=kept)
        self._pending.add(pending)
        return pending

    def finish_puts(self, pending: list[PendingPut]) -> list[PutResult]:
        """Publish begun puts in order, one manifest transaction; waits for their staging."""
        results: list[PutResult] = []
        try:
            wait([p.staged for p in pending if p.staged is not None])  # not while holding the write lock
            with self.db.write() as conn:
                self.db.lock_keys(conn, [p.key.hex for p in pending])
                for p in pending:
                    results.append(self._finish(conn, p))
        finally:
            self.discard_puts(pending)  # no-op for the published; drops the rest on any error
        budget = self._auto_evict(set())
        return [PutResult(r.key, r.new, r.bytes, budget) for r in results]

    def discard_puts(self, pending: list[PendingPut]) -> None:
        """Drop begun puts that were not published (their temp files go)."""
        for p in pending:
            discard(p)
            self._pending.discard(p)

    def _finish(self, conn: sa.Connection, p: PendingPut) -> PutResult:
        """Inside the write transaction, holding the key's lock: publish the blob, write its row.

        Re-checks under the lock: another writer may have stored the same key since
        put_begin looked, in which case its blob and row stay and ours goes.
        """
        if p.staged is None:
            docs.touch(conn, [p.key.hex], hit=False)
            if p.drift_score is not None:
                conn.execute(sa.update(chunks).where(chunks.c.key == p.key.hex).values(drift_score=float(p.drift_score)))
            return PutResult(p.key, False, p.existing_bytes)
        staged = p.staged.result()
        existing = self._row(p.key, conn)
        if existing is not None and self.blobs.intact(p.key, existing["checksum"]):
            return PutResult(p.key, False, existing["bytes"])  # discard_puts drops ours
        self.blobs.publish(staged.blob, p.key, staged.checksum)
        p.settled = True
        conn.execute(docs.upsert_chunk(self.db, {**p.record, "bytes": staged.nbytes, "checksum": staged.checksum}))
        if p.kept is not None:
            self._recent.remember(p.key.hex, staged.checksum, p.kept)
        return PutResult(p.key, True, staged.nbytes)

    def get(self, key: ChunkKey | str, tenant: str = DEFAULT_TENANT, *, touch: bool = True) -> StoredChunk:
        """One chunk, checksum-verified; counts as a use (hits, last_used) unless touch=False."""
        return self.get_many([key], tenant, touch=touch)[0]

    def get_many(self, keys: Iterable[ChunkKey | str], tenant: str = DEFAULT_TENANT, *,
                 touch: bool = True) -> list[StoredChunk]:
        """Chunks in the order asked, each checksum-verified; counts one use per distinct key, or, with
        touch=False, none: a caller answering a request counts them after its first token (`touch`), so
        the use counts' write transaction (~0.8 ms) is not on the time to first token."""
        wanted = [as_key(key) for key in keys]
        rows = self._visible_rows([key.hex for key in wanted], tenant)
        for key in wanted:
            if key.hex not in rows:
                raise not_found(key.hex)
        loaded: dict[str, StoredChunk] = {}
        for key in wanted:
            if key.hex not in loaded:
                loaded[key.hex] = self._load(key, rows[key.hex])
        if touch:
            self.touch(list(loaded))
        return [loaded[key.hex] for key in wanted]

    def find_many(self, keys: Iterable[ChunkKey | str], tenant: str = DEFAULT_TENANT) -> dict[str, StoredChunk]:
        """The stored chunks among `keys` that the tenant sees, by key hex, in one manifest query;
        a key not stored, not visible, or whose blob is missing or corrupt is left out (`kvlib
        verify` reports the latter). Counts no use: the caller touches what it served (touch)."""
        wanted = {key.hex: key for key in map(as_key, keys)}
        found: dict[str, StoredChunk] = {}
        for hexkey, row in self._visible_rows(list(wanted), tenant).items():
            recent = self._recent.get(hexkey, row["checksum"])
            if recent is not None:  # stored moments ago by this handle: the same bytes, unread
                found[hexkey] = recent
                continue
            try:
                found[hexkey] = self._load(wanted[hexkey], row)
            except CorruptBlobError:
                continue
        return found

    def warm_one(self) -> bool:
        """Map and verify the blob of one chunk the recent memory let go of, so that its next read
        finds the mapping held (store/recent.py); False when none is left. For idle time."""
        dropped = self._recent.next_dropped()
        if dropped is not None:
            self.blobs.warm(*dropped)
        return dropped is not None

    def touch(self, keys: Iterable[ChunkKey | str]) -> None:
        """Count one use of each chunk now (recency and hits for eviction), in one transaction."""
        hexkeys = sorted({as_key(key).hex for key in keys})
        if hexkeys:
            with self.db.write() as conn:
                self.db.lock_keys(conn, hexkeys)
                docs.touch(conn, hexkeys, hit=True)

    def set_drift_score(self, key: ChunkKey | str, score: float | None) -> None:
        """Record how far this chunk's cached KV drifts from a full recompute (repair's measure)."""
        check_drift(score)
        hexkey = as_key(key).hex
        with self.db.write() as conn:
            result = conn.execute(sa.update(chunks).where(chunks.c.key == hexkey)
                                  .values(drift_score=None if score is None else float(score)))
        if result.rowcount == 0:
            raise not_found(hexkey)

    # -- documents -------------------------------------------------------

    def set_document(
        self, *, tenant: str, public: bool, path: str, content_hash: str, chunk_keys: Iterable[ChunkKey | str]
    ) -> int:
        """Record a document as an ordered list of chunks; replaces the earlier version of
        the same path for this tenant and visibility. Returns the new document id."""
        check_text("path", path)
        owner, _ = self._namespace(tenant, public)
        keys = [as_key(key).hex for key in chunk_keys]
        with self.db.write() as conn:
            is_public = int(owner == PUBLIC_OWNER)
            self.db.lock_keys(conn, [f"document:{tenant}:{is_public}:{path}"])
            rows = self._visible_rows(keys, tenant, conn)
            for hexkey in keys:
                if hexkey not in rows:
                    raise not_found(hexkey)
                if owner == PUBLIC_OWNER and rows[hexkey]["owner"] != PUBLIC_OWNER:
                    raise InputError(f"a public document cannot hold private chunk {hexkey[:12]}")
            doc_id = docs.replace_document(conn, tenant, is_public, path, content_hash, keys)
        self._unclaimed.difference_update(keys)
        self._auto_evict(set())
        return doc_id

    def document(self, tenant: str, path: str, public: bool | None = None) -> dict | None:
        """The visible document at `path`, preferring the tenant's own over others' public one."""
        check_tenant(tenant)
        with self.db.read() as conn:
            return docs.find_document(conn, tenant, path, public)

    def remove_document(self, *, tenant: str, path: str, public: bool | None = None) -> int:
        """Delete one of this tenant's documents (not its chunks, which become evictable)."""
        check_tenant(tenant)
        with self.db.write() as conn:
            doc_id = docs.remove_document(conn, tenant, path, public)
        self._auto_evict(set())
        return doc_id

    def list_documents(self, tenant: str = DEFAULT_TENANT) -> list[dict]:
        with self.db.read() as conn:
            return reports.list_documents(conn, tenant)

    def list_chunks(self, tenant: str = DEFAULT_TENANT) -> list[dict]:
        with self.db.read() as conn:
            return reports.list_chunks(conn, tenant)

    # -- reports and maintenance ----------------------------------------

    def inspect(self, key_or_prefix: ChunkKey | str, tenant: str = DEFAULT_TENANT) -> dict:
        """Everything known about one visible chunk; its checksum is verified now."""
        key = key_or_prefix if isinstance(key_or_prefix, ChunkKey) else self.resolve(key_or_prefix, tenant)
        row = self._visible_rows([key.hex], tenant).get(key.hex)
        if row is None:
            raise not_found(key.hex)
        with self.db.read() as conn:
            return reports.inspect_chunk(conn, self.blobs, row, tenant)

    def stats(self, tenant: str = DEFAULT_TENANT) -> dict:
        with self.db.read() as conn:
            found = reports.library_stats(conn, tenant)
        return {**found, "home": str(self.home), "max_bytes": self.max_bytes,
                "manifest": self.db.url, "store": self.store_url or "local"}

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

    def sync(self):
        """Upload the blobs queued while the remote store was unreachable (a no-op without one)."""
        drain = getattr(self.blobs, "drain_queue", None)
        if drain is None:
            return SyncReport()
        return drain(self._checksum_of)

    # -- internals -------------------------------------------------------

    def _checksum_of(self, hexkey: str) -> str | None:
        row = self._row(ChunkKey(hexkey))
        return None if row is None else row["checksum"]

    def _namespace(self, tenant: str, public: bool) -> tuple[str, str]:
        """(owner, key salt): public chunks share the empty salt; private ones get the tenant's."""
        check_tenant(tenant)
        if public or tenant == DEFAULT_TENANT:
            return PUBLIC_OWNER, ""
        if tenant not in self._salts:  # one write transaction per tenant and handle, not one per key
            with self.db.write() as conn:
                self._salts[tenant] = tenant_salt(self.db, conn, tenant)
        return tenant, self._salts[tenant]

    def _row(self, key: ChunkKey, conn: sa.Connection | None = None) -> dict | None:
        query = sa.select(chunks).where(chunks.c.key == key.hex)
        if conn is not None:
            row = conn.execute(query).mappings().first()
        else:
            with self.db.read() as own:
                row = own.execute(query).mappings().first()
        return None if row is None else dict(row)

    def _visible_rows(self, keys: list[str], tenant: str, conn: sa.Connection | None = None) -> dict[str, dict]:
        owners = visible_owners(tenant)
        if conn is None:
            with self.db.read() as own:
                return docs.visible_rows(own, keys, owners)
        return docs.visible_rows(conn, keys, owners)

    def _load(self, key: ChunkKey, row: dict) -> StoredChunk:
        contents = self.blobs.read(key, row["checksum"])
        return StoredChunk(
            key=key, k_sem=contents.k_sem, v=contents.v, token_ids=contents.token_ids.long(),
            model_fp=row["model_fp"], context_id=row["context_id"], dtype=row["dtype"],
            drift_score=row.get("drift_score"),
        )

    def _auto_evict(self, protect: set[str]) -> BudgetReport | None:
        """Keep the library within max_bytes after a write; warn visibly if it cannot."""
        if self.max_bytes is None:
            return None
        report = evict_to_budget(self.db, self.blobs, self.max_bytes, protect | self._unclaimed)
        if not report.ok:
            warnings.warn(BudgetWarning(report), stacklevel=3)
        return report

