"""Retrieval recall: gold titles from HotpotQA supporting facts, pool forms, and the recall arithmetic."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kvlib.bench.data import QARecord, load_records
from kvlib.bench.recall import PoolPassage, load_pool, retrieval_recall
from kvlib.errors import InputError


class KeywordEmbedder:
    """Deterministic test embedder: one axis per known word, so nearest neighbours are known by hand."""

    words = ("apple", "banana", "cherry", "date")

    def embed(self, texts):
        rows = np.array([[t.lower().count(w) for w in self.words] for t in texts], dtype=np.float32) + 1e-3
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def record(question: str, gold: tuple[str, ...]) -> QARecord:
    return QARecord(id=question, question=question, answers=("x",), passages=(), gold_titles=gold)


def test_gold_titles_come_from_supporting_facts_in_order_without_repeats(tmp_path):
    rec = {"question": "q?", "answer": "a", "context": [["A", ["a."]], ["B", ["b."]]],
           "supporting_facts": [["B", 0], ["A", 2], ["B", 1]]}
    path = tmp_path / "h.json"
    path.write_text(json.dumps([rec, {k: v for k, v in rec.items() if k != "supporting_facts"}]))
    first, second = load_records(path).records
    assert first.gold_titles == ("B", "A") and second.gold_titles == ()


def test_pool_forms(tmp_path):
    (tmp_path / "dict.json").write_text(json.dumps({"T1": ["One.", " Two."], "T2": ["Three."], "bad": 3}))
    (tmp_path / "list.jsonl").write_text('{"title": "T1", "text": "x"}\n{"text": ""}\n')
    assert load_pool(tmp_path / "dict.json") == [PoolPassage("T1", "One. Two."), PoolPassage("T2", "Three.")]
    assert load_pool(tmp_path / "list.jsonl") == [PoolPassage("T1", "x")]
    with pytest.raises(InputError, match="does not exist"):
        load_pool(tmp_path / "missing.json")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(InputError, match="no usable passage"):
        load_pool(tmp_path / "empty.json")


def test_recall_and_all_gold_at_k_by_hand():
    pool = [PoolPassage("A", "apple apple"), PoolPassage("B", "banana"), PoolPassage("C", "cherry"),
            PoolPassage("D", "date")]
    records = [
        record("apple?", ("A",)),                     # A first: found at k=1
        record("banana and some cherry cherry", ("B", "C")),  # C first, then B: half at 1, all at 2
        record("date", ("A", "Z")),                   # Z is not in the pool: never all
        record("no gold known", ()),                  # not scored
    ]
    report = retrieval_recall(records, pool, ks=(1, 2, 4), embedder=KeywordEmbedder())
    assert report["questions"] == 3 and report["gold_missing_from_pool"] == 1
    assert report["recall_at"] == {"1": round((1 + 0.5 + 0) / 3, 4), "2": round((1 + 1 + 0) / 3, 4),
                                   "4": round((1 + 1 + 0.5) / 3, 4)}
    assert report["all_gold_at"] == {"1": round(1 / 3, 4), "2": round(2 / 3, 4), "4": round(2 / 3, 4)}


def test_recall_needs_gold_titles():
    with pytest.raises(InputError, match="gold passages"):
        retrieval_recall([record("q", ())], [PoolPassage("A", "apple")], embedder=KeywordEmbedder())
