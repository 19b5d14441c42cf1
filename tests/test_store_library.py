"""The library facade in one process: round trips, dedup, tenants, corruption, prefixes, migrations."""

from __future__ import annotations

import json
import os
from contextlib import nullcontext

import numpy as np
import pytest
import torch

from kvlib.errors import AmbiguousKeyError, CorruptBlobError, InputError, NotFoundError
from kvlib.store import ChunkKey, Library
from kvlib.store.keys import compute_key, compute_keys
from kvlib.store.manifest import MIGRATIONS, applied_migrations, apply_migrations
from store_helpers import CONTEXT_ID, MODEL_FP, blob_files, flip_bytes, make_chunk, put_chunk

UNKNOWN_KEY = "f" * 64


@pytest.fixture
def library(tmp_path):
    with Library(tmp_path / "home") as lib:
        yield lib


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_put_get_round_trip_is_bit_exact(library, dtype):
    token_ids, k_sem, v = make_chunk(1, tokens=9, dtype=dtype)
    result = library.put(
        tenant="public", public=True, model_fp=MODEL_FP, context_id=CONTEXT_ID,
        token_ids=token_ids.to(torch.int32), k_sem=k_sem, v=v, text_preview="hello", meta={"source": "t"},
    )
    chunk = library.get(result.key)
    assert result.new and result.bytes == blob_files(library.home)[0].stat().st_size
    assert chunk.k_sem.dtype == dtype and chunk.v.dtype == dtype, "stored dtype must be exactly the given one"
    assert torch.equal(chunk.k_sem, k_sem) and torch.equal(chunk.v, v)
    assert chunk.token_ids.dtype == torch.int64 and torch.equal(chunk.token_ids, token_ids)
    assert (chunk.model_fp, chunk.context_id, chunk.dtype) == (MODEL_FP, CONTEXT_ID, str(dtype)[6:])
    # int32 and int64 ids of the same tokens address the same chunk
    assert result.key == library.key_for(
        tenant="public", public=True, model_fp=MODEL_FP, context_id=CONTEXT_ID, token_ids=token_ids.tolist()
    )


def test_key_depends_on_every_field():
    base = dict(model_fp="m", context_id="bos", token_ids=[1, 2, 3], salt="")
    variants = [
        {**base, "model_fp": "m2"}, {**base, "context_id": "sys"},
        {**base, "token_ids": [1, 2, 4]}, {**base, "salt": "s"},
        # length prefixes: moving a boundary between fields must change the key
        {**base, "model_fp": "mb", "context_id": "os"},
    ]
    keys = {compute_key(**base).hex} | {compute_key(**variant).hex for variant in variants}
    assert len(keys) == 1 + len(variants)


def test_key_scheme_is_pinned_and_keys_for_many_salts_agree():
    """The serialization addresses every stored chunk: these values were computed by the first
    implementation, so a rewrite of the hashing that moved them would re-address the library."""
    fields = dict(model_fp="m", context_id="bos")
    pinned = {"": "b1470efe5e7948b062158eb69030276801fc1c0e0cca12694d83e9837d74fd24",
              "s": "3f7b0f3a5a1feab54fb08d02bb84d2bb78f26fd68992d77041f7005925ce0141"}
    for ids in ([1, 2, 300000], (1, 2, 300000), np.array([1, 2, 300000], dtype=np.int64)):
        assert [k.hex for k in compute_keys(**fields, token_ids=ids, salts=["", "s"])] == list(pinned.values())
        assert {s: compute_key(**fields, token_ids=ids, salt=s).hex for s in pinned} == pinned
    for bad in ((1, True), (1, -2), (1, 2.0)):  # the remembered tuple path checks as the list path does
        with pytest.raises(InputError, match="non-negative ints"):
            compute_keys(**fields, token_ids=bad, salts=[""])


def test_chunk_key_is_frozen_and_validated():
    key = ChunkKey("a" * 64)
    assert key.short == "a" * 12 and str(key) == "a" * 64 and key == ChunkKey("a" * 64)
    with pytest.raises(Exception):
        key.hex = "b" * 64  # type: ignore[misc]
    with pytest.raises(InputError):
        ChunkKey("xyz")


def test_public_text_is_stored_once(library):
    first = put_chunk(library, 3)
    second = put_chunk(library, 3, tenant="alice", public=True)
    assert first.new and not second.new, "a second identical public put must be a dedup hit"
    assert first.key == second.key
    assert len(blob_files(library.home)) == 1


def test_private_identical_text_of_two_tenants_shares_nothing(library):
    alice = put_chunk(library, 4, tenant="alice", public=False)
    bob = put_chunk(library, 4, tenant="bob", public=False)
    public = put_chunk(library, 4)
    assert len({alice.key, bob.key, public.key}) == 3
    assert alice.new and bob.new and public.new
    assert len(blob_files(library.home)) == 3


def test_default_tenant_has_no_private_namespace(library):
    # "public" is everyone's namespace: its private put is the public chunk.
    assert put_chunk(library, 5, tenant="public", public=False).key == put_chunk(library, 5).key


def _error_text(call) -> str:
    with pytest.raises(NotFoundError) as info:
        call()
    return str(info.value)


def test_tenant_cannot_see_another_tenants_private_chunk(library):
    secret = put_chunk(library, 6, tenant="alice", public=False).key
    library.set_document(tenant="alice", public=False, path="secret.txt", content_hash="h", chunk_keys=[secret])
    assert library.has(secret, "alice") and not library.has(secret, "bob")
    assert secret.hex not in {c["key"] for c in library.list_chunks("bob")}
    assert library.list_documents("bob") == [] and library.document("bob", "secret.txt") is None
    calls = {
        "get": lambda key: library.get(key, "bob"),
        "inspect": lambda key: library.inspect(key, "bob"),
        "resolve": lambda key: library.resolve(key[:10], "bob"),
        "set_document": lambda key: library.set_document(
            tenant="bob", public=False, path="x", content_hash="h", chunk_keys=[key]),
    }
    for name, call in calls.items():
        hidden = _error_text(lambda: call(secret.hex)).replace(secret.hex[: 10 if name == "resolve" else 64], "<KEY>")
        absent = _error_text(lambda: call(UNKNOWN_KEY)).replace(UNKNOWN_KEY[: 10 if name == "resolve" else 64], "<KEY>")
        assert hidden == absent, f"{name}: a hidden chunk must read exactly like a missing one"
    assert library.stats("bob")["chunks"] == 0


def test_public_chunk_does_not_reveal_private_documents_holding_it(library):
    shared = put_chunk(library, 7).key
    library.set_document(tenant="alice", public=False, path="a.txt", content_hash="h", chunk_keys=[shared])
    assert library.inspect(shared, "bob")["documents"] == []
    assert [d["path"] for d in library.inspect(shared, "alice")["documents"]] == ["a.txt"]
    assert [c["documents"] for c in library.list_chunks("bob")] == [0]


def test_public_document_cannot_hold_private_chunks(library):
    private = put_chunk(library, 8, tenant="alice", public=False).key
    with pytest.raises(InputError):
        library.set_document(tenant="alice", public=True, path="p.txt", content_hash="h", chunk_keys=[private])


def test_corrupt_blob_is_detected_on_get_inspect_and_verify(library):
    key = put_chunk(library, 9).key
    flip_bytes(blob_files(library.home)[0])
    with pytest.raises(CorruptBlobError) as info:
        library.get(key)
    assert "\n" not in str(info.value) and key.short in str(info.value)
    assert library.inspect(key)["checksum_status"] == "mismatch"
    problems = library.verify()
    assert [p.key for p in problems] == [key.hex] and "checksum" in problems[0].reason
    # putting the same chunk again repairs the blob instead of trusting the row
    assert put_chunk(library, 9).new and library.verify() == []


def test_find_many_finds_what_the_tenant_sees_and_counts_no_use_until_touched(library):
    public, secret, corrupt = (put_chunk(library, 30).key, put_chunk(library, 31, tenant="alice", public=False).key,
                               put_chunk(library, 32).key)
    flip_bytes(next(p for p in blob_files(library.home) if p.stem == corrupt.hex))
    asked = [public, secret, corrupt, UNKNOWN_KEY]
    assert set(library.find_many(asked, "alice")) == {public.hex, secret.hex}, "a corrupt blob is left out"
    bob = library.find_many(asked, "bob")
    assert set(bob) == {public.hex} and torch.equal(bob[public.hex].v, make_chunk(30)[2])
    assert library.inspect(public, "bob")["hits"] == 0, "finding is not using"
    library.touch([public, public.hex])
    assert library.inspect(public, "bob")["hits"] == 1, "one use per chunk per touch"


def test_get_many_counts_uses_unless_told_not_to(library):
    key = put_chunk(library, 33).key
    library.get_many([key], touch=False)
    assert library.inspect(key)["hits"] == 0, "a read left uncounted, for its caller to count after its answer"
    library.get_many([key, key])
    assert library.inspect(key)["hits"] == 1, "one use per distinct key"


def test_truncated_and_missing_blobs_are_problems(library):
    truncated, missing = put_chunk(library, 10).key, put_chunk(library, 11).key
    library.blobs.path_for(truncated).write_bytes(b"\x00" * 5)
    library.blobs.path_for(missing).unlink()
    reasons = {p.key: p.reason for p in library.verify()}
    assert set(reasons) == {truncated.hex, missing.hex}
    assert "missing" in reasons[missing.hex]
    with pytest.raises(CorruptBlobError):
        library.get(missing)


def _colliding_ids(library, tenants: tuple[str, str]) -> tuple[int, int, str]:
    """Token ids (t0, t1) whose one-token chunks, keyed in the namespaces of `tenants`,
    share their first 6 hex digits.

    A birthday search: a 6-hex collision is expected within about
    sqrt(16**6) ~ 4k keys, so this costs a few thousand sha256 calls.
    """
    def prefix_of(tenant: str, token: int) -> str:
        return library.key_for(tenant=tenant, public=tenant == "public", model_fp=MODEL_FP,
                               context_id=CONTEXT_ID, token_ids=[token]).hex[:6]

    seen: tuple[dict[str, int], dict[str, int]] = ({}, {})
    for token in range(200_000):
        first, second = prefix_of(tenants[0], token), prefix_of(tenants[1], token)
        if first in seen[1]:
            return token, seen[1][first], first
        if second in seen[0] and seen[0][second] != token:  # same tenant: a key never collides with itself
            return seen[0][second], token, second
        seen[0].setdefault(first, token)
        seen[1].setdefault(second, token)
    raise AssertionError("no 6-hex prefix collision in 200k keys (astronomically unlikely)")


def _put_token(library, token: int, tenant: str):
    _, k_sem, v = make_chunk(token, tokens=1)
    return library.put(tenant=tenant, public=tenant == "public", model_fp=MODEL_FP, context_id=CONTEXT_ID,
                       token_ids=[token], k_sem=k_sem, v=v).key


def test_prefix_resolution_like_git(library):
    first, second, prefix = _colliding_ids(library, ("public", "public"))
    key_a, key_b = _put_token(library, first, "public"), _put_token(library, second, "public")
    with pytest.raises(AmbiguousKeyError) as info:
        library.resolve(prefix)
    assert key_a.short in str(info.value) and key_b.short in str(info.value)
    assert set(info.value.candidates) == {key_a, key_b}
    assert library.resolve(key_a.hex[:20]) == key_a and library.resolve(key_b.hex.upper()) == key_b
    for bad in ("abcde", "zzzzzzzz", ""):
        with pytest.raises(InputError):
            library.resolve(bad)


def test_prefix_candidates_never_include_other_tenants(library):
    public_token, private_token, prefix = _colliding_ids(library, ("public", "bob"))
    public_key = _put_token(library, public_token, "public")
    private_key = _put_token(library, private_token, "bob")
    assert library.resolve(prefix, "alice") == public_key, "bob's private key must not make alice's prefix ambiguous"
    with pytest.raises(AmbiguousKeyError) as info:
        library.resolve(prefix, "bob")
    assert private_key.short in str(info.value)


def test_documents_replace_keep_order_and_count_dedup(library):
    keys = [put_chunk(library, seed).key for seed in range(3)]
    first = library.set_document(tenant="alice", public=False, path="d.txt", content_hash="v1", chunk_keys=keys)
    second = library.set_document(tenant="alice", public=False, path="d.txt", content_hash="v2",
                                  chunk_keys=[keys[2], keys[0], keys[2]])
    doc = library.document("alice", "d.txt")
    assert second != first and doc["content_hash"] == "v2"
    assert doc["chunk_keys"] == [keys[2].hex, keys[0].hex, keys[2].hex], "membership keeps order"
    stats = library.stats("alice")
    assert (stats["documents"], stats["chunk_references"], stats["referenced_chunks"]) == (1, 3, 2)
    assert stats["dedup_ratio"] == pytest.approx(1.5)
    library.remove_document(tenant="alice", path="d.txt")
    assert library.document("alice", "d.txt") is None
    with pytest.raises(NotFoundError):
        library.remove_document(tenant="alice", path="d.txt")


def test_inspect_reports_model_use_and_drift(library):
    library.register_model(MODEL_FP, "tiny", {"layers": 2})
    key = put_chunk(library, 12).key
    library.get(key)
    library.set_drift_score(key, 0.25)
    info = library.inspect(key.hex[:8])
    assert (info["model_name"], info["hits"], info["drift_score"], info["checksum_status"]) == ("tiny", 1, 0.25, "ok")
    assert info["shapes"]["k_sem"] == [2, 2, 6, 8] and info["tokens"] == 6
    assert json.loads(json.dumps(info)) == info, "inspect must be JSON-ready"


def test_bad_inputs_are_input_errors(library):
    token_ids, k_sem, v = make_chunk(13)
    bad_calls = [
        dict(k_sem=k_sem.float(), v=v.float(), token_ids=token_ids),  # float32 is not a storage dtype
        dict(k_sem=k_sem, v=v[:, :, :3], token_ids=token_ids),  # token dims disagree
        dict(k_sem=k_sem, v=v, token_ids=token_ids[:3]),  # ids do not match the tokens dim
        dict(k_sem=k_sem, v=v, token_ids=[-1] * 6),
    ]
    for call in bad_calls:
        with pytest.raises(InputError):
            library.put(tenant="public", public=True, model_fp=MODEL_FP, context_id=CONTEXT_ID, **call)
    with pytest.raises(InputError):
        library.put(tenant="no spaces", public=False, model_fp=MODEL_FP, context_id=CONTEXT_ID,
                    token_ids=token_ids, k_sem=k_sem, v=v)


def test_migrations_are_recorded_once_and_idempotent(tmp_path):
    home = tmp_path / "home"
    Library(home).close()
    with Library(home) as library:
        assert applied_migrations(library.db) == [name for name, _ in MIGRATIONS]
        assert apply_migrations(library.db) == []
        assert library.db.journal_mode == "wal"
        rows = library.db.execute("SELECT name, applied_at FROM migrations").fetchall()
        assert len(rows) == len(MIGRATIONS) and all(applied_at for _, applied_at in rows)


def _begin(library, seed: int, **kwargs):
    token_ids, k_sem, v = make_chunk(seed)
    return library.put_begin(tenant="public", public=True, model_fp=MODEL_FP, context_id=CONTEXT_ID,
                             token_ids=token_ids, k_sem=k_sem, v=v, **kwargs)


def test_background_puts_publish_in_order_with_their_drift(library):
    pending = [_begin(library, seed, background=True, drift_score=seed / 10) for seed in (1, 2, 3)]
    assert not blob_files(library.home), "a begun put is visible before finish_puts"
    results = library.finish_puts(pending)
    assert [r.new for r in results] == [True, True, True]
    for seed, r in zip((1, 2, 3), results):
        token_ids, k_sem, v = make_chunk(seed)
        got = library.get(r.key)
        assert torch.equal(got.k_sem, k_sem) and torch.equal(got.v, v)
        assert got.drift_score == pytest.approx(seed / 10)
    assert library.verify() == []


def test_discarded_and_unfinished_puts_leave_nothing(library, tmp_path):
    kept = _begin(library, 1, background=True)
    dropped = _begin(library, 2, background=True)
    library.discard_puts([dropped])
    library.finish_puts([kept])
    left = _begin(library, 3, background=True)  # never finished: closing the library drops it
    library.close()
    files = sorted(p.name for p in (library.home / "blobs").glob("??/*"))
    assert files == [f"{kept.key.hex}.safetensors"], files
    assert left.settled


def test_blob_is_written_buffered_where_o_direct_is_refused(library, monkeypatch):
    from kvlib.store import blobs

    real_open, calls = os.open, []

    def refuse_direct(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            calls.append(path)
            raise OSError(22, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(blobs.os, "open", refuse_direct)
    monkeypatch.setattr(blobs, "_direct_warned", False)
    with pytest.warns(RuntimeWarning, match="O_DIRECT was refused") if getattr(os, "O_DIRECT", 0) else nullcontext():
        r = put_chunk(library, 7)
    assert calls or not getattr(os, "O_DIRECT", 0)
    token_ids, k_sem, v = make_chunk(7)
    assert torch.equal(library.get(r.key).k_sem, k_sem)
    assert blob_files(library.home)[0].stat().st_size == r.bytes


def test_direct_write_is_exact_to_the_byte(tmp_path):
    from kvlib.store.blobs import _write_direct

    data = os.urandom(3 * 4096 + 123)
    target = tmp_path / "blob.part"
    target.touch()
    if not _write_direct(target, data):
        pytest.skip("this filesystem refuses O_DIRECT; the buffered path is tested above")
    assert target.read_bytes() == data



def _resident_share(path) -> float:
    """Share of a file's pages in the page cache: mincore(2) over a private mapping of it."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    status = ctypes.create_string_buffer(pages)
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY) as mapped:
        anchor = ctypes.c_char.from_buffer(mapped)  # its address is the mapping's; maps no page in
        failed = libc.mincore(ctypes.addressof(anchor), size, status)
        del anchor  # the mapping cannot close while exported
    if failed:
        pytest.skip(f"mincore failed here (errno {ctypes.get_errno()})")
    return sum(b & 1 for b in status.raw) / pages


def test_a_blob_read_soon_is_in_the_page_cache_and_a_direct_one_is_not(library):
    """The server's stores (read_soon) are read back into the page cache by the kernel, so the next
    turn does not wait on the disk; ingest's direct writes leave the cache to the blobs in use."""
    import time

    from kvlib.store.blobs import _write_direct

    probe = library.home / "direct-probe"
    probe.touch()
    if not _write_direct(probe, os.urandom(4096)):
        pytest.skip("this filesystem refuses O_DIRECT, so every blob write is buffered (cached)")
    shares = {}
    for seed, read_soon in ((21, False), (22, True)):
        token_ids, k_sem, v = make_chunk(seed, tokens=512)  # a blob of many pages
        r = library.put(tenant="public", public=True, model_fp=MODEL_FP, context_id=CONTEXT_ID,
                        token_ids=token_ids, k_sem=k_sem, v=v, read_soon=read_soon)
        path = library.blobs.path_for(r.key)
        deadline = time.monotonic() + 5
        while (share := _resident_share(path)) < 0.9 and read_soon and time.monotonic() < deadline:
            time.sleep(0.05)  # readahead is asynchronous
        shares[read_soon] = share
    assert shares[True] >= 0.9 and shares[False] < 0.1, shares  # readahead may skip the last partial page


def test_just_stored_chunks_are_served_from_memory_within_the_budget(tmp_path):
    """With recent_bytes a put's KV answers the next find_many without reading its blob (here the
    blob is gone, so only memory can answer), bit-exact; the oldest leave once the budget is full."""
    token_ids, k, v = make_chunk(1, tokens=6)
    per_chunk = k.nbytes + v.nbytes
    lib = Library(tmp_path / "home", recent_bytes=2 * per_chunk)
    plain = Library(tmp_path / "home")  # another handle: nothing in memory
    keys = [put_chunk(lib, seed).key for seed in (1, 2, 3)]
    for key in keys:
        lib.blobs.path_for(key).unlink()
    found = lib.find_many(keys)
    assert set(found) == {keys[1].hex, keys[2].hex}  # 1 left the budget; its blob is gone
    _, k3, v3 = make_chunk(3, tokens=6)
    assert torch.equal(found[keys[2].hex].k_sem, k3) and torch.equal(found[keys[2].hex].v, v3)
    assert plain.find_many(keys) == {}
    lib.close(), plain.close()


def test_a_chunk_memory_let_go_of_has_its_blob_mapped_at_idle(tmp_path):
    """warm_one maps and verifies the blob of each chunk pushed out of memory, once, newest first,
    so its next read is the held mapping's; a corrupt one is left for that read to report."""
    _, k, v = make_chunk(1, tokens=6)
    lib = Library(tmp_path / "home", recent_bytes=k.nbytes + v.nbytes)
    first, second, third = (put_chunk(lib, seed).key for seed in (1, 2, 3))  # 1, then 2, pushed out
    flip_bytes(lib.blobs.path_for(first))
    assert lib.blobs.mapped.held_bytes() == 0
    assert lib.warm_one() and lib.blobs.mapped.held_bytes() == lib.blobs.path_for(second).stat().st_size
    assert lib.warm_one() and not lib.warm_one(), "each pushed-out chunk is warmed once; the kept one not at all"
    assert lib.blobs.mapped.held_bytes() == lib.blobs.path_for(second).stat().st_size, "a corrupt blob is not held"
    found = lib.find_many([first, second, third])
    assert set(found) == {second.hex, third.hex}, "the corrupt blob is still found corrupt by the read"
    assert torch.equal(found[second.hex].k_sem, make_chunk(2, tokens=6)[1])
    lib.close()


def test_memory_never_serves_another_tenant_or_a_restored_blob(tmp_path):
    lib = Library(tmp_path / "home", recent_bytes=1 << 20)
    private = put_chunk(lib, 4, tenant="alice", public=False).key
    assert lib.find_many([private], "bob") == {}
    assert set(lib.find_many([private], "alice")) == {private.hex}
    # the same key stored again by another handle, with other bytes: the row's checksum changes
    other = Library(tmp_path / "home")
    other.blobs.path_for(private).unlink()
    token_ids, k, v = make_chunk(4, tokens=6)
    k2 = k + 1
    assert other.put(tenant="alice", public=False, model_fp=MODEL_FP, context_id=CONTEXT_ID, token_ids=token_ids,
                     k_sem=k2, v=v).new
    assert torch.equal(lib.find_many([private], "alice")[private.hex].k_sem, k2)  # read from the new blob
    lib.close(), other.close()


def test_memory_keeps_a_compact_copy_of_a_view(tmp_path):
    lib = Library(tmp_path / "home", recent_bytes=1 << 20)
    token_ids, k, v = make_chunk(5, tokens=6)
    packed = torch.cat([k, k], dim=2)  # k as a view into a buffer twice its size
    key = lib.put(tenant="public", public=True, model_fp=MODEL_FP, context_id=CONTEXT_ID, token_ids=token_ids,
                  k_sem=packed[:, :, :6], v=v).key
    got = lib.find_many([key])[key.hex].k_sem
    assert torch.equal(got, k) and got.untyped_storage().nbytes() == got.nbytes
    lib.close()
