"""Stacked projections and prepacked weights (engine/fused.py): the same forward (bit for bit in
bf16, to float rounding in float32), and no weight held twice: a packed copy replaces the plain one."""

from __future__ import annotations

import pytest
import torch

from kvlib.engine import fused as fused_mod
from kvlib.engine import linear_kernel
from kvlib.engine.forward import KVCache, forward, reference_logits
from kvlib.engine.model import plain_weights, wrap_model
from tiny_models import FAMILIES, random_ids, tiny_hf


def logits_of(lm, ids):
    cache = KVCache.for_model(lm, len(ids))
    return forward(lm, ids, torch.arange(len(ids)), cache, logits="all", keep_kv=True)


def make_lm(family="llama", dtype=torch.float32, *, pack_mb=None, monkeypatch=None):
    """A tiny model; pack_mb sets the packing budget for this load (0: nothing packed)."""
    if pack_mb is not None:
        monkeypatch.setenv("KVLIB_PACK_MB", str(pack_mb))
    lm = wrap_model(tiny_hf(family), None, name=f"tiny-{family}", dtype=dtype, device=torch.device("cpu"))
    if pack_mb is not None:
        monkeypatch.delenv("KVLIB_PACK_MB")
    return lm


def assert_same_forward(out, reference):
    assert torch.equal(out.logits, reference.logits)
    assert torch.equal(out.k_sem, reference.k_sem) and torch.equal(out.v, reference.v)


@pytest.mark.parametrize("family", FAMILIES)
def test_unpacked_hf_weights_are_views_of_the_stacked_matrices(family, monkeypatch):
    lm = make_lm(family, torch.bfloat16, pack_mb=0, monkeypatch=monkeypatch)
    layer, f = lm.layers[0], lm.fused[0]
    attn = layer.self_attn
    assert f.packed is None and lm.head_packed is None
    assert attn.q_proj.weight.untyped_storage().data_ptr() == f.qkv_weight.untyped_storage().data_ptr()
    assert attn.v_proj.weight.untyped_storage().data_ptr() == f.qkv_weight.untyped_storage().data_ptr()
    assert torch.equal(f.qkv_weight[: attn.q_proj.weight.shape[0]], attn.q_proj.weight)
    assert layer.mlp.up_proj.weight.untyped_storage().data_ptr() == f.gate_up_weight.untyped_storage().data_ptr()


@pytest.mark.parametrize("family", FAMILIES)
def test_stacked_forward_equals_the_modules_bit_for_bit(family, monkeypatch):
    lm = make_lm(family, torch.bfloat16, pack_mb=0, monkeypatch=monkeypatch)
    ids = random_ids(24, seed=3)
    stacked = logits_of(lm, ids)
    lm.fused = []
    # a stacked product's columns are the separate products' columns
    assert_same_forward(stacked, logits_of(lm, ids))


def bf16_linear_off(monkeypatch):
    """No bf16 linear kernel for this test (oneDNN packs bf16 weights), as KVLIB_BF16_LINEAR=0 does."""
    monkeypatch.setenv("KVLIB_BF16_LINEAR", "0")
    monkeypatch.setattr(linear_kernel.BF16, "_state", {})


@pytest.mark.skipif(not fused_mod.cpu_packs_bf16(), reason="this CPU's oneDNN cannot pack bf16 weights (AVX2 only)")
@pytest.mark.parametrize("family", FAMILIES)
def test_onednn_packed_bf16_forward_equals_the_modules_bit_for_bit(family, monkeypatch):
    bf16_linear_off(monkeypatch)
    lm = make_lm(family, torch.bfloat16)
    assert not isinstance(lm.fused[0].packed["qkv"], linear_kernel.Panels)
    assert lm.fused[0].packed is not None and lm.head_packed is not None  # bf16 on CPU, far under the budget
    ids = random_ids(24, seed=3)
    plain = make_lm(family, torch.bfloat16, pack_mb=0, monkeypatch=monkeypatch)
    plain.fused = []
    assert_same_forward(logits_of(lm, ids), logits_of(plain, ids))


@pytest.mark.skipif(linear_kernel.bf16_status() != "compiled",
                    reason=f"bf16 linear kernel unavailable here: {linear_kernel.bf16_status()}")
@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_panels_forward_is_as_close_to_float32_as_the_modules(family, monkeypatch):
    """The bf16 linear kernel sums in another order than oneDNN: its forward is as far from the model's
    float32 forward as the modules' bf16 forward is."""
    lm = make_lm(family, torch.bfloat16)
    assert isinstance(lm.fused[0].packed["qkv"], linear_kernel.Panels) and lm.head_packed is not None
    plain = make_lm(family, torch.bfloat16, pack_mb=0, monkeypatch=monkeypatch)
    exact = make_lm(family, torch.float32, pack_mb=0, monkeypatch=monkeypatch)
    plain.fused, exact.fused = [], []
    ids = random_ids(24, seed=3)
    reference = logits_of(exact, ids).logits.double()
    err = {name: (logits_of(m, ids).logits.double() - reference).abs().max() for name, m in
           (("panels", lm), ("modules", plain))}
    assert err["panels"] <= 1.5 * err["modules"] + 1e-2, err


def test_no_packed_copy_where_the_cpu_cannot_pack_bf16(monkeypatch):
    bf16_linear_off(monkeypatch)
    monkeypatch.setattr(fused_mod, "cpu_packs_bf16", lambda: False)
    lm = make_lm("llama", torch.bfloat16)
    assert lm.fused[0].packed is None and lm.head_packed is None


@pytest.mark.parametrize("family", FAMILIES)
def test_float32_packed_forward_is_the_modules_up_to_rounding(family, monkeypatch):
    lm = make_lm(family)
    assert set(lm.fused[0].packed) == {"qkv", "o", "gate_up", "down"} and lm.head_packed is not None
    ids = random_ids(24, seed=3)
    plain = make_lm(family, pack_mb=0, monkeypatch=monkeypatch)
    plain.fused = []
    packed, modules = logits_of(lm, ids), logits_of(plain, ids)
    # oneDNN's and MKL's float32 products sum in other orders: ~1e-7 relative per product
    torch.testing.assert_close(packed.logits, modules.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(packed.k_sem, modules.k_sem, rtol=1e-4, atol=1e-4)


def test_float32_packed_products_do_not_depend_on_the_batch():
    torch.manual_seed(0)
    weight, x = torch.randn(96, 64), torch.randn(40, 64)
    packed = fused_mod.pack(weight)
    alone = fused_mod.linear(x[:1], weight, None, packed)
    for rows in (2, 7, 30, 40):  # the first row's bits, whatever shares its product
        assert torch.equal(fused_mod.linear(x[:rows], weight, None, packed)[:1], alone), rows


def test_a_packed_weight_replaces_its_plain_copy_and_comes_back_exactly():
    hf = tiny_hf("qwen2", tie_word_embeddings=False)
    originals = {name: p.detach().clone() for name, p in hf.named_parameters()}
    lm = wrap_model(hf, None, name="t", dtype=torch.float32, device=torch.device("cpu"))
    layer = lm.layers[0]
    for module in (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.down_proj):
        assert module.weight.is_meta  # no plain copy held beside the packed one
    assert lm.fused[0].qkv_weight.is_meta and lm.hf.lm_head.weight.is_meta
    assert not layer.self_attn.q_proj.bias.is_meta  # biases are not packed: they stay
    with plain_weights(lm) as restored:
        for name, p in restored.named_parameters():
            assert torch.equal(p, originals[name]), name
    assert layer.mlp.up_proj.weight.is_meta  # let go again after the block
    ids = random_ids(20, seed=4)
    torch.testing.assert_close(reference_logits(lm, ids), logits_of(lm, ids).logits, rtol=1e-4, atol=1e-4)


def test_a_head_tied_to_the_embedding_keeps_its_plain_copy():
    lm = wrap_model(tiny_hf("llama", tie_word_embeddings=True), None, name="t", dtype=torch.float32,
                    device=torch.device("cpu"))
    assert lm.hf.lm_head.weight is lm.hf.model.embed_tokens.weight and not lm.hf.lm_head.weight.is_meta
    assert lm.head_packed is not None


def test_packing_follows_the_plan_within_the_budget(monkeypatch):
    lm = make_lm(pack_mb=0, monkeypatch=monkeypatch)
    assert lm.fused[0].packed is None and lm.head_packed is None
    head = tiny_hf("llama").lm_head.weight
    monkeypatch.setattr(fused_mod, "PACK_MAX_BYTES", head.numel() * head.element_size())
    lm = make_lm()  # the head first: it alone fits
    assert lm.head_packed is not None and lm.fused[0].packed is None
    groups = [("a", [torch.zeros(4, 4)]), ("b", [torch.zeros(8, 8)]), ("c", [torch.zeros(2, 2)])]
    assert fused_mod.plan_packing(groups, budget=4 * (16 + 4)) == {"a", "c"}  # b does not fit after a; c does
    assert fused_mod.plan_packing([("h", [torch.zeros(2, 2, dtype=torch.float16)])], budget=1 << 20) == set()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_is_the_modules_own_rmsnorm(family, dtype):
    """forward.norm gives the HF module's RMSNorm for the input norm, the post-attention norm and
    the final one, at a decode token, a question's rows and a prompt's: bit for bit through torch's
    fused kernel; within float32 rounding through pointwise_kernel (float32, where it builds)."""
    from kvlib.engine import pointwise_kernel
    from kvlib.engine.forward import norm

    lm = make_lm(family, dtype)
    gen = torch.Generator().manual_seed(3)
    modules = [lm.layers[0].input_layernorm, lm.layers[-1].post_attention_layernorm, lm.hf.model.norm]
    for module in modules:
        with torch.no_grad():
            module.weight.copy_(torch.randn(module.weight.shape, generator=gen).to(dtype))
        for t in (1, 30, 257):
            x = (torch.randn(1, t, module.weight.shape[0], generator=gen) * 7).to(dtype)
            with torch.no_grad():
                got, want = norm(module, x), module(x)
            if dtype == torch.float32 and pointwise_kernel.status() == "compiled":
                torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)
            else:
                assert torch.equal(got, want), (type(module).__name__, t)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch build")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_onednn_rows_are_bucketed_without_changing_a_bit(dtype):
    """oneDNN meets few row counts (row_bucket: at most 3% more rows, zeros, cut back) and each real row
    comes out as the unpadded product's."""
    if dtype == torch.bfloat16 and not fused_mod.cpu_packs_bf16():
        pytest.skip("this CPU's oneDNN cannot pack bf16 weights")
    assert [fused_mod.row_bucket(m) for m in (1, 64, 65, 700, 4120)] == [1, 64, 66, 704, 4224]
    assert all(m <= fused_mod.row_bucket(m) <= m * 1.032 for m in range(1, 9000))
    g = torch.Generator().manual_seed(5)
    weight, bias = torch.randn(96, 64, generator=g).to(dtype), torch.randn(96, generator=g).to(dtype)
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
    for m in (3, 65, 129, 700):
        x = torch.randn(1, m, 64, generator=g).to(dtype)
        got = fused_mod.onednn_linear(x, packed, bias)
        assert got.shape == (1, m, 96)
        assert torch.equal(got, torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")), m
