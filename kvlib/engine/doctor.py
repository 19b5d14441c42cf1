"""The per-model correctness gate (`kvlib doctor`) and the in-memory TTFT measurement.

Design facts:
- Checks run in float32, where the invariants of DESIGN.md §1 are exact up to
  rounding; the limits below give that rounding room on a real model (logits of
  magnitude ~30, positions up to a few thousand), yet a one-position error moves
  logits by whole units and fails them.
- The TTFT bench keeps chunk KV in memory, so it measures compute only: `full`
  prefills every token; `rerope` rotates cached keys and prefills the question. Both go
  through Engine.answer, the pipeline every command uses.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

from kvlib.engine.compose import compose, encode_chunk
from kvlib.engine.generate import prefill
from kvlib.engine.rope import apply_rope, unapply_rope
from kvlib.engine.session import Engine, sync
from kvlib.engine.spec import parse_mode

SAMPLE_TEXT = (
    "The Varnholm lighthouse was first lit in 1874 by keeper Ansel Brook, who kept a diary of every "
    "storm for thirty-one years. Its lamp burned rapeseed oil until 1902, when the harbour board paid "
    "for a paraffin burner, and it was electrified in 1951. The tower is forty-two metres tall."
)
SAMPLE_QUESTION = "Who first lit the Varnholm lighthouse?"
SHIFT = 2048  # a start position far from the encoding position, as a long prompt would give


@dataclass
class Check:
    name: str
    value: float
    limit: float
    ok: bool


def _check(name: str, value: float, limit: float) -> Check:
    return Check(name=name, value=float(value), limit=limit, ok=bool(value <= limit))


def check_shift_invariance(engine: Engine, ids) -> Check:
    at0 = encode_chunk(engine.lm, engine.context, ids, offset=0)
    at_s = encode_chunk(engine.lm, engine.context, ids, offset=SHIFT)
    diff = max((at0.k_sem - at_s.k_sem).abs().max().item(), (at0.v - at_s.v).abs().max().item())
    return _check(f"shift invariance of K_sem, V (max abs, offset {SHIFT})", diff, 1e-3)


def check_composition(engine: Engine, ids) -> Check:
    lm, suffix = engine.lm, engine.suffix_ids(SAMPLE_QUESTION)
    chunk = encode_chunk(lm, engine.context, ids)
    cached, _, _ = prefill(lm, compose(lm, engine.context, [chunk], "rerope"), suffix, logits="all")
    full, _, _ = prefill(lm, compose(lm, engine.context, [chunk], "full"), suffix, logits="all")
    n = len(suffix)
    diff = (cached.logits[-n:] - full.logits[-n:]).abs().max().item()
    return _check("single cached chunk vs full recompute (max abs logit diff)", diff, 1e-3)


def check_forward(engine: Engine, ids) -> Check:
    """Invariant 4: kvlib's own forward equals transformers' logits on the same ids."""
    from kvlib.engine.cache import KVCache
    from kvlib.engine.forward import forward, reference_logits

    lm, ids = engine.lm, torch.as_tensor(ids, dtype=torch.long)
    ours = forward(lm, ids, torch.arange(ids.shape[0]), KVCache.for_model(lm, ids.shape[0]), logits="all").logits
    diff = (ours - reference_logits(lm, ids)).abs().max().item()
    return _check("kvlib forward vs transformers logits (max abs)", diff, 1e-3)


def check_rotation_roundtrip(engine: Engine) -> Check:
    lm = engine.lm
    g = torch.Generator().manual_seed(0)
    k = torch.randn(lm.n_kv_heads, 64, lm.head_dim, generator=g)
    pos = torch.randint(0, 32768, (64,), generator=g)
    diff = (unapply_rope(apply_rope(k, pos, lm.rope), pos, lm.rope) - k).abs().max().item()
    return _check("rotation round trip unrope(rope(k, p), p) (max abs)", diff, 1e-4)


def check_rope_kernel(engine: Engine) -> Check | None:
    """The C rotation of stored keys (engine/rope_kernel.py), where this machine builds it: float16 keys
    into a float32 cache, or for a bf16 model a run of bf16 chunks in one pass (values copied); the
    torch passes' bits, on the model's own rotary tables. None where it is not used."""
    from kvlib.engine import rope_kernel
    from kvlib.engine.rope import half_tables, rope_into_

    lm, g = engine.lm, torch.Generator().manual_seed(1)
    stored = torch.bfloat16 if lm.dtype == torch.bfloat16 else torch.float16
    k, v = (torch.randn(2, 2, lm.n_kv_heads, 64, lm.head_dim, generator=g) * 4).to(stored)
    tables = half_tables(lm.rope, torch.randint(0, 32768, (64,), generator=g), "cpu")
    expected = torch.stack([k, v]).to(lm.dtype if stored == torch.bfloat16 else torch.float32)
    rope_into_(expected[0], expected[0], tables)
    got = torch.empty_like(expected)
    if stored == torch.bfloat16:
        halves = [(k[:, :, :40], v[:, :, :40]), (k[:, :, 40:], v[:, :, 40:])]
        done = rope_kernel.rope_run_into(got[0], got[1], 0, halves, tables.cos, tables.sin)
    else:
        got[1] = expected[1]
        done = rope_kernel.rope_into(got[0], k, tables.cos, tables.sin)
    if not done:
        return None
    what = "a run of bf16 chunks" if stored == torch.bfloat16 else "float16 keys"
    diff = (got.float() - expected.float()).abs().max().item()
    return _check(f"C rotation of {what} vs torch's passes (max abs)", diff, 0.0)


def check_attn_kernel(engine: Engine) -> Check | None:
    """The C attention of a question behind a long past (engine/attn_kernel.py), where this machine
    builds it: against SDPA on the model's own head shapes. None where it is not used."""
    from kvlib.engine import attn_kernel
    from kvlib.engine.attention import Mask, sdpa

    lm, g, t, past = engine.lm, torch.Generator().manual_seed(2), 25, 2000
    q = torch.randn(1, t, lm.config_summary["num_attention_heads"], lm.head_dim, generator=g).transpose(1, 2)
    keys, values = torch.randn(2, lm.n_kv_heads, past + t, lm.head_dim, generator=g)
    scale = lm.head_dim ** -0.5
    got = attn_kernel.attend_behind(q, keys, values, past, scale)
    if got is None:
        return None
    expected = sdpa(q, keys, values, scale, mask=Mask.causal(t, past).dense(q.device))
    return _check("C attention behind a 2k past vs SDPA (max abs)", (got - expected).abs().max().item(), 1e-5)


def check_bf16_attn(engine: Engine) -> Check | None:
    """The bf16 attention of queries behind a long past (attn_kernel.attend_behind_bf16), where this
    machine has it: its error against float64 attention within twice grouped SDPA's, which it replaces."""
    from kvlib.engine import attn_kernel
    from kvlib.engine.attention import Mask, few_queries, grouped_sdpa

    lm, g, t, past = engine.lm, torch.Generator().manual_seed(4), 25, 2000
    heads, scale = lm.config_summary["num_attention_heads"], lm.head_dim ** -0.5
    q = torch.randn(1, heads, t, lm.head_dim, generator=g).bfloat16()
    keys, values = torch.randn(2, lm.n_kv_heads, past + t, lm.head_dim, generator=g).bfloat16()
    got = attn_kernel.attend_behind_bf16(q, keys, values, past, scale)
    if got is None:
        return None
    ref = few_queries(q.double(), keys.double(), values.double(), past, scale)
    sdpa_err = (grouped_sdpa(q, keys, values, scale, Mask.causal(t, past)).double() - ref).abs().max().item()
    return _check("C bf16 attention behind a 2k past vs float64 (max abs; limit twice SDPA's)",
                  (got.double() - ref).abs().max().item(), 2 * sdpa_err)


def check_pointwise_kernel(engine: Engine) -> Check | None:
    """The C RMSNorm and gated SiLU (engine/pointwise_kernel.py), where this machine builds them:
    against torch's ops on the model's own widths. None where they are not used."""
    import torch.nn.functional as F

    from kvlib.engine import pointwise_kernel

    lm, g = engine.lm, torch.Generator().manual_seed(3)
    hidden, inter = lm.hf.config.hidden_size, lm.hf.config.intermediate_size
    x, gate_up = torch.randn(25, hidden, generator=g) * 3, torch.randn(25, 2 * inter, generator=g) * 3
    w = torch.randn(hidden, generator=g)
    normed, act = pointwise_kernel.rms_norm(x, w, 1e-6), pointwise_kernel.silu_mul(gate_up, inter)
    if normed is None or act is None:
        return None
    diff = max((normed - w * F.rms_norm(x, (hidden,), eps=1e-6)).abs().max().item(),
               (act - F.silu(gate_up[:, :inter]) * gate_up[:, inter:]).abs().max().item())
    return _check("C RMSNorm and gated SiLU vs torch (max abs)", diff, 1e-5)


def run_checks(engine: Engine) -> list[Check]:
    """Needs a float32 engine: the limits assume float32 rounding."""
    ids = engine.tokenize(SAMPLE_TEXT)
    checks = [check_forward(engine, ids), check_shift_invariance(engine, ids), check_composition(engine, ids),
              check_rotation_roundtrip(engine), check_rope_kernel(engine), check_attn_kernel(engine),
              check_bf16_attn(engine), check_pointwise_kernel(engine)]
    return [c for c in checks if c is not None]


def checks_as_json(engine: Engine, checks: list[Check]) -> dict:
    from kvlib.engine.kernels import statuses

    return {"model": engine.lm.name, "fingerprint": engine.lm.fingerprint, "dtype": str(engine.lm.dtype),
            "device": str(engine.lm.device), **statuses(),
            "checks": [asdict(c) for c in checks], "ok": all(c.ok for c in checks)}


def synthetic_chunks(engine: Engine, n_chunks: int, chunk_tokens: int) -> list:
    """n_chunks distinct chunks of real text tokens, chunk_tokens long, KV in memory."""
    base = engine.tokenize(SAMPLE_TEXT)
    chunks = []
    for i in range(n_chunks):
        ids = (base * (chunk_tokens // len(base) + 2))[i : i + chunk_tokens]
        chunks.append(engine.encode(ids))
    return chunks


def time_ttft(engine: Engine, chunks, mode: str, suffix) -> float:
    sync(engine.lm)
    t0 = time.perf_counter()
    engine.answer(parse_mode(mode), chunks, suffix_ids=suffix, max_new_tokens=1, t0=t0)
    sync(engine.lm)
    return time.perf_counter() - t0


def bench_ttft(engine: Engine, *, n_chunks: int = 8, chunk_tokens: int = 512, repeats: int = 5) -> dict:
    """Median TTFT of `full` and `rerope` over `repeats` runs after one warm-up each."""
    chunks = synthetic_chunks(engine, n_chunks, chunk_tokens)
    suffix = engine.suffix_ids(SAMPLE_QUESTION)
    out = {"n_chunks": n_chunks, "chunk_tokens": chunk_tokens, "prompt_tokens":
           engine.context.n_tokens + n_chunks * chunk_tokens + len(suffix), "repeats": repeats,
           "dtype": str(engine.lm.dtype).replace("torch.", ""), "device": str(engine.lm.device)}
    for mode in ("full", "rerope"):
        time_ttft(engine, chunks, mode, suffix)  # warm-up
        runs = [time_ttft(engine, chunks, mode, suffix) for _ in range(repeats)]
        out[f"{mode}_ttft_s"] = statistics.median(runs)
        out[f"{mode}_runs_s"] = runs
    out["speedup"] = out["full_ttft_s"] / out["rerope_ttft_s"]
    # Plain prefill throughput, the yardstick for ingest: the whole prompt at once, and the
    # chunks as separate chunk_tokens-long sequences (what ingest encodes, minus storing).
    out["full_prefill_tok_s"] = out["prompt_tokens"] / out["full_ttft_s"]
    sync(engine.lm)
    t0 = time.perf_counter()
    for chunk in chunks:
        engine.encode(chunk.token_ids)
    sync(engine.lm)
    out["chunk_prefill_tok_s"] = n_chunks * chunk_tokens / (time.perf_counter() - t0)
    return out
