"""Repair strategies at their extremes are exact: blend:1 and boundary:k>=len equal full; blend:0 equals rerope."""

from __future__ import annotations

import pytest
import torch

from kvlib.engine.compose import compose, encode_chunk, encode_context
from kvlib.engine.generate import prefill
from kvlib.engine.repair import parse_repair
from tiny_models import FAMILIES, random_ids, tiny_lm

TOL = dict(atol=1e-4, rtol=1e-4)


def logits_for(lm, ctx, chunks, q, mode, repair=None):
    composed = compose(lm, ctx, chunks, mode)
    if repair:
        parse_repair(repair)(None if lm is None else type("E", (), {"lm": lm})(), composed, chunks, q)
    out, _, _ = prefill(lm, composed, q, logits="all")
    return out.logits[-len(q):]


def setup(family):
    lm, _ = tiny_lm(family, "default")
    ctx = encode_context(lm, random_ids(5, 30))
    chunks = [encode_chunk(lm, ctx, random_ids(n, 31 + n)) for n in (12, 20, 9)]
    return lm, ctx, chunks, random_ids(6, 40)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("repair", ["blend:1.0", "boundary:64", "boundary:2+query:1.0"])
def test_full_strength_repair_equals_full(family, repair):
    lm, ctx, chunks, q = setup(family)
    ref = logits_for(lm, ctx, chunks, q, "full")
    torch.testing.assert_close(logits_for(lm, ctx, chunks, q, "rerope", repair), ref, **TOL,
                               msg=f"{repair} recomputes every token yet differs from full")


@pytest.mark.parametrize("family", FAMILIES)
def test_blend_zero_is_rerope(family):
    lm, ctx, chunks, q = setup(family)
    torch.testing.assert_close(logits_for(lm, ctx, chunks, q, "rerope", "blend:0"),
                               logits_for(lm, ctx, chunks, q, "rerope"), atol=0, rtol=0)


def test_partial_repair_moves_toward_full():
    lm, ctx, chunks, q = setup("llama")
    full = logits_for(lm, ctx, chunks, q, "full")
    gap = lambda x: (x - full).abs().max().item()  # noqa: E731
    base = gap(logits_for(lm, ctx, chunks, q, "rerope"))
    assert base > 1e-3, f"rerope already equals full ({base:.1e}); the test cannot tell repairs apart"
    assert gap(logits_for(lm, ctx, chunks, q, "rerope", "boundary:4")) < base
    assert gap(logits_for(lm, ctx, chunks, q, "rerope", "blend:0.5")) < base


@pytest.mark.parametrize("bad", ["blend", "blend:x", "boundary:", "sideways:3", "blend:0.5+query:0.1",
                                 "boundary:-1", "query:2"])
def test_unknown_repair_is_refused(bad):
    from kvlib.errors import InputError

    with pytest.raises(InputError, match="unknown repair"):
        parse_repair(bad)


@pytest.mark.parametrize("repair", ["query:1.0", "auto:1.0"])
def test_query_and_auto_at_full_budget_equal_full(repair):
    """query:1 recomputes every chunk token; auto:1 covers all drift mass (the first chunk is exact behind E)."""
    lm, ctx, chunks, q = setup("qwen3")
    ref = logits_for(lm, ctx, chunks, q, "full")
    torch.testing.assert_close(logits_for(lm, ctx, chunks, q, "rerope", repair), ref, **TOL)


def test_auto_spends_less_than_everything_at_its_default_target():
    from kvlib.engine.repair import parse_repair

    lm, ctx, chunks, q = setup("llama")
    composed = compose(lm, ctx, chunks, "rerope")
    n = parse_repair("auto")(type("E", (), {"lm": lm})(), composed, chunks, q)
    later = sum(c.n_tokens for c in chunks[1:])
    assert 0 < n < later, f"auto recomputed {n} of {later} drifting tokens"


def test_drift_score_is_zero_alone_and_positive_behind_a_neighbour():
    from kvlib.engine.drift import drift_score

    lm, ctx, chunks, _ = setup("llama")
    alone = drift_score(lm, ctx, [], chunks[1])
    behind = drift_score(lm, ctx, chunks[0].token_ids, chunks[1])
    assert alone < 1e-5, f"a chunk behind nothing new drifted by {alone:.2e}"
    assert behind > 1e-3, f"a chunk behind a neighbour drifted only {behind:.2e}"


def test_union_recomputes_each_slot_once():
    """boundary:4+query:r picks the union: never more than the two apart, never fewer than either."""
    lm, ctx, chunks, q = setup("llama")
    engine = type("E", (), {"lm": lm})()
    count = lambda name: parse_repair(name)(engine, compose(lm, ctx, chunks, "rerope"), chunks, q)  # noqa: E731
    b, qr, both = count("boundary:4"), count("query:0.2"), count("boundary:4+query:0.2")
    assert max(b, qr) <= both <= b + qr and b == 8  # 4 tokens of each chunk but the first


def test_drift_windows_follow_the_stored_scores_by_hand():
    from types import SimpleNamespace as C

    from kvlib.engine.repair import drift_windows

    chunks = [C(drift=9.0), C(drift=0.1), C(drift=0.3)]
    assert drift_windows(chunks, 32, skip_first=True) == [0, 16, 48]  # mean 0.2 over the live chunks
    assert drift_windows(chunks, 32, skip_first=False) == [64, 1, 3]  # mean 3.13; capped at 2 x window
    assert drift_windows([C(drift=0.1), C(drift=None)], 32, skip_first=False) == [32, 32], "unscored: uniform"
    assert drift_windows([C(drift=0.0), C(drift=0.0)], 8, skip_first=False) == [8, 8]


def test_drift_score_without_stored_kv_matches_with_it():
    from kvlib.engine.drift import drift_score

    lm, ctx, chunks, _ = setup("llama")
    stored = drift_score(lm, ctx, chunks[0].token_ids, chunks[1])
    fresh = drift_score(lm, ctx, chunks[0].token_ids, ids=chunks[1].token_ids)
    assert fresh == pytest.approx(stored, rel=1e-4, abs=1e-6)


def test_auto_spends_nothing_on_a_chunk_whose_stored_drift_is_zero():
    from dataclasses import replace

    lm, ctx, chunks, q = setup("llama")
    chunks = [chunks[0], replace(chunks[1], drift=0.0), replace(chunks[2], drift=1.0)]
    composed = compose(lm, ctx, chunks, "rerope")
    n = parse_repair("auto:1.0")(type("E", (), {"lm": lm})(), composed, chunks, q)
    assert n == chunks[2].n_tokens, f"auto recomputed {n}; only the drifting last chunk's {chunks[2].n_tokens} tokens"
