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


def test_no_packed_copy_beyond_the_budget_or_in_float32(monkeypatch):
    f32 = wrap_model(tiny_hf("llama"), None, name="t", dtype=torch.float32, device=torch.device("cpu"))
    assert f32.fused[0].packed is None and f32.head_packed is None
    monkeypatch.setattr(fused_mod, "PACK_MAX_BYTES", 0)
    over = bf16_lm("llama")
    assert over.fused[0].packed is None and over.head_packed is None
