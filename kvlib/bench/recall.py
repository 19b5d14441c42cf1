"""Retrieval quality: recall@k of the gold passages, retrieving from a passage pool.

Design facts:
- The pool is a file of passages: the HotpotQA corpus form `{title: [sentence, ...]}`,
  a JSON list of `[title, [sentence, ...]]` or `{"title", "text"}`, or JSONL of the latter.
- Each passage is embedded exactly as `kvlib ingest` would embed it from a JSONL record with
  a title (`# title` heading, then the text), with the same Embedder, into the same
  VectorIndex class (in a temporary directory), and searched with the same per-tenant call;
  only the KV encoding is left out, since it does not touch retrieval.
- Gold passages are the records' `gold_titles` (HotpotQA `supporting_facts`). recall@k is the
  share of a question's gold titles among its top k, averaged over questions; all@k is the
  share of questions with every gold title in the top k (multi-hop QA needs both).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kvlib.bench.data import QARecord
from kvlib.config import DEFAULT_TENANT
from kvlib.errors import InputError
from kvlib.retrieve.embed import Embedder
from kvlib.retrieve.index import IndexEntry, VectorIndex
from kvlib.retrieve.sources import titled

DEFAULT_KS = (1, 2, 5, 10, 20)


@dataclass(frozen=True)
class PoolPassage:
    title: str
    text: str


def load_pool(path: str | Path) -> list[PoolPassage]:
    """Passages of a pool file (forms in the module docstring); InputError when none is usable."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"passage pool {path} does not exist")
    raw = path.read_text(encoding="utf-8", errors="strict")
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        data = [json.loads(line) for line in raw.splitlines() if line.strip()]
    items = list(data.items()) if isinstance(data, dict) else data
    passages = [p for p in (_passage(item) for item in items) if p is not None]
    if not passages:
        raise InputError(f"no usable passage in {path}")
    return passages


def _passage(item) -> PoolPassage | None:
    if isinstance(item, dict):
        title, body = item.get("title") or "", item.get("text")
    elif isinstance(item, (list, tuple)) and len(item) == 2:
        title, body = item
        body = "".join(body) if isinstance(body, list) and all(isinstance(s, str) for s in body) else body
    else:
        return None
    if not isinstance(title, str) or not isinstance(body, str) or not body.strip():
        return None
    return PoolPassage(title=title.strip(), text=body.strip())


def retrieval_recall(records: list[QARecord], pool: list[PoolPassage], ks=DEFAULT_KS,
                     embedder: Embedder | None = None) -> dict:
    """recall@k and all@k of each record's gold titles, retrieving from `pool`."""
    scored = [r for r in records if r.gold_titles]
    if not scored:
        raise InputError("no record names its gold passages (HotpotQA 'supporting_facts'); recall needs them")
    titles = {p.title for p in pool}
    missing = sum(t not in titles for r in scored for t in r.gold_titles)
    embedder = embedder or Embedder()
    vectors = embedder.embed([titled(p.title, p.text) for p in pool])  # [n, 384]
    query_vecs = embedder.embed([r.question for r in scored])  # [q, 384]
    depth = max(ks)
    with tempfile.TemporaryDirectory(prefix="kvlib-recall-") as tmp:
        index = VectorIndex(Path(tmp), dim=vectors.shape[1])
        try:
            index.add([IndexEntry(chunk_key=f"{i:064x}", doc_path=p.title, owner=DEFAULT_TENANT, ord=0)
                       for i, p in enumerate(pool)], vectors)
            ranked = [[h.doc_path for h in index.search(q, depth, DEFAULT_TENANT)] for q in query_vecs]
        finally:
            index.close()
    recall, every = {}, {}
    for k in ks:
        found = [len(set(r.gold_titles) & set(top[:k])) for r, top in zip(scored, ranked)]
        recall[k] = sum(f / len(r.gold_titles) for f, r in zip(found, scored)) / len(scored)
        every[k] = sum(f == len(r.gold_titles) for f, r in zip(found, scored)) / len(scored)
    return {"questions": len(scored), "pool": len(pool), "gold_missing_from_pool": missing,
            "recall_at": {str(k): round(v, 4) for k, v in recall.items()},
            "all_gold_at": {str(k): round(v, 4) for k, v in every.items()}}
