"""`--data examples`: the bundled corpus's questions, with passages retrieved from the library."""

from __future__ import annotations

import json
from pathlib import Path

from kvlib.bench.data import LoadResult, Passage, QARecord
from kvlib.config import PUBLIC
from kvlib.errors import InputError


def examples_dir() -> Path:
    """examples/ beside the package (a source checkout), else in the working directory."""
    here = Path(__file__).resolve().parents[2] / "examples"
    return here if here.is_dir() else Path("examples")


def example_records(stack, *, k: int, limit: int | None, progress=None) -> LoadResult:
    """Ingest examples/corpus if the index is empty, then retrieve top-k passages per question."""
    from kvlib.rag.ingest import Ingestor

    corpus = examples_dir() / "corpus"
    questions = corpus / "questions.jsonl"
    if not questions.exists():
        raise InputError(f"example questions not found: {questions}")
    if len(stack.index) == 0:
        Ingestor(stack.engine, stack.library, stack.index, stack.embedder, public=True).run([corpus], progress)
    records = []
    for i, line in enumerate(questions.read_text().splitlines()[:limit]):
        q = json.loads(line)
        hits = stack.index.search(stack.embedder.embed_query(q["question"]), k, PUBLIC)
        records.append(QARecord(id=f"example-{i + 1}", question=q["question"], answers=tuple(q["answers"]),
                                passages=tuple(Passage("", h.text) for h in hits)))
    return LoadResult(records=records, form="examples", skipped=[])
