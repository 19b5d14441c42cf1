"""Process-wide memory settings (kvlib/memory.py), checked in fresh interpreters: what they bound
is decided when oneDNN first runs, and a test process has long run it."""

from __future__ import annotations

import os
import subprocess
import sys

# 150 prompt lengths through one prepacked and one plain bf16 product, as the engine's layers run
# them; prints how many MB of anonymous memory they left behind.
SHAPES = """
import torch
{prelude}
def anon():
    return [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('RssAnon')][0] // 1024
w = torch.randn(1536, 576, dtype=torch.bfloat16)
packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
def run(m):
    x = torch.randn(m, 576, dtype=torch.bfloat16)
    torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    torch.mm(x, w.t())
for m in range(1, 20):
    run(m)
start = anon()
for m in range(100, 400, 2):
    run(m)
print(anon() - start)
"""


def growth_mb(prelude: str, **env) -> int:
    environ = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
    out = subprocess.run([sys.executable, "-c", SHAPES.format(prelude=prelude)], env={**environ, **env},
                         capture_output=True, text=True, timeout=300, check=True)
    return int(out.stdout.split()[-1])


def test_importing_kvlib_bounds_onednn_per_shape_caches():
    """Without the caps every new prompt length keeps its oneDNN primitives (1024 of them per
    cache); with kvlib imported first, memory stops growing once the caps are reached."""
    import pytest
    import torch

    from kvlib.engine.fused import cpu_packs_bf16

    if not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN in this torch build")
    if not cpu_packs_bf16():  # float32 here, through MKL: 150 lengths left +10-15 MB with or without the caps
        pytest.skip("this CPU's oneDNN has no bf16 products (AVX2 only): the engine computes in float32, "
                    "whose products keep no per-shape primitives")
    capped = growth_mb("import kvlib")
    uncapped = growth_mb("")
    assert uncapped > 120, f"the uncapped caches grew by {uncapped} MB only: the check cannot see the caps"
    assert capped < uncapped / 2, f"with kvlib's caps: +{capped} MB, without: +{uncapped} MB"


def test_a_cache_capacity_the_user_set_is_kept():
    out = subprocess.run([sys.executable, "-c", "import kvlib, os; print(os.environ['LRU_CACHE_CAPACITY'], "
                                                "os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])"],
                         env={**os.environ, "LRU_CACHE_CAPACITY": "7"}, capture_output=True, text=True, check=True)
    from kvlib.memory import ONEDNN_CACHE_ENTRIES

    assert out.stdout.split() == ["7", str(ONEDNN_CACHE_ENTRIES)]


FREEZE = """
import gc
from kvlib.memory import freeze_loaded
held = [[i] for i in range(1000)]  # tracked objects alive at the freeze, as a loaded engine's are
print(freeze_loaded(), gc.get_freeze_count() >= 1000)
"""


def test_a_loaded_process_leaves_its_objects_out_of_the_collectors_walks():
    for env, expected in (({}, ["True", "True"]), ({"KVLIB_GC_FREEZE": "0"}, ["False", "False"])):
        out = subprocess.run([sys.executable, "-c", FREEZE], env={**os.environ, **env}, capture_output=True, text=True,
                             check=True)
        assert out.stdout.split() == expected, (env, out.stdout)
