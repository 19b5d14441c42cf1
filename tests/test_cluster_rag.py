"""Two nodes over one library, with the real SmolLM2: ingest on A, answer on B; concurrent ingests;
a manifest outage seen from the CLI.

Nodes are separate homes. With the services they share the S3 prefix and the PostgreSQL
database (through KVLIB_STORE / KVLIB_MANIFEST, as an operator would set them); with the
defaults "sharing" is one home, which is how the embedded library is shared.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import CORPUS
from rag_helpers import ingest
from services_helpers import kvlib_command, make_cluster, requires_services, services

pytestmark = pytest.mark.slow
KINDS = ["default", pytest.param("services", marks=[pytest.mark.services, requires_services])]
DOCS_A = [CORPUS / "ferry_notes.txt", CORPUS / "aberlow.txt"]
DOCS_B = [CORPUS / "aberlow.txt", CORPUS / "brennock.txt"]  # overlaps A's on aberlow.txt
QUESTION = "Where does the ferry leave from?"


@pytest.fixture(params=KINDS)
def cluster(request, tmp_path, monkeypatch):
    found = make_cluster(request.param, tmp_path, monkeypatch)
    if found.kind == "services":
        monkeypatch.setenv("KVLIB_STORE", found.store)
        monkeypatch.setenv("KVLIB_MANIFEST", found.manifest)
    return found


def _node_home(cluster, make_home, node: str) -> Path:
    home = cluster.home(node)
    return home if home.exists() else make_home(home.parent, home.name)


def test_node_b_answers_from_node_a_kv_without_encoding(cluster, make_home, smol_stack):
    from kvlib.rag.query import QueryRunner

    report = ingest(smol_stack, _node_home(cluster, make_home, "a"), DOCS_A)
    assert report.chunks_new > 0
    stack = smol_stack(_node_home(cluster, make_home, "b"))
    try:
        runner = QueryRunner(stack.engine, stack.library, stack.index, stack.embedder)
        hits = runner.retrieve(QUESTION, 3)
        assert {Path(h.doc_path).name for h in hits} <= {p.name for p in DOCS_A} and hits, hits
        from kvlib.engine.spec import parse_mode

        loaded = runner.load(hits, parse_mode("rerope"))
        assert not any(c.fresh for c in loaded.chunks) and not loaded.warnings, \
            "node B must reuse A's KV, encoding nothing"
        answer = runner.answer(QUESTION, k=3, max_new_tokens=8, hits=hits)
        context = sum(c.n_tokens for c in loaded.chunks)
        assert answer.tokens["cached"] >= context and answer.sources, (answer.tokens, context)
    finally:
        stack.close()


def _ingest_process(cluster, home: Path, docs: list[Path]) -> subprocess.Popen:
    return subprocess.Popen(kvlib_command("ingest", *docs, "--home", home, "--dtype", "float32", "--json"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cluster.node_env())


@pytest.mark.services
@requires_services
def test_concurrent_ingests_on_two_nodes_store_every_chunk_once(tmp_path, monkeypatch, make_home):
    cluster = make_cluster("services", tmp_path, monkeypatch)
    homes = [make_home(tmp_path, "home-a"), make_home(tmp_path, "home-b")]
    runs = [_ingest_process(cluster, home, docs) for home, docs in zip(homes, (DOCS_A, DOCS_B))]
    outputs = [run.communicate(timeout=900) for run in runs]
    for run, (out, err) in zip(runs, outputs):
        assert run.returncode == 0, err
    reports = [json.loads(out) for out, _ in outputs]
    with cluster.library("a") as library:
        rows = library.list_chunks()
        assert library.verify() == []
        docs = {Path(d["path"]).name for d in library.list_documents()}
    assert sum(r["chunks_new"] for r in reports) == len(rows), "each chunk is new on exactly one node"
    assert cluster.stored_objects() == {r["key"] for r in rows}, "one object per chunk row, none extra"
    assert docs == {p.name for p in DOCS_A + DOCS_B}


@pytest.mark.services
@requires_services
def test_postgres_down_fails_one_line_exit_1_and_changes_nothing(tmp_path, monkeypatch, make_home):
    cluster = make_cluster("services", tmp_path, monkeypatch)
    home = make_home(tmp_path, "home-a")
    cluster.library("a").close()  # the manifest exists and is migrated before the outage
    services("down", "postgres")
    try:
        runs = [subprocess.run(kvlib_command(*args, "--home", home), capture_output=True, text=True,
                               env=cluster.node_env(), timeout=300)
                for args in (["ingest", DOCS_A[0], "--dtype", "float32"], ["stats"], ["sync"])]
    finally:
        services("up", "postgres")
    for run in runs:
        lines = run.stderr.strip().splitlines()
        assert run.returncode == 1 and len(lines) == 1, run.stderr
        assert lines[0].startswith("error: cannot reach manifest postgresql://"), lines
        assert "Traceback" not in run.stderr
    with cluster.library("a") as library:
        assert library.list_chunks() == [] and library.list_documents() == [], "a failed command changed nothing"
    assert not list((home / "blobs").rglob("*.safetensors")) and cluster.stored_objects() == set()
