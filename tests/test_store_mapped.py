"""Blob mappings held between reads (store/mapped.py): a held mapping never hides a change to the
file, nor a write into the tensors it served, and stays within its budget."""

from __future__ import annotations

import pytest
import torch

from kvlib.errors import CorruptBlobError
from kvlib.store import Library
from kvlib.store.mapped import MappedBlobs
from store_helpers import blob_files, flip_bytes, make_chunk, put_chunk


@pytest.fixture
def library(tmp_path):
    with Library(tmp_path / "home") as lib:
        yield lib


def test_a_second_read_is_served_from_the_held_mapping(library):
    key = put_chunk(library, 1).key
    first, second = library.get(key), library.get(key)
    assert second.k_sem.data_ptr() == first.k_sem.data_ptr(), "the same mapping, not a new one"
    token_ids, k_sem, v = make_chunk(1)
    assert torch.equal(second.k_sem, k_sem) and torch.equal(second.v, v) and torch.equal(second.token_ids, token_ids)
    assert library.blobs.mapped.held_bytes() == blob_files(library.home)[0].stat().st_size


def test_corruption_after_a_read_is_caught_on_the_next(library):
    key = put_chunk(library, 2).key
    library.get(key)  # now held
    flip_bytes(blob_files(library.home)[0])
    with pytest.raises(CorruptBlobError, match="corrupt"):
        library.get(key)
    assert library.find_many([key]) == {}
    assert [p.key for p in library.verify()] == [key.hex]


def test_a_write_into_served_kv_is_not_served_again(library):
    key = put_chunk(library, 3).key
    library.get(key).k_sem.add_(1.0)  # callers must not; if one does, the file is still whole
    again = library.get(key)
    assert torch.equal(again.k_sem, make_chunk(3)[1]), "mapped afresh from the file"
    assert library.verify() == []


def test_a_deleted_blob_is_missing_though_it_was_held(library):
    key = put_chunk(library, 4).key
    library.get(key)
    blob_files(library.home)[0].unlink()  # as another process's gc would
    with pytest.raises(CorruptBlobError, match="missing"):
        library.get(key)
    assert library.blobs.mapped.held_bytes() == 0


def test_a_restored_blob_is_read_from_its_new_file(library):
    key = put_chunk(library, 5).key
    library.get(key)
    flip_bytes(blob_files(library.home)[0])
    assert put_chunk(library, 5).new, "the corrupt blob is rewritten"
    assert torch.equal(library.get(key).v, make_chunk(5)[2])


def test_held_mappings_stay_within_their_budget(library):
    keys = [put_chunk(library, 10 + i).key for i in range(4)]
    size = blob_files(library.home)[0].stat().st_size
    library.blobs.mapped = MappedBlobs(max_bytes=2 * size)
    chunks = [library.get(k) for k in keys]
    assert library.blobs.mapped.held_bytes() <= 2 * size
    for chunk, i in zip(chunks, range(4)):  # tensors of a dropped mapping keep it alive while in use
        assert torch.equal(chunk.k_sem, make_chunk(10 + i)[1])
