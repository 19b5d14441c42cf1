"""Float32 attention over a float32 KV cache on AVX2 CPUs: a C flash-attention kernel.

Design facts:
- A question over cached chunks is ~25-30 new tokens behind thousands of cached slots. On an
  AVX2 CPU in float32 SDPA's blocked kernel ran that at ~75 GFLOP/s on 2 threads, against the
  ~130 of a large matmul, and it reads the keys once per query head. attn_kernel.c reads each
  block of keys and values once for all the query heads that share them (grouped-query), with
  register-tiled products, an online softmax, and work split over (KV head, rows, key range).
  Decode's one token (at most 8 rows a KV head) takes dot products over the head dimension
  instead, its keys split over the threads: SmolLM2 decode at 4k context 14.6 -> 17.1 tok/s
  against SDPA (in-process A/B, the same tokens), level at 1k.
- Not the same bits as SDPA (another order of sums, and its own exponential): within the
  exactness tolerance of DESIGN.md §1 (tests: against attention written out in float64, and
  composition against full recompute through the engine).
- A bf16 model (kvlib computes in bf16 on CPUs with AVX-512 BF16 or AMX) takes bf16_attn_kernel.c
  for a question behind a long past and for decode's one token (attention.py): bf16 products
  summed in float32, an online softmax in float32, the probabilities rounded to bf16 to meet the
  values as SDPA's CPU kernel does. Within the error of SDPA against float64 (tests). Two builds
  of the one source: on AMX tiles (KVLIB_AMX_ATTN=0 turns it off), else on AVX-512 BF16 dot
  products (KVLIB_DPBF16_ATTN=0). AMX Xeon: 0.42 against grouped SDPA's 0.74 ms a layer at 4k;
  AVX-512 BF16 EPYC: 1.05 against 2.61 ms for 30 queries over 4k slots, 0.16 against 0.37 for
  decode's one token (SmolLM2's heads). Without either, attention.grouped_sdpa runs.
- Built and loaded as kernels.py says, with OpenMP on torch's own worker threads. Only x86-64
  CPUs with AVX2 and FMA take it; anywhere else, with no compiler, for other dtypes or layouts,
  or with KVLIB_ATTN_KERNEL=0 (an A/B's other arm), `attend_behind` returns None and the caller
  runs SDPA; `status()` says which and why.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from kvlib.engine.kernels import AVX512_BF16_CPU, AVX512_BF16_FLAGS, CKernel

FLAGS = ("-O3", "-mavx2", "-mfma", "-fPIC", "-shared", "-fopenmp")
MAX_SLOTS = 1 << 24  # the kernel compares slots as float32, exact up to here
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
# q, its head and token strides; keys, head stride; values, head stride; out, head and token strides;
# heads, KV heads, new tokens, each token's last slot, head dim, scale, threads
_ARGS = [_PTR, _I64, _I64, _PTR, _I64, _PTR, _I64, _PTR, _I64, _I64, _I64, _I64, _I64, _PTR, _I64, ctypes.c_float,
         ctypes.c_int]
KERNEL = CKernel(Path(__file__).with_name("attn_kernel.c"), FLAGS, "kvlib_attend_f32", _ARGS, "KVLIB_ATTN_KERNEL",
                 {"avx2", "fma"})
_BF16_SOURCE = Path(__file__).with_name("bf16_attn_kernel.c")
AMX = CKernel(_BF16_SOURCE, ("-mamx-tile", "-mamx-bf16", *AVX512_BF16_FLAGS), "kvlib_attend_bf16", _ARGS,
              "KVLIB_AMX_ATTN", {"amx_bf16", "amx_tile", *AVX512_BF16_CPU})
DPBF16 = CKernel(_BF16_SOURCE, AVX512_BF16_FLAGS, "kvlib_attend_bf16", _ARGS, "KVLIB_DPBF16_ATTN", AVX512_BF16_CPU)


def status() -> str:
    """'compiled' or why SDPA is used."""
    return KERNEL.status()


@functools.cache
def _amx_permitted() -> bool:
    """The process may use AMX tiles (Linux grants them on request: arch_prctl XCOMP_PERM)."""
    permit = AMX.sibling("kvlib_amx_permit", [])
    return permit is not None and permit() == 0


def amx_usable() -> bool:
    """The AMX build is built and the process may use its tiles."""
    return AMX.function() is not None and _amx_permitted()


def bf16_function():
    """The bf16 kernel this CPU runs: on AMX tiles where usable, else on AVX-512 BF16 dot products;
    None where neither is (grouped SDPA runs)."""
    return AMX.function() if amx_usable() else DPBF16.function()


def bf16_status() -> str:
    """'compiled (AMX)' or 'compiled (AVX-512 BF16)', or why grouped SDPA runs a bf16 question
    behind a long past."""
    if amx_usable():
        return "compiled (AMX)"
    if DPBF16.function() is not None:
        return "compiled (AVX-512 BF16)"
    amx = AMX.status() if AMX.function() is None else "the kernel refused AMX tiles to this process"
    return f"AMX: {amx}; AVX-512 BF16: {DPBF16.status()}"


def _rows_ok(x: torch.Tensor) -> bool:
    """Each [slots or tokens, D] matrix row-contiguous with rows D apart (strides of size-1
    dimensions do not matter)."""
    d = x.shape[-1]
    return (d == 1 or x.stride(-1) == 1) and (x.shape[-2] == 1 or x.stride(-2) == d)


def accepts(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> bool:
    """q [1, H, T, D], keys/values [Hkv, S, D]: float32 on the CPU, D a multiple of 16, H a
    multiple of Hkv, rows contiguous (a cache's slots are; q may be a head transpose)."""
    if q.dim() != 4 or keys.dim() != 3 or keys.shape != values.shape or q.shape[0] != 1:
        return False
    heads, _, d = q.shape[1], q.shape[2], q.shape[3]
    if not takes_shape(torch.float32, d, keys.shape[1]) or keys.shape[2] != d or heads % keys.shape[0]:
        return False
    if any(x.dtype != torch.float32 or x.device.type != "cpu" for x in (q, keys, values)):
        return False
    if q.stride(3) != 1 or not (_rows_ok(keys) and _rows_ok(values)):
        return False
    return KERNEL.function() is not None


def takes_shape(dtype, head_dim: int, slots: int) -> bool:
    """The kernel of this dtype takes heads of head_dim over this many slots: float32 a multiple of 16,
    bf16 a multiple of 32 up to 256; at most MAX_SLOTS either way."""
    if slots > MAX_SLOTS:
        return False
    return head_dim % 32 == 0 and head_dim <= 256 if dtype == torch.bfloat16 else head_dim % 16 == 0


def _last_slots(last: torch.Tensor, q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor | None:
    """`last` as the kernel reads it (int64 on the CPU, contiguous), or None unless it gives each of q's
    tokens a slot within the keys."""
    if last.dim() != 1 or last.numel() != q.shape[2]:
        return None
    last = last.to(device="cpu", dtype=torch.int64).contiguous()
    return None if int(last.max()) >= keys.shape[1] or int(last.min()) < 0 else last


def attend_until(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, last: torch.Tensor, scale: float):
    """softmax(q k^T * scale) v with new token t seeing slots [0, last[t]], as [1, H, T, D] (a view
    of a [1, T, H, D] tensor, so the output projection's reshape copies nothing); None, having
    done nothing, where the kernel does not take the operands (accepts). last: int [T], each
    below keys.shape[1]."""
    last = _last_slots(last, q, keys) if accepts(q, keys, values) else None
    return None if last is None else _run(q, keys, values, last, scale)


def _run(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, last: torch.Tensor, scale: float,
         fn=None) -> torch.Tensor:
    """The kernel (or `fn`, of the same arguments) on operands it takes, `last` int64 [T] within the keys."""
    heads, t, dim = q.shape[1], q.shape[2], q.shape[3]
    out = torch.empty(1, t, heads, dim).transpose(1, 2)
    rc = (fn or KERNEL.function())(q.data_ptr(), q.stride(1), q.stride(2), keys.data_ptr(), keys.stride(0),
                                   values.data_ptr(), values.stride(0), out.data_ptr(), out.stride(1),
                                   out.stride(2), heads, keys.shape[0], t, last.data_ptr(), dim, scale,
                                   torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"attention kernel refused its operands ({rc})")
    return out


def attend_behind_bf16(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, t_past: int, scale: float,
                       fn=None):
    """attend_behind for bf16 operands on `fn` (a build's function; default bf16_function()), as
    [1, H, T, D] bf16; None, having done nothing, where the kernel does not take them (neither AMX
    nor AVX-512 BF16, D not a multiple of 32 up to 256, other layouts)."""
    t = q.shape[2]
    if keys.dim() != 3 or keys.shape[1] != t_past + t or t_past < 0 or not _bf16_takes(q, keys, values):
        return None
    fn = fn or bf16_function()
    return None if fn is None else _run(q, keys, values, _behind(t_past, t), scale, fn).to(torch.bfloat16)


def attend_until_bf16(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, last: torch.Tensor, scale: float):
    """attend_until for bf16 operands on bf16_function() (a repair's tokens at scattered slots, each
    seeing the slots up to its own), as [1, H, T, D] bf16; None, having done nothing, where the kernel
    does not take them. For 300-1,330 of a 1.3k SmolLM2 cache's slots, 2.3-2.6x faster than SDPA per
    block of 64 queries (attention.at_slots), with the same error against float64."""
    fn = bf16_function() if _bf16_takes(q, keys, values) else None
    last = _last_slots(last, q, keys) if fn is not None else None
    return None if last is None else _run(q, keys, values, last, scale, fn).to(torch.bfloat16)


def _bf16_takes(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> bool:
    """q [1, H, T, D], keys/values [Hkv, S, D], bf16 on the CPU, D a multiple of 32 up to 256, H a
    multiple of Hkv, rows contiguous: what the bf16 kernel reads."""
    if q.dim() != 4 or keys.dim() != 3 or keys.shape != values.shape or q.shape[0] != 1 or q.shape[2] == 0:
        return False
    d = q.shape[3]
    if not takes_shape(torch.bfloat16, d, keys.shape[1]) or keys.shape[2] != d or q.shape[1] % keys.shape[0]:
        return False
    if any(x.dtype != torch.bfloat16 or x.device.type != "cpu" for x in (q, keys, values)):
        return False
    return q.stride(3) == 1 and _rows_ok(keys) and _rows_ok(values)


def attend_behind(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, t_past: int, scale: float):
    """attend_until for T new tokens behind t_past slots, each seeing the past and the new tokens up
    to itself (keys: [Hkv, t_past + T, D])."""
    t = q.shape[2]
    if keys.shape[1] != t_past + t or t_past < 0 or keys.shape[1] > MAX_SLOTS or not accepts(q, keys, values):
        return None
    return _run(q, keys, values, _behind(t_past, t), scale)


@functools.lru_cache(maxsize=1)
def _behind(t_past: int, t: int) -> torch.Tensor:
    """arange(t_past, t_past + t) as int64, the last one asked for kept: every layer of a forward asks
    for the same (the kernel only reads it)."""
    return torch.arange(t_past, t_past + t, dtype=torch.int64)
