"""Every decoder layer in one C call, for new tokens written at a contiguous start: layer_loop.c.

Design facts:
- A question over cached chunks (~25 tokens) and a decode step run each layer as eight C kernels
  (norms, the four products, rotation into the cache, attention, SiLU). Between them forward.py's
  Python (wrappers' checks, views, allocations) cost about 0.29 ms a layer on a 2-core EPYC: 8.7 ms
  a 25-token forward of SmolLM2's 30 layers, measured on a model of its layout with tiny widths,
  where the kernels cost almost nothing. layer_loop.c calls the same kernels with the same
  arguments in the same order (so the same bits: tests compare the caches and hidden states
  with forward.py's path bit for bit), handed their addresses; what is left here is one call.
- It runs where forward.py's path would run exactly those kernels: every layer the plain fused
  Llama layer (forward.loop_layers), its four products on linear_kernel's panels, the pointwise,
  rope and attention kernels built, a float32 or bf16 model on the CPU; and per call: new tokens
  at a contiguous start of a cache in the model's dtype, a causal mask, no probabilities or KV
  asked for, and the attention kernel taking the shape (bf16: one token, or a past longer than
  the new tokens). Anywhere else, or with KVLIB_LAYER_LOOP=0 (an A/B's other arm), `run` returns
  None and forward.py runs the layers itself.
- The plan (weight addresses, kernels) is made once per model and kept on it; the tensors it
  points at are the model's own packed weights, which live as long as the model.
- A decode step of several sequences (forward.decode_batch: the server's streams) goes through
  `run_batch`: the products on all of the step's rows together, rotation and attention per
  sequence on its own cache, as decode_batch's Python layers do (tests: the same bits).
- `run(..., keep=n)` (forward's logits="last" / "none"): the last layer writes every token's K/V, then
  runs attention, the output product and the MLP for the last n rows only (forward.run_layers' out_rows,
  which its Python layers do the same way: the same bits).
- Under the hot-path profile (stages.recording) the C code times attention, added to the
  "attention" stage inside the layers' total.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import torch

from kvlib.engine import attn_kernel, linear_kernel, pointwise_kernel, rope_kernel, stages
from kvlib.engine.kernels import CKernel
from kvlib.engine.linear_kernel import Panels

_PTR, _I64 = ctypes.c_void_p, ctypes.c_int64


class Layer(ctypes.Structure):
    _fields_ = [(name, _PTR) for name in ("ln1", "ln2", "qkv", "qkv_bias", "o", "o_bias", "gate_up",
                                          "gate_up_bias", "down", "down_bias")] + \
               [(name, ctypes.c_float) for name in ("eps1", "eps2", "scale")]


class Model(ctypes.Structure):
    _fields_ = [(name, _PTR) for name in ("norm", "linear", "rope", "attend", "silu")] + \
               [(name, _I64) for name in ("n_layers", "hidden", "n_q", "n_kv", "d", "inter", "elem")]


class Cache(ctypes.Structure):
    _fields_ = [("k", _PTR), ("v", _PTR)] + [(name, _I64) for name in ("k_ls", "v_ls", "k_hs", "v_hs")]


KERNEL = CKernel(Path(__file__).with_name("layer_loop.c"), ("-O2", "-mavx2", "-fPIC", "-shared"), "kvlib_layers",
                 [_PTR, _PTR, _PTR, _PTR, _I64, _I64, _PTR, _PTR, _PTR, _I64, ctypes.c_int, _PTR], "KVLIB_LAYER_LOOP",
                 {"avx2"})
_BATCH_ARGS = [_PTR, _PTR, _PTR, _PTR, _I64, _PTR, _PTR, _PTR, ctypes.c_int, _PTR]
SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}


@dataclass(eq=False)
class Plan:
    model: Model
    layers: ctypes.Array


def status() -> str:
    return KERNEL.status()


def _address(fn) -> int | None:
    return None if fn is None else ctypes.cast(fn, ctypes.c_void_p).value


def _kernels(dtype) -> list | None:
    """The addresses of the norm, linear, rope, attention and SiLU kernels for dtype, or None."""
    suffix, rope = SUFFIX[dtype], rope_kernel.build()
    if rope is None or pointwise_kernel.KERNEL.function() is None:
        return None
    fns = [pointwise_kernel.KERNEL.sibling(f"kvlib_rms_norm_{suffix}", pointwise_kernel.KERNEL.argtypes),
           (linear_kernel.BF16 if dtype == torch.bfloat16 else linear_kernel.KERNEL).function(),
           rope.sibling(rope_kernel.QKV_FUNCTIONS[dtype], rope_kernel._QKV_ARGS),
           attn_kernel.bf16_function() if dtype == torch.bfloat16 else attn_kernel.KERNEL.function(),
           pointwise_kernel.KERNEL.sibling(f"kvlib_silu_mul_{suffix}", pointwise_kernel._SILU_ARGS)]
    return None if any(fn is None for fn in fns) else [_address(fn) for fn in fns]


def _ptr(x: torch.Tensor | None) -> int | None:
    return None if x is None else x.data_ptr()


def _layer(weights: tuple, dtype) -> Layer | None:
    """One layer's Layer from forward.loop_layers' tuple, or None where a product is not on panels
    of the model's dtype or a tensor is not the model's dtype and contiguous."""
    ln1, eps1, ln2, eps2, scale, o_bias, down_bias, fused = weights
    packed = [(fused.packed or {}).get(name) for name in ("qkv", "o", "gate_up", "down")]
    tensors = [t for t in (ln1, ln2, o_bias, down_bias, fused.qkv_bias, fused.gate_up_bias) if t is not None]
    if not all(isinstance(p, Panels) and p.data.dtype == dtype for p in packed):
        return None
    if not all(t.dtype == dtype and t.is_contiguous() and t.device.type == "cpu" for t in tensors):
        return None
    return Layer(ln1=_ptr(ln1), ln2=_ptr(ln2), qkv=_ptr(packed[0].data), qkv_bias=_ptr(fused.qkv_bias),
                 o=_ptr(packed[1].data), o_bias=_ptr(o_bias), gate_up=_ptr(packed[2].data),
                 gate_up_bias=_ptr(fused.gate_up_bias), down=_ptr(packed[3].data), down_bias=_ptr(down_bias),
                 eps1=eps1, eps2=eps2, scale=scale)


def make_plan(lm) -> Plan | None:
    """The model's plan, or None where layer_loop.c cannot run it (module docstring)."""
    from kvlib.engine.forward import loop_layers

    if lm.dtype not in SUFFIX or lm.device.type != "cpu" or KERNEL.function() is None:
        return None
    weights, kernels = loop_layers(lm), _kernels(lm.dtype)
    if weights is None or kernels is None:
        return None
    layers = [_layer(w, lm.dtype) for w in weights]
    if any(layer is None for layer in layers):
        return None
    s = lm.config_summary
    inter = weights[0][7].intermediate
    if any(w[7].intermediate != inter for w in weights):
        return None
    model = Model(*kernels, n_layers=lm.n_layers, hidden=s["hidden_size"], n_q=s["num_attention_heads"],
                  n_kv=lm.n_kv_heads, d=lm.head_dim, inter=inter, elem=torch.tensor([], dtype=lm.dtype).element_size())
    return Plan(model, (Layer * len(layers))(*layers))


def plan(lm) -> Plan | None:
    """make_plan, once per model (kept on it)."""
    if not hasattr(lm, "_layer_loop"):
        lm._layer_loop = make_plan(lm)
    return lm._layer_loop


def _attention_takes(lm, t: int, t_past: int) -> bool:
    """forward.py runs the attention kernel for t new tokens behind t_past slots (attention.py: in bf16
    only for one token or behind a longer past) and the kernel takes the shape."""
    bf16_routed = t == 1 or t_past > t
    return (lm.dtype != torch.bfloat16 or bf16_routed) and attn_kernel.takes_shape(lm.dtype, lm.head_dim, t_past + t)


def _cache(cache) -> Cache:
    k, v = cache.k, cache.v
    return Cache(k=k.data_ptr(), v=v.data_ptr(), k_ls=k.stride(0), v_ls=v.stride(0), k_hs=k.stride(1), v_hs=v.stride(1))


def _takes_cache(lm, cache, start: int, t: int) -> bool:
    """t new tokens at slots start.. of `cache`, behind every slot before, in the loop's layout."""
    k, v = cache.k, cache.v
    return (k.dtype == lm.dtype and v.dtype == lm.dtype and k.shape[0] == lm.n_layers and 0 <= start
            and start + t <= cache.capacity and k.stride() == v.stride() and k.stride()[2:] == (lm.head_dim, 1)
            and _attention_takes(lm, t, start))


def _call(fn, p: Plan, h: torch.Tensor, caches, *rest) -> torch.Tensor:
    """fn(model, layers, caches, h's rows, *rest, threads, seconds) (both entry points' order) on a contiguous
    copy of h [1, T, hidden], which the kernels write in place and which is returned; attention's time
    reported to the profile."""
    t = h.shape[1]
    x = h.reshape(t, -1).clone(memory_format=torch.contiguous_format)
    seconds = ctypes.c_double() if stages.active() else None
    with stages.stage("layers"):
        rc = fn(ctypes.byref(p.model), p.layers, caches, x.data_ptr(), *rest, torch.get_num_threads(),
                None if seconds is None else ctypes.byref(seconds))
    if rc != 0:
        raise RuntimeError(f"layer loop refused its operands ({rc})")
    if seconds is not None:
        stages.add("attention", seconds.value)
    return x.view(1, t, -1)


def run(lm, h: torch.Tensor, position_ids: torch.Tensor, cache, start: int,
        keep: int | None = None) -> torch.Tensor | None:
    """h [1, T, hidden] (new tokens entering layer 0, at slots start.. of `cache`, causal behind
    every slot before) through every layer: their KV written into the cache, the hidden states
    of the last `keep` tokens (default all) leaving the last layer returned ([1, keep, hidden]: the
    others' last layer stops once their K/V are written); None, having done nothing, where
    layer_loop.c does not run (module docstring)."""
    from kvlib.engine.rope import forward_half_tables

    t = h.shape[1]
    p = plan(lm)
    if p is None or h.dim() != 3 or h.dtype != lm.dtype or t == 0 or not _takes_cache(lm, cache, start, t):
        return None
    tables = forward_half_tables(lm.rope, position_ids, lm.device)
    last = attn_kernel._behind(start, t)  # held here: the C call runs without the GIL, _behind's cache may move on
    keep = t if keep is None else keep
    out = _call(KERNEL.function(), p, h, ctypes.byref(_cache(cache)), t, start, tables.cos.data_ptr(),
                tables.sin.data_ptr(), last.data_ptr(), keep)
    return out[:, t - keep:]


def run_batch(lm, h: torch.Tensor, position_ids: torch.Tensor, caches: list) -> torch.Tensor | None:
    """A decode step: h [1, B, hidden], row i one new token of the sequence in caches[i], written at
    its first free slot (caches[i].length) behind every slot before, at position_ids[i]; through
    every layer as `run` does, the products on the B rows together, rotation and attention per
    sequence. Returns the hidden states leaving the last layer, or None, having done nothing."""
    from kvlib.engine.rope import half_tables

    b = len(caches)
    p = plan(lm)
    if (p is None or h.dim() != 3 or h.dtype != lm.dtype or b == 0 or h.shape[:2] != (1, b)
            or tuple(position_ids.shape) != (b,) or not all(_takes_cache(lm, c, c.length, 1) for c in caches)):
        return None
    fn = KERNEL.sibling("kvlib_layers_batch", _BATCH_ARGS)
    tables = half_tables(lm.rope, position_ids, lm.device)
    starts = torch.tensor([c.length for c in caches], dtype=torch.int64)
    return _call(fn, p, h, (Cache * b)(*[_cache(c) for c in caches]), b, starts.data_ptr(),
                 tables.cos.data_ptr(), tables.sin.data_ptr())
