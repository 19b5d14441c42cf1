"""Helpers shared by the ingest and query integration tests."""

from __future__ import annotations

from pathlib import Path

from kvlib.rag.ingest import Ingestor


def ingest(smol_stack, home: Path, paths: list[Path], **options):
    """One Ingestor run over `paths` with the session engine; returns the IngestReport."""
    stack = smol_stack(home)
    try:
        return Ingestor(stack.engine, stack.library, stack.index, stack.embedder, **options).run(paths)
    finally:
        stack.close()
