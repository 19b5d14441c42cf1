"""How much a stored chunk saves: one chunk's fetch from the local tier, from the remote store,
and by recompute (encoding it again), on the same machine, in one run.

Design facts:
- A benchmark, not a test (DESIGN.md §7): one warm-up, then `repeats` timed rounds per path,
  medians reported, and the paths compared as ratios within the run.
- "local" is `Library.get` with the blob in the node's local tier (checksum verified, tensors
  memory-mapped); "remote" is the same `get` after deleting the local copy, so it pays the
  S3 round trip, the checksum of the downloaded bytes and the atomic write into the tier;
  "recompute" is `Engine.encode` of the chunk's token ids.
- Without a remote store there is no "remote" path: it reports None.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from kvlib.errors import InputError

CORPUS_TEXT = Path(__file__).resolve().parents[2] / "examples" / "corpus"


def _chunk_ids(engine, tokens: int) -> list[int]:
    """`tokens` real token ids from the bundled corpus (any text would do: encode cost is per token)."""
    ids: list[int] = []
    for path in sorted(CORPUS_TEXT.rglob("*.md")):
        ids += engine.tokenize(path.read_text())
        if len(ids) >= tokens:
            return ids[:tokens]
    raise InputError(f"the bundled corpus has fewer than {tokens} tokens")


def _nothing() -> None:
    return None


def _median_ms(run, repeats: int, before=_nothing) -> float:
    """Median wall time of `run` over `repeats` rounds after one warm-up; `before` is untimed."""
    times = []
    for _ in range(repeats + 1):
        before()
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times[1:])


def run_fetch_bench(home: Path, *, model: str | None, store: str | None, manifest: str | None,
                    tokens: int, repeats: int) -> dict:
    """Medians in ms of the three paths for one `tokens`-long chunk, and their ratios."""
    from kvlib.engine.session import Engine
    from kvlib.store.library import Library

    if tokens < 1 or repeats < 1:
        raise InputError("--tokens and --repeats must be positive")
    engine = Engine.load(model, home)
    ids = _chunk_ids(engine, tokens)
    with Library(home, store=store, manifest=manifest) as library:
        kv = engine.encode(ids)
        put = library.put(tenant="public", public=True, model_fp=engine.lm.fingerprint,
                          context_id=engine.context_id, token_ids=ids, k_sem=kv.k_sem, v=kv.v,
                          text_preview="kvlib fetch-bench chunk")
        local = _median_ms(lambda: library.get(put.key), repeats)
        remote = None
        if library.store_url is not None:
            local_copy = library.blobs.path_for(put.key)
            remote = _median_ms(lambda: library.get(put.key), repeats,
                                before=lambda: local_copy.unlink(missing_ok=True))
    recompute = _median_ms(lambda: engine.encode(ids), repeats)
    return {
        "tokens": tokens, "bytes": put.bytes, "repeats": repeats, "model": engine.lm.name,
        "store": store or "local", "local_ms": local, "remote_ms": remote if remote is not None else float("nan"),
        "recompute_ms": recompute, "local_speedup": recompute / local,
        "remote_speedup": recompute / remote if remote else float("nan"),
    }
