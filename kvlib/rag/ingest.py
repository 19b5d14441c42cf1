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
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from kvlib.engine.drift import drift_scores
from kvlib.retrieve.chunker import chunk_text
from kvlib.retrieve.index import PUBLIC, IndexEntry
from kvlib.retrieve.sources import SourceDoc, iter_sources


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


def chunk_document(engine, text: str, chunk_tokens: int) -> list:
    """A document's chunks as ingest stores them. Paragraphs under half the budget travel with
    their neighbours, so chunks come out near chunk_tokens rather than one short paragraph each."""
    return chunk_text(text, engine.lm.tokenizer, max_tokens=chunk_tokens, min_tokens=max(1, chunk_tokens // 2))


def owner_of(tenant: str, public: bool) -> str:
    return PUBLIC if public or tenant == PUBLIC else tenant


@dataclass
class Ingestor:
    engine: object  # kvlib.engine.session.Engine
    library: object  # kvlib.store.library.Library
    index: object  # kvlib.retrieve.index.VectorIndex
    embedder: object  # kvlib.retrieve.embed.Embedder
    tenant: str = PUBLIC
    public: bool = False
    chunk_tokens: int = 256

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

    def chunk_keys(self, chunks) -> list:
        lm = self.engine.lm
        return [self.library.key_for(tenant=self.tenant, public=self.public, model_fp=lm.fingerprint,
                                     context_id=self.engine.context_id, token_ids=c.token_ids) for c in chunks]

    def is_unchanged(self, doc: SourceDoc, keys: list) -> bool:
        """Same text, model, encoding context and chunking as the stored version, all chunks present."""
        row = self.library.document(self.tenant, doc.path, self.public)
        if row is None or row.get("content_hash") != doc.content_hash:
            return False
        return row.get("chunk_keys") == [k.hex for k in keys] and all(self.library.has(k, self.tenant) for k in keys)

    def ingest_document(self, doc: SourceDoc, report: IngestReport, progress) -> None:
        report.documents += 1
        chunks = chunk_document(self.engine, doc.text, self.chunk_tokens)
        keys = self.chunk_keys(chunks)
        if self.is_unchanged(doc, keys):
            report.unchanged += 1
            progress.doc_done(doc.path, unchanged=True)
            return
        progress.doc_started(doc.path, len(chunks))
        if not report.load_s:  # model loading is start-up, for the embedder as for the LLM: not ingest time
            t_load = time.perf_counter()
            self.embedder.warm()
            report.load_s = time.perf_counter() - t_load
        owner = owner_of(self.tenant, self.public)
        todo = self.chunks_to_encode(keys, chunks, report, progress)
        previous = {c.index: chunks[i - 1] for i, c in enumerate(chunks) if i > 0}
        held: dict = {}  # chunk index -> KV, for the last window's chunks (the next one's neighbours)
        pending: list = []
        try:
            # A window of chunks is encoded while the previous window's blobs are written on the
            # library's writer thread; a document's memory stays two windows, however long it is.
            for window in token_windows(todo, WINDOW_TOKENS):
                # finish_puts discards its own puts on any error, the finally below the rest
                older, pending = pending, self.begin_window(window, previous, held, report)
                self.finish_chunks(older, report, progress)
            t_embed = time.perf_counter()  # the last window's blobs are written meanwhile
            vectors = self.embedder.embed([c.text for c in chunks])
            report.stage_s["embed"] += time.perf_counter() - t_embed
            self.finish_chunks(pending, report, progress)
        finally:
            self.library.discard_puts([p for _, p in pending])  # after an error or Ctrl-C; else a no-op
        t_index = time.perf_counter()
        self.index.remove_document(doc.path, owner)
        self.index.add([IndexEntry(k.hex, doc.path, owner, c.index, c.text) for k, c in zip(keys, chunks)], vectors)
        report.stage_s["embed"] += time.perf_counter() - t_index
        self.library.set_document(tenant=self.tenant, public=self.public, path=doc.path,
                                  content_hash=doc.content_hash, chunk_keys=keys)
        progress.doc_done(doc.path, unchanged=False)

    def chunks_to_encode(self, keys, chunks, report: IngestReport, progress) -> list:
        """The chunks the library does not hold yet; the others count as deduplicated."""
        todo = []
        for key, chunk in zip(keys, chunks):
            report.tokens += len(chunk.token_ids)
            if self.library.has(key, self.tenant):
                report.chunks_dedup += 1
                progress.chunk_done(len(chunk.token_ids), new=False)
            else:
                todo.append(chunk)
        return todo

    def begin_window(self, window: list, previous: dict, held: dict, report: IngestReport) -> list:
        """Encode (packed) a window of chunks, score their drift and begin their puts on the
        writer thread. Returns [(chunk, PendingPut)]; `held` becomes this window's KV."""
        lm, engine = self.engine.lm, self.engine
        t_encode = time.perf_counter()
        encoded = engine.encode_many([c.token_ids for c in window])
        report.stage_s["encode"] += time.perf_counter() - t_encode
        t_drift = time.perf_counter()
        held.update((c.index, kv) for c, kv in zip(window, encoded))
        # Each chunk's neighbour is its KV from this encode when there is one, else its ids
        # (first two layers computed); a document's first chunk follows the neutral lead-in.
        behind = [engine.lead if (b := previous.get(c.index)) is None else held.get(b.index, b.token_ids)
                  for c in window]
        drifts = drift_scores(lm, engine.context, list(zip(behind, encoded)))
        current = {c.index for c in window}
        for index in [i for i in held if i not in current]:
            del held[index]
        report.stage_s["drift"] += time.perf_counter() - t_drift
        t_write = time.perf_counter()
        begun = [(chunk, self.library.put_begin(
            tenant=self.tenant, public=self.public, model_fp=lm.fingerprint, context_id=engine.context_id,
            token_ids=chunk.token_ids, k_sem=kv.k_sem, v=kv.v, text_preview=chunk.text, drift_score=drift,
            background=True)) for chunk, kv, drift in zip(window, encoded, drifts)]
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
