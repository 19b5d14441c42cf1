"""What the engine thread owns: the engine, the library, the index, and the pipeline.

Built on the engine thread (queue.EngineWorker runs `build_state` there), since the
library's and the index's SQLite connections may only be used by the thread that opened
them. The index and the embedding model open on the first document, not at start-up:
a server that is never sent documents never loads them.

The library is reached through a LibraryLink (library_link.py): the server starts and
answers while the manifest is unreachable, degraded, and goes back to reuse when it answers.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from kvlib.errors import ManifestUnavailableError
from kvlib.memory import freeze_loaded
from kvlib.serve.library_link import LibraryLink, library_opener
from kvlib.serve.pipeline import Pipeline
from kvlib.serve.settings import Settings

DOCUMENT_PREFIX = "api/"  # a document sent over HTTP is named api/<name>, apart from ingested files


@dataclass
class ServerState:
    settings: Settings
    engine: object
    link: LibraryLink
    pipeline: Pipeline
    _index: object = None
    _embedder: object = None

    def library_bytes(self) -> int | None:
        """Bytes of KV in the library, or None while the manifest is unreachable."""
        library = self.link.usable()
        if library is None:
            return None
        try:  # the facade's stats are per tenant; the server's gauge wants the whole home
            row = next(library.db.query("SELECT COALESCE(SUM(bytes), 0) AS n FROM chunks"))
        except ManifestUnavailableError as exc:
            self.link.failed(exc)
            return None
        return int(row["n"])

    def ingest_text(self, tenant: str, public: bool, name: str | None, text: str, chunk_tokens: int) -> dict:
        """Ingest one document as `kvlib ingest` would ingest a file holding `text` (chunks for
        retrieval), and store its prompt forms for chats that paste it in (Pipeline.store_document)."""
        from kvlib.rag.ingest import Ingestor, IngestReport, NullProgress
        from kvlib.retrieve.sources import make_doc

        with self.link.watching():  # an unreachable manifest: a 503, and the server degraded
            library = self.pipeline.writable_library()
            index, embedder = self._retrieval()
            name = name or hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
            doc = make_doc(DOCUMENT_PREFIX + name, text)
            ingestor = Ingestor(self.engine, library, index, embedder, tenant, public, chunk_tokens)
            report = IngestReport(files=1)
            ingestor.ingest_document(doc, report, NullProgress())
            index.save()
            forms = self.pipeline.store_document(tenant, public, text)  # what a chat pasting it will carry
        return {"id": doc.path, "object": "document", "tenant": "public" if public else tenant,
                "chunks": report.chunks_new + report.chunks_dedup, "chunks_new": report.chunks_new,
                "chunks_dedup": report.chunks_dedup, "tokens": report.tokens, "unchanged": bool(report.unchanged),
                "bytes_written": report.bytes_written, "prompt_forms_new": forms}

    def idle(self) -> bool:
        """When no request waits: store one miss of an answered request, else map one blob the
        library's recent memory let go of (Library.warm_one); False when neither is left, or
        while the manifest is unreachable (the misses wait for it)."""
        if self.link.degraded:
            return False
        if self.pipeline.pending:
            self.pipeline.store_pending(limit=1)
            return True
        library = self.link.usable()
        return library is not None and library.warm_one()

    def _retrieval(self):
        if self._index is None:
            from kvlib.rag.stack import INDEX_DIR
            from kvlib.retrieve.embed import Embedder
            from kvlib.retrieve.index import VectorIndex

            index = VectorIndex(self.settings.home / INDEX_DIR, manifest=self.settings.manifest)
            self._index, self._embedder = index, Embedder()
            self.pipeline.index, self.pipeline.embedder = self._index, self._embedder
        return self._index, self._embedder

    def close(self) -> None:
        if self._index is not None:
            self._index.close()
        self.link.close()


def build_state(settings: Settings) -> ServerState:
    from kvlib.engine.session import Engine

    home = Path(settings.home)
    home.mkdir(parents=True, exist_ok=True)
    engine = Engine.load(settings.model, home, dtype=settings.dtype)
    link = LibraryLink(library_opener(settings), retry_s=settings.manifest_retry_s).start()
    pipeline = Pipeline(engine, link, spec=settings.spec, misses=settings.misses, prefix_bytes=settings.prefix_bytes)
    state = ServerState(settings=settings, engine=engine, link=link, pipeline=pipeline)
    pipeline.open_retrieval = state._retrieval
    warn_without_calibration(pipeline)
    freeze_loaded()  # the loaded engine out of the cycle collector's walks (kvlib/memory.py)
    return state


def warn_without_calibration(pipeline: Pipeline) -> None:
    """A guard default without a calibration: every request in it is refused until one is stored; say so now."""
    import logging

    from kvlib.errors import CalibrationMissingError

    try:
        pipeline.calibration_for(pipeline.resolved)
    except CalibrationMissingError as exc:
        logging.getLogger("kvlib.serve").warning("%s; until then every request in mode %s is refused "
                                                 "(calibration_missing)", exc, pipeline.resolved.name)
