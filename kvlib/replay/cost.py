"""The cost model behind replay's savings: measured on this machine, plus a labelled GPU projection.

Design facts:
- Every measurement goes through the engine's one door, Engine.answer (and
  Engine.encode_many for the probe chunks); this is the one module of replay that touches
  the engine.
- Full prefill time is fitted as t(n) = t0 + a*n + c*n^2 (fixed cost, dense work per token,
  attention per pair) from medians at several lengths. Computing m tokens whose context reaches n costs
  a*m + c*(n^2 - (n - m)^2) when they are the prompt's tail (prefix caching), and
  a*m + c*m*(n + p) when they are spread between the cached prefix p and n (misses sit between hits).
- A library hit costs its tokens times (load + rotation + repair) seconds per token. Load is
  a safetensors read of the chunk's K and V from the home's disk (page cache warm after the
  first read, as a hot library is); rotation is the rotate and assemble stages of a rerope
  answer (engine/stages.py); repair is what `rerope+auto` costs over `rerope`.
- The measured model is cached in the home per model fingerprint, so it is measured once; it
  records the machine's load average, because a shared machine's timings are only as good as
  its quiet (delete `<home>/replay/cost-*.json` to measure again).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from kvlib.replay.shape import LLAMA31_8B, ModelShape

LENGTHS = (128, 512, 1024, 2048)
REPEATS = 3
DEFAULT_REPAIR = "auto"
CHUNK_TOKENS, N_CHUNKS = 256, 4  # the composed prompt that rotation and repair are timed on


@dataclass(frozen=True)
class CostModel:
    t0: float  # seconds of fixed cost per request (the same whatever is cached)
    a: float  # seconds per token of dense work
    c: float  # seconds per (token, context token) pair, over 2
    load_s_per_token: float
    rotate_s_per_token: float
    repair_s_per_token: float
    repair: str
    lengths: tuple[int, ...]
    prefill_tok_s: tuple[float, ...]  # measured full prefill throughput at each length
    label: str  # what this model is: the machine and model measured, or a projection
    load_average: tuple[float, ...] = ()  # the machine's 1/5/15-minute load when measured: contention shows here

    def full_s(self, n: int) -> float:
        return self.t0 + self.a * n + self.c * n * n

    def tail_s(self, n: int, cached_prefix: int) -> float:
        m = n - cached_prefix
        return self.t0 + self.a * m + self.c * (n * n - cached_prefix * cached_prefix)

    def kvlib_s(self, n: int, prefix: int, library: int) -> float:
        """Prefix cached at the head, library hits placed, the rest computed in place."""
        m = n - prefix - library
        hit = library * (self.load_s_per_token + self.rotate_s_per_token + self.repair_s_per_token)
        spread = self.a * m + self.c * m * (n + prefix)  # misses sit between prefix end and n
        return self.t0 + spread + hit

    def as_dict(self) -> dict:
        return asdict(self)


def _median_s(fn, repeats: int = REPEATS) -> float:
    fn()  # warm-up: first calls allocate and pick kernels
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def _token_ids(engine, n: int, salt: int = 0) -> list[int]:
    vocab = int(engine.lm.config_summary["vocab_size"])
    return [(1009 * (i + 7 * salt) + 17) % (vocab - 200) + 100 for i in range(n)]


def measure_prefill(engine, lengths=LENGTHS) -> list[float]:
    """Median seconds of a full prefill of n tokens (behind the template's E), for each n."""
    from kvlib.engine.spec import parse_mode

    full, out = parse_mode("full"), []
    for n in lengths:
        ids = _token_ids(engine, n)
        out.append(_median_s(lambda: engine.answer(full, [], suffix_ids=ids, max_new_tokens=1)))
    return out


def fit_prefill(lengths, seconds) -> tuple[float, float, float]:
    """Least squares for t = t0 + a*n + c*n^2; c is clamped at 0 (attention too cheap to resolve at
    these lengths) and a, t0 refitted, so the model never predicts cheaper long prompts."""
    import numpy as np

    n, t = np.asarray(lengths, dtype=float), np.asarray(seconds, dtype=float)
    (t0, a, c), *_ = np.linalg.lstsq(np.stack([np.ones_like(n), n, n * n], 1), t, rcond=None)
    if c < 0:
        (t0, a), *_ = np.linalg.lstsq(np.stack([np.ones_like(n), n], 1), t, rcond=None)
        c = 0.0
    if t0 < 0 or a <= 0:  # noise swamped the fixed cost: a line through the origin
        t0, a, c = 0.0, float((n * t).sum() / (n * n).sum()), 0.0
    return float(t0), float(a), float(c)


def measure_hit_costs(engine, work_dir: Path, repair: str = DEFAULT_REPAIR) -> tuple[float, float, float]:
    """Seconds per cached token to load, rotate into place, and repair (N_CHUNKS chunks)."""
    from safetensors.torch import load_file, save_file

    from kvlib.engine.spec import parse_mode
    from kvlib.engine.stages import recording

    chunks = engine.encode_many([_token_ids(engine, CHUNK_TOKENS, salt=i + 1) for i in range(N_CHUNKS)])
    n = N_CHUNKS * CHUNK_TOKENS
    paths = [work_dir / f"cost-probe-{i}.safetensors" for i in range(N_CHUNKS)]
    for p, ch in zip(paths, chunks):
        save_file({"k_sem": ch.k_sem.contiguous(), "v": ch.v.contiguous()}, str(p))
    try:
        load = _median_s(lambda: [load_file(str(p)) for p in paths]) / n
    finally:
        for p in paths:
            p.unlink(missing_ok=True)
    suffix = engine.suffix_ids("What do these notes say?")
    rerope, repaired = parse_mode("rerope"), parse_mode("rerope", repair)

    def placing() -> float:
        with recording(engine.lm.device) as stages:
            engine.answer(rerope, chunks, suffix_ids=suffix, max_new_tokens=1)
        return stages.get("rotate", 0.0) + stages.get("assemble", 0.0)

    placing()  # warm-up
    rotate = statistics.median(placing() for _ in range(REPEATS)) / n
    plain = _median_s(lambda: engine.answer(rerope, chunks, suffix_ids=suffix, max_new_tokens=1))
    fixed = _median_s(lambda: engine.answer(repaired, chunks, suffix_ids=suffix, max_new_tokens=1))
    return load, rotate, max(0.0, (fixed - plain) / n)


def measure_cost_model(engine, work_dir: Path, lengths=LENGTHS) -> CostModel:
    seconds = measure_prefill(engine, lengths)
    t0, a, c = fit_prefill(lengths, seconds)
    load, rotate, repair = measure_hit_costs(engine, work_dir)
    dtype = str(engine.lm.dtype).replace("torch.", "")
    return CostModel(t0=t0, a=a, c=c, load_s_per_token=load, rotate_s_per_token=rotate, repair_s_per_token=repair,
                     repair=DEFAULT_REPAIR, lengths=tuple(lengths),
                     prefill_tok_s=tuple(n / t for n, t in zip(lengths, seconds)),
                     label=f"measured: {engine.lm.name} {dtype} on {engine.lm.device} of this machine",
                     load_average=tuple(round(x, 2) for x in os.getloadavg()))


def cached_cost_model(model: str | None, home: Path, progress=None) -> CostModel:
    """The measured cost model of `model`, from `<home>/replay/` when measured before."""
    from kvlib.engine.session import Engine

    engine = Engine.load(model, home)
    cache = home / "replay" / f"cost-{engine.lm.fingerprint[:16]}.json"
    if cache.exists():
        try:
            data = json.loads(cache.read_text())
            return CostModel(**{**data, **{k: tuple(data[k]) for k in ("lengths", "prefill_tok_s", "load_average")}})
        except (ValueError, TypeError, KeyError):
            pass  # an unreadable cache is measured again and rewritten
    if progress:
        progress("measuring the cost model (once per model and home)")
    cache.parent.mkdir(parents=True, exist_ok=True)
    cm = measure_cost_model(engine, cache.parent)
    cache.write_text(json.dumps(cm.as_dict(), indent=2))
    return cm


@dataclass(frozen=True)
class Gpu:
    name: str
    flops: float  # dense bf16 FLOP/s, datasheet
    hbm_bytes_s: float
    link_bytes_s: float  # host-to-device for library loads
    mfu: float  # share of peak a prefill reaches


H100_SXM = Gpu("NVIDIA H100 SXM", flops=989e12, hbm_bytes_s=3.35e12, link_bytes_s=50e9, mfu=0.5)
PROJECTION_FORMULA = (
    "t_full(n) = (2*P*n + 0.5*A*n^2) / (F*MFU); hit cost per token = B_kv/link + 2*B_kv/HBM + "
    "r_repair * 2*P/(F*MFU); P = dense weights, A = attention FLOPs per (token, context token), "
    "B_kv = KV bytes per token, r_repair = the default repair's recomputed share measured here")


def projected_cost_model(measured: CostModel, shape: ModelShape = LLAMA31_8B, gpu: Gpu = H100_SXM) -> CostModel:
    """A labelled projection for `shape` on `gpu` from the formula above (not a measurement)."""
    rate = gpu.flops * gpu.mfu
    a = 2 * shape.params / rate
    c = 0.5 * shape.attn_flops_per_ctx_token / rate  # causal: each pair counted once, half the square
    repair_share = measured.repair_s_per_token / measured.a if measured.a > 0 else 0.0
    bkv = shape.kv_bytes_per_token
    return CostModel(t0=0.0, a=a, c=c, load_s_per_token=bkv / gpu.link_bytes_s, rotate_s_per_token=2 * bkv / gpu.hbm_bytes_s,
                     repair_s_per_token=repair_share * a, repair=measured.repair, lengths=measured.lengths,
                     prefill_tok_s=tuple(n / (a * n + c * n * n) for n in measured.lengths),
                     label=f"projection: {shape.name} bf16 on {gpu.name} at {gpu.flops / 1e12:.0f} TFLOP/s x "
                           f"MFU {gpu.mfu}, HBM {gpu.hbm_bytes_s / 1e12:.2f} TB/s, host link {gpu.link_bytes_s / 1e9:.0f} GB/s")


def savings(cm: CostModel, per_request: dict) -> dict:
    """Prefill seconds (= TTFT's compute part) per request and in total: full, prefix only, kvlib."""
    full = prefix = kv = 0.0
    n_req = len(per_request["tokens"])
    for n, p, lib in zip(per_request["tokens"], per_request["prefix"], per_request["library"]):
        full += cm.full_s(n)
        prefix += cm.tail_s(n, p)
        kv += cm.kvlib_s(n, p, lib)
    per = max(1, n_req)
    return {"label": cm.label, "requests": n_req, "full_s": full, "prefix_only_s": prefix, "kvlib_s": kv,
            "saved_vs_full_s": full - kv, "saved_vs_prefix_s": prefix - kv,
            "ttft_full_ms_per_request": 1e3 * full / per, "ttft_prefix_ms_per_request": 1e3 * prefix / per,
            "ttft_kvlib_ms_per_request": 1e3 * kv / per,
            "compute_saved_vs_prefix": (prefix - kv) / prefix if prefix else 0.0}
