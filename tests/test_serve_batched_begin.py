"""The worker's batched begin (Pipeline.begin(defer=True) for each request, then Pipeline.start for
all): requests whose small prefills (misses computed in context, the question) run in one pass over
the weights give the greedy tokens, token accounting and segment fates each gets alone. In process on
the float32 engine; each test asserts whether the joint pass happened, so none passes without it."""

from __future__ import annotations

import pytest

from kvlib.serve.library_link import LibraryLink
from kvlib.store import Library

pytestmark = pytest.mark.slow

DOCS = ["Aberlow Mill was a water-powered flax mill on the river Senn, built in 1794 by the Harrow family "
        "and closed in 1911 after a flood destroyed its wheel.",
        "The Brennock ferry crosses the sound twice a day; its first boat, the Maid of Ost, was launched in 1926.",
        "Castle Dunmoy stands on a basalt sill above the harbour; its keep was finished in 1402 by Aed Ruadh.",
        "The Lissan observatory's first telescope, a 14-inch refractor, saw first light on 3 March 1888."]


def prompt(order: list[int], question: str, system: str) -> list[dict]:
    docs = "\n\n".join(f"Document [{n}](Title: D{i}) {DOCS[i]}" for n, i in enumerate(order, 1))
    return [{"role": "system", "content": system}, {"role": "user", "content": f"{docs}\n\nQuestion: {question}"}]


REQUESTS = [prompt([1, 0], "When was the mill built?", "Answer briefly."),
            prompt([0, 2, 1], "Who finished the keep?", "Answer from the documents."),
            prompt([3], "When did the telescope see first light?", "Be exact.")]


def pipeline_on(home, engine, misses: str, batch_tokens: int):
    from kvlib.serve.pipeline import Pipeline

    link = LibraryLink(lambda: Library(home), retry_s=0.2).start()
    pipe = Pipeline(engine, link, spec="rerope", misses=misses, prefix_bytes=0, batch_tokens=batch_tokens)
    pipe.complete(prompt([0, 1, 2, 3], "Which is oldest?", "Warm up."), "alice", max_tokens=2)  # stores the documents
    pipe.store_pending()
    return pipe, link


@pytest.mark.parametrize("misses,batch_tokens", [("isolated", 256), ("context", 4096), ("isolated", 0)])
def test_requests_begun_together_answer_as_each_alone(tmp_path, smol_engine, misses, batch_tokens):
    alone_pipe, a_link = pipeline_on(tmp_path / "alone", smol_engine, misses, batch_tokens)
    batch_pipe, b_link = pipeline_on(tmp_path / "batch", smol_engine, misses, batch_tokens)
    try:
        alone = [alone_pipe.complete(m, "alice", max_tokens=10) for m in REQUESTS]
        begun = [batch_pipe.begin(m, "alice", max_tokens=10, defer=True) for m in REQUESTS]
        assert any(p.prepared.deferred and p.prepared.composed.misses for p in begun), "misses wait for the start"
        batch_pipe.start(begun)
        joined = len({p.answering.stream.t_pre for p in begun}) == 1
        assert joined == (batch_tokens > 0), "small prefills run in one pass exactly when batch_tokens allows"
        for p in begun:
            batch_pipe.after_first_token(p)
        live = list(begun)
        while live:
            live = batch_pipe.step(live)
        together = [batch_pipe.finish(p) for p in begun]
    finally:
        a_link.close()
        b_link.close()
    assert any(c.computed_tokens > 20 for c in alone), "some prompt has misses and a question to compute"
    for one, many in zip(alone, together):
        assert many.token_ids == one.token_ids
        assert many.kvlib["tokens"] == one.kvlib["tokens"]
        assert [s["fate"] for s in many.kvlib["segments"]] == [s["fate"] for s in one.kvlib["segments"]]
        split = many.kvlib["ttft_split_s"]
        assert sum(split.values()) == pytest.approx(many.ttft_s, abs=1e-6), "the stages add up to TTFT"
