"""`kvlib bench --ingest`: ingest throughput against plain prefill of the very same chunks."""

from __future__ import annotations

import json

PARAGRAPHS = [
    "The Skelder lighthouse was first lit in 1871. Its keeper kept a log of every ship that passed the point.",
    "In the winter of 1890 the lamp failed twice, and the harbour board paid for a new lens from Paris.",
    "The keeper's daughter later wrote a short history of the light, which the town library still holds.",
]


def write_corpus(root):
    corpus = root / "corpus"
    corpus.mkdir()
    (corpus / "light.txt").write_text("\n\n".join(PARAGRAPHS) + "\n")
    (corpus / "copy.md").write_text("\n\n".join(PARAGRAPHS) + "\n")  # every chunk already stored: ingest dedups
    (corpus / "other.txt").write_text("A different note about tides.\n\nIt has two paragraphs of its own.\n")
    return corpus


def test_ingest_speed_times_the_chunks_ingest_encodes(tmp_path, smol_engine, smol_embedder):
    from kvlib.bench.ingest_speed import corpus_chunks, report_lines, run_ingest_speed

    corpus = write_corpus(tmp_path)
    chunks = corpus_chunks(smol_engine, [corpus], 24)
    assert sum(1 for c in chunks if not c) == 1, "the copy's chunks are all deduplicated"
    # run_ingest_speed raises if ingest encoded other tokens than the prefill runs timed
    r = run_ingest_speed(tmp_path, smol_engine, [corpus], chunk_tokens=24, repeats=2, embedder=smol_embedder)
    assert r["tokens"] == sum(len(c.token_ids) for doc in chunks for c in doc) > 0
    assert r["chunks"] == sum(len(doc) for doc in chunks) >= 3
    for role in ("prefill_alone", "prefill_packed", "ingest"):
        assert len(r["runs_s"][role]) == 2 and r["tok_s"][role] == r["tokens"] / r["seconds"][role]
    assert r["ingest_vs_prefill_packed"] == r["tok_s"]["ingest"] / r["tok_s"]["prefill_packed"]
    assert set(r["ingest_stage_s"]) == {"encode", "drift", "write", "embed"}
    assert not list(tmp_path.glob(".bench-ingest-*")), "the temporary homes are removed"
    assert any(line.startswith("| kvlib ingest") for line in report_lines(r))


def test_bench_ingest_cli_writes_its_report(tmp_path, kvlib_cli, make_home):
    corpus = write_corpus(tmp_path)
    out = tmp_path / "out"
    result = kvlib_cli("bench", "--ingest", corpus, "--repeats", "1", "--dtype", "float32",
                       "--home", make_home(tmp_path), "--out", out, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["repeats"] == 1
    assert (out / "ingest.md").read_text().startswith("# Ingest throughput")


def test_bench_ingest_refuses_a_missing_path(tmp_path, kvlib_cli):
    result = kvlib_cli("bench", "--ingest", tmp_path / "nope", "--home", tmp_path / "h")
    assert result.exit_code == 1 and "path not found" in result.output
