"""DESIGN.md §1 invariants on tiny random models, in float32, within 1e-4.

1e-4 is the tolerance because float32 matmul reassociation across SDPA, eager
attention and different slot layouts moves logits of O(1) by ~1e-6; anything near
1e-4 is a real bug (a wrong position shifts logits by >1e-2, see the negative test).
"""

from __future__ import annotations

import pytest
import torch

from kvlib.engine.compose import compose, encode_chunk, encode_context
from kvlib.engine.forward import KVCache, forward, reference_logits
from kvlib.engine.generate import prefill
from tiny_models import FAMILIES, ROPE_TYPES, random_ids, tiny_lm

TOL = dict(atol=1e-4, rtol=1e-4)
CASES = [(f, "default") for f in FAMILIES] + [("llama", r) for r in ROPE_TYPES if r != "default"] + [
    ("qwen3", "yarn"), ("qwen2", "llama3")]


def full_logits(lm, ids):
    cache = KVCache.for_model(lm, len(ids))
    return forward(lm, ids, torch.arange(len(ids)), cache, logits="all").logits


@pytest.mark.parametrize("family,rope", CASES)
def test_own_forward_equals_transformers(family, rope):
    lm, _ = tiny_lm(family, rope)
    ids = random_ids(40, seed=1)
    with torch.no_grad():
        ref = reference_logits(lm, ids)
    torch.testing.assert_close(full_logits(lm, ids), ref, **TOL, msg=f"{family}/{rope}: own forward drifts from HF")


@pytest.mark.parametrize("family,rope", CASES)
def test_k_sem_is_shift_invariant(family, rope):
    lm, _ = tiny_lm(family, rope)
    ctx = encode_context(lm, random_ids(5, seed=2))
    chunk = random_ids(24, seed=3)
    at0 = encode_chunk(lm, ctx, chunk, offset=0)
    at_s = encode_chunk(lm, ctx, chunk, offset=777)
    torch.testing.assert_close(at_s.k_sem, at0.k_sem, **TOL, msg="K_sem moved with the start position")
    torch.testing.assert_close(at_s.v, at0.v, **TOL, msg="V moved with the start position")


def composed_logits(lm, ctx_ids, chunk_ids, q_ids, mode):
    ctx = encode_context(lm, ctx_ids)
    chunk = encode_chunk(lm, ctx, chunk_ids)
    composed = compose(lm, ctx, [chunk], mode)
    out, _, _ = prefill(lm, composed, q_ids, logits="all")
    return out.logits[-len(q_ids):]


@pytest.mark.parametrize("family,rope", CASES)
def test_single_cached_chunk_equals_full_recompute(family, rope):
    lm, _ = tiny_lm(family, rope)
    e, c, q = random_ids(5, 4), random_ids(30, 5), random_ids(7, 6)
    ref = full_logits(lm, torch.cat([e, c, q]))[-len(q):]
    got = composed_logits(lm, e, c, q, "rerope")
    torch.testing.assert_close(got, ref, **TOL, msg=f"{family}/{rope}: [E,c,q] on cached c != full")


@pytest.mark.parametrize("family", FAMILIES)
def test_naive_at_offset_does_not_match_full(family):
    """Two chunks: the second sits at a nonzero offset, so keeping encoding positions is wrong."""
    lm, _ = tiny_lm(family, "default")
    e, c1, c2, q = random_ids(5, 7), random_ids(30, 8), random_ids(30, 9), random_ids(6, 10)
    ctx = encode_context(lm, e)
    chunks = [encode_chunk(lm, ctx, c) for c in (c1, c2)]
    logits = {}
    for mode in ("naive", "rerope"):
        out, _, _ = prefill(lm, compose(lm, ctx, chunks, mode), q, logits="all")
        logits[mode] = out.logits[-len(q):]
    gap = (logits["naive"] - logits["rerope"]).abs().max().item()
    assert gap > 1e-3, f"naive and rerope agree to {gap:.2e}: the rotation is not being exercised"


@pytest.mark.parametrize("family", FAMILIES)
def test_full_mode_compose_equals_plain_forward(family):
    lm, _ = tiny_lm(family, "default")
    e, c, q = random_ids(5, 11), random_ids(20, 12), random_ids(6, 13)
    ref = full_logits(lm, torch.cat([e, c, q]))[-len(q):]
    torch.testing.assert_close(composed_logits(lm, e, c, q, "full"), ref, **TOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_encoding_equals_one_by_one(family):
    from kvlib.engine.compose import encode_packed

    lm, _ = tiny_lm(family, "default")
    ctx = encode_context(lm, random_ids(5, 14))
    chunks = [random_ids(n, 20 + n) for n in (9, 30, 1, 17)]
    packed = encode_packed(lm, ctx, chunks)
    for ids, got in zip(chunks, packed):
        alone = encode_chunk(lm, ctx, ids)
        torch.testing.assert_close(got.k_sem, alone.k_sem, **TOL, msg="packing leaked between chunks")
        torch.testing.assert_close(got.v, alone.v, **TOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_one_token_steps_equal_transformers(family):
    """Decoding a token at a time (the single-query attention path) gives HF's logits at each position."""
    lm, _ = tiny_lm(family, "default")
    assert lm.layers[0].self_attn.config.num_key_value_heads < lm.layers[0].self_attn.config.num_attention_heads
    ids = random_ids(24, seed=5)
    with torch.no_grad():
        ref = reference_logits(lm, ids)
    cache = KVCache.for_model(lm, len(ids))
    forward(lm, ids[:20], torch.arange(20), cache, logits="all")
    for t in range(20, 24):
        step = forward(lm, ids[t : t + 1], torch.tensor([t]), cache, logits="all").logits
        torch.testing.assert_close(step[0], ref[t], **TOL, msg=f"{family}: decode step {t} drifts from HF")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("split", [3, 20, 37])
def test_prefill_behind_a_cached_prefix_equals_one_pass(family, split):
    """New tokens behind P cached slots (P <= T: padded causal kernel; P > T: dense mask) equal one pass."""
    lm, _ = tiny_lm(family, "default")
    ids = random_ids(40, seed=6)
    with torch.no_grad():
        ref = reference_logits(lm, ids)
    cache = KVCache.for_model(lm, len(ids))
    forward(lm, ids[:split], torch.arange(split), cache, logits="none")
    rest = forward(lm, ids[split:], torch.arange(split, 40), cache, logits="all").logits
    torch.testing.assert_close(rest, ref[split:], **TOL, msg=f"{family}: prefill behind {split} cached slots")
