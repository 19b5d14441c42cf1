"""The CPU attention kernels equal the dense-mask reference (SDPA with the layout's own mask)."""

from __future__ import annotations

import pytest
import torch

from kvlib.engine import attention, attn_kernel
from kvlib.engine.attention import Mask, attend, sdpa


def qkv(heads: int, hkv: int, t: int, total: int, dim: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, t, dim, generator=g)
    return q, torch.randn(hkv, total, dim, generator=g), torch.randn(hkv, total, dim, generator=g)


@pytest.mark.parametrize("order", ["sorted", "scattered"])
@pytest.mark.parametrize("block_rows", [64, 5])  # one block; many blocks of a few rows
def test_tokens_at_slots_equal_the_dense_mask(monkeypatch, order, block_rows):
    monkeypatch.setattr(attention, "SLOTS_BLOCK_ROWS", block_rows)
    heads, hkv, total = 6, 2, 90
    slots = torch.randperm(total, generator=torch.Generator().manual_seed(1))[:37]
    slots = slots.sort().values if order == "sorted" else slots
    q, k, v = qkv(heads, hkv, slots.numel(), total)
    mask = Mask.at_slots(slots, total)
    out, probs = attend(q, k, v, mask, 0.25)
    assert probs is None
    ref = sdpa(q, k, v, 0.25, mask=mask.dense(q.device))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_a_token_at_slot_zero_sees_only_itself():
    q, k, v = qkv(4, 2, 2, 10)
    out, _ = attend(q, k, v, Mask.at_slots(torch.tensor([0, 9]), 10), 0.5)
    torch.testing.assert_close(out[0, :, 0], v[[0, 0, 1, 1], 0])  # query heads 0-1 share KV head 0


@pytest.mark.parametrize("t,past", [(5, 40), (1, 40), (30, 12)])  # few queries, one query, a short past
def test_causal_behind_a_past_equals_the_dense_mask_and_leaves_q_alone(t, past):
    q, k, v = qkv(6, 2, t, past + t)
    q_before = q.clone()
    mask = Mask.causal(t, past)
    out, _ = attend(q, k, v, mask, 0.25)
    torch.testing.assert_close(out, sdpa(q_before, k, v, 0.25, mask=mask.dense(q.device)), atol=1e-5, rtol=1e-5)
    assert torch.equal(q, q_before), "the kernel scaled the caller's q in place"


def softmax_attention_f64(q, k, v, mask: Mask, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v written out in float64 under the mask's dense form, grouped-query
    heads expanded: the reference the kernels are held to."""
    group = q.shape[1] // k.shape[0]
    kk, vv = (x.double().repeat_interleave(group, dim=0) for x in (k, v))
    scores = torch.einsum("htd,hsd->hts", q[0].double(), kk) * scale
    scores = scores.masked_fill(~mask.dense(q.device), float("-inf"))
    return torch.einsum("hts,hsd->htd", scores.softmax(dim=-1), vv)[None]


@pytest.mark.parametrize("t,past", [(5, 40), (30, 1600), (1, 1600), (30, 12), (7, 0)])
def test_attend_equals_softmax_attention_in_float64(t, past):
    """Each causal kernel attend picks (few queries, a long float32 past, one query, a short past,
    no past) against softmax(q k^T) v written out in float64, grouped-query heads expanded."""
    q, k, v = qkv(6, 2, t, past + t, dim=64)
    out, _ = attend(q, k, v, Mask.causal(t, past), 0.125)
    torch.testing.assert_close(out.double(), softmax_attention_f64(q, k, v, Mask.causal(t, past), 0.125),
                               atol=1e-5, rtol=1e-5)


def test_the_additive_mask_is_the_dense_one_built_once_and_attends_alike(monkeypatch):
    """Without the C kernel (attn_kernel.py), a long float32 past runs SDPA on the Mask's additive
    form, built once for every layer of a forward: 0 where the dense mask sees a slot, -inf
    elsewhere, giving the bool mask's bits."""
    monkeypatch.setattr(attn_kernel.KERNEL, "_state", {"fn": None, "reason": "off (this test)"})
    t, past = 30, 1600
    mask = Mask.causal(t, past)
    add = mask.additive(torch.device("cpu"), torch.float32)
    assert mask.additive("cpu", torch.float32) is add, "rebuilt for a second layer"
    assert torch.equal(add == 0, mask.dense("cpu")) and torch.isneginf(add[~mask.dense("cpu")]).all()
    assert mask.additive("cpu", torch.float64).dtype == torch.float64
    q, k, v = qkv(6, 2, t, past + t, dim=64)
    out, _ = attend(q, k, v, mask, 0.125)
    assert torch.equal(out, sdpa(q, k, v, 0.125, mask=mask.dense(q.device)))


@pytest.mark.parametrize("t,past", [(5, 40), (25, 1000)])
def test_bf16_few_queries_behind_a_past_run_grouped_sdpa_as_close_as_the_matmuls(monkeypatch, t, past):
    """In bf16 without a bf16 kernel a question behind a long past runs SDPA with each KV head's query heads as
    one head of G * T rows: the grouped mask is the dense one repeated, built once, and the output
    is as close to softmax attention in float64 as the two float32-score matmuls it replaced."""
    monkeypatch.setattr(attn_kernel, "attend_behind_bf16", lambda *a: None)
    q, k, v = (x.bfloat16() for x in qkv(6, 2, t, past + t, dim=64, seed=3))
    mask = Mask.causal(t, past)
    grouped = mask.additive("cpu", torch.bfloat16, 3)
    assert mask.additive("cpu", torch.bfloat16, 3) is grouped, "rebuilt for a second layer"
    assert torch.equal(grouped, mask.additive("cpu", torch.bfloat16).repeat(3, 1))
    out, _ = attend(q, k, v, mask, 0.125)
    assert out.dtype == torch.bfloat16 and torch.equal(out, attention.grouped_sdpa(q, k, v, 0.125, mask))
    ref = softmax_attention_f64(q, k, v, mask, 0.125)
    err = (out.double() - ref).abs().max()
    assert err <= 1.5 * (attention.few_queries(q, k, v, past, 0.125).double() - ref).abs().max() + 1e-3


def test_one_bf16_token_runs_grouped_sdpa_as_close_as_the_matmuls(monkeypatch):
    monkeypatch.setattr(attn_kernel, "attend_behind_bf16", lambda *a: None)  # no bf16 kernel
    q, k, v = (x.bfloat16() for x in qkv(6, 2, 1, 300, dim=64, seed=4))
    out, _ = attend(q, k, v, Mask.causal(1, 299), 0.125)
    assert torch.equal(out, attention.grouped_sdpa(q, k, v, 0.125, None))
    ref = attention.single_query_attention(q.double(), k.double(), v.double(), 0.125)
    err = (out.double() - ref).abs().max()
    assert err <= 1.5 * (attention.single_query_attention(q, k, v, 0.125).double() - ref).abs().max() + 1e-3


def bf16_build(name: str):
    """One build of bf16_attn_kernel.c, or a skip where this CPU lacks it."""
    if name == "amx":
        fn = attn_kernel.AMX.function() if attn_kernel.amx_usable() else None
    else:
        fn = attn_kernel.DPBF16.function()
    if fn is None:
        pytest.skip(f"{name} attention unavailable here: {attn_kernel.bf16_status()}")
    return fn


@pytest.mark.parametrize("build", ["amx", "avx512_bf16"])
# head dims 64, 128 and 96 (AMX: tiles held, and the generic path); one token, a few; a last key block part-filled
@pytest.mark.parametrize("heads, hkv, t, past, dim", [(9, 3, 25, 1000, 64), (12, 2, 30, 700, 128), (6, 2, 5, 300, 96),
                                                      (9, 3, 1, 333, 64), (4, 4, 40, 90, 32)])
def test_bf16_attention_is_as_close_to_float64_as_sdpa(build, heads, hkv, t, past, dim):
    fn = bf16_build(build)
    q, k, v = (x.bfloat16() for x in qkv(heads, hkv, t, past + t, dim=dim, seed=past))
    scale = dim ** -0.5
    got = attn_kernel.attend_behind_bf16(q, k, v, past, scale, fn)
    assert got.dtype == torch.bfloat16 and got.shape == q.shape
    ref = attention.few_queries(q.double(), k.double(), v.double(), past, scale)
    sdpa_err = (attention.grouped_sdpa(q, k, v, scale, Mask.causal(t, past)).double() - ref).abs().max()
    assert (got.double() - ref).abs().max() <= 1.5 * sdpa_err + 1e-3
    if fn is attn_kernel.bf16_function():
        routed, _ = attend(q, k, v, Mask.causal(t, past), scale)
        assert torch.equal(routed, got)  # what a bf16 forward runs, behind a past and for one token alike


def test_bf16_attention_declines_what_it_does_not_take():
    q, k, v = qkv(6, 2, 5, 45, dim=64)
    assert attn_kernel.attend_behind_bf16(q, k, v, 40, 0.125) is None  # float32
    q, k, v = (x.bfloat16() for x in qkv(6, 2, 5, 45, dim=48))
    assert attn_kernel.attend_behind_bf16(q, k, v, 40, 0.125) is None  # head dim not a multiple of 32


@pytest.mark.parametrize("order", ["sorted", "scattered"])
@pytest.mark.parametrize("heads, hkv, n, total, dim", [(9, 3, 300, 700, 64), (12, 2, 7, 90, 128), (4, 4, 1, 40, 32)])
def test_bf16_tokens_at_scattered_slots_run_the_kernel_as_close_to_float64_as_sdpa(monkeypatch, order, heads, hkv, n,
                                                                                    total, dim):
    """A bf16 repair's tokens, each seeing the slots up to its own: the bf16 kernel through at_slots,
    within the error of SDPA's blocks against attention written out in float64."""
    if attn_kernel.bf16_function() is None:
        pytest.skip(f"bf16 attention unavailable here: {attn_kernel.bf16_status()}")
    g = torch.Generator().manual_seed(n)
    slots = torch.randperm(total, generator=g)[:n]
    slots = slots.sort().values if order == "sorted" else slots
    q, k, v = (x.bfloat16() for x in qkv(heads, hkv, n, total, dim=dim, seed=n))
    scale = dim ** -0.5
    got, _ = attend(q, k, v, Mask.at_slots(slots, total), scale)
    assert torch.equal(got, attn_kernel.attend_until_bf16(q, k, v, slots, scale))  # the route a bf16 repair takes
    seen = torch.arange(total)[None, :] <= slots[:, None]
    probs = attention.attention_probs(q.double(), k.double(), seen, scale).double()
    ref = torch.einsum("hts,hsd->htd", probs, v.double().repeat_interleave(heads // hkv, 0))[None]
    monkeypatch.setattr(attn_kernel, "attend_until_bf16", lambda *a: None)
    blocks = attention.at_slots(q, k, v, slots, scale)
    assert got.dtype == torch.bfloat16 and got.shape == q.shape
    assert (got.double() - ref).abs().max() <= 1.5 * (blocks.double() - ref).abs().max() + 1e-3
