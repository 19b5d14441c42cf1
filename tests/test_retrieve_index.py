"""The vector index: tenants see public rows and their own only; it persists and survives crashes."""

import numpy as np
import pytest

from kvlib.errors import KvlibError
from kvlib.retrieve.index import FAISS_FILE, IndexEntry, VectorIndex

DIM = 8


def _unit(rng, n):
    vectors = rng.standard_normal((n, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.fixture
def query():
    return _unit(np.random.default_rng(0), 1)[0]


@pytest.fixture
def index(tmp_path, query):
    """A's private chunks are the query's nearest neighbours; public and B's lie further out."""
    rng = np.random.default_rng(1)
    near = query + 0.05 * _unit(rng, 5)
    far = _unit(rng, 6)
    entries = [IndexEntry(f"a{i}", "a.md", "A", i) for i in range(5)]
    entries += [IndexEntry(f"p{i}", "pub.md", "public", i) for i in range(4)]
    entries += [IndexEntry(f"b{i}", "b.md", "B", i) for i in range(2)]
    idx = VectorIndex(tmp_path / "idx")
    assert idx.add(entries, np.concatenate([near, far])) == 11
    yield idx
    idx.close()


def test_tenant_never_sees_another_tenants_chunks(index, query):
    hits = index.search(query, k=100, tenant="B")
    assert {h.chunk_key for h in hits} == {"p0", "p1", "p2", "p3", "b0", "b1"}
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_k_visible_hits_even_when_hidden_ones_are_nearer(index, query):
    # The five nearest vectors are A's; B must still get its two best visible ones.
    assert len(index.search(query, k=2, tenant="B")) == 2
    assert [h.owner for h in index.search(query, k=5, tenant="A")] == ["A"] * 5


def test_public_is_visible_to_everyone(index, query):
    assert {h.chunk_key for h in index.search(query, k=100, tenant="public")} == {"p0", "p1", "p2", "p3"}
    assert {h.chunk_key for h in index.search(query, k=100, tenant="C")} == {"p0", "p1", "p2", "p3"}


def test_add_is_idempotent(index):
    vectors = _unit(np.random.default_rng(2), 2)
    again = [IndexEntry("a0", "a.md", "A", 0), IndexEntry("a0", "a.md", "B", 0)]
    assert index.add(again, vectors) == 1, "only the (chunk, doc, owner) triple not seen before is new"
    assert len(index) == 12


def test_persists_across_reopen(index, query, tmp_path):
    expected = index.search(query, k=4, tenant="A")
    index.save()
    assert (tmp_path / "idx" / FAISS_FILE).is_file()
    assert [p.name for p in (tmp_path / "idx").iterdir() if p.name.endswith(".tmp")] == []
    reopened = VectorIndex(tmp_path / "idx")
    assert len(reopened) == 11 and reopened.search(query, k=4, tenant="A") == expected
    reopened.close()


def test_unsaved_changes_are_rebuilt_from_sqlite(index, query, tmp_path):
    index.save()
    index.add([IndexEntry("late", "late.md", "public", 0)], query[None, :])
    index.close()  # no save: the FAISS file on disk lacks "late"
    reopened = VectorIndex(tmp_path / "idx")
    assert reopened.search(query, k=1, tenant="public")[0].chunk_key == "late"
    reopened.close()


def test_remove_document_only_touches_that_owner(index, query):
    index.add([IndexEntry("a-pub", "a.md", "public", 0)], query[None, :])
    assert index.remove_document("a.md", "A") == 5
    assert index.remove_document("a.md", "A") == 0
    assert [h.chunk_key for h in index.search(query, k=100, tenant="A")][0] == "a-pub"
    assert not any(h.owner == "A" for h in index.search(query, k=100, tenant="A"))
    assert len(index) == 7


def test_dimension_mismatch_is_an_error(index):
    with pytest.raises(KvlibError, match="dimension"):
        index.add([IndexEntry("x", "x.md", "public", 0)], np.ones((1, DIM + 1), dtype=np.float32))
    with pytest.raises(KvlibError, match="dimension"):
        index.search(np.ones(DIM + 1, dtype=np.float32), k=1, tenant="A")


def test_empty_index_searches_to_nothing(tmp_path, query):
    idx = VectorIndex(tmp_path / "empty")
    assert len(idx) == 0 and idx.search(query, k=3, tenant="A") == []
    idx.save()
    idx.close()
