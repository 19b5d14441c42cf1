"""Byte budgets and garbage: LRU eviction of unreferenced chunks, orphan collection."""

from __future__ import annotations

import pytest

from kvlib.errors import InputError
from kvlib.store import BudgetWarning, Library
from store_helpers import blob_files, put_chunk, temp_files


def test_eviction_is_lru_over_unreferenced_chunks_only(tmp_path):
    with Library(tmp_path / "home") as library:
        keys = [put_chunk(library, seed).key for seed in range(5)]
        size = library.inspect(keys[0])["bytes"]
        library.set_document(tenant="public", public=True, path="held.txt", content_hash="h", chunk_keys=keys[:2])
        library.get(keys[2])  # most recently used of the unreferenced three

        report = library.evict(3 * size)
        assert set(report.evicted) == {keys[3].hex, keys[4].hex}, "least recently used go first"
        assert report.ok and report.freed_bytes == 2 * size

        report = library.evict(size)
        assert report.evicted == (keys[2].hex,)
        assert report.over_by == size, "chunks held by a document are kept and the shortfall reported"
        assert [library.has(key) for key in keys] == [True, True, False, False, False]
        assert len(blob_files(library.home)) == 2 and library.verify() == []


def test_automatic_eviction_warns_instead_of_dropping_held_or_fresh_chunks(tmp_path):
    home = tmp_path / "home"
    with Library(home) as probe:
        size = put_chunk(probe, 99).bytes
        probe.evict(0)
    with Library(home, max_bytes=3 * size) as library:
        keys = [put_chunk(library, seed).key for seed in range(3)]
        library.set_document(tenant="public", public=True, path="d.txt", content_hash="h", chunk_keys=keys)
        with pytest.warns(BudgetWarning) as caught:
            fresh = put_chunk(library, 3)
        assert fresh.budget.over_by == size and caught[0].message.report.over_by == size
        assert library.has(fresh.key), "a chunk just put is not evicted before a document can claim it"

        library.remove_document(tenant="public", path="d.txt")  # frees three chunks: the oldest goes
        assert not library.has(keys[0]) and all(library.has(key) for key in (*keys[1:], fresh.key))
        assert library.stats()["bytes"] == 3 * size


def test_evict_needs_a_budget(tmp_path):
    with Library(tmp_path / "home") as library, pytest.raises(InputError):
        library.evict()


def test_gc_removes_orphans_but_not_live_writes(tmp_path):
    with Library(tmp_path / "home") as library:
        kept, rowless, fileless = (put_chunk(library, seed).key for seed in range(3))
        library.set_document(tenant="public", public=True, path="d.txt", content_hash="h", chunk_keys=[kept, fileless])
        library.db.execute("DELETE FROM chunks WHERE key = ?", [rowless.hex])  # blob without a row
        library.blobs.path_for(fileless).unlink()  # row without a blob
        abandoned = library.blobs.path_for(kept).parent / ".tmp-crashed.part"
        abandoned.write_bytes(b"partial")
        live = library.blobs.stage(kept, b"in flight")  # a writer mid-put, holding its lock

        report = library.gc()
        assert report.orphan_blobs == (rowless.hex,) and report.orphan_rows == (fileless.hex,)
        assert report.doc_links == 1 and report.damaged_documents == ("d.txt",)
        assert report.temp_files == (str(abandoned),)
        assert temp_files(library.home) == [live.temp], "a temp file its writer still holds must survive gc"
        live.discard()
        assert library.verify() == [] and library.document("public", "d.txt")["chunk_keys"] == [kept.hex]
        assert library.gc().removed == 0
