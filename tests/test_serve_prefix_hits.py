"""The server's prefix cache (kvlib/serve/prefix_hits.py), in process on the float32 engine: a
conversation's next turn opens with its history's KV, the answer is the one the same request gets
without it (and full recompute's where the composition is exact), and no tenant opens with
another's. Each test asserts the prefix hit happened where it must, so none passes without it."""

from __future__ import annotations

import pytest

from kvlib.serve.library_link import LibraryLink
from kvlib.store import Library

pytestmark = pytest.mark.slow

DOC_A = ("Aberlow Mill was a water-powered flax mill on the river Senn, built in 1794 by the Harrow family "
         "and closed in 1911 after a flood destroyed its wheel. Its weir was rebuilt in 1903.")
DOC_B = ("The Brennock ferry crosses the sound twice a day; its first boat, the Maid of Ost, was launched "
         "in 1926 and carried forty passengers to the island of Fennick.")


@pytest.fixture
def pipelines(tmp_path, smol_engine):
    """pipe(spec, prefix_mb) -> a Pipeline on its own library home; all closed at the end."""
    from kvlib.serve.pipeline import Pipeline

    links = []

    def pipe(spec: str = "rerope", prefix_mb: float = 64):
        link = LibraryLink(lambda home=tmp_path / f"home{len(links)}": Library(home), retry_s=0.2).start()
        links.append(link)
        return Pipeline(smol_engine, link, spec=spec, prefix_bytes=int(prefix_mb * (1 << 20)))

    yield pipe
    for link in links:
        link.close()


def converse(pipeline, tenant: str, turns: list[str], system: str, max_tokens: int = 8) -> list:
    """Each turn's Completion; the next turn carries the earlier questions and answers."""
    messages, done = [{"role": "system", "content": system}], []
    for text in turns:
        messages.append({"role": "user", "content": text})
        out = pipeline.complete(list(messages), tenant, max_tokens=max_tokens)
        messages.append({"role": "assistant", "content": out.text})
        done.append(out)
    return done


def prefix_tokens(completion) -> int:
    return sum(s["tokens"] for s in completion.kvlib["segments"] if s["kind"] == "prefix")


TURNS = [f"Document [1](Title: Aberlow Mill) {DOC_A}\n\nQuestion: When was the mill built?",
         f"Document [1](Title: Brennock Ferry) {DOC_B}\n\nDocument [2](Title: Aberlow Mill) {DOC_A}\n\n"
         "Question: What was the first ferry called?"]


def test_the_next_turn_opens_with_its_history_and_answers_as_without_it(pipelines):
    with_prefix = converse(pipelines(), "alice", TURNS, "Answer from the documents.")
    without = converse(pipelines(prefix_mb=0), "alice", TURNS, "Answer from the documents.")
    first, second = with_prefix
    assert prefix_tokens(first) == 0 and prefix_tokens(without[1]) == 0
    assert prefix_tokens(second) >= first.prompt_tokens - 16, "turn 2 opens with turn 1's prompt (whole blocks)"
    assert second.cached_tokens > without[1].cached_tokens, "the history's glue is served too"
    assert [c.token_ids for c in with_prefix] == [c.token_ids for c in without]


def test_a_prefix_over_an_exact_composition_gives_full_recomputes_tokens(pipelines):
    """One document right behind E (exact, DESIGN invariant 2), then a follow-up: the prefix holds
    that exact KV and the answer's, and turn 2's greedy tokens are full recompute's."""
    from kvlib.engine.model import SYSTEM_PROMPT

    turns = [f"{DOC_A}\n\nQuestion: When was the weir rebuilt?", "And when did the mill close?"]
    reuse = converse(pipelines(), "alice", turns, SYSTEM_PROMPT, max_tokens=12)
    full = converse(pipelines(spec="full"), "alice", turns, SYSTEM_PROMPT, max_tokens=12)
    assert prefix_tokens(reuse[1]) > reuse[0].prompt_tokens - 16
    assert [c.token_ids for c in reuse] == [c.token_ids for c in full]
    assert prefix_tokens(full[1]) == 0, "full recompute (the no-reuse baseline) keeps nothing"


def test_the_prefix_base_is_prefix_caching_alone(pipelines):
    """`--mode prefix`: the cache without the library; any conversation's next turn is exact."""
    prefix = converse(pipelines(spec="prefix"), "alice", TURNS, "Answer from the documents.")
    full = converse(pipelines(spec="full"), "alice", TURNS, "Answer from the documents.")
    assert prefix[0].cached_tokens == 0 and prefix_tokens(prefix[1]) >= prefix[0].prompt_tokens - 16
    assert prefix[1].cached_tokens == prefix_tokens(prefix[1]), "nothing but the prefix is served from cache"
    assert [c.token_ids for c in prefix] == [c.token_ids for c in full]


def test_no_tenant_opens_with_another_tenants_conversation(pipelines):
    pipe = pipelines()
    alice = converse(pipe, "alice", TURNS, "Answer from the documents, please.")
    assert prefix_tokens(alice[1]) > 0
    bob = pipe.complete([{"role": "system", "content": "Answer from the documents, please."},
                         {"role": "user", "content": TURNS[0]}, {"role": "assistant", "content": alice[0].text},
                         {"role": "user", "content": TURNS[1]}], "bob", max_tokens=8)
    assert prefix_tokens(bob) == 0 and bob.cached_tokens == 0, "bob must open with nothing of alice's"


def test_read_only_callers_keep_nothing_and_the_budget_holds(pipelines):
    pipe = pipelines(prefix_mb=2)  # two blocks: one of SmolLM2's float32 KV is 0.7 MiB
    pipe.complete([{"role": "user", "content": TURNS[0]}], "public", max_tokens=4, may_store=False)
    assert pipe.prefix_hits.bytes == 0, "an anonymous caller's prompt is not kept"
    converse(pipe, "alice", TURNS, "Answer from the documents.")
    assert 0 < pipe.prefix_hits.bytes <= 2 << 20


def test_exact_prefix_caching_never_opens_with_a_rerope_composition(pipelines):
    """A request in mode `prefix` (a request's kvlib.mode) opens only with KV that mode kept: a rerope
    answer's composition is not exact prefix caching's KV."""
    from kvlib.engine.spec import parse_mode

    pipe = pipelines()  # the server's default: rerope
    first = converse(pipe, "alice", TURNS[:1], "Answer from the documents.")[0]
    messages = [{"role": "system", "content": "Answer from the documents."}, {"role": "user", "content": TURNS[0]},
                {"role": "assistant", "content": first.text}, {"role": "user", "content": TURNS[1]}]
    exact = pipe.complete(messages, "alice", max_tokens=4, spec=parse_mode("prefix"))
    assert prefix_tokens(exact) == 0, "rerope's kept KV is not served to exact prefix caching"
    again = pipe.complete(messages, "alice", max_tokens=4, spec=parse_mode("prefix"))
    assert prefix_tokens(again) >= exact.prompt_tokens - 16, "what mode prefix kept, it opens with"
    rerope = pipe.complete(messages, "alice", max_tokens=4)
    assert prefix_tokens(rerope) >= first.prompt_tokens - 16, "rerope opens with what rerope kept"
