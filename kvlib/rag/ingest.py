"""`ingest`: corpus -> chunker -> engine.encode -> store.put, with the vector index beside it.

Design facts:
- Content-addressed all the way: a chunk whose key is already in the library is not
  encoded again (dedup), and a document whose content hash is unchanged is skipped.
  A changed document re-encodes only the chunks whose token ids changed.
- Crash-safe order per document: blobs first (each atomic), then index entries
  (idempotent), then the document row last. The blobs are staged on the library's writer
  thread while this thread embeds the document's chunks, and published before the index
  entries. The FAISS file is written once per run: after a crash the index rebuilds it from
  its SQLite rows, which are committed per document. A run killed anywhere leaves a library
  that the next run completes: finished documents are skipped, stored chunks are
  deduplicated, and the document row is only written when all its chunks exist.
- One unreadable file never stops the run; it is reported with a reason.
- `prompt_forms` also stores each document's prompt forms (kvlib.segment.text_segments: the
  segments a chat that pastes the document as a block carries), as POST /v1/documents does,
  so `kvlib serve` serves such a chat from the library on its first turn. They are encoded
  behind E like every chunk, counted apart (forms_new, forms_dedup), and, referenced by no
  document row, evictable like the segments the server stores itself.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from kvlib.config import PUBLIC
from kvlib.engine.drift import drift_scores
from kvlib.retrieve.chunker import chunk_document
from kvlib.retrieve.index import IndexEntry
from kvlib.retrieve.sources import SourceDoc, iter_sources

if TYPE_CHECKING:
    from kvlib.engine.session import Engine
    from kvlib.retrieve.embed import Embedder
    from kvlib.retrieve.index import VectorIndex
    from kvlib.store.library import Library


@dataclass
class IngestReport:
    files: int = 0
    documents: int = 0
    unchanged: int = 0
    chunks_new: int = 0
    chunks_dedup: int = 0
    tokens: int = 0  # tokens in all chunks of changed documents
    tokens_encoded: int = 0  # tokens actually run through the model
    bytes_written: int = 0
    seconds: float = 0.0
    skipped: list = field(default_factory=list)  # [(path, reason)]
    forms_new: int = 0  # prompt forms stored (prompt_forms only); their tokens are in tokens_encoded
    forms_dedup: int = 0
    load_s: float = 0.0  # loading the embedding model, before the first changed document; not in `seconds`
    # where the time went: the model's packed encode, the drift score, blob writes, embedding + index
    stage_s: dict = field(default_factory=lambda: dict.fromkeys(("encode", "drift", "write", "embed"), 0.0))

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["skipped"] = [{"path": p, "reason": r} for p, r in self.skipped]
        return d


class NullProgress:
    """The pipeline reports to any object with these methods; the CLI passes a rich one."""

    def start(self, total_docs: int) -> None: ...

    def doc_started(self, path: str, n_chunks: int) -> None: ...

    def chunk_done(self, n_tokens: int, new: bool) -> None: ...

    def doc_done(self, path: str, unchanged: bool) -> None: ...


WINDOW_TOKENS = 2048  # chunks encoded, scored and handed to the writer together (Engine.encode_many packs this much)


def token_windows(chunks: list, max_tokens: int) -> list[list]:
    """Consecutive runs of chunks of at most max_tokens tokens (a longer chunk stands alone)."""
    out, size = [], 0
    for chunk in chunks:
        if not out or size + len(chunk.token_ids) > max_tokens:
            out.append([])
            size = 0
        out[-1].append(chunk)
        size += len(chunk.token_ids)
    return out


def owner_of(tenant: str, public: bool) -> str:
    return PUBLIC if public or tenant == PUBLIC else tenant


@dataclass(eq=False)
class Piece:
    """One chunk to store: its ids, its text (the manifest's preview) and the piece before it
    in its document, which is its neighbour for the drift score (None: the neutral lead-in)."""

    token_ids: tuple
    text: str
    before: "Piece | None" = None


def document_pieces(chunks: list) -> list[Piece]:
    """A document's chunks as pieces, each behind the one before it."""
    out: list[Piece] = []
    for c in chunks:
        out.append(Piece(tuple(c.token_ids), c.text, out[-1] if out else None))
    return out


@dataclass
class Ingestor:
    """Stores chunks' KV in one encoding (sink: behind E, the library default; lead; bare).
    `run` ingests documents (chunks, KV, index); `store_pieces` is the KV part alone, which
    the bench prepares its library with."""

    engine: "Engine"
    library: "Library"
    index: "VectorIndex | None" = None
    embedder: "Embedder | None" = None
    tenant: str = PUBLIC
    public: bool = False
    chunk_tokens: int = 256
    encoding: str = "sink"
    prompt_forms: bool = False  # also store the forms a chat pasting the document carries (sink only)

    def run(self, paths: list[Path], progress=None) -> IngestReport:
        progress = progress or NullProgress()
        t0 = time.perf_counter()
        docs, skipped = iter_sources([Path(p) for p in paths])
        report = IngestReport(files=len(docs) + len(skipped), skipped=[(s.path, s.reason) for s in skipped])
        lm = self.engine.lm
        self.library.register_model(lm.fingerprint, lm.name, lm.config_summary)
        progress.start(len(docs))
        for doc in docs:
            self.ingest_document(doc, report, progress)
        self.index.save()
        report.seconds = time.perf_counter() - t0 - report.load_s
        return report

    @property
    def context_id(self) -> str:
        return self.engine.context_id_for(self.encoding)

    def key_of(self, token_ids):
        return self.library.key_for(tenant=self.tenant, public=self.public, model_fp=self.engine.lm.fingerprint,
                                    context_id=self.context_id, token_ids=token_ids)

    def chunk_keys(self, chunks) -> list:
        return [self.key_of(c.token_ids) for c in chunks]

    def is_unchanged(self, doc: SourceDoc, keys: list) -> bool:
        """Same text, model, encoding context and chunking as the stored version, all chunks present."""
        row = self.library.document(self.tenant, doc.path, self.public)
        if row is None or row.get("content_hash") != doc.content_hash:
            return False
        return row.get("chunk_keys") == [k.hex for k in keys] and all(self.library.has(k, self.tenant) for k in keys)

    def ingest_document(self, doc: SourceDoc, report: IngestReport, progress) -> None:
        report.documents += 1
        chunks = chunk_document(doc.text, self.engine.lm.tokenizer, self.chunk_tokens)
        keys = self.chunk_keys(chunks)
        if self.is_unchanged(doc, keys):
            report.unchanged += 1
            self.store_forms(doc, report)  # an earlier run without prompt_forms left them out
            progress.doc_done(doc.path, unchanged=True)
            return
        progress.doc_started(doc.path, len(chunks))
        if not report.load_s:  # model loading is start-up, for the embedder as for the LLM: not ingest time
            t_load = time.perf_counter()
            self.embedder.warm()
            report.load_s = time.perf_counter() - t_load
        owner = owner_of(self.tenant, self.public)

        def embed() -> list:  # runs while the last window's blobs are written
            t_embed = time.perf_counter()
            vectors = self.embedder.embed([c.text for c in chunks])
            report.stage_s["embed"] += time.perf_counter() - t_embed
            return vectors

        vectors = self.store_pieces(document_pieces(chunks), report, progress, overlap=embed)
        t_index = time.perf_counter()
        self.index.remove_document(doc.path, owner)
        self.index.add([IndexEntry(k.hex, doc.path, owner, c.index, c.text) for k, c in zip(keys, chunks)], vectors)
        report.stage_s["embed"] += time.perf_counter() - t_index
        self.library.set_document(tenant=self.tenant, public=self.public, path=doc.path,
                                  content_hash=doc.content_hash, chunk_keys=keys)
        self.store_forms(doc, report)
        progress.doc_done(doc.path, unchanged=False)

    def store_forms(self, doc: SourceDoc, report: IngestReport) -> None:
        """The document's prompt forms the library lacks (module docstring); nothing unless prompt_forms."""
        from kvlib.segment import text_segments

        if not self.prompt_forms:
            return
        pieces: list[Piece] = []
        for seg in text_segments(self.engine.lm.tokenizer, doc.text):
            if seg.reusable:
                pieces.append(Piece(seg.token_ids, self.engine.decode(seg.token_ids), pieces[-1] if pieces else None))
        forms = IngestReport()
        self.store_pieces(pieces, forms)
        report.forms_new += forms.chunks_new
        report.forms_dedup += forms.chunks_dedup
        report.tokens_encoded += forms.tokens_encoded
        report.bytes_written += forms.bytes_written
        for stage, seconds in forms.stage_s.items():
            report.stage_s[stage] += seconds

    def store_pieces(self, pieces: list[Piece], report: IngestReport, progress=None,
                     overlap: Callable | None = None):
        """Encode and store the pieces the library lacks; returns overlap()'s result.

        A window of pieces is encoded while the previous window's blobs are written on the
        library's writer thread, so memory stays two windows however many pieces there are.
        `overlap` runs while the last window's blobs are written.
        """
        progress = progress or NullProgress()
        todo = self.pieces_to_encode(pieces, report, progress)
        held: dict = {}  # piece -> KV, for the last window's pieces (the next one's neighbours)
        pending: list = []
        try:
            for window in token_windows(todo, WINDOW_TOKENS):
                # finish_puts discards its own puts on any error, the finally below the rest
                older, pending = pending, self.begin_window(window, held, report)
                self.finish_chunks(older, report, progress)
            result = overlap() if overlap else None
            self.finish_chunks(pending, report, progress)
        finally:
            self.library.discard_puts([p for _, p in pending])  # after an error or Ctrl-C; else a no-op
        return result

    def pieces_to_encode(self, pieces: list[Piece], report: IngestReport, progress) -> list[Piece]:
        """The pieces the library does not hold yet (each content once); the others count as deduplicated."""
        todo, seen = [], set()
        for piece in pieces:
            key = self.key_of(piece.token_ids)
            report.tokens += len(piece.token_ids)
            if key.hex in seen or self.library.has(key, self.tenant):
                report.chunks_dedup += 1
                progress.chunk_done(len(piece.token_ids), new=False)
            else:
                seen.add(key.hex)
                todo.append(piece)
        return todo

    def drift_pairs(self, window: list[Piece], encoded: list, held: dict) -> list:
        """(neighbour, chunk) per piece for drift_scores. The score is a property of the text,
        always against the chunk behind E alone: in the sink encoding the KV just encoded is that
        baseline and the neighbour's KV is reused when held; in another encoding both are
        computed from ids (the first two layers behind E). A first piece follows the lead-in."""
        lead, sink = self.engine.lead, self.encoding == "sink"
        pairs = []
        for piece, kv in zip(window, encoded):
            before = piece.before
            behind = lead if before is None else held.get(before, before.token_ids) if sink else before.token_ids
            pairs.append((behind, kv if sink else kv.token_ids))
        return pairs

    def begin_window(self, window: list[Piece], held: dict, report: IngestReport) -> list:
        """Encode (packed) a window of pieces, score their drift and begin their puts on the
        writer thread. Returns [(piece, PendingPut)]; `held` becomes this window's KV."""
        lm, engine = self.engine.lm, self.engine
        t_encode = time.perf_counter()
        encoded = engine.encode_many([p.token_ids for p in window], encoding=self.encoding)
        report.stage_s["encode"] += time.perf_counter() - t_encode
        t_drift = time.perf_counter()
        held.update(zip(window, encoded))
        drifts = drift_scores(lm, engine.context, self.drift_pairs(window, encoded, held))
        current = set(window)
        for piece in [p for p in held if p not in current]:
            del held[piece]
        report.stage_s["drift"] += time.perf_counter() - t_drift
        t_write = time.perf_counter()
        begun = [(piece, self.library.put_begin(
            tenant=self.tenant, public=self.public, model_fp=lm.fingerprint, context_id=self.context_id,
            token_ids=piece.token_ids, k_sem=kv.k_sem, v=kv.v, text_preview=piece.text, drift_score=drift,
            background=True)) for piece, kv, drift in zip(window, encoded, drifts)]
        report.stage_s["write"] += time.perf_counter() - t_write
        return begun

    def finish_chunks(self, pending: list, report: IngestReport, progress) -> None:
        """Publish the begun puts (waiting for what the writer thread has not finished)."""
        t_write = time.perf_counter()
        results = self.library.finish_puts([p for _, p in pending])
        report.stage_s["write"] += time.perf_counter() - t_write
        for (chunk, _), result in zip(pending, results):
            report.tokens_encoded += len(chunk.token_ids)
            report.chunks_new += int(result.new)
            report.chunks_dedup += int(not result.new)
            report.bytes_written += result.bytes if result.new else 0
            progress.chunk_done(len(chunk.token_ids), new=result.new)
