"""The one door: every real path (query, bench, doctor) goes through Engine.answer, and a
mode name resolves to the same spec in every command."""

from __future__ import annotations

import json

import pytest
import torch

from kvlib.engine.session import Engine
from kvlib.engine.spec import ALL_MODES, ModeSpec, parse_mode, parse_modes
from kvlib.errors import InputError
from tiny_models import random_ids, tiny_lm


def tiny_engine(family: str, n_context: int) -> Engine:
    """An Engine around a tiny random model (no tokenizer): E is n_context random ids."""
    from kvlib.engine.prompt import PromptTemplate

    lm, _ = tiny_lm(family, "default")
    return Engine(lm, PromptTemplate(context_ids=tuple(random_ids(n_context, 1).tolist()), suffix_text=""))


class AnswerSpy:
    """Wraps the real Engine.answer (it still runs) and records each call's spec and result."""

    def __init__(self, monkeypatch):
        self.calls, real = [], Engine.answer

        def spy(engine, spec, *args, **kwargs):
            gen = real(engine, spec, *args, **kwargs)
            self.calls.append((spec, gen))
            return gen

        monkeypatch.setattr(Engine, "answer", spy)


@pytest.mark.slow
def test_kvlib_query_answers_through_engine_answer(ingested_home, kvlib_cli, monkeypatch):
    spy = AnswerSpy(monkeypatch)
    result = kvlib_cli("query", "How many arches does the Skelder Viaduct have?", "--home", ingested_home[0],
                       "--k", 2, "--json", "--dtype", "float32", "--max-new-tokens", 4)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert len(spy.calls) == 1, "query must make exactly one pass through the door"
    spec, gen = spy.calls[0]
    assert out["spec"] == spec.as_dict() and out["tokens"] == gen.tokens and out["ttft_s"] == gen.ttft_s


VIADUCT = """The Skelder Viaduct

The Skelder Viaduct carries the main line across the Tarrow Gorge on eleven stone arches. It was built between
1861 and 1864 and reopened in 2023 after a fourteen-month restoration.

The Tarrow Gorge is forty metres deep at the viaduct, and the river below floods most winters.
"""


@pytest.fixture(scope="module")
def small_home(tmp_path_factory, make_home, smol_stack):
    """A home of its own (modes that read other encodings store chunks on the spot: not in the shared one)."""
    from kvlib.rag.ingest import Ingestor

    root = tmp_path_factory.mktemp("door")
    (root / "docs").mkdir()
    (root / "docs" / "viaduct.txt").write_text(VIADUCT)
    home = make_home(root)
    stack = smol_stack(home)
    try:
        Ingestor(stack.engine, stack.library, stack.index, stack.embedder, chunk_tokens=48).run([root / "docs"])
    finally:
        stack.close()
    return home


@pytest.mark.slow
@pytest.mark.parametrize("mode", ALL_MODES)
def test_query_json_reports_the_resolved_spec_of_every_mode(mode, small_home, kvlib_cli, smol_engine):
    """The same mode name resolves to the same spec in query as in bench (tested there on the same names)."""
    question = "How many arches does the Skelder Viaduct have?"
    result = kvlib_cli("query", question, "--home", small_home, "--k", 2, "--mode", mode, "--json",
                       "--dtype", "float32", "--max-new-tokens", 2)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["spec"] == parse_mode(mode).as_dict() and out["mode"] == parse_mode(mode).name
    t = out["tokens"]
    assert t["computed"] >= len(smol_engine.suffix_ids(question)), t
    if parse_mode(mode).base == "full":
        assert t["cached"] == t["recomputed"] == 0, t


def test_bench_mode_runner_and_doctor_answer_through_the_door(monkeypatch):
    from kvlib.bench.modes import ModeRunner, PromptItem
    from kvlib.engine.doctor import time_ttft

    engine = tiny_engine("llama", 4)
    spy = AnswerSpy(monkeypatch)
    chunks = [engine.encode(random_ids(n, n)) for n in (6, 9)]
    time_ttft(engine, chunks, "rerope", random_ids(3, 2).tolist())
    assert [s.name for s, _ in spy.calls] == ["rerope+sink"]
    item = PromptItem("r", "given", [c.token_ids.tolist() for c in chunks], {}, random_ids(3, 2).tolist(),
                      [5, 6], ("x",))
    ModeRunner(engine, library=None, max_new_tokens=2).run(item, parse_mode("full"))
    assert [s.name for s, _ in spy.calls] == ["rerope+sink", "full"]


def test_answer_accounting_adds_up_and_a_miss_is_computed_in_context():
    """A chunk without KV is computed in context: the result equals full recompute exactly."""
    from kvlib.engine.compose import ChunkKV

    engine = tiny_engine("qwen2", 5)
    ids = [random_ids(n, 10 + n) for n in (7, 11, 5)]
    chunks = [engine.encode(i) for i in ids]
    suffix = random_ids(4, 9).tolist()
    full = engine.answer(parse_mode("full"), chunks, suffix_ids=suffix, max_new_tokens=1)
    assert full.tokens == {"cached": 0, "recomputed": 0, "computed": 5 + 23 + 4}
    # every chunk a miss: all computed in context, which is full recompute
    misses = [ChunkKV(i, None, None) for i in ids]
    allmiss = engine.answer(parse_mode("rerope"), misses, suffix_ids=suffix, max_new_tokens=1)
    torch.testing.assert_close(allmiss.first_logits, full.first_logits, atol=1e-4, rtol=1e-4)
    assert allmiss.tokens == {"cached": 5, "recomputed": 0, "computed": 23 + 4}, "E is cached, misses computed"
    mixed = engine.answer(parse_mode("rerope+boundary:3"), [chunks[0], misses[1], chunks[2]], suffix_ids=suffix,
                          max_new_tokens=1)
    assert mixed.tokens == {"cached": 5 + 7 + 5 - 3, "recomputed": 3, "computed": 11 + 4}, mixed.tokens
    assert sum(mixed.tokens.values()) == 5 + 23 + 4


def test_hits_around_a_miss_are_rotated_to_their_own_positions():
    """Runs of hits are copied in and rotated as one span each: every hit's slots hold exactly
    apply_rope of its stored keys at its own positions, whatever misses break the runs."""
    from kvlib.engine.compose import ChunkKV, compose
    from kvlib.engine.rope import apply_rope

    engine = tiny_engine("llama", 4)
    chunks = [engine.encode(random_ids(n, 30 + n)) for n in (6, 3, 9, 5)]
    layout = [chunks[0], chunks[1], ChunkKV(chunks[2].token_ids, None, None), chunks[3]]
    composed = compose(engine.lm, engine.context, layout, "rerope")
    for (slot, n), c in zip(composed.spans, layout):
        if c.k_sem is None:
            continue
        keys, values = composed.cache.read(slot, slot + n)
        want = apply_rope(c.k_sem.to(engine.lm.dtype), torch.arange(slot, slot + n), engine.lm.rope)
        assert torch.equal(keys, want) and torch.equal(values, c.v.to(engine.lm.dtype)), f"chunk at slot {slot}"
    assert composed.misses == [(4 + 6 + 3, 2)] and composed.cached_tokens == 4 + 6 + 3 + 5


@pytest.mark.parametrize("name, spec", [
    ("rerope", ModeSpec("rerope", "sink")), ("rerope+bare", ModeSpec("rerope", "bare")),
    ("naive+lead", ModeSpec("naive", "lead")), ("rerope+auto:0.7", ModeSpec("rerope", "sink", "auto:0.7")),
    ("rerope+lead+boundary:8+query:0.05", ModeSpec("rerope", "lead", "boundary:8+query:0.05")),
    ("full", ModeSpec("full", "sink")), ("prefix", ModeSpec("prefix", "sink")),
])
def test_one_grammar(name, spec):
    assert parse_mode(name) == spec and parse_mode(spec.name) == spec, "the canonical name parses back"


@pytest.mark.parametrize("bad", ["sideways", "full+auto", "prefix+bare", "rerope+sink+lead", "rerope+blend:2"])
def test_bad_modes_are_refused(bad):
    with pytest.raises(InputError, match="unknown"):
        parse_mode(bad)


def test_all_modes_are_distinct_specs():
    assert len(parse_modes("all")) == len(ALL_MODES)
    assert parse_modes("rerope,rerope+sink,full") == [ModeSpec("rerope", "sink"), ModeSpec("full", "sink")]


def test_batched_decode_equals_each_stream_alone():
    """Three prompts decoded together (one batched forward per step) give each one's own tokens."""
    from kvlib.engine.compose import compose
    from kvlib.engine.generate import advance, finish, generate, start

    engine = tiny_engine("llama", 4)
    lm = engine.lm
    prompts = [[engine.encode(random_ids(n, 50 + n))] for n in (5, 9, 13)]
    suffixes = [random_ids(3, 60 + i).tolist() for i in range(3)]
    alone = [generate(lm, compose(lm, engine.context, c, "rerope"), q, max_new_tokens=6).token_ids
             for c, q in zip(prompts, suffixes)]
    streams = [start(lm, compose(lm, engine.context, c, "rerope"), q, max_new_tokens=6)
               for c, q in zip(prompts, suffixes)]
    live = streams
    while live:
        live = advance(lm, live)
    assert [finish(s).token_ids for s in streams] == alone and all(len(t) == 6 for t in alone)
