"""Retrieval across nodes: each node's FAISS index follows the vectors in the shared manifest."""

from __future__ import annotations

import numpy as np
import pytest

from kvlib.retrieve.index import IndexEntry, VectorIndex
from services_helpers import make_cluster, requires_services

DIM = 8
KINDS = ["default", pytest.param("services", marks=[pytest.mark.services, requires_services])]


@pytest.fixture(params=KINDS)
def manifest(request, tmp_path, monkeypatch):
    cluster = make_cluster(request.param, tmp_path, monkeypatch)
    # The defaults share a manifest only as one SQLite file; the services as one database.
    return cluster.manifest or str(tmp_path / "shared-manifest.sqlite")


def _unit(seed: int, n: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_a_document_indexed_on_node_a_is_found_on_node_b(tmp_path, manifest):
    vectors = _unit(0, 3)
    with VectorIndex(tmp_path / "a", manifest=manifest) as a, VectorIndex(tmp_path / "b", manifest=manifest) as b:
        assert b.search(vectors[0], k=3, tenant="public") == []
        entries = [IndexEntry(f"k{i}", "doc.md", "public", i, f"text {i}") for i in range(2)]
        entries.append(IndexEntry("secret", "mine.md", "alice", 0, "private"))
        assert a.add(entries, vectors) == 3
        hits = b.search(vectors[1], k=3, tenant="public")
        assert [h.chunk_key for h in hits][:1] == ["k1"] and {h.chunk_key for h in hits} == {"k0", "k1"}
        assert hits[0].text == "text 1", "the chunk text travels, so node B can re-encode a missing chunk"
        assert {h.chunk_key for h in b.search(vectors[2], k=3, tenant="alice")} == {"k0", "k1", "secret"}
        assert b.sync() == 0, "nothing changed: the cheap check must skip the fetch"
        assert b.add(entries[:1], vectors[:1]) == 0, "a second node indexing the same entry adds nothing"
        assert a.remove_document("doc.md", "public") == 2
        assert [h.chunk_key for h in b.search(vectors[0], k=3, tenant="alice")] == ["secret"]
    with VectorIndex(tmp_path / "c", manifest=manifest) as c:
        assert len(c) == 1, "a new node starts from the manifest's rows"
