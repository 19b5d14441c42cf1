"""The library over its backends: SQLite + the home's folder (the default) and PostgreSQL + Ceph S3.

Every test that makes sense for both runs on both (`cluster` is parametrized); the fault
tests stop and restart the real services. The services tests skip without `.services/env`.
"""

from __future__ import annotations

import subprocess
import time

import pytest
import torch

from kvlib.errors import CorruptBlobError, KvlibError, NotFoundError, StoreUnavailableError
from kvlib.store.keys import ChunkKey
from services_helpers import make_cluster, requires_services, services
from store_helpers import CONTEXT_ID, MODEL_FP, make_chunk, put_chunk, writer_command

KINDS = ["default", pytest.param("services", marks=[pytest.mark.services, requires_services])]


@pytest.fixture(params=KINDS)
def cluster(request, tmp_path, monkeypatch):
    return make_cluster(request.param, tmp_path, monkeypatch)


@pytest.fixture
def s3_cluster(tmp_path, monkeypatch):
    return make_cluster("services", tmp_path, monkeypatch)


def test_round_trip_across_nodes_is_bit_exact(cluster):
    token_ids, k_sem, v = make_chunk(7, tokens=11, dtype=torch.bfloat16)
    with cluster.library("a") as a:
        put = a.put(tenant="public", public=True, model_fp=MODEL_FP, context_id=CONTEXT_ID,
                    token_ids=token_ids, k_sem=k_sem, v=v)
    with cluster.library("b") as b:
        got = b.get(put.key)
        assert b.verify() == []
    assert got.k_sem.dtype == torch.bfloat16 and torch.equal(got.k_sem, k_sem) and torch.equal(got.v, v)
    assert torch.equal(got.token_ids, token_ids)
    assert cluster.stored_objects() == {put.key.hex}, "the blob must be in the shared store, once"


def test_dedup_and_tenant_isolation_across_homes(cluster):
    with cluster.library("a") as a, cluster.library("b") as b:
        first, again = put_chunk(a, 1), put_chunk(b, 1)
        assert first.new and not again.new and first.key == again.key, "public chunks dedup across nodes"
        alice, bob = put_chunk(a, 2, tenant="alice", public=False), put_chunk(b, 2, tenant="bob", public=False)
        assert alice.key != bob.key, "private keys are salted per tenant"
        assert b.has(alice.key, "alice") and a.has(bob.key, "bob"), "a tenant sees its own chunks on every node"
        assert not b.has(alice.key, "bob") and b.has(first.key, "bob")
        unknown = ChunkKey("e" * 64)
        messages = []
        for key in (alice.key, unknown):
            with pytest.raises(NotFoundError) as caught:
                b.get(key, "bob")
            messages.append(str(caught.value).replace(key.hex, "KEY"))
        assert messages[0] == messages[1], "another tenant's chunk must answer exactly like a missing one"
        assert {c["key"] for c in b.list_chunks("bob")} == {first.key.hex, bob.key.hex}
    assert cluster.stored_objects() == {first.key.hex, alice.key.hex, bob.key.hex}


def test_a_corrupt_stored_blob_is_caught_and_recomputed(cluster):
    with cluster.library("a") as a:
        stored = put_chunk(a, 3)
    _corrupt(cluster, stored.key)
    with cluster.library("b") as b:
        with pytest.raises(CorruptBlobError, match="corrupt"):
            b.get(stored.key)
        assert b.verify() != [], "verify must see the corrupt copy in the store"
        again = put_chunk(b, 3)  # what query does on a CorruptBlobError: encode again, put
        assert again.new and again.key == stored.key, "a recomputed chunk must replace the corrupt blob"
    with cluster.library("c") as c:
        assert torch.equal(c.get(stored.key).k_sem, make_chunk(3)[1]) and c.verify() == []


def _corrupt(cluster, key: ChunkKey) -> None:
    """Flip the stored copy's bytes (and drop every node's cached copy)."""
    if cluster.kind == "default":
        path = cluster.home("a") / "blobs" / key.fanout / f"{key.hex}.safetensors"
        data = bytearray(path.read_bytes())
        data[-5] ^= 0xFF
        path.write_bytes(bytes(data))
        return
    from kvlib.store.s3 import S3Blobs

    remote = S3Blobs(cluster.store)
    data = bytearray(remote.get(key))
    data[-5] ^= 0xFF
    # The original checksum metadata stays: only the bytes can give the corruption away.
    remote.put(key, bytes(data), remote.head_checksum(key))


@pytest.mark.services
@requires_services
def test_store_outage_reads_the_local_tier_queues_writes_and_syncs(s3_cluster):
    with s3_cluster.library("a") as a:
        cached = put_chunk(a, 1)
    services("down", "rgw")
    try:
        with s3_cluster.library("a") as a:
            assert torch.equal(a.get(cached.key).v, make_chunk(1)[2]), "node a reads its local tier"
            with pytest.warns(RuntimeWarning, match="unreachable"):
                queued = put_chunk(a, 2)
            assert queued.new and len(a.blobs.queued()) == 1, "a write during the outage is queued on disk"
            assert a.sync().pending == 1, "sync keeps the queue while the store is down"
        with s3_cluster.library("b") as b:
            with pytest.raises(StoreUnavailableError):
                b.get(cached.key)  # nothing local: the caller must recompute
    finally:
        services("up", "rgw")
    with s3_cluster.library("a") as a:
        report = a.sync()
        assert report.uploaded == (queued.key.hex,) and report.pending == 0 and not a.blobs.queued()
    with s3_cluster.library("b") as b:
        assert torch.equal(b.get(queued.key).k_sem, make_chunk(2)[1]) and b.verify() == []


@pytest.mark.services
@requires_services
def test_gateway_stopped_mid_write_loses_nothing(s3_cluster, tmp_path):
    home, go = s3_cluster.home("writer"), tmp_path / "go"
    seeds = list(range(100, 220))  # 120 puts of 1 MB: the gateway goes down while they run
    go.touch()
    writer = subprocess.Popen([*writer_command(tmp_path), str(home), str(go), "0", "8192", *map(str, seeds)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**s3_cluster.node_env(), "PYTHONPATH": _pythonpath()})
    try:
        early = _wait_for_lines(writer, 5)
        services("down", "rgw")
        out, err = writer.communicate(timeout=300)
    finally:
        services("up", "rgw")
    assert writer.returncode == 0, err
    keys = set(early) | set(out.split())
    with s3_cluster.library("writer") as library:
        report = library.sync()
        assert report.uploaded, "the outage must have queued some puts (else it missed the writer)"
        assert report.pending == 0 and not library.blobs.queued(), "the queue drains once the store is back"
        assert library.verify() == [], "every row has a whole, matching object in the store"
        assert len(library.list_chunks()) == len(seeds)
    assert len(keys) == len(seeds) and s3_cluster.stored_objects() >= keys


def _pythonpath() -> str:
    from store_helpers import writer_env

    return writer_env()["PYTHONPATH"]


def _wait_for_lines(process, count: int, limit_s: float = 120) -> list[str]:
    """The first `count` keys the writer reported stored (it prints one per put)."""
    start, lines = time.monotonic(), []
    while len(lines) < count:
        assert time.monotonic() - start < limit_s, "the writer stored nothing in time"
        line = process.stdout.readline().strip()
        if line:
            lines.append(line)
    return lines


@pytest.mark.services
@requires_services
def test_manifest_outage_is_one_error_line(s3_cluster):
    with s3_cluster.library("a") as a:
        put_chunk(a, 1)
    services("down", "postgres")
    try:
        with pytest.raises(KvlibError, match="cannot reach manifest postgresql://") as caught:
            s3_cluster.library("a")
        assert "\n" not in str(caught.value)
    finally:
        services("up", "postgres")
    with s3_cluster.library("a") as a:
        assert len(a.list_chunks()) == 1 and a.verify() == []


@pytest.mark.services
@requires_services
def test_background_sync_loop_uploads_once_the_store_is_back(s3_cluster):
    from kvlib.store.sync_loop import SyncLoop

    services("down", "rgw")
    try:
        with s3_cluster.library("a") as a, pytest.warns(RuntimeWarning):
            queued = put_chunk(a, 5)
        loop = SyncLoop(lambda: s3_cluster.library("a"), interval_s=0.5)
        loop.run_once()
        assert loop.pending == 1, "while the store is down the entry stays queued"
    finally:
        services("up", "rgw")
    loop.start()
    try:
        deadline = time.monotonic() + 60
        while not (loop.last_report and loop.last_report.uploaded) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        loop.stop()
    assert loop.last_report.uploaded == (queued.key.hex,) and loop.last_error is None
    assert queued.key.hex in s3_cluster.stored_objects()
