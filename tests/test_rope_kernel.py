"""The C rotation kernel (engine/rope_kernel.py): the same bits as the torch passes it replaces."""

import pytest
import torch

from kvlib.engine import rope_kernel
from kvlib.engine.cache import KVCache
from kvlib.engine.rope import half_tables, rope_into_

from tiny_models import random_ids, tiny_lm

needs_kernel = pytest.mark.skipif(rope_kernel.status() != "compiled",
                                  reason=f"rope kernel unavailable here: {rope_kernel.status()}")


@pytest.fixture(params=["avx2", "avx512"])
def build(request, monkeypatch):
    """Each build of the kernel this CPU runs: the AVX2 one (the AVX-512 one switched off), and the
    AVX-512 one where it builds."""
    if request.param == "avx2":
        monkeypatch.setenv("KVLIB_ROPE_AVX512", "0")
    monkeypatch.setattr(rope_kernel.AVX512, "_state", {})
    if request.param == "avx512" and rope_kernel.AVX512.function() is None:
        pytest.skip(f"AVX-512 build unavailable here: {rope_kernel.AVX512.status()}")
    assert rope_kernel.build() is (rope_kernel.AVX512 if request.param == "avx512" else rope_kernel.KERNEL)
    yield request.param
    monkeypatch.undo()
    rope_kernel.AVX512._state.clear()


def stored_keys(layers, heads, t, dim, seed, dtype=torch.float16):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(layers, heads, t, dim, generator=g) * 4).to(dtype)


@needs_kernel
# dim 20: ten pairs, eight in vector lanes and two left over; three threads split the rows
@pytest.mark.parametrize("dim, threads", [(64, 1), (128, 1), (20, 1), (64, 3)])
# float16 keys into a float32 cache, and bfloat16 into bfloat16 (rounded once, as torch's copy does)
@pytest.mark.parametrize("stored, cached", [(torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16)])
def test_kernel_gives_the_torch_passes_bits_in_cache_slots(dim, threads, stored, cached, build):
    lm, _ = tiny_lm("llama", "yarn")  # yarn: attention scaling folded into the tables
    src = stored_keys(3, 2, 41, dim, seed=dim, dtype=stored)
    spec = lm.rope if dim == lm.head_dim else type(lm.rope)(
        inv_freq=torch.rand(dim // 2) / 3, attention_scaling=lm.rope.attention_scaling, rope_type="yarn")
    tables = half_tables(spec, torch.randint(0, 30000, (41,), generator=torch.Generator().manual_seed(1)), "cpu")
    expected = torch.zeros(3, 2, 64, dim, dtype=cached)
    expected[:, :, 5:46] = src
    rope_into_(expected[:, :, 5:46], expected[:, :, 5:46], tables)
    got = torch.zeros(3, 2, 64, dim, dtype=cached)
    assert rope_kernel.rope_into(got[:, :, 5:46], src, tables.cos, tables.sin, threads=threads)
    assert torch.equal(got, expected)  # the slots rotated, the others untouched


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same bits everywhere, except that a NaN need only be a NaN: torch's own bf16 conversions
    disagree on its bits (0xffff vectorised, 0x7fc0 scalar)."""
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(a.view(torch.int16)[~nan], b.view(torch.int16)[~nan])


@needs_kernel
@pytest.mark.parametrize("dim, threads", [(64, 2), (20, 3), (128, 1)])  # dim 20: ten pairs, a masked tail
def test_a_run_in_one_pass_gives_the_torch_passes_bits(dim, threads, build):
    """Stored bf16 chunks of 7, 19 and 3 rows into a bf16 cache in one call (rope_run_into): keys as
    rope_into_ rotates them, values as copied, bit for bit, NaN, infinities, signed zeros and
    denormals included (torch rounds denormals; VCVTNEPS2BF16 would flush them); other slots untouched."""
    g = torch.Generator().manual_seed(dim)
    chunks = [(stored_keys(2, 3, t, dim, seed=t, dtype=torch.bfloat16),
               stored_keys(2, 3, t, dim, seed=50 + t, dtype=torch.bfloat16)) for t in (7, 19, 3)]
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-39, -3e-39, 1e38])
    chunks[1][0][0, 1, :, : special.numel()] = special.bfloat16()
    inv_freq = torch.rand(dim // 2, generator=g) / 3
    tables = half_tables(type(tiny_lm("llama")[0].rope)(inv_freq=inv_freq, attention_scaling=1.25, rope_type="yarn"),
                         torch.randint(0, 30000, (29,), generator=g), "cpu")
    expected = torch.full((2, 2, 3, 48, dim), 7.0, dtype=torch.bfloat16)
    expected[0, :, :, 4:33] = torch.cat([k for k, _ in chunks], dim=2)
    expected[1, :, :, 4:33] = torch.cat([v for _, v in chunks], dim=2)
    rope_into_(expected[0, :, :, 4:33], expected[0, :, :, 4:33], tables)
    got = torch.full_like(expected, 7.0)
    assert rope_kernel.rope_run_into(got[0], got[1], 4, chunks, tables.cos, tables.sin, threads=threads)
    assert same_bits(got, expected)


@needs_kernel
def test_a_run_in_one_pass_declines_what_it_does_not_handle():
    tables = half_tables(tiny_lm("llama")[0].rope, torch.arange(8), "cpu")
    dim = tables.cos.shape[1] * 2
    cache = torch.zeros(2, 2, 2, 16, dim, dtype=torch.bfloat16)
    chunk = stored_keys(2, 2, 8, dim, seed=0, dtype=torch.bfloat16)
    assert not rope_kernel.rope_run_into(cache[0], cache[1], 0, [(chunk.half(), chunk.half())], tables.cos, tables.sin)
    f32 = cache.float()
    assert not rope_kernel.rope_run_into(f32[0], f32[1], 0, [(chunk, chunk)], tables.cos, tables.sin)
    assert not rope_kernel.rope_run_into(cache[0], cache[1], 9, [(chunk, chunk)], tables.cos, tables.sin)  # no room
    assert not rope_kernel.rope_run_into(cache[0], cache[1], 0, [(chunk, chunk)], tables.cos[:7], tables.sin[:7])
    assert not rope_kernel.rope_run_into(cache[0], cache[1], 0, [(chunk, chunk[:1])], tables.cos, tables.sin)
    assert not torch.any(cache)


def test_kernel_declines_what_it_does_not_handle():
    tables = half_tables(tiny_lm("llama")[0].rope, torch.arange(8), "cpu")
    dim = tables.cos.shape[1] * 2
    f32_src = torch.randn(2, 2, 8, dim)
    assert not rope_kernel.rope_into(torch.empty(2, 2, 8, dim), f32_src, tables.cos, tables.sin)
    assert not rope_kernel.rope_into(torch.empty(2, 2, 8, dim, dtype=torch.bfloat16), f32_src.half(),
                                     tables.cos, tables.sin)
    assert not rope_kernel.rope_into(torch.empty(2, 2, 8, dim), f32_src.bfloat16(), tables.cos, tables.sin)
    strided = torch.randn(2, 2, 8, 2 * dim).half()[..., :dim]  # rows not contiguous
    assert not rope_kernel.rope_into(torch.empty(2, 2, 8, dim), strided, tables.cos, tables.sin)


@needs_kernel
@pytest.mark.parametrize("stored, cached", [(torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16)])
def test_append_rotated_through_the_kernel_matches_the_torch_path(stored, cached):
    """A run of stored hits into a cache: the kernel's cache equals copy-then-rotate's."""
    lm, _ = tiny_lm("llama", "llama3")
    chunks = [(stored_keys(lm.n_layers, lm.n_kv_heads, t, lm.head_dim, seed=t, dtype=stored),
               stored_keys(lm.n_layers, lm.n_kv_heads, t, lm.head_dim, seed=100 + t, dtype=stored)) for t in (7, 19, 3)]
    tables = half_tables(lm.rope, torch.arange(200, 229), "cpu")
    cache = KVCache(lm.n_layers, lm.n_kv_heads, lm.head_dim, 40, cached, "cpu")
    ones = torch.ones(lm.n_layers, lm.n_kv_heads, 2, lm.head_dim, dtype=cached)
    cache.append(ones, ones)
    cache.append_rotated(chunks, tables)
    k_all = torch.cat([k.to(cached) for k, _ in chunks], dim=2)
    rope_into_(k_all, k_all, tables)
    assert cache.length == 31
    assert torch.equal(cache.k[:, :, 2:31], k_all)
    assert torch.equal(cache.v[:, :, 2:31], torch.cat([v.to(cached) for _, v in chunks], dim=2))


@pytest.mark.parametrize("env, reason", [({"KVLIB_ROPE_KERNEL": "0"}, "off (KVLIB_ROPE_KERNEL=0)"),
                                         ({"PATH": "/nonexistent"}, "no C compiler (cc) on PATH")])
def test_without_the_kernel_the_torch_passes_run(monkeypatch, tmp_path, env, reason):
    if env.get("PATH") and rope_kernel.KERNEL.unavailable_reason() is not None:
        pytest.skip("this CPU takes no kernel anyway")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("KVLIB_KERNEL_DIR", str(tmp_path))  # no kernel built before
    monkeypatch.setattr(rope_kernel.KERNEL, "_state", {})
    assert rope_kernel.status() == reason
    tables = half_tables(tiny_lm("llama")[0].rope, torch.arange(8), "cpu")
    dim = tables.cos.shape[1] * 2
    src = torch.randn(1, 1, 8, dim).half()
    assert not rope_kernel.rope_into(torch.empty(1, 1, 8, dim), src, tables.cos, tables.sin)



@needs_kernel
def test_a_run_the_kernel_cannot_take_whole_falls_back_whole():
    """A run whose later chunk the kernel declines (rows not contiguous) goes through the torch
    passes from its first chunk: nothing half-written, the same cache either way. A single KV head
    laid out by a transpose (odd stride on a size-1 dimension) is taken."""
    lm, _ = tiny_lm("llama", num_key_value_heads=1)
    shape = (lm.n_layers, 1, 6, lm.head_dim)
    odd_head = stored_keys(lm.n_layers, 6, 1, lm.head_dim, seed=1).transpose(1, 2)  # [L, 1, 6, D], stride(1) = D
    rows_apart = torch.cat([stored_keys(*shape, seed=2)] * 2, dim=-1)[..., : lm.head_dim]
    tables = half_tables(lm.rope, torch.arange(50, 62), "cpu")
    assert rope_kernel.accepts(torch.empty(shape), odd_head, tables.cos[:6], tables.sin[:6])
    for second in (odd_head, rows_apart):
        chunks = [(stored_keys(*shape, seed=3), stored_keys(*shape, seed=4)), (second, stored_keys(*shape, seed=5))]
        cache = KVCache.for_model(lm, 12)
        cache.append_rotated(chunks, tables)
        k_all = torch.cat([k.float() for k, _ in chunks], dim=2)
        rope_into_(k_all, k_all, tables)
        assert cache.length == 12 and torch.equal(cache.k[:, :, :12], k_all)


@needs_kernel
def test_kernel_builds_into_a_relative_directory_and_reports_a_failed_build(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KVLIB_KERNEL_DIR", "kernels")  # relative: loaded by absolute path all the same
    monkeypatch.setattr(rope_kernel.KERNEL, "_state", {})
    assert rope_kernel.status() == "compiled"
    (tmp_path / "blocked").write_text("a file where the directory should be")
    monkeypatch.setenv("KVLIB_KERNEL_DIR", "blocked/kernels")
    monkeypatch.setattr(rope_kernel.KERNEL, "_state", {})
    assert rope_kernel.status().startswith("build failed")


@needs_kernel
@pytest.mark.parametrize("family, rope", [("llama", "yarn"), ("qwen2", "default")])  # qwen2: q/k/v biases
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_forward_writes_its_projections_through_the_kernel_with_the_torch_bits(monkeypatch, family, rope, dtype):
    """run_layers at a contiguous start rotates q and k and writes k, v into the cache straight from
    the fused product (KVCache.write_projected): the same cache and the same hidden states, bit for
    bit, as apply_rope and KVCache.write, which run where the kernel is off; in float32 and in bf16."""
    from kvlib.engine.attention import Mask
    from kvlib.engine.forward import embed, run_layers
    from kvlib.engine.model import wrap_model

    from tiny_models import tiny_hf

    lm = wrap_model(tiny_hf(family, rope, 0), None, name="tiny", dtype=dtype, device=torch.device("cpu"))
    ids, positions = random_ids(13, seed=2), torch.arange(300, 313)
    seen = []
    real = KVCache.write_projected
    monkeypatch.setattr(KVCache, "write_projected", lambda self, *a: seen.append(real(self, *a)) or seen[-1])

    def run():
        cache = KVCache.for_model(lm, 40)
        cache.append(*[torch.randn(lm.n_layers, lm.n_kv_heads, 9, lm.head_dim,
                                   generator=torch.Generator().manual_seed(s)) for s in (1, 2)])
        out = run_layers(lm, embed(lm, ids), positions, cache, Mask.causal(13, 9), keep_kv=True)
        return out, cache

    fast, fast_cache = run()
    assert len(seen) == lm.n_layers and all(s is not None for s in seen)
    monkeypatch.setattr(rope_kernel.KERNEL, "_state", {"fn": None, "reason": "off", "lib": None})
    slow, slow_cache = run()
    assert torch.equal(fast.h, slow.h)
    assert torch.equal(fast_cache.k[:, :, :22], slow_cache.k[:, :, :22])
    assert torch.equal(fast_cache.v[:, :, :22], slow_cache.v[:, :, :22])
    assert all(torch.equal(a, b) for a, b in zip(fast.k_sem + fast.v, slow.k_sem + slow.v))
