"""In-process A/B: 8 requests begun one by one (compose, misses in context, question prefill) against
forward.prefill_batch (their misses and questions in one pass). Run alone: python scripts/prefill_batch_ab.py"""
import statistics
import time

import torch

from kvlib.config import resolve_home
from kvlib.engine.compose import ChunkKV, compose
from kvlib.engine.forward import prefill_batch
from kvlib.engine.generate import start
from kvlib.engine.session import Engine, compute_misses

eng = Engine.load(None, resolve_home(None))  # the default model, from KVLIB_HOME or ~/.kvlib
print(eng.lm.dtype)
g = torch.Generator().manual_seed(0)
def rid(n): return torch.randint(100, 20000, (n,), generator=g)
docs = [eng.encode(rid(110)) for _ in range(6)]
def layout():
    out = []
    for d in docs:
        out += [ChunkKV(rid(9), None, None), d]   # a header miss before each document hit
    return out
B = 8
layouts = [layout() for _ in range(B)]
suffix = rid(15).tolist()
def one():
    t = time.perf_counter()
    for lay in layouts:
        c = compose(eng.lm, eng.context, lay, "rerope", extra=len(suffix) + 2)
        compute_misses(eng.lm, c, lay)
        start(eng.lm, c, suffix, max_new_tokens=1)
    return time.perf_counter() - t
def batch():
    t = time.perf_counter()
    seqs = []
    for lay in layouts:
        c = compose(eng.lm, eng.context, lay, "rerope", extra=len(suffix) + 2)
        at = torch.cat([torch.arange(s, s + lay[i].n_tokens) for s, i in c.misses])
        ids = torch.cat([lay[i].token_ids for _, i in c.misses])
        end = c.cache.length; c.cache.commit(end + len(suffix))
        seqs.append((c.cache, torch.cat([ids, torch.tensor(suffix)]), torch.cat([at, torch.arange(end, end + len(suffix))])))
    prefill_batch(eng.lm, seqs)
    return time.perf_counter() - t
with torch.inference_mode():
    for f in (one, batch): f()
    a, b = [], []
    for _ in range(7):
        a.append(one()); b.append(batch())
print(f"8 requests' begin (6 hits of 110 tokens, 6 misses of 9, a 15-token question each): one by one {statistics.median(a)*1e3:.1f} ms, batched {statistics.median(b)*1e3:.1f} ms (medians of 7)")
