"""Every layer in one C call (engine/layer_loop.py): the bits of forward.py's own layer path."""

import pytest
import torch

from kvlib.engine import layer_loop
from kvlib.engine.attention import Mask
from kvlib.engine.cache import KVCache
from kvlib.engine.forward import embed, forward, run_layers
from kvlib.engine.model import wrap_model

from tiny_models import random_ids, tiny_hf

RUN = layer_loop.run  # before any test patches it


def model(family, rope, dtype, head_dim):
    hf = tiny_hf(family, rope, 0, head_dim=head_dim, num_attention_heads=4, num_key_value_heads=2,
                 hidden_size=64, num_hidden_layers=3)
    lm = wrap_model(hf, None, name="tiny", dtype=dtype, device=torch.device("cpu"))
    if layer_loop.plan(lm) is None:
        pytest.skip(f"the layer loop does not run a {dtype} model here (kernels: {layer_loop.status()})")
    return lm


def filled(lm, past: int, capacity: int = 64) -> KVCache:
    cache = KVCache.for_model(lm, capacity)
    g = torch.Generator().manual_seed(past)
    cache.append(*[torch.randn(lm.n_layers, lm.n_kv_heads, past, lm.head_dim, generator=g) for _ in range(2)])
    return cache


def both_ways(monkeypatch, lm, t: int, past: int, out_rows: int | None = None):
    """run_layers for t new tokens behind `past` random slots, through the loop and through forward.py's
    own layers: (hidden states, cache) each, and how many calls the loop took."""
    ids, positions = random_ids(t, seed=t), torch.arange(200 + past, 200 + past + t)
    taken = []
    monkeypatch.setattr(layer_loop, "run", lambda *a: taken.append(RUN(*a)) or taken[-1])
    results = []
    for loop_on in (True, False):
        if not loop_on:
            monkeypatch.setattr(layer_loop, "run", lambda *a: None)
        cache = filled(lm, past)
        out = run_layers(lm, embed(lm, ids), positions, cache, Mask.causal(t, past), out_rows=out_rows)
        results.append((out.h, cache))
    return results, sum(x is not None for x in taken)


@pytest.mark.parametrize("family, rope", [("llama", "yarn"), ("qwen2", "default")])  # qwen2: q/k/v biases
@pytest.mark.parametrize("dtype, head_dim", [(torch.float32, 16), (torch.bfloat16, 32)])
@pytest.mark.parametrize("t, past", [(13, 40), (1, 40), (1, 0)])  # a question, a decode step, a first token
def test_the_loop_gives_the_bits_of_forward_py(monkeypatch, family, rope, dtype, head_dim, t, past):
    lm = model(family, rope, dtype, head_dim)
    ((h_loop, c_loop), (h_py, c_py)), taken = both_ways(monkeypatch, lm, t, past)
    assert taken == 1
    assert torch.equal(h_loop, h_py)
    assert torch.equal(c_loop.k[:, :, : past + t], c_py.k[:, :, : past + t])
    assert torch.equal(c_loop.v[:, :, : past + t], c_py.v[:, :, : past + t])


@pytest.mark.parametrize("family, rope", [("llama", "default"), ("qwen2", "default")])
@pytest.mark.parametrize("dtype, head_dim", [(torch.float32, 16), (torch.bfloat16, 32)])
@pytest.mark.parametrize("out_rows", [0, 1, 4])
def test_only_the_rows_asked_for_leave_the_last_layer(monkeypatch, family, rope, dtype, head_dim, out_rows):
    """out_rows: the loop and forward.py's layers give the same bits; every token's KV is written
    exactly as without it (only the last layer's attention and MLP of the other rows are left out),
    and the rows kept are those of the whole run, up to the attention's order of sums."""
    lm = model(family, rope, dtype, head_dim)
    t, past = 13, 40
    ((h_loop, c_loop), (h_py, c_py)), taken = both_ways(monkeypatch, lm, t, past, out_rows)
    ((h_all, c_all), _), _ = both_ways(monkeypatch, lm, t, past)
    assert taken == 1
    assert h_loop.shape == h_py.shape == (1, out_rows, lm.config_summary["hidden_size"])
    assert torch.equal(h_loop, h_py)
    for cache in (c_loop, c_py):
        assert torch.equal(cache.k[:, :, : past + t], c_all.k[:, :, : past + t])
        assert torch.equal(cache.v[:, :, : past + t], c_all.v[:, :, : past + t])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(h_loop.float(), h_all[:, t - out_rows:].float(), atol=tol, rtol=tol)


def test_forward_runs_the_last_layer_for_the_logits_it_returns():
    """logits="last" equals the last row of logits="all" (up to the attention's order of sums), and
    both leave the same cache."""
    lm = model("llama", "default", torch.float32, 16)
    ids = random_ids(9, seed=3)
    caches = [filled(lm, 20), filled(lm, 20)]
    last = forward(lm, ids, torch.arange(20, 29), caches[0], logits="last").logits
    every = forward(lm, ids, torch.arange(20, 29), caches[1], logits="all").logits
    assert last.shape == (1, every.shape[1])
    torch.testing.assert_close(last, every[-1:], atol=1e-5, rtol=1e-5)
    filled_slots = 20 + 9  # the rest of each cache's capacity is a pooled buffer's old contents
    assert caches[0].length == caches[1].length == filled_slots
    for a, b in ((caches[0].k, caches[1].k), (caches[0].v, caches[1].v)):
        assert torch.equal(a[:, :, :filled_slots], b[:, :, :filled_slots])


def test_the_loop_leaves_bf16_prompts_behind_a_short_past_to_forward_py(monkeypatch):
    """A bf16 prompt behind a past no longer than itself runs SDPA in forward.py, so not the loop;
    float32 runs the C attention at any past, and the loop with it."""
    lm = model("llama", "default", torch.bfloat16, 32)
    _, taken = both_ways(monkeypatch, lm, 13, 13)
    assert taken == 0
    lm32 = model("llama", "default", torch.float32, 16)
    ((h_loop, _), (h_py, _)), taken = both_ways(monkeypatch, lm32, 13, 0)
    assert taken == 1 and torch.equal(h_loop, h_py)


def test_the_loop_is_not_asked_for_probabilities_kv_or_scattered_slots(monkeypatch):
    lm = model("llama", "default", torch.float32, 16)
    calls = []
    monkeypatch.setattr(layer_loop, "run", lambda *a: calls.append(a))
    ids = random_ids(5, seed=1)
    forward(lm, ids, torch.arange(5), filled(lm, 0), keep_kv=True)
    forward(lm, ids, torch.arange(5), filled(lm, 0), attn_layers=(1,))
    run_layers(lm, embed(lm, ids), torch.arange(5), filled(lm, 8), Mask.at_slots(torch.arange(3, 8), 8),
               slots=torch.arange(3, 8))
    run_layers(lm, embed(lm, ids), torch.arange(5), filled(lm, 8), Mask.causal(5, 8), layers=range(2))
    assert calls == []
    forward(lm, ids, torch.arange(5), filled(lm, 0))
    assert len(calls) == 1


def test_switched_off_the_loop_leaves_forward_py_its_layers(monkeypatch):
    lm = model("llama", "default", torch.float32, 16)
    monkeypatch.setenv("KVLIB_LAYER_LOOP", "0")
    monkeypatch.setattr(layer_loop.KERNEL, "_state", {})
    assert layer_loop.make_plan(lm) is None and layer_loop.status() == "off (KVLIB_LAYER_LOOP=0)"


@pytest.mark.parametrize("family, rope", [("llama", "yarn"), ("qwen2", "default")])
@pytest.mark.parametrize("dtype, head_dim", [(torch.float32, 16), (torch.bfloat16, 32)])
def test_a_batched_decode_step_gives_the_bits_of_forward_py(monkeypatch, family, rope, dtype, head_dim):
    """Three sequences of different lengths, one new token each: the loop's batch call against
    decode_batch's own Python layers, hidden states and every cache bit for bit."""
    from kvlib.engine import forward as fw

    lm = model(family, rope, dtype, head_dim)
    pasts, ids, positions = [40, 7, 23], [5, 17, 3], [300, 9, 23]
    taken, results = [], []
    batch = layer_loop.run_batch
    for loop_on in (True, False):
        monkeypatch.setattr(layer_loop, "run_batch",
                            (lambda *a: taken.append(batch(*a)) or taken[-1]) if loop_on else (lambda *a: None))
        caches = [filled(lm, past) for past in pasts]
        logits = fw.decode_batch(lm, ids, positions, caches)
        results.append((logits, caches))
    (logits_loop, caches_loop), (logits_py, caches_py) = results
    assert len(taken) == 1 and taken[0] is not None
    assert torch.equal(logits_loop, logits_py)
    for past, c_loop, c_py in zip(pasts, caches_loop, caches_py):
        assert c_loop.length == c_py.length == past + 1
        assert torch.equal(c_loop.k[:, :, : past + 1], c_py.k[:, :, : past + 1])
        assert torch.equal(c_loop.v[:, :, : past + 1], c_py.v[:, :, : past + 1])


def test_a_batched_step_without_room_is_left_to_forward_py():
    lm = model("llama", "default", torch.float32, 16)
    caches = [filled(lm, 10), filled(lm, 64)]  # the second is full
    h = embed(lm, torch.tensor([1, 2]))
    assert layer_loop.run_batch(lm, h, torch.tensor([10, 64]), caches) is None
