"""Integration: `kvlib query` (and tenant isolation through retrieval) on the real SmolLM2.

The CLI runs in-process (CliRunner) with `--dtype float32`, so it loads the same model
fingerprint as the session engine that ingested the homes, and the stored KV is served.
"""

from __future__ import annotations

import json
import secrets
import shutil
from pathlib import Path

import pytest

from rag_helpers import ingest
from kvlib.engine.spec import parse_mode
from kvlib.rag.query import QueryRunner
from kvlib.store import Library
from kvlib.store.keys import ChunkKey

pytestmark = pytest.mark.slow

CORPUS = Path(__file__).resolve().parents[1] / "examples" / "corpus"
MODEL_NAME = "SmolLM2-135M-Instruct"
MAX_NEW = 12
STAGES = ("retrieval", "load", "compose", "repair", "prefill")


def corpus_questions(n: int) -> list[str]:
    """The first n questions of examples/corpus/questions.jsonl whose answer is in one document."""
    records = [json.loads(line) for line in (CORPUS / "questions.jsonl").read_text().splitlines() if line.strip()]
    return [r["question"] for r in records if isinstance(r["doc"], str)][:n]


def query_json(kvlib_cli, home: Path, question: str, *args) -> dict:
    result = kvlib_cli("query", question, "--home", home, "--json", "--dtype", "float32",
                       "--max-new-tokens", MAX_NEW, *args)
    assert result.exit_code == 0 and result.exception is None, result.output
    return json.loads(result.stdout)


def assert_answer_schema(out: dict, mode: str, k: int) -> None:
    required = {"answer", "mode", "spec", "ttft_s", "timings", "sources", "tokens", "model"}
    assert required <= set(out), f"missing fields {required - set(out)}"
    assert isinstance(out["answer"], str) and out["model"] == MODEL_NAME
    spec = parse_mode(mode)
    assert out["mode"] == spec.name and out["spec"] == spec.as_dict(), (out["mode"], out["spec"])
    assert set(STAGES) <= set(out["timings"]), out["timings"]
    assert all(isinstance(out["timings"][s], float) and out["timings"][s] >= 0 for s in STAGES), out["timings"]
    # The stages split TTFT exactly (prefill is defined as what the others leave).
    assert out["ttft_s"] > 0 and sum(out["timings"][s] for s in STAGES) == pytest.approx(out["ttft_s"], abs=1e-6)
    assert len(out["sources"]) == k
    for source in out["sources"]:
        assert set(source) == {"doc", "key", "score"}, source
        assert Path(source["doc"]).is_relative_to(CORPUS), source
        assert len(source["key"]) == 64 and int(source["key"], 16) >= 0, source
        assert isinstance(source["score"], float) and -1.0 <= source["score"] <= 1.0, source
    assert set(out["tokens"]) == {"cached", "recomputed", "computed"}
    assert all(isinstance(v, int) and v >= 0 for v in out["tokens"].values()), out["tokens"]


# -- query --json -------------------------------------------------------------------


@pytest.mark.parametrize("question", corpus_questions(2))
def test_query_json_rerope_with_one_chunk_equals_full(question, ingested_home, smol_engine, kvlib_cli):
    home, _ = ingested_home
    rerope = query_json(kvlib_cli, home, question, "--k", 1, "--mode", "rerope")
    full = query_json(kvlib_cli, home, question, "--k", 1, "--mode", "full")
    assert_answer_schema(rerope, "rerope", k=1)
    assert_answer_schema(full, "full", k=1)
    assert rerope["sources"] == full["sources"], "both modes must answer from the same retrieved chunk"
    assert rerope["warnings"] == full["warnings"] == []

    suffix = len(smol_engine.suffix_ids(question))
    # rerope: every context token served from the library, only the question computed.
    assert rerope["tokens"]["computed"] == suffix and rerope["tokens"]["cached"] > 0, rerope
    # full: the very same ids, all computed.
    assert full["tokens"] == {"cached": 0, "recomputed": 0, "computed": rerope["tokens"]["cached"] + suffix}, full
    # One chunk right behind the encoding context is exact composition (DESIGN invariant 2).
    assert rerope["answer"], "empty answer"
    assert rerope["answer"] == full["answer"], f"rerope {rerope['answer']!r} != full {full['answer']!r}"


def test_query_compare_json(ingested_home, kvlib_cli):
    home, _ = ingested_home
    question = corpus_questions(3)[2]
    out = query_json(kvlib_cli, home, question, "--k", 1, "--compare")
    assert_answer_schema(out, "rerope", k=1)
    compare = out["compare"]
    assert_answer_schema(compare["full"], "full", k=1)
    assert compare["full"]["sources"] == out["sources"]
    assert compare["ttft_ratio"] == pytest.approx(compare["full"]["ttft_s"] / out["ttft_s"])
    assert compare["same_answer"] is True and compare["full"]["answer"] == out["answer"]


def test_query_counts_one_use_of_each_chunk_it_served(ingested_home, kvlib_cli):
    """The use counts (eviction's recency and hits) are written after the answer, not skipped."""
    home, _ = ingested_home

    def hits(keys):
        return [json.loads(kvlib_cli("inspect", key, "--home", home, "--json").stdout)["hits"] for key in keys]

    keys = [s["key"] for s in query_json(kvlib_cli, home, corpus_questions(1)[0], "--k", 2)["sources"]]
    before = hits(keys)
    assert [s["key"] for s in query_json(kvlib_cli, home, corpus_questions(1)[0], "--k", 2)["sources"]] == keys
    assert hits(keys) == [n + 1 for n in before]


def test_query_ttft_counts_retrieval(ingested_home, kvlib_cli):
    """TTFT runs from the question's arrival: embedding it and searching FAISS are part of it."""
    home, _ = ingested_home
    out = query_json(kvlib_cli, home, corpus_questions(1)[0], "--k", 2)
    # MiniLM embedding one question plus a FAISS search never takes under 0.1 ms.
    assert out["timings"]["retrieval"] > 1e-4, f"TTFT leaves out retrieval: {out['timings']}"
    assert out["ttft_s"] > out["timings"]["retrieval"]


def test_query_streams_answer_and_prints_stages(ingested_home, kvlib_cli):
    home, _ = ingested_home
    question = corpus_questions(1)[0]
    result = kvlib_cli("query", question, "--home", home, "--dtype", "float32", "--k", 2,
                       "--max-new-tokens", MAX_NEW)
    assert result.exit_code == 0, result.output
    text = result.stdout
    for word in ("sources", "TTFT", "retrieval", "load", "compose", "prefill", "tok/s", "cached", "computed"):
        assert word in text, f"{word!r} missing from:\n{text}"


# -- a chunk missing from the library or corrupt ------------------------------------


@pytest.fixture(scope="module")
def pristine_small_home(tmp_path_factory, make_home, smol_stack):
    """One public document (a few chunks) ingested once; tests damage copies of it."""
    root = tmp_path_factory.mktemp("small")
    docs = root / "docs"
    docs.mkdir()
    shutil.copy(CORPUS / "aberlow.txt", docs / "aberlow.txt")
    home = make_home(root)
    report = ingest(smol_stack, home, [docs], chunk_tokens=128)
    assert report.chunks_new > 1
    return home


@pytest.fixture
def small_home(pristine_small_home, tmp_path):
    home = tmp_path / "home"
    shutil.copytree(pristine_small_home, home, symlinks=True)  # the model cache stays a link
    return home


DAMAGE_QUESTION = "Who designed the curved breakwater of Aberlow harbour?"


@pytest.mark.parametrize("damage", ["blob deleted", "blob and row gone (gc)", "blob corrupt"])
def test_damaged_chunk_is_encoded_on_the_spot(damage, small_home, smol_stack, smol_engine, kvlib_cli):
    stack = smol_stack(small_home)
    try:
        hit = QueryRunner(stack.engine, stack.library, stack.index, stack.embedder).retrieve(DAMAGE_QUESTION, 1)[0]
        n_tokens = stack.library.inspect(hit.chunk_key)["tokens"]
        blob = stack.library.blobs.path_for(ChunkKey(hit.chunk_key))
    finally:
        stack.close()
    assert blob.is_file()
    if damage == "blob corrupt":
        data = bytearray(blob.read_bytes())
        data[len(data) // 2 : len(data) // 2 + 16] = bytes(b ^ 0xFF for b in data[len(data) // 2 : len(data) // 2 + 16])
        blob.write_bytes(bytes(data))
    else:
        blob.unlink()
    if damage == "blob and row gone (gc)":
        with Library(small_home) as library:
            assert hit.chunk_key in library.gc().orphan_rows
            assert not library.has(hit.chunk_key)

    out = query_json(kvlib_cli, small_home, DAMAGE_QUESTION, "--k", 1)
    assert_answer_schema_local(out)
    assert out["sources"][0]["key"] == hit.chunk_key
    suffix = len(smol_engine.suffix_ids(DAMAGE_QUESTION))
    assert out["tokens"]["computed"] == suffix + n_tokens > suffix, out
    assert out["tokens"]["cached"] == smol_engine.context.n_tokens, "only the encoding context came from cache"
    if damage == "blob corrupt":
        assert any("corrupt" in w for w in out["warnings"]), out["warnings"]
    elif damage == "blob and row gone (gc)":
        assert out["warnings"] == [], "an absent chunk is not a warning"
    assert blob.is_file(), "the re-encoded chunk must be stored again"
    with Library(small_home) as library:
        assert library.has(hit.chunk_key) and library.verify() == []

    again = query_json(kvlib_cli, small_home, DAMAGE_QUESTION, "--k", 1)
    assert again["tokens"]["computed"] == suffix and again["warnings"] == [], "the stored copy must now be served"
    assert again["answer"] == out["answer"]


def assert_answer_schema_local(out: dict) -> None:
    """Small homes hold documents outside examples/corpus: check everything but the source path."""
    assert {"answer", "mode", "spec", "ttft_s", "timings", "sources", "tokens", "model", "warnings"} <= set(out)
    assert set(STAGES) <= set(out["timings"]) and out["model"] == MODEL_NAME


# -- tenants ------------------------------------------------------------------------

SECRET_DOC = """The Heron Vault

The strongroom beneath the old customs house in Ostrand is opened with the passphrase HERON-4471.
Only the harbour master and her deputy know it; it was last changed on 3 February 2024.
"""
BOB_DOC = """Bob's allotment notes

The leeks at plot 12 in Northmoor were planted on 9 April. The gooseberry bushes need netting
before June, or the blackbirds take everything.
"""
PUBLIC_DOC = """Ostrand customs house

The old customs house on Quay Street was built in 1791 and now holds the city archive. Its
reading room is open to the public on weekdays from 10:00 to 16:00.
"""
SHARED_DOC = "A note both tenants keep privately: the tide table for Brennock is posted at the ferry office.\n"
SECRET_QUESTION = "What is the passphrase that opens the strongroom beneath the customs house?"


@pytest.fixture
def tenant_home(tmp_path, make_home, smol_stack):
    """alice and bob each ingest a private document and the same shared text; alice a public one."""
    docs = {}
    for name, text in {"alice/vault.txt": SECRET_DOC, "bob/allotment.txt": BOB_DOC,
                       "public/customs_house.txt": PUBLIC_DOC, "alice/shared.txt": SHARED_DOC,
                       "bob/shared.txt": SHARED_DOC}.items():
        path = tmp_path / "docs" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        docs[name] = path
    home = make_home(tmp_path)
    ingest(smol_stack, home, [docs["alice/vault.txt"], docs["alice/shared.txt"]], tenant="alice")
    ingest(smol_stack, home, [docs["bob/allotment.txt"], docs["bob/shared.txt"]], tenant="bob")
    ingest(smol_stack, home, [docs["public/customs_house.txt"]], tenant="alice", public=True)
    return home, {name: str(path) for name, path in docs.items()}


def private_keys(library: Library, tenant: str) -> set[str]:
    return {c["key"] for c in library.list_chunks(tenant) if c["owner"] == tenant}


def test_tenant_isolation_through_retrieval(tenant_home, smol_stack, kvlib_cli):
    home, docs = tenant_home
    stack = smol_stack(home)
    try:
        alice_keys, bob_keys = private_keys(stack.library, "alice"), private_keys(stack.library, "bob")
        assert alice_keys and bob_keys and not alice_keys & bob_keys, "private chunks are salted per tenant"
        n_chunks = len(stack.index)

        def runner(tenant):
            return QueryRunner(stack.engine, stack.library, stack.index, stack.embedder, tenant=tenant)

        # Control: the question does find alice's secret for alice.
        alice_hits = runner("alice").retrieve(SECRET_QUESTION, n_chunks + 5)
        assert alice_hits[0].doc_path == docs["alice/vault.txt"], alice_hits

        # k above the number of chunks: bob gets everything he may see, and nothing of alice's.
        answer = runner("bob").answer(SECRET_QUESTION, k=n_chunks + 5, max_new_tokens=MAX_NEW)
        seen_docs = {s["doc"] for s in answer.sources}
        seen_keys = {s["key"] for s in answer.sources}
        assert seen_docs == {docs["bob/allotment.txt"], docs["bob/shared.txt"], docs["public/customs_house.txt"]}
        assert not seen_keys & alice_keys, "bob was served one of alice's chunks"
        assert "4471" not in answer.answer, answer.answer

        public_docs = {h.doc_path for h in runner("public").retrieve(SECRET_QUESTION, n_chunks + 5)}
        assert public_docs == {docs["public/customs_house.txt"]}
    finally:
        stack.close()

    # Inspecting alice's chunk as bob reads exactly like inspecting a key that does not exist.
    secret_key = sorted(alice_keys)[0]
    unknown_key = secrets.token_hex(32)
    as_bob = kvlib_cli("inspect", secret_key, "--tenant", "bob", "--home", home)
    unknown = kvlib_cli("inspect", unknown_key, "--tenant", "bob", "--home", home)
    assert as_bob.exit_code == unknown.exit_code == 1, (as_bob.output, unknown.output)
    assert as_bob.stderr.replace(secret_key, "KEY") == unknown.stderr.replace(unknown_key, "KEY"), (
        as_bob.stderr, unknown.stderr)
    assert as_bob.stdout == unknown.stdout == ""
    as_alice = kvlib_cli("inspect", secret_key, "--tenant", "alice", "--home", home, "--json")
    assert as_alice.exit_code == 0 and json.loads(as_alice.stdout)["owner"] == "alice", as_alice.output


# -- bad input ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, expected_error",
    [
        (["ingest", "{missing}"], "path not found"),
        (["ingest", "{docs}", "{missing}"], "path not found"),
        (["query", "What is the longest river in Varnholm?", "--mode", "sideways"], "unknown mode 'sideways'"),
        (["query", "What is the longest river in Varnholm?"], "no indexed documents"),
        (["ingest", "{docs}", "--tenant", "bad tenant"], "invalid tenant name"),
    ],
)
def test_bad_cli_input_is_one_error_line(args, expected_error, tmp_path, make_home, kvlib_cli):
    """Each bad input ends in one red error line, exit 1, no traceback."""
    home = make_home(tmp_path)  # an empty home (only the model cache)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "note.txt").write_text("A short note about the Ostrand ferry.\n")
    values = {"missing": tmp_path / "nowhere", "docs": docs}
    result = kvlib_cli(*[arg.format(**values) for arg in args], "--home", home, "--dtype", "float32")
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert expected_error in lines[0], lines[0]
    assert "Traceback" not in result.output
