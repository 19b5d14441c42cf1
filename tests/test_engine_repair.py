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
        parse_repair(repair)(lm, composed, chunks, q)
    out, _, _ = prefill(lm, composed, q, logits="all")
    return out.logits[-len(q):]


def setup(family):
    lm, _ = tiny_lm(family, "default")
    ctx = encode_context(lm, random_ids(5, 30))
    chunks = [encode_chunk(lm, ctx, random_ids(n, 31 + n)) for n in (12, 20, 9)]
    return lm, ctx, chunks, random_ids(6, 40)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("repair", ["blend:1.0", "blend:1.0:1.0", "boundary:64", "boundary:2+query:1.0", "chunks:2"])
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
    assert gap(logits_for(lm, ctx, chunks, q, "rerope", "blend:0.8:0.2")) < base


def test_narrowing_blend_carries_fewer_tokens_deeper():
    """blend:R:LAST picks in layer 1 what blend:R picks, then carries fewer tokens layer by layer:
    its last layer rewrites fewer slots than blend:R's, and more than none."""
    lm, _ = tiny_lm("llama", "default", num_hidden_layers=6)
    ctx = encode_context(lm, random_ids(5, 30))
    chunks = [encode_chunk(lm, ctx, random_ids(n, 31 + n)) for n in (12, 20, 9)]
    q = random_ids(6, 40)
    rerope = compose(lm, ctx, chunks, "rerope").cache
    last = lm.n_layers - 1
    rewritten, carried = {}, {}
    for repair in ("blend:0.6", "blend:0.6:0.1"):
        composed = compose(lm, ctx, chunks, "rerope")
        carried[repair] = parse_repair(repair)(lm, composed, chunks, q)
        rewritten[repair] = int((composed.cache.layer(last)[0] != rerope.layer(last)[0]).any(dim=2).any(dim=0).sum())
    assert torch.equal(carried["blend:0.6"], carried["blend:0.6:0.1"])  # the same layer-1 pick
    assert 0 < rewritten["blend:0.6:0.1"] < rewritten["blend:0.6"]


@pytest.mark.parametrize("bad", ["blend", "blend:x", "blend:0.2:0.5", "blend:0.5:x", "boundary:", "sideways:3",
                                 "blend:0.5+query:0.1", "boundary:-1", "query:2", "chunks:-1", "chunks:x"])
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


def test_chunks_recomputes_the_whole_chunks_the_question_reads_most():
    """chunks:N: all the tokens of N chunks (never the exact first one), picked by the question's layer-1
    attention summed over each chunk; chunks:0 is rerope bit for bit."""
    from kvlib.engine.repair import question_attention

    lm, ctx, chunks, q = setup("llama")
    composed = compose(lm, ctx, chunks, "rerope")
    mass = question_attention(lm, composed.cache, q)
    later = composed.spans[1:]  # the first chunk sits right behind E: exact
    by_mass = sorted(range(len(later)), key=lambda i: -float(mass[later[i][0]: later[i][0] + later[i][1]].sum()))
    slots = parse_repair("chunks:1")(lm, composed, chunks, q)
    s, n = later[by_mass[0]]
    assert torch.equal(slots, torch.arange(s, s + n))
    torch.testing.assert_close(logits_for(lm, ctx, chunks, q, "rerope", "chunks:0"),
                               logits_for(lm, ctx, chunks, q, "rerope"), atol=0, rtol=0)


def test_auto_spends_less_than_everything_at_its_default_target():
    from kvlib.engine.repair import parse_repair

    lm, ctx, chunks, q = setup("llama")
    composed = compose(lm, ctx, chunks, "rerope")
    n = parse_repair("auto")(lm, composed, chunks, q).numel()
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
    count = lambda name: parse_repair(name)(lm, compose(lm, ctx, chunks, "rerope"), chunks, q).numel()  # noqa: E731
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


def test_drift_pass_sees_cached_neighbour_kv_as_one_sequence():
    """The head behind [E, neighbour's cached KV rotated after E] has exactly the KV of
    encoding neighbour + head as one chunk behind E: the past a rerope repair meets."""
    from kvlib.engine.drift import head_kv, own_past

    lm, ctx, chunks, _ = setup("llama")
    pairs = [(chunks[0], chunks[1].token_ids[:6]), (chunks[2], chunks[0].token_ids[:9]), (chunks[1], chunks[2].token_ids)]
    got = head_kv(lm, ctx, [own_past(lm, ctx, nb) for nb, _ in pairs], [head for _, head in pairs])
    for (nb, head), (k, v) in zip(pairs, got):
        whole = encode_chunk(lm, ctx, torch.cat([nb.token_ids, head]))
        torch.testing.assert_close(k, whole.k_sem[1, :, nb.n_tokens:], **TOL, msg="packed heads leaked or misplaced")
        torch.testing.assert_close(v, whole.v[1, :, nb.n_tokens:], **TOL)


def test_drift_scores_in_one_batch_equal_one_at_a_time():
    from kvlib.engine.drift import drift_score, drift_scores

    lm, ctx, chunks, _ = setup("llama")
    pairs = [(chunks[0], chunks[1]), ([], chunks[2]), (chunks[2].token_ids, chunks[0].token_ids)]
    one_by_one = [drift_score(lm, ctx, b, c) if hasattr(c, "k_sem") else drift_score(lm, ctx, b, ids=c) for b, c in pairs]
    assert drift_scores(lm, ctx, pairs) == pytest.approx(one_by_one, rel=1e-4, abs=1e-6)
    assert one_by_one[1] < 1e-5 < one_by_one[0]


def test_drift_score_behind_cached_neighbour_equals_behind_its_ids():
    from kvlib.engine.drift import drift_score

    lm, ctx, chunks, _ = setup("llama")
    cached = drift_score(lm, ctx, chunks[0], chunks[1])
    from_ids = drift_score(lm, ctx, chunks[0].token_ids, chunks[1])
    assert cached > 1e-3 and cached == pytest.approx(from_ids, rel=1e-4)


def test_drift_score_behind_a_context_uses_it_whole():
    """A ContextKV (E plus a lead-in) is the whole past: the same as its extra ids behind E."""
    from kvlib.engine.drift import drift_score

    lm, ctx, chunks, _ = setup("llama")
    lead_ids = random_ids(7, 50)
    lead = encode_context(lm, torch.cat([ctx.token_ids, lead_ids]))
    assert drift_score(lm, ctx, lead, chunks[1]) == pytest.approx(drift_score(lm, ctx, lead_ids, chunks[1]), rel=1e-4)


def test_auto_spends_nothing_on_a_chunk_whose_stored_drift_is_zero():
    from dataclasses import replace

    lm, ctx, chunks, q = setup("llama")
    chunks = [chunks[0], replace(chunks[1], drift=0.0), replace(chunks[2], drift=1.0)]
    composed = compose(lm, ctx, chunks, "rerope")
    n = parse_repair("auto:1.0")(lm, composed, chunks, q).numel()
    assert n == chunks[2].n_tokens, f"auto recomputed {n}; only the drifting last chunk's {chunks[2].n_tokens} tokens"
