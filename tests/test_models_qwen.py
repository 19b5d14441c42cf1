"""Integration, opt-in: the real Qwen2.5-Coder-1.5B-Instruct, float32.

Runs only when `kvlib models fetch qwen2.5-1.5b` has installed it in the library home that
`--home` would resolve to (KVLIB_HOME, else ~/.kvlib); never downloads. Select with
`pytest -m qwen` (or `make test-qwen`). The first run in a home dequantizes the GGUF into it
(about 3.5 minutes and 7 GB of disk on 2 cores); later loads take about 15 s and 7 GB of memory.
"""

from __future__ import annotations

import pytest
import torch

from kvlib.engine.doctor import SAMPLE_QUESTION, SAMPLE_TEXT
from kvlib.engine.spec import parse_mode

pytestmark = [pytest.mark.qwen, pytest.mark.slow]  # slow too: `make test-fast` leaves it out


def _installed_home():
    from kvlib.config import resolve_home
    from kvlib.engine import models_registry as registry

    home = resolve_home()
    spec = registry.get_spec("qwen2.5-1.5b")
    return home if registry.is_verified(spec, registry.model_file(spec, home)) else None


@pytest.fixture(scope="module")
def qwen_engine():
    home = _installed_home()
    if home is None:
        pytest.skip("qwen2.5-1.5b is not installed in the library home: run `kvlib models fetch qwen2.5-1.5b` "
                    "(set KVLIB_HOME to the home that holds it)")
    from kvlib.engine.session import Engine

    return Engine.load("qwen2.5-1.5b", home, dtype="float32")


def test_loaded_config_is_the_pinned_model(qwen_engine):
    lm = qwen_engine.lm
    s = lm.config_summary
    assert lm.name == "Qwen2.5-Coder-1.5B-Instruct" and s["model_type"] == "qwen2"
    assert (s["num_hidden_layers"], s["num_attention_heads"], s["num_key_value_heads"], s["head_dim"]) == (28, 12, 2, 128)
    assert s["rope_parameters"]["rope_theta"] == 1e6 and s["sliding_window"] is None
    assert lm.hf.model.layers[0].self_attn.k_proj.bias is not None  # qwen2's qkv bias survived dequantization
    # KV bytes per token as stored (fp16 or bf16): layers x kv heads x head_dim x (K, V) x 2 bytes.
    assert s["num_hidden_layers"] * s["num_key_value_heads"] * s["head_dim"] * 2 * lm.kv_dtype.itemsize == 28_672


def test_chat_template_and_stop_tokens(qwen_engine):
    tok = qwen_engine.lm.tokenizer
    head = tok.decode(list(qwen_engine.template.context_ids))
    assert head.startswith("<|im_start|>system\n") and head.endswith("<|im_start|>user\n")
    assert qwen_engine.template.suffix_text == "<|im_end|>\n<|im_start|>assistant\n"
    assert tok.convert_tokens_to_ids("<|im_end|>") in qwen_engine.stop


def test_doctor_checks_pass(qwen_engine):
    from kvlib.engine.doctor import run_checks

    checks = run_checks(qwen_engine)
    assert checks and all(c.ok for c in checks), [(c.name, c.value, c.limit) for c in checks if not c.ok]


def test_own_forward_equals_transformers(qwen_engine):
    """Invariant 4 on the real weights: kvlib's forward reproduces HF's logits (qkv bias, untied head)."""
    from kvlib.engine.compose import compose
    from kvlib.engine.forward import reference_logits
    from kvlib.engine.generate import prefill

    lm, eng = qwen_engine.lm, qwen_engine
    chunk = eng.encode(eng.tokenize(SAMPLE_TEXT))
    suffix = eng.suffix_ids(SAMPLE_QUESTION)
    ids = list(eng.template.context_ids) + chunk.token_ids.tolist() + suffix
    own, _, _ = prefill(lm, compose(lm, eng.context, [chunk], "full"), suffix, logits="all")
    with torch.no_grad():
        ref = reference_logits(lm, torch.tensor(ids))
    n = len(suffix)
    # Same limit as doctor's: float32 rounding on logits of magnitude ~30 stays far below it.
    assert (own.logits[-n:] - ref[-n:]).abs().max().item() <= 1e-3


def test_single_cached_chunk_greedy_equals_full(qwen_engine):
    chunk = qwen_engine.encode(qwen_engine.tokenize(SAMPLE_TEXT))  # stored form: fp16 KV
    full = qwen_engine.answer(parse_mode("full"), [chunk], SAMPLE_QUESTION, max_new_tokens=12)
    cached = qwen_engine.answer(parse_mode("rerope"), [chunk], SAMPLE_QUESTION, max_new_tokens=12)
    answer = qwen_engine.decode(full.token_ids)
    assert "Ansel Brook" in answer, f"a 1.5B model should answer this; got {answer!r}"
    assert cached.token_ids == full.token_ids, f"cached {qwen_engine.decode(cached.token_ids)!r} != full {answer!r}"
