"""Each decoder layer's q/k/v projections as one matrix, and its MLP's gate and up as another.

Design facts:
- A question over cached chunks runs ~30 tokens through every layer: at that size a linear
  layer costs its dispatch and its weight read more than its arithmetic, so three products
  of [T, hidden] against q, k and v (and two against gate and up) cost more than one
  against their rows stacked. Inference engines fuse them the same way (vLLM's
  QKVParallelLinear and MergedColumnParallelLinear).
- No weight is held twice: the stacked matrix is built once, and the HF modules' own
  weights become views of its rows, so transformers' forward (the doctor's reference) reads
  the same memory.
- Built after the model reaches its device and dtype (a later `.to` would copy the views
  apart), by model.fuse_model (called by wrap_model, the one place a model is made ready),
  which hands this module the modules' tensors: nothing here touches a transformers module.
- A layer whose projections disagree on bias (some with, some without) is left unfused and
  runs through its modules.
- Prepacked weights (oneDNN's blocked layout, `torch.ops.mkldnn._reorder_linear_weight`, what
  inductor's freezing pass does): in bf16 on CPU the same products ran 30-35% faster at 1 and
  30 rows and 10% at 512-2048, with bit-identical outputs (measured here, interleaved). The
  output head too: one row against SmolLM2's 49k-row head took 6.8 ms plain and 2.5 ms packed.
- In float32 (what an AVX2-only CPU computes in) oneDNN packs as well, and its products are
  batch-invariant: a row's result is the same bits whatever other rows share the product
  (MKL's, torch's plain float32 path, are not: one row and thirty differ in the last bits).
  Measured on an AVX2 EPYC at 30 rows:
  qkv 0.37 -> 0.26 ms, gate/up 1.09 -> 0.85, down 0.47 -> 0.41; the head's one row 7.6 -> 4.3.
  They differ from the modules' float32 products by float rounding (about 1e-7 relative).
- A packed copy replaces the plain one (model.fuse_model; model.plain_weights rebuilds the
  dense weights, bit for bit, for transformers' own forward), except a head tied to the
  embedding, which the embedding still reads. Packing runs within PACK_MAX_BYTES (or
  KVLIB_PACK_MB), by group in order of what it saves per byte: the output head (every TTFT
  and every decode step), then the MLPs, then the attention projections (plan_packing).
  SmolLM2 packs all three (in-process A/B on an AVX2 EPYC, rerope TTFT at 1k context
  198 -> 128 ms, at 4k 279 -> 261 ms), and holds only its tied head twice (57 MB in bf16,
  113 MB in float32); Qwen2.5-1.5B in bf16 only its head (~470 MB). `linear` runs a product
  on the packed copy where there is one.
- On an x86 CPU with AVX2 and FMA, float32 weights are packed for linear_kernel.py's product
  instead of oneDNN's (faster at every row count measured, 1.22x at a question's 25 rows); on
  one with AVX-512 BF16, bf16 weights for its bf16 product (not oneDNN's bits: the sums' order
  differs, within bf16 rounding; tests).
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from kvlib.engine import linear_kernel
from kvlib.engine.linear_kernel import Panels

PACK_MAX_BYTES = 640 << 20


@dataclass(frozen=True, eq=False)
class FusedLayer:
    qkv_weight: torch.Tensor  # [(H + 2 Hkv) D, hidden]
    qkv_bias: torch.Tensor | None
    qkv_sizes: tuple[int, int, int]
    gate_up_weight: torch.Tensor | None  # [2 I, hidden]; None when the MLP is left unfused
    gate_up_bias: torch.Tensor | None
    intermediate: int
    packed: dict | None = None  # "qkv", "o", "gate_up", "down" -> prepacked weight, when made


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed=None,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) (+ residual, added last), on the prepacked copy of weight when
    there is one: oneDNN's (same bits), or linear_kernel's panels (float32 rounding apart,
    batch-invariant alike), which add the residual as they write."""
    if isinstance(packed, Panels):
        return packed.apply(x, bias, residual)
    if packed is None:
        y = F.linear(x, weight, bias)
    else:
        y = onednn_linear(x, packed, bias)
    return y if residual is None else residual + y


def row_bucket(m: int) -> int:
    """m rows rounded up to one of 32 sizes per power of two above 64 (at most 3% more rows)."""
    return m if m <= 64 else -(-m // (1 << (m.bit_length() - 6))) * (1 << (m.bit_length() - 6))


def onednn_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """oneDNN's product on its packed weight, the rows padded with zeros to row_bucket's size and cut
    back. oneDNN builds (JIT-compiles) a primitive for every new row count, ~6 ms for SmolLM2's
    gate/up product in bf16 against ~1 ms to run it: a narrowing repair meets a new count at every
    layer, and every prompt length is new to full prefill. Bucketed, a process meets few counts,
    each once (rows are computed one by one: the padding changes no real row's value)."""
    rows = x.reshape(-1, x.shape[-1])
    m = rows.shape[0]
    padded = row_bucket(m)
    if padded != m:
        rows = torch.cat([rows, rows.new_zeros(padded - m, rows.shape[1])])
    y = torch.ops.mkldnn._linear_pointwise(rows.contiguous(), packed, bias, "none", [], "")
    return y[:m].reshape(*x.shape[:-1], y.shape[-1])


def stack_rows(weights: list, biases: list) -> tuple | None:
    """One matrix (and bias) from the rows of several linear weights, and each part's view of
    it: (weight, bias, weight views, bias views); None where some parts have a bias and some not."""
    if any(b is not None for b in biases) and any(b is None for b in biases):
        return None
    weight = torch.cat(weights, dim=0)
    bias = torch.cat(biases, dim=0) if biases[0] is not None else None
    bounds = list(itertools.accumulate(w.shape[0] for w in weights))
    parts = list(zip([0, *bounds[:-1]], bounds))
    return (weight, bias, [weight[a:b] for a, b in parts],
            [None if bias is None else bias[a:b] for a, b in parts])


def cpu_packs_bf16() -> bool:
    """oneDNN can reorder bf16 weights on this CPU (AVX-512 BW/VL/DQ or AVX-NE-CONVERT; an
    AVX2-only CPU cannot, and computes in float32 anyway: model.pick_dtype)."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def can_pack(weight: torch.Tensor) -> bool:
    """This CPU prepacks weights of this dtype: float32 (linear_kernel's panels, else oneDNN's), or
    bf16 where oneDNN computes bf16."""
    if linear_kernel.takes(weight):
        return True
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return weight.dtype == torch.float32 or (weight.dtype == torch.bfloat16 and cpu_packs_bf16())


def pack_budget() -> int:
    """PACK_MAX_BYTES, or KVLIB_PACK_MB megabytes where set (0 packs nothing: an A/B's other arm)."""
    mb = os.environ.get("KVLIB_PACK_MB", "").strip()
    return int(mb) << 20 if mb.isdigit() else PACK_MAX_BYTES


def plan_packing(groups: list, budget: int | None = None) -> set:
    """The names of the groups [(name, [weights])], given in order of value, whose packed copies
    fit `budget` (default pack_budget()) together; a group that does not fit is skipped."""
    budget = pack_budget() if budget is None else budget
    chosen, used = set(), 0
    for name, weights in groups:
        size = sum(w.numel() * w.element_size() for w in weights)
        if weights and all(can_pack(w) for w in weights) and used + size <= budget:
            chosen.add(name)
            used += size
    return chosen


def pack(weight: torch.Tensor):
    """The weight reordered once for the products `linear` runs on it (its `packed`): the linear
    kernel's panels in float32 where it builds, else oneDNN's layout."""
    if linear_kernel.takes(weight):
        return linear_kernel.panels(weight)
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


def layer_products(fused: FusedLayer, o_weight: torch.Tensor, down_weight: torch.Tensor) -> dict:
    """A fused layer's products by packing group: {"attention": {"qkv", "o"}, "mlp": {"gate_up", "down"}}."""
    mlp = {"gate_up": fused.gate_up_weight, "down": down_weight} if fused.gate_up_weight is not None else {}
    return {"attention": {"qkv": fused.qkv_weight, "o": o_weight}, "mlp": mlp}


def pack_layer(fused: FusedLayer, products: dict, groups: set) -> FusedLayer:
    """The layer with the products of the planned groups packed (layer_products' layout)."""
    packed = {name: pack(w) for group in groups for name, w in products[group].items()}
    return replace(fused, packed=packed or None)
