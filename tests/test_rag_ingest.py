"""Integration: `kvlib ingest` on the real SmolLM2 (float32) and temporary homes.

The whole example corpus is ingested once per session (fixture `ingested_home`, about two
minutes on 2 cores); every other test here builds a corpus of a few small documents.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pytest

from rag_helpers import ingest
from kvlib.retrieve.chunker import chunk_text
from kvlib.store import Library

pytestmark = pytest.mark.slow

CORPUS = Path(__file__).resolve().parents[1] / "examples" / "corpus"

# Small chunks give a two-page document several chunks, so an edit can leave most of them alone.
SMALL_CHUNK_TOKENS = 64
# Six short documents (one in a subfolder), several 64-token chunks each: the kill lands after
# the first chunk row and well before the last document.
RESUME_DOCS = (
    "aberlow.txt", "ferry_notes.txt", "book_review_the_keepers_daughter.md",
    "saltmere_salt_works.txt", "brennock.txt", "history/letter_from_kell_1911.txt",
)
RESUME_PARAGRAPHS = 3
KILL_WAIT_S = 180


def blob_files(home: Path) -> list[Path]:
    return sorted((home / "blobs").glob("??/*.safetensors"))


def documents(home: Path, tenant: str = "public") -> dict[str, dict]:
    with Library(home) as library:
        return {doc["path"]: doc for doc in library.list_documents(tenant)}


def copy_docs(names, target: Path) -> Path:
    target.mkdir(parents=True)
    for name in names:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(CORPUS / name, target / name)
    return target


def test_ingest_and_query_have_help_text(kvlib_cli):
    for command in ("ingest", "query"):
        result = kvlib_cli(command, "--help")
        assert result.exit_code == 0, result.output
        assert "--home" in result.stdout and "--json" in result.stdout and "--tenant" in result.stdout


def test_corpus_ingest_is_idempotent(ingested_home, smol_stack, kvlib_cli):
    home, first = ingested_home
    assert first.documents >= 20 and first.unchanged == 0, first.as_dict()
    assert first.chunks_new > 0 and first.tokens_encoded > 0 and first.bytes_written > 0
    assert all(first.stage_s[k] > 0 for k in ("encode", "drift", "write", "embed")), first.stage_s
    assert sum(first.stage_s.values()) <= first.seconds
    blobs = blob_files(home)
    assert len(blobs) == first.chunks_new, "every new chunk is one blob file"
    with Library(home) as library:  # every chunk, a document's first included, has its ingest drift score
        scores = [row["drift_score"] for row in library.db.query("SELECT drift_score FROM chunks")]
    assert len(scores) == len(blobs) and all(s is not None and s > 0 for s in scores), scores[:5]
    stamps = {p: p.stat().st_mtime_ns for p in blobs}
    docs_before = documents(home)
    assert len(docs_before) == first.documents

    second = ingest(smol_stack, home, [CORPUS])
    assert (second.chunks_new, second.tokens_encoded, second.bytes_written) == (0, 0, 0), second.as_dict()
    assert second.unchanged == second.documents == first.documents, "an unchanged document is a no-op"
    assert {p: p.stat().st_mtime_ns for p in blob_files(home)} == stamps, "no blob may be written or rewritten"
    # set_document rewrites a row with a new id: unchanged documents must keep theirs
    assert documents(home) == docs_before

    # The command, on the same home and model: the same no-op, reported as JSON.
    result = kvlib_cli("ingest", CORPUS, "--home", home, "--dtype", "float32", "--json")
    assert result.exit_code == 0, result.output
    third = json.loads(result.stdout)
    assert (third["chunks_new"], third["tokens_encoded"], third["bytes_written"]) == (0, 0, 0), third
    assert third["unchanged"] == third["documents"] == first.documents
    assert len(blob_files(home)) == len(blobs)


def test_changed_file_reencodes_only_its_changed_chunks(tmp_path, smol_stack, smol_engine):
    corpus = copy_docs(["aberlow.txt", "ferry_notes.txt"], tmp_path / "corpus")
    home = tmp_path / "home"
    first = ingest(smol_stack, home, [corpus], chunk_tokens=SMALL_CHUNK_TOKENS)
    assert first.documents == 2 and first.chunks_new > 0
    edited, other = corpus / "aberlow.txt", corpus / "ferry_notes.txt"
    docs_before = documents(home)

    old_text = edited.read_text()
    paragraphs = old_text.split("\n\n")
    middle = len(paragraphs) // 2
    paragraphs[middle] = paragraphs[middle].rstrip() + " The breakwater was repaired again in 1999."
    new_text = "\n\n".join(paragraphs)
    edited.write_text(new_text)

    # The chunks the Ingestor will cut, with its own parameters.
    def chunk_ids(text: str) -> list[tuple[int, ...]]:
        chunks = chunk_text(text, smol_engine.lm.tokenizer, max_tokens=SMALL_CHUNK_TOKENS,
                            min_tokens=max(1, SMALL_CHUNK_TOKENS // 2))
        return [c.token_ids for c in chunks]

    stored = set(chunk_ids(old_text)) | set(chunk_ids(other.read_text()))
    after = chunk_ids(new_text)
    changed = [ids for ids in after if ids not in stored]
    assert 0 < len(set(changed)) < len(after), (
        f"the edit should change some but not all of the {len(after)} chunks (changed {len(changed)})")

    second = ingest(smol_stack, home, [corpus], chunk_tokens=SMALL_CHUNK_TOKENS)
    assert second.chunks_new == len(set(changed)), second.as_dict()
    assert second.tokens_encoded == sum(len(ids) for ids in changed) > 0, second.as_dict()
    assert second.chunks_dedup == len(after) - len(set(changed)), second.as_dict()
    assert second.documents == 2 and second.unchanged == 1, second.as_dict()
    assert len(blob_files(home)) == first.chunks_new + second.chunks_new

    docs_after = documents(home)
    assert docs_after[str(other)] == docs_before[str(other)], "the other document must not be touched"
    assert docs_after[str(edited)]["content_hash"] != docs_before[str(edited)]["content_hash"]
    stack = smol_stack(home)
    try:
        keys = [stack.library.key_for(tenant="public", public=False, model_fp=smol_engine.lm.fingerprint,
                                      context_id=smol_engine.context_id, token_ids=ids).hex for ids in after]
        assert stack.library.document("public", str(edited))["chunk_keys"] == keys
        # The index holds the new version of the edited document and nothing of the old one.
        hits = stack.index.search(stack.embedder.embed_query(new_text[:200]), 1000, "public")
        assert sorted(h.chunk_key for h in hits if h.doc_path == str(edited)) == sorted(set(keys))
    finally:
        stack.close()


def test_bad_files_are_skipped_with_reasons(tmp_path, make_home, smol_stack, kvlib_cli):
    corpus = tmp_path / "mixed"
    corpus.mkdir()
    good = corpus / "good.txt"
    good.write_text("The Kittiwake II sails from Aberlow harbour to Fennick Island on Saturdays in July.\n")
    (corpus / "binary.txt").write_bytes(b"PK\x03\x04\x14\x00\x00\x00binary\x00payload")
    (corpus / "empty.md").write_bytes(b"")
    (corpus / "latin1.txt").write_bytes("Caf\u00e9 au lait in Ostrand, sm\u00f6rg\u00e5sbord.\n".encode("latin-1"))
    expected = {"binary.txt": "binary", "empty.md": "empty", "latin1.txt": "UTF-8"}
    home = make_home(tmp_path)

    report = ingest(smol_stack, home, [corpus])
    reasons = {Path(path).name: reason for path, reason in report.skipped}
    assert set(reasons) == set(expected), report.skipped
    for name, word in expected.items():
        assert word in reasons[name], f"{name}: reason {reasons[name]!r} should mention {word!r}"
    assert (report.files, report.documents, report.chunks_new) == (4, 1, 1), report.as_dict()
    assert list(documents(home)) == [str(good)]

    result = kvlib_cli("ingest", corpus, "--home", home, "--dtype", "float32", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert {Path(s["path"]).name: s["reason"] for s in out["skipped"]} == reasons
    assert (out["documents"], out["unchanged"], out["chunks_new"]) == (1, 1, 0), out

    # Without --json each skipped file gets a line on stderr; stdout keeps the summary.
    result = kvlib_cli("ingest", corpus, "--home", home, "--dtype", "float32")
    assert result.exit_code == 0, result.output
    flat = "".join(result.stderr.split())  # rich wraps long paths, at a space or inside a word
    assert all("".join(f"skipped {corpus / name}: {reasons[name]}".split()) in flat for name in expected), result.stderr
    assert "1 documents" in result.stdout and "3 files with skipped input" in result.stdout, result.stdout


def count_chunk_rows(home: Path) -> int:
    """Chunk rows in the manifest a running ingest is writing (0 until its schema exists)."""
    path = home / "manifest.sqlite"
    if not path.exists():
        return 0
    try:
        with closing(sqlite3.connect(path, timeout=1)) as db:
            return db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
    except sqlite3.Error:
        return 0


def kvlib_command(*args) -> list[str]:
    """The installed console script beside this interpreter (.venv/bin/kvlib)."""
    return [str(Path(sys.executable).parent / "kvlib"), *map(str, args)]


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVLIB_")}
    return {**env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def short_corpus(target: Path) -> Path:
    """The opening paragraphs of six corpus documents (one in a subfolder): ~1.5k tokens."""
    for name in RESUME_DOCS:
        path = target / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n\n".join((CORPUS / name).read_text().split("\n\n")[:RESUME_PARAGRAPHS]) + "\n")
    return target


def test_killed_ingest_resumes(tmp_path, make_home, smol_embedder, kvlib_cli):
    corpus = short_corpus(tmp_path / "corpus")
    home = make_home(tmp_path)
    # float32 pins the fingerprint to the session engine's, which the reruns below use.
    args = ("ingest", corpus, "--home", home, "--chunk-tokens", SMALL_CHUNK_TOKENS, "--dtype", "float32", "--json")

    proc = subprocess.Popen(kvlib_command(*args), cwd=tmp_path, env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + KILL_WAIT_S
        while count_chunk_rows(home) == 0 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, f"ingest ended before it could be killed: {proc.stderr.read()}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(60)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    rows_at_kill = count_chunk_rows(home)
    docs_at_kill = len(documents(home))
    assert rows_at_kill > 0 and docs_at_kill < len(RESUME_DOCS), (rows_at_kill, docs_at_kill)

    result = kvlib_cli(*args)  # the same command again, to completion
    assert result.exit_code == 0, result.output
    second = json.loads(result.stdout)
    with Library(home) as library:
        paths = {doc["path"]: doc for doc in library.list_documents("public")}
        assert sorted(paths) == sorted(str(corpus / name) for name in RESUME_DOCS)
        n_chunks = len(library.list_chunks("public"))
        library.gc()
        assert library.verify() == []
        assert len(library.list_chunks("public")) == n_chunks, "gc must not find finished chunks orphaned"
    # Finished documents were skipped and stored chunks reused: only the rest was encoded.
    assert second["unchanged"] == docs_at_kill, second
    assert second["chunks_new"] + rows_at_kill == n_chunks, (second, rows_at_kill, n_chunks)
    assert second["chunks_dedup"] >= rows_at_kill, second

    # The index holds every chunk of every document, whatever the kill interrupted.
    from kvlib.retrieve.index import VectorIndex

    with closing(VectorIndex(home / "index")) as index:
        hits = index.search(smol_embedder.embed_query("Aberlow harbour"), 10_000, "public")
    assert {h.doc_path for h in hits} == set(paths)
    assert len(hits) == sum(doc["chunks"] for doc in paths.values())

    result = kvlib_cli(*args)
    assert result.exit_code == 0, result.output
    third = json.loads(result.stdout)
    assert (third["chunks_new"], third["tokens_encoded"], third["bytes_written"]) == (0, 0, 0), third
    assert third["unchanged"] == len(RESUME_DOCS), third
