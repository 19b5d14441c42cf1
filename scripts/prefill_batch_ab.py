"""In-process A/B of the server's batched begin: 8 requests prepared (composed, misses deferred), then
Engine.start one by one (batch_tokens=0) against in one pass (forward.prefill_batch), as the misses
grow: where does a joint pass stop paying? Run alone: python scripts/prefill_batch_ab.py [--json]"""
import json
import statistics
import sys
import time

import torch

from kvlib.config import resolve_home
from kvlib.engine.compose import ChunkKV
from kvlib.engine.session import Engine
from kvlib.engine.spec import parse_mode

eng = Engine.load(None, resolve_home(None))  # the default model, from KVLIB_HOME or ~/.kvlib
g = torch.Generator().manual_seed(0)


def rid(n):
    return torch.randint(100, 20000, (n,), generator=g)


docs = [eng.encode(rid(110)) for _ in range(6)]
suffix = rid(15).tolist()
spec = parse_mode("rerope")


def layouts(miss: int):
    """Per request: six 110-token document hits, each behind a `miss`-token miss (a header, glue)."""
    return [[c for d in docs for c in (ChunkKV(rid(miss), None, None), d)] for _ in range(8)]


def begin_all(lays, batch_tokens: int) -> float:
    t = time.perf_counter()
    prepared = [eng.prepare(spec, lay, suffix_ids=suffix, max_new_tokens=1, defer_misses=True) for lay in lays]
    eng.start(prepared, batch_tokens=batch_tokens)
    return time.perf_counter() - t


rows = []
with torch.inference_mode():
    for miss in (9, 40, 100, 200):
        lays = layouts(miss)
        new = 6 * miss + len(suffix)
        for b in (0, 1 << 20):
            begin_all(lays, b)  # warm-up
        a, j = [], []
        for _ in range(5):
            a.append(begin_all(lays, 0))
            j.append(begin_all(lays, 1 << 20))
        rows.append({"new_tokens_per_request": new, "one_by_one_ms": round(1e3 * statistics.median(a), 1),
                     "joined_ms": round(1e3 * statistics.median(j), 1)})
        r = rows[-1]
        if "--json" not in sys.argv:
            print(f"8 requests, {new} new tokens each: one by one {r['one_by_one_ms']} ms, joined {r['joined_ms']} ms "
                  f"({r['joined_ms'] / r['one_by_one_ms']:.2f}x; medians of 5, {eng.lm.dtype})", flush=True)
if "--json" in sys.argv:
    print(json.dumps({"dtype": str(eng.lm.dtype), "rows": rows}, indent=1))
