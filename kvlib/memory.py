"""Process-wide allocator settings that the cached path depends on; applied when kvlib is imported.

Design facts:
- glibc's malloc hands blocks above its mmap threshold (128 KiB at start, growing on its own
  to at most 32 MiB) to the kernel and back on every free, and trims the heap's free top
  beyond twice that. Each new few-MB temporary is then fresh pages, and on CPU every first
  touch of a 4 KiB page is a fault. Measured here: 30 question tokens' attention over 4k
  cached slots (scores, softmax, casts of a few MB each) took 5.6 ms a layer with the
  defaults and 1.9 ms with a fixed 32 MiB mmap threshold and a 1 GiB trim threshold, which
  keep such blocks in the heap, already mapped, from one use to the next.
- Blocks above 32 MiB (a whole request's KV cache) are always mapped afresh by glibc;
  engine/cache.py keeps those in its own pool.
- Transparent huge pages for every torch allocation (`THP_MEM_ALLOC_ENABLE=1`) were tried
  and refused: they make each few-MB temporary fault in a zeroed 2 MiB page instead.
- Set on import, through `mallopt`, unless `KVLIB_MALLOC_TUNING=0`; a no-op off glibc. The
  cost is memory: up to the trim threshold of freed heap stays with the process. So after a
  one-off release of hundreds of MB (a model's plain weights replaced by packed copies at
  load: engine/model.py) `release_free_heap` hands the free heap back (`malloc_trim`).
- oneDNN (bf16 products on CPU) keeps every primitive it builds, one per operand shape, in two
  caches of 1024 entries each: its own (`ONEDNN_PRIMITIVE_CACHE_CAPACITY`) and ideep's, under
  torch (`LRU_CACHE_CAPACITY`). Every new prompt length is new shapes, so a server's memory
  grew with each request: measured here, 150 prompt lengths through one packed and one plain
  product added 206 MB (20 MB with 16 entries, 43 with 32), and SmolLM2 forwards of 60 random
  lengths 158 MB (27 with 32). Both are capped at ONEDNN_CACHE_ENTRIES on import (unless set
  already): a batched decode step's products (five shapes, the same every step, and one
  attention shape per sequence) fit with room. A shape built again costs ~0.9 ms (a [30, 576]
  x [576, 3072] product: 1.3 ms new, 0.44 ms cached), once per forward, for all its layers.
  They are read when oneDNN first runs, so this must precede it.
- A loaded engine leaves ~400k objects tracked by Python's cycle collector (the model's modules and
  parameters, the tokenizer, transformers' own tables), and every collection of the older
  generations walks them all: measured here, 8% of a decode step's profile at 4k slots (gc's own
  functions). A process that goes on to serve or time requests calls `freeze_loaded` once after
  loading (as servers do: CPython's gc.freeze): those objects leave the collector's reach for good,
  and a decode step at 4k took 17.63 -> 16.75 ms (in-process A/B, SmolLM2 in bf16). Objects in
  cycles that were frozen and die later are never collected; the engine's are the process's own
  until it exits. KVLIB_GC_FREEZE=0 leaves the collector alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # glibc's maximum on 64-bit
TRIM_THRESHOLD = 1 << 30
ONEDNN_CACHE_ENTRIES = 32
ONEDNN_CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
_applied = False


def cap_onednn_caches() -> None:
    """Bound oneDNN's per-shape primitive caches (a variable the user set is left alone)."""
    for name in ONEDNN_CACHE_VARIABLES:
        os.environ.setdefault(name, str(ONEDNN_CACHE_ENTRIES))


def tune_malloc() -> bool:
    """Apply the thresholds once; True when glibc accepted them."""
    global _applied
    if _applied or os.environ.get("KVLIB_MALLOC_TUNING") == "0":
        return _applied
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    _applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied


def malloc_tuning() -> str:
    """For reports: whether this process runs with the thresholds."""
    return "on" if _applied else "off"


def release_free_heap() -> None:
    """Return the heap's free pages to the kernel (glibc's malloc_trim; a no-op elsewhere)."""
    malloc_trim = _libc_function("malloc_trim")
    if malloc_trim is not None:
        malloc_trim(0)


def freeze_loaded() -> bool:
    """Collect, then move every object the cycle collector tracks into its permanent generation
    (gc.freeze): for a process that has loaded its engine and will now serve or time requests.
    True when it froze (not with KVLIB_GC_FREEZE=0)."""
    if os.environ.get("KVLIB_GC_FREEZE") == "0":
        return False
    gc.collect()
    gc.freeze()
    return True


def _libc_function(name: str):
    """A function of the C library by name, or None where there is no such library or function (not glibc)."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None
