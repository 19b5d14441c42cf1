"""Rotation algebra, and equality with transformers' own apply_rotary_pos_emb per rope type."""

from __future__ import annotations

import pytest
import torch

from kvlib.engine.rope import apply_rope, rope_spec_from_rotary, rotate, unapply_rope
from kvlib.errors import UnsupportedModelError
from tiny_models import ROPE_TYPES, tiny_hf, tiny_lm

TOL = dict(atol=1e-4, rtol=1e-4)


def keys(seed=0, t=12, d=16):
    return torch.randn(2, t, d, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("rope", list(ROPE_TYPES))
def test_matches_transformers_apply_rotary_pos_emb(rope):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    hf = tiny_hf("llama", rope)
    spec = rope_spec_from_rotary(hf.model.rotary_emb)
    k = keys(1)[None]  # [1, H, T, D]
    pos = torch.tensor([0, 1, 5, 100, 1000, 3000, 7, 8, 9, 10, 2047, 4095])
    cos, sin = hf.model.rotary_emb(k, pos[None])
    _, ref = apply_rotary_pos_emb(k, k, cos, sin)
    torch.testing.assert_close(apply_rope(k, pos, spec), ref, **TOL, msg=f"{rope}: kvlib rotation != transformers")


@pytest.mark.parametrize("rope", list(ROPE_TYPES))
def test_rotation_composes_additively(rope):
    spec = rope_spec_from_rotary(tiny_hf("llama", rope).model.rotary_emb)
    k = keys(2)
    a, b = torch.arange(12) * 37, torch.full((12,), 1234)
    torch.testing.assert_close(rotate(apply_rope(k, a, spec), b, spec), apply_rope(k, a + b, spec), **TOL)
    torch.testing.assert_close(rotate(rotate(k, a, spec), b, spec), rotate(k, a + b, spec), **TOL)


@pytest.mark.parametrize("rope", list(ROPE_TYPES))
def test_unrope_inverts_rope(rope):
    spec = rope_spec_from_rotary(tiny_hf("llama", rope).model.rotary_emb)
    k = keys(3)
    pos = torch.arange(12) * 311
    torch.testing.assert_close(unapply_rope(apply_rope(k, pos, spec), pos, spec), k, **TOL)


def test_wrong_position_is_detected():
    """A sanity check that the tolerance can fail: an off-by-one position is far outside it."""
    spec = rope_spec_from_rotary(tiny_hf("llama", "default").model.rotary_emb)
    k = keys(4)
    pos = torch.arange(12)
    diff = (apply_rope(k, pos, spec) - apply_rope(k, pos + 1, spec)).abs().max().item()
    assert diff > 1e-2, f"off-by-one rotation differs by only {diff:.2e}"


@pytest.mark.parametrize("rope_type", ["dynamic", "longrope"])
def test_position_dependent_scaling_is_refused(rope_type):
    class Rotary(torch.nn.Module):
        pass

    rotary = Rotary()
    rotary.rope_type, rotary.inv_freq, rotary.attention_scaling = rope_type, torch.ones(4), 1.0
    with pytest.raises(UnsupportedModelError, match="supported rope types: default, linear, llama3, yarn"):
        rope_spec_from_rotary(rotary)


def test_dynamic_model_config_is_refused():
    from kvlib.engine.model import wrap_model

    hf = tiny_hf("llama", "default", rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(UnsupportedModelError, match="dynamic"):
        wrap_model(hf, None, name="dyn", dtype=torch.float32, device=torch.device("cpu"))


def test_unsupported_family_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    from kvlib.engine.model import wrap_model

    hf = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match="supported: llama, mistral, qwen2, qwen3"):
        wrap_model(hf, None, name="gpt2", dtype=torch.float32, device=torch.device("cpu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_rotation_is_bit_identical_to_apply_rope(dtype):
    """compose rotates cache slots in place, layer by layer: the same bits as the out-of-place formula."""
    from kvlib.engine.rope import apply_rope_

    lm, _ = tiny_lm("llama", "yarn")
    g = torch.Generator().manual_seed(3)
    k = torch.randn(2, lm.n_kv_heads, 37, lm.head_dim, generator=g).to(dtype)
    pos = torch.randint(0, 9000, (37,), generator=g)
    expected = apply_rope(k, pos, lm.rope)
    apply_rope_(k, pos, lm.rope)
    assert torch.equal(k, expected)
