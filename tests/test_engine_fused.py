"""Stacked projections and prepacked weights (engine/fused.py): the same forward, bit for bit,
and no weight held twice unless the packed copy fits its budget."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from kvlib.engine import fused as fused_mod
from kvlib.engine.forward import KVCache, forward
from kvlib.engine.model import wrap_model
from tiny_models import FAMILIES, random_ids, tiny_hf


def logits_of(lm, ids):
    cache = KVCache.for_model(lm, len(ids))
    return forward(lm, ids, torch.arange(len(ids)), cache, logits="all", keep_kv=True)


def bf16_lm(family):
    hf = tiny_hf(family)
    return wrap_model(hf, None, name=f"tiny-{family}", dtype=torch.bfloat16, device=torch.device("cpu"))


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_weights_are_views_of_the_stacked_matrices(family):
    lm = bf16_lm(family)
    layer, f = lm.layers[0], lm.fused[0]
    attn = layer.self_attn
    assert attn.q_proj.weight.untyped_storage().data_ptr() == f.qkv_weight.untyped_storage().data_ptr()
    assert attn.v_proj.weight.untyped_storage().data_ptr() == f.qkv_weight.untyped_storage().data_ptr()
    assert torch.equal(f.qkv_weight[: attn.q_proj.weight.shape[0]], attn.q_proj.weight)
    assert layer.mlp.up_proj.weight.untyped_storage().data_ptr() == f.gate_up_weight.untyped_storage().data_ptr()


def assert_same_forward(out, reference):
    assert torch.equal(out.logits, reference.logits)
    assert torch.equal(out.k_sem, reference.k_sem) and torch.equal(out.v, reference.v)


@pytest.mark.parametrize("family", FAMILIES)
def test_stacked_forward_equals_the_modules_bit_for_bit(family):
    lm = bf16_lm(family)
    ids = random_ids(24, seed=3)
    lm.fused, lm.head_packed = [replace(f, packed=None) for f in lm.fused], None
    stacked = logits_of(lm, ids)
    lm.fused = []
    # a stacked product's columns are the separate products' columns
    assert_same_forward(stacked, logits_of(lm, ids))


@pytest.mark.skipif(not fused_mod.cpu_packs_bf16(), reason="this CPU's oneDNN cannot pack bf16 weights (AVX2 only)")
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_forward_equals_the_modules_bit_for_bit(family):
    lm = bf16_lm(family)
    ids = random_ids(24, seed=3)
    assert lm.fused[0].packed is not None and lm.head_packed is not None  # bf16 on CPU, far under the budget
    packed = logits_of(lm, ids)
    lm.fused, lm.head_packed = [], None
    assert_same_forward(packed, logits_of(lm, ids))


def test_no_packed_copy_where_the_cpu_cannot_pack_bf16(monkeypatch):
    monkeypatch.setattr(fused_mod, "cpu_packs_bf16", lambda: False)
    lm = bf16_lm("llama")
    assert lm.fused[0].packed is None and lm.head_packed is None


def f32_lm(family="llama"):
    return wrap_model(tiny_hf(family), None, name="t", dtype=torch.float32, device=torch.device("cpu"))


@pytest.mark.parametrize("family", FAMILIES)
def test_float32_packed_forward_is_the_modules_up_to_rounding_and_batch_invariant(family):
    lm = f32_lm(family)
    assert set(lm.fused[0].packed) == {"qkv", "o", "gate_up", "down"} and lm.head_packed is not None
    ids = random_ids(24, seed=3)
    packed = logits_of(lm, ids)
    lm.fused, lm.head_packed = [], None
    modules = logits_of(lm, ids)
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


def test_packing_follows_the_plan_within_the_budget(monkeypatch):
    monkeypatch.setattr(fused_mod, "PACK_MAX_BYTES", 0)
    lm = f32_lm()
    assert lm.fused[0].packed is None and lm.head_packed is None
    head_only = f32_lm().hf.lm_head.weight
    monkeypatch.setattr(fused_mod, "PACK_MAX_BYTES", head_only.numel() * head_only.element_size())
    lm = f32_lm()  # the head first: it alone fits
    assert lm.head_packed is not None and lm.fused[0].packed is None
    groups = [("a", [torch.zeros(4, 4)]), ("b", [torch.zeros(8, 8)]), ("c", [torch.zeros(2, 2)])]
    assert fused_mod.plan_packing(groups, budget=4 * (16 + 4)) == {"a", "c"}  # b does not fit after a; c does
    assert fused_mod.plan_packing([("h", [torch.zeros(2, 2, dtype=torch.float16)])], budget=1 << 20) == set()
