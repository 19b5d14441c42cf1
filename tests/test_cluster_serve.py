"""`kvlib serve` over a shared library: PostgreSQL stopped under a running server (full recompute,
degraded, documents 503, then back to reuse), a server started with PostgreSQL down, node B
answering from node A's stores with nothing encoded, and scripts/cluster_serve.py --check.

The outage tests stop the real PostgreSQL of `make services` and start it again; each test has
its own database and S3 prefix (services_helpers.make_cluster). Requests go through the real
openai client, as in the other serve tests.
"""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from serve_helpers import REPO_ROOT, Server, add_key, new_home, wait_until
from services_helpers import ENV_FILE, make_cluster, requires_services, services

pytestmark = pytest.mark.slow
SERVICES = [pytest.mark.services, requires_services]
KINDS = ["default", pytest.param("services", marks=SERVICES)]
RETRY_S = 1  # --manifest-retry: the server tries PostgreSQL again every second
DOCS = [
    ("Aberlow Mill", "Aberlow Mill was a water-powered flax mill on the river Senn, built in 1794 by the Harrow "
     "family. It employed forty spinners at its height and closed in 1911 after a spring flood destroyed its wheel."),
    ("Brennock Ferry", "The Brennock ferry crosses the sound twice a day. Its first boat, the Maid of Ost, was "
     "launched in 1926, carried forty passengers and a mail sack, and served until a storm sank it in 1958."),
    ("Greyspine Ridge", "Greyspine Ridge is a granite escarpment north of Fennick Island. Its highest point, Cairn "
     "Tor, stands 412 metres above the sea, and a stone hut on its summit shelters walkers caught by fog."),
]


def rag_prompt(order, question="When was it built?"):
    lines = [f"Document [{n}](Title: {DOCS[i][0]}) {DOCS[i][1]}" for n, i in enumerate(order, start=1)]
    return [{"role": "system", "content": "Answer from the documents."},
            {"role": "user", "content": "\n\n".join(lines) + f"\n\nQuestion: {question}"}]


def backend_flags(cluster) -> list[str]:
    """A node's backends as `kvlib serve` flags (the server sees no KVLIB_* variable)."""
    if cluster.kind == "default":
        return []
    return ["--store", cluster.store, "--manifest", cluster.manifest]


def ask(server, key, messages, **kw):
    return server.client(key, timeout=600).chat.completions.create(
        model="default", messages=messages, max_tokens=4, temperature=0, **kw)


def cached(reply) -> int:
    return reply.usage.prompt_tokens_details.cached_tokens


def post_document(server, key, text):
    return httpx.post(server.url + "/v1/documents", json={"text": text, "name": "outage"},
                      headers={"Authorization": f"Bearer {key}"}, timeout=600)


def alice_chunks(cluster) -> int:
    with cluster.library("check") as library:
        return len(library.list_chunks("alice"))


def assert_full_recompute(reply) -> None:
    meta = reply.model_extra["kvlib"]
    assert cached(reply) == 0 and meta["mode"] == "full" and meta["degraded"] is True, meta
    assert meta["degraded_reason"].startswith("cannot reach manifest postgresql://"), meta["degraded_reason"]
    assert reply.choices[0].message.content is not None


def assert_degraded(server, key) -> None:
    """/healthz, /v1/documents and the gauge while PostgreSQL is down."""
    health = server.health()
    assert health["status"] == "degraded" and "cannot reach manifest" in health["degraded_reason"], health
    refused = post_document(server, key, DOCS[2][1])
    assert refused.status_code == 503, refused.text
    error = refused.json()["error"]
    assert error["code"] == "manifest_unavailable" and error["type"] == "server_error" and error["message"]
    assert server.metric("kvlib_degraded") == 1.0


def wait_reuse_again(server) -> None:
    wait_until(lambda: server.health()["status"] == "ok", 20 * RETRY_S + 30, "the server to find PostgreSQL again")
    assert server.metric("kvlib_degraded") == 0.0


@pytest.fixture
def pg_node(tmp_path, monkeypatch, smol_home):
    """(cluster, home, alice's key, start): a home over its own database and prefix, and how to serve it."""
    cluster = make_cluster("services", tmp_path, monkeypatch)
    home = new_home(tmp_path, smol_home)
    return cluster, home, add_key(home, "alice"), \
        lambda: Server(home, *backend_flags(cluster), "--manifest-retry", str(RETRY_S))


@pytest.mark.services
@requires_services
def test_postgres_stopped_under_a_running_server_answers_by_full_recompute(pg_node):
    cluster, home, key, start = pg_node
    server = start()
    try:
        ask(server, key, rag_prompt([0, 1]))
        server.wait_idle(600)  # both documents stored
        warm = ask(server, key, rag_prompt([1, 0]))
        assert cached(warm) > 0 and warm.model_extra["kvlib"]["degraded"] is False
        assert server.health()["status"] == "ok" and server.metric("kvlib_degraded") == 0.0
        stored = alice_chunks(cluster)
        services("down", "postgres")
        try:
            down = ask(server, key, rag_prompt([2, 1, 0]))  # a lookup on the lost manifest: no 500
            assert_full_recompute(down)
            streamed = list(ask(server, key, rag_prompt([0, 2]), stream=True))
            assert streamed[-1].model_extra["kvlib"]["degraded"] is True, "the last chunk says so too"
            assert_degraded(server, key)
            assert server.health()["pending_stores"] == 0, "nothing seen while degraded waits to be stored"
        finally:
            services("up", "postgres")
        wait_reuse_again(server)
        back = ask(server, key, rag_prompt([0, 1]))
        assert cached(back) > 0 and back.model_extra["kvlib"]["degraded"] is False
        assert server.wait_idle(600)["status"] == "ok"
    finally:
        server.stop()
    assert alice_chunks(cluster) == stored, "the outage's requests stored nothing, then or after"
    with cluster.library("check") as library:
        assert library.verify() == [], "nothing half-written"


@pytest.mark.services
@requires_services
def test_server_starts_with_postgres_down_and_goes_to_reuse_when_it_is_back(pg_node):
    cluster, home, key, start = pg_node
    services("down", "postgres")
    server = None
    try:
        server = start()
        assert_full_recompute(ask(server, key, rag_prompt([0, 1])))
        assert_degraded(server, key)
    except BaseException:
        if server is not None:
            server.stop()
        raise
    finally:
        services("up", "postgres")
    try:
        wait_reuse_again(server)
        ask(server, key, rag_prompt([0, 1]))
        server.wait_idle(600)
        again = ask(server, key, rag_prompt([1, 0]))
        assert cached(again) > 0, "once the manifest answers, misses are stored and reused"
        added = post_document(server, key, DOCS[2][1])
        assert added.status_code == 200 and added.json()["chunks_new"] >= 1, added.text
    finally:
        server.stop()


@pytest.mark.parametrize("kind", KINDS)
def test_node_b_answers_from_node_a_stores_encoding_nothing(kind, tmp_path, monkeypatch, smol_home):
    cluster = make_cluster(kind, tmp_path, monkeypatch)
    for home in {cluster.home("a"), cluster.home("b")}:  # the defaults share one home
        new_home(home.parent, smol_home, home.name)
    keys = {node: add_key(cluster.home(node), "alice") for node in "ab"}
    node_a = Server(cluster.home("a"), *backend_flags(cluster))
    try:
        ask(node_a, keys["a"], rag_prompt([0, 1, 2]))
        node_a.wait_idle(600)  # A's misses stored (and, with S3, uploaded)
    finally:
        node_a.stop()
    stored = alice_chunks(cluster)
    assert stored >= len(DOCS)
    node_b = Server(cluster.home("b"), *backend_flags(cluster))
    try:
        reply = ask(node_b, keys["b"], rag_prompt([2, 0, 1], "How tall is Cairn Tor?"))
        health = node_b.health()
    finally:
        node_b.stop()
    docs = [s for s in reply.model_extra["kvlib"]["segments"] if s["kind"] == "document"]
    assert len(docs) == len(DOCS) and all(s["fate"] == "hit" for s in docs), docs
    assert cached(reply) >= sum(s["tokens"] for s in docs)
    assert health["pending_stores"] == 0 and health["status"] == "ok", health
    assert (health["upload_queue"], health["sync_error"]) == (0, None), health
    assert alice_chunks(cluster) == stored, "node B encoded and stored nothing"
    if kind == "services":
        fetched = list((cluster.home("b") / "blobs").rglob("*.safetensors"))
        assert len(fetched) >= len(DOCS), "B's hits came from S3 into its local tier"


@pytest.mark.services
@requires_services
def test_cluster_serve_script_check(tmp_path, smol_home):
    from kvlib.serve.loadgen import HOTPOT

    if not HOTPOT.is_file():
        pytest.skip("shared/data/hotpotqa not beside the repo (the load sessions' questions)")
    (smol_home / "models").mkdir(exist_ok=True)
    run = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "cluster_serve.py"), "--check",
                          "--root", str(tmp_path), "--models", str(smol_home / "models"),
                          "--services-env", str(ENV_FILE)], capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stdout + run.stderr[-4000:]
    summary = json.loads((tmp_path / "serve-load" / "summary.json").read_text())
    a, cold, warm = summary["runs"]
    assert cold["cached_tokens"] > 0 and warm["cached_share"] >= cold["cached_share"] > 0, summary["runs"]
    assert warm["chunks_after"] == a["chunks_after"] > 0
    assert "node B, cold local tier" in (tmp_path / "serve-load" / "summary.md").read_text()
