"""The C attention kernel for a few queries behind a long past (engine/attn_kernel.py): the same
attention as written out in float64, within float32 rounding, for every layout it accepts."""

import pytest
import torch

from kvlib.engine import attention, attn_kernel

needs_kernel = pytest.mark.skipif(attn_kernel.status() != "compiled",
                                  reason=f"attention kernel unavailable here: {attn_kernel.status()}")


def reference(q, keys, values, last, scale):
    """softmax(q k^T * scale) v in float64, token t seeing slots [0, last[t]]; q [1, H, T, D]."""
    group = q.shape[1] // keys.shape[0]
    k64, v64 = (x.double().repeat_interleave(group, 0) for x in (keys, values))
    scores = torch.einsum("htd,hsd->hts", q[0].double(), k64) * scale
    seen = torch.arange(keys.shape[1])[None, :] <= last[:, None]
    return torch.einsum("hts,hsd->htd", scores.masked_fill(~seen, float("-inf")).softmax(-1), v64)[None]


def behind(t_past, t):
    """Each new token's last slot behind t_past cached ones: the past and the new tokens up to itself."""
    return torch.arange(t_past, t_past + t)


def operands(heads, kv_heads, dim, t, t_past, seed, spread=1.0):
    """q laid out as the forward makes it (a head transpose of [1, T, H, D]); keys and values as
    a cache hands them over: the filled slots of a larger buffer."""
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(1, t, heads, dim, generator=g) * spread).transpose(1, 2)
    buffer = torch.randn(2, kv_heads, t_past + t + 13, dim, generator=g)
    return q, buffer[0, :, : t_past + t], buffer[1, :, : t_past + t]


@needs_kernel
@pytest.mark.parametrize("heads, kv_heads, dim, t, t_past", [
    (9, 3, 64, 25, 700),    # SmolLM2's heads: a question behind cached chunks
    (12, 2, 128, 30, 500),  # Qwen2.5-1.5B's: 180 rows, two row blocks
    (4, 4, 16, 1, 1500),    # one query: the keys split over threads and merged
    (9, 3, 64, 1, 4000),    # decode's rows: dot products, three rows of eight lanes
    (12, 2, 128, 1, 3000),  # six query heads a KV head
    (9, 3, 64, 2, 999),     # two tokens: six rows, still the few-row path
    (6, 2, 32, 200, 250),   # many rows: seven row blocks, the causal corner across blocks
    (9, 3, 64, 7, 5),       # shorter than a block of keys
])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_kernel_equals_attention_written_out_in_float64(heads, kv_heads, dim, t, t_past, threads):
    q, keys, values = operands(heads, kv_heads, dim, t, t_past, seed=heads * t + dim)
    torch.set_num_threads(threads)
    try:
        got = attn_kernel.attend_behind(q, keys, values, t_past, dim ** -0.5)
    finally:
        torch.set_num_threads(2)
    assert got is not None and got.shape == q.shape
    assert (got.double() - reference(q, keys, values, behind(t_past, t), dim ** -0.5)).abs().max() < 2e-6


@needs_kernel
def test_peaked_scores_stay_finite_and_right():
    """Scores of a few hundred (one slot takes nearly all the weight, found in a later block than
    the first): the running maximum rescales what came before without overflow, and the error is
    float32's in scores that large, as SDPA's is."""
    q, keys, values = operands(9, 3, 64, 25, 900, seed=5, spread=30.0)
    keys[:, 700] = q[0, ::3, 0] * 0.5  # slot 700 aligned with each KV head's first query
    got = attn_kernel.attend_behind(q, keys, values, 900, 0.125)
    assert torch.isfinite(got).all()
    expected = reference(q, keys, values, behind(900, 25), 0.125)
    sdpa = attention.sdpa(q, keys, values, 0.125, mask=attention.Mask.causal(25, 900).dense(q.device))
    assert (got.double() - expected).abs().max() <= 2 * (sdpa.double() - expected).abs().max() + 1e-6


@needs_kernel
def test_causal_behind_runs_the_kernel_and_sdpa_agrees():
    q, keys, values = operands(9, 3, 64, 25, 2000, seed=7)
    mask = attention.Mask.causal(25, 2000)
    got = attention.causal_behind(q, keys, values, 2000, 0.125, mask)
    assert got.stride(1) == 64 and got.stride(2) == 9 * 64  # the kernel's [1, T, H, D] layout
    sdpa = attention.sdpa(q, keys, values, 0.125, mask=mask.additive(q.device, q.dtype))
    assert (got - sdpa).abs().max() < 2e-6


@needs_kernel
def test_tokens_at_scattered_slots_see_up_to_their_own():
    """Repair's layout: tokens recomputed at slots in the middle of a filled cache, in any order."""
    q, keys, values = operands(9, 3, 64, 150, 650, seed=11)
    slots = torch.randperm(800, generator=torch.Generator().manual_seed(3))[:150]
    got = attn_kernel.attend_until(q, keys, values, slots, 0.125)
    assert (got.double() - reference(q, keys, values, slots, 0.125)).abs().max() < 2e-6
    assert torch.equal(attention.at_slots(q, keys, values, slots, 0.125), got)
    assert attn_kernel.attend_until(q, keys, values, torch.tensor([800] * 150), 0.125) is None  # beyond the keys


@pytest.mark.parametrize("change", ["bf16", "dim 20", "rows apart", "heads", "slots"])
def test_operands_the_kernel_does_not_take_are_declined(change):
    q, keys, values = operands(9, 3, 64, 4, 40, seed=1)
    t_past = 40
    if change == "bf16":
        q, keys, values = q.bfloat16(), keys.bfloat16(), values.bfloat16()
    elif change == "dim 20":
        q, keys, values = q[..., :20], keys[..., :20], values[..., :20]
    elif change == "rows apart":
        keys = torch.cat([keys, keys], dim=-1)[..., :64]
    elif change == "heads":
        q = q[:, :8]
    else:
        t_past = 39
    assert attn_kernel.attend_behind(q, keys, values, t_past, 0.125) is None


def test_switched_off_the_kernel_says_so_and_sdpa_answers(monkeypatch, tmp_path):
    monkeypatch.setenv("KVLIB_ATTN_KERNEL", "0")
    monkeypatch.setenv("KVLIB_KERNEL_DIR", str(tmp_path))
    monkeypatch.setattr(attn_kernel.KERNEL, "_state", {})
    assert attn_kernel.status() == "off (KVLIB_ATTN_KERNEL=0)"
    q, keys, values = operands(9, 3, 64, 25, 2000, seed=3)
    assert attn_kernel.attend_behind(q, keys, values, 2000, 0.125) is None
    got = attention.causal_behind(q, keys, values, 2000, 0.125)
    assert (got.double() - reference(q, keys, values, behind(2000, 25), 0.125)).abs().max() < 2e-6
