"""Stored float16 keys rotated into a float32 cache in one pass (bf16 into bf16 alike): a small C kernel.

Design facts:
- Where the model computes in float32 and the library stores float16 KV (an AVX2-only CPU), a
  hit's keys reach the cache through six torch passes per layer: the float16 -> float32 copy,
  then rope.rope_into_'s two half swaps, two products and a sum over float32 temporaries. Each
  is a memory pass, ~20 ms for 4k keys of SmolLM2's 30 layers. rope_kernel.c reads each stored
  key once and writes its rotated float32 value once, with the same float32 operations in the
  same order (each product rounded, then the sum; built with -ffp-contract=off), so the cache
  holds the same bits (tests/test_rope_kernel.py). In the request path (in-process A/B, SmolLM2
  rerope): rotation and assembly 31.8 -> 15.2 ms at 4k, 66.1 -> 33.0 at 8k; TTFT 269 -> 232 ms
  at 4k, 414 -> 371 at 8k.
- A bfloat16 model (computing bf16 on an AVX-512 BF16 CPU, bf16 KV stored) takes its bf16 twin:
  the torch passes rotate a bf16 cache through a float32 copy, layer by layer (copy in, two half
  swaps, two products, a sum, copy out: ~20 ms for 4k keys of SmolLM2's 30 layers on a 2-core
  Xeon with AMX); the kernel widens each key, rotates it with the same float32 operations and
  rounds it once to nearest even, torch's conversion, so the cache holds the same bits.
- It is built and loaded as kernels.py says, and splits rows over torch's own OpenMP workers
  (a private pthread pool lost the second core to those workers, still spinning from the op
  before: in-process A/B at 4k, rotation and assembly 15.2 ms on the calling thread alone, 19.0
  on two pthreads). An Engine on such a model builds or finds it when it is made, so no
  request's TTFT holds the build.
- Only x86-64 CPUs with AVX2 and F16C take it (x86 CPUs have had both since 2013). Anywhere
  else, with no compiler, when the build fails, for other dtypes or layouts, or with
  KVLIB_ROPE_KERNEL=0 (an A/B's other arm), callers use the torch passes; `status()` says
  which and why (kvlib doctor prints it).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from kvlib.engine.kernels import CKernel

FLAGS = ("-O3", "-mavx2", "-mf16c", "-ffp-contract=off", "-fPIC", "-shared", "-fopenmp")
AVX512_FLAGS = ("-mavx512f", "-mavx512bw", "-mavx512vl", *FLAGS)
# Threads the kernel splits rows over; 0: torch's count (its OpenMP workers, which the kernel runs on).
# In-process A/B, SmolLM2 rerope, rotation and assembly: 14.7 ms on the calling thread alone, 12.9 on
# torch's two workers at 4k; 26.6 and 19.4 at 8k.
THREADS = 0
KERNEL = CKernel(Path(__file__).with_name("rope_kernel.c"), FLAGS, "kvlib_rope_f16_into_f32",
                 [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 5 + [ctypes.c_int], "KVLIB_ROPE_KERNEL", {"avx2", "f16c"})
# The same source for AVX-512 (bf16 rows sixteen values at a time); KVLIB_ROPE_AVX512=0 keeps the AVX2 build.
AVX512 = CKernel(KERNEL.source, AVX512_FLAGS, KERNEL.symbol, KERNEL.argtypes, "KVLIB_ROPE_AVX512",
                 {"avx2", "f16c", "avx512f", "avx512bw", "avx512vl"})


# stored dtype -> cache dtype the kernel rotates between, and its function
PAIRS = {(torch.float16, torch.float32): "kvlib_rope_f16_into_f32",
         (torch.bfloat16, torch.bfloat16): "kvlib_rope_bf16_into_bf16"}


def status() -> str:
    """'compiled' or why the torch passes are used."""
    return KERNEL.status()


def avx512_status() -> str:
    """'compiled' where the AVX-512 build runs instead of the AVX2 one, or why not."""
    return AVX512.status() if KERNEL.function() is not None else f"off with the AVX2 build ({KERNEL.status()})"


def build() -> CKernel | None:
    """The build the functions below run: AVX-512 where it builds, else AVX2; None where the AVX2
    build is off or unavailable (its switch, KVLIB_ROPE_KERNEL, turns both off)."""
    if KERNEL.function() is None:
        return None
    return AVX512 if AVX512.function() is not None else KERNEL


def _matrix_stride(x: torch.Tensor) -> int | None:
    """The element stride between the [T, D] matrices of x [L, Hkv, T, D] when each is row-contiguous
    and they are evenly spaced (a cache's slots are; so is a contiguous tensor); else None. The
    strides of size-1 dimensions do not matter (is_contiguous ignores them too)."""
    if x.dim() != 4:
        return None
    layers, heads, t, d = x.shape
    if (d > 1 and x.stride(3) != 1) or (t > 1 and x.stride(2) != d):
        return None
    if heads == 1:
        return x.stride(0)
    if layers > 1 and x.stride(0) != heads * x.stride(1):
        return None
    return x.stride(1)


def accepts(dst: torch.Tensor, src: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether rope_into takes these operands (it builds the kernel on first use to know)."""
    if src.dim() != 4 or src.shape != dst.shape or src.shape[-1] % 2:
        return False
    if (src.dtype, dst.dtype) not in PAIRS:
        return False
    t, d = src.shape[2], src.shape[3]
    tables = (cos, sin)
    if not all(x.dtype == torch.float32 and x.is_contiguous() and x.shape == (t, d // 2) for x in tables):
        return False
    on_cpu = all(x.device.type == "cpu" for x in (dst, src, *tables))
    strided = _matrix_stride(src) is not None and _matrix_stride(dst) is not None
    return on_cpu and strided and build() is not None


def rope_into(dst: torch.Tensor, src: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              threads: int | None = None) -> bool:
    """dst = rope.rope_into_(dst, src, HalfTables(cos, sin)) in one pass where the kernel takes it
    (accepts): src [L, Hkv, T, D] (stored keys) float16 with dst float32 of the same shape (a cache's
    slots), or both bfloat16; cos and sin float32 [T, D/2] on the CPU. Returns False, having done
    nothing, where it does not."""
    if not accepts(dst, src, cos, sin):
        return False
    t, d = src.shape[2], src.shape[3]
    fn = build().sibling(PAIRS[src.dtype, dst.dtype], KERNEL.argtypes)
    fn(src.data_ptr(), dst.data_ptr(), cos.data_ptr(), sin.data_ptr(), src.shape[0] * src.shape[1], t, d,
       _matrix_stride(src), _matrix_stride(dst), threads or THREADS or torch.get_num_threads())
    return True


_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_QKV_ARGS = [_PTR, _I64, _I64, _I64, _I64] + [_PTR] * 5 + [_I64, _I64]


QKV_FUNCTIONS = {torch.float32: "kvlib_rope_qkv_f32", torch.bfloat16: "kvlib_rope_qkv_bf16"}


def rope_qkv_into(qkv: torch.Tensor, n_q: int, cos: torch.Tensor, sin: torch.Tensor, cache_k: torch.Tensor,
                  cache_v: torch.Tensor, layer: int, start: int) -> torch.Tensor | None:
    """New tokens' projections qkv [1, T, (n_q + 2 Hkv) D] (q, k, v heads in turn; float32, or
    bfloat16 with a bf16 cache) in one pass: keys rotated and values copied into slots [start,
    start + T) of `layer` of a cache's k and v ([L, Hkv, C, D]; the caller checked the room), the
    rotated queries returned as [1, n_q, T, D] (a view of [1, T, n_q, D]); the same bits as
    rope.apply_rope (bf16: its float32 arithmetic, then its cast back). None, having done
    nothing, where the kernel does not take the operands. Checked with plain attributes and
    written by pointer: ~25 us a call, against ~100 with the cache's slot views."""
    _, t, width = qkv.shape
    n_kv, d = cache_k.shape[1], cache_k.shape[3]
    f32, dtype = torch.float32, qkv.dtype
    ok = (width == (n_q + 2 * n_kv) * d and dtype in QKV_FUNCTIONS and cache_k.dtype == dtype
          and cache_v.dtype == dtype and cos.dtype == f32 and sin.dtype == f32 and qkv.device.type == "cpu"
          and cache_k.device.type == "cpu" and qkv.is_contiguous() and cos.is_contiguous() and sin.is_contiguous()
          and cos.shape == sin.shape == (t, d // 2) and d % 2 == 0 and cache_v.shape == cache_k.shape
          and cache_k.stride()[2:] == cache_v.stride()[2:] == (d, 1) and 0 <= start <= cache_k.shape[2] - t
          and 0 <= layer < cache_k.shape[0])
    fn = build() if ok else None
    fn = fn.sibling(QKV_FUNCTIONS[dtype], _QKV_ARGS) if fn is not None else None
    if fn is None:
        return None
    q = torch.empty(1, t, n_q, d, dtype=dtype)
    size = qkv.element_size()
    k_ptr = cache_k.data_ptr() + size * (layer * cache_k.stride(0) + start * d)
    v_ptr = cache_v.data_ptr() + size * (layer * cache_v.stride(0) + start * d)
    rc = fn(qkv.data_ptr(), t, n_q, n_kv, d, cos.data_ptr(), sin.data_ptr(), q.data_ptr(), k_ptr, v_ptr,
            cache_k.stride(1), cache_v.stride(1))
    if rc != 0:
        raise RuntimeError(f"rope kernel refused its operands ({rc})")
    return q.transpose(1, 2)


_RUN_ARGS = [_I64] + [_PTR] * 5 + [_PTR, _PTR, _I64, _I64, _I64, _PTR, _PTR, ctypes.c_int]


def rope_run_into(cache_k: torch.Tensor, cache_v: torch.Tensor, start: int, chunks: list, cos: torch.Tensor,
                  sin: torch.Tensor, threads: int | None = None) -> bool:
    """A run of stored chunks [(k_sem, v)], each bf16 [L, Hkv, T_i, D] (rows of evenly spaced matrices),
    into a bf16 cache's k and v ([L, Hkv, C, D]) at slots [start, start + sum T_i), in one parallel pass:
    keys rotated (cos and sin float32 [sum T_i, D/2], the run's rows in order; the bits of rope_into),
    values copied. The caller checked the room. False, having done nothing, where the kernel does not
    take the operands."""
    n_layers, n_kv, _, d = cache_k.shape
    total = sum(k.shape[2] for k, _ in chunks)
    bf16, strides = torch.bfloat16, [(_matrix_stride(k), _matrix_stride(v)) for k, v in chunks]
    ok = (chunks and cache_k.dtype == cache_v.dtype == bf16 and cache_v.shape == cache_k.shape
          and cache_k.device.type == cache_v.device.type == "cpu" and cache_k.stride() == cache_v.stride()
          and _matrix_stride(cache_k) is not None and 0 <= start <= cache_k.shape[2] - total
          and all(k.dtype == v.dtype == bf16 and k.device.type == v.device.type == "cpu"
                  and k.shape == v.shape == (n_layers, n_kv, k.shape[2], d) for k, v in chunks)
          and all(a is not None and b is not None for a, b in strides)
          and all(x.dtype == torch.float32 and x.device.type == "cpu" and x.is_contiguous()
                  and x.shape == (total, d // 2) for x in (cos, sin)) and d % 2 == 0)
    fn = build() if ok else None
    fn = fn.sibling("kvlib_rope_run_bf16", _RUN_ARGS) if fn is not None else None
    if fn is None:
        return False
    n, size = len(chunks), cache_k.element_size()
    pointers, counts = ctypes.c_void_p * n, ctypes.c_int64 * n
    rc = fn(n, pointers(*(k.data_ptr() for k, _ in chunks)), pointers(*(v.data_ptr() for _, v in chunks)),
            counts(*(k.shape[2] for k, _ in chunks)), counts(*(a for a, _ in strides)),
            counts(*(b for _, b in strides)),
            cache_k.data_ptr() + size * start * d, cache_v.data_ptr() + size * start * d, _matrix_stride(cache_k),
            n_layers * n_kv, d, cos.data_ptr(), sin.data_ptr(), threads or THREADS or torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"rope kernel refused its operands ({rc})")
    return True
