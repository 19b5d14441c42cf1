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
  30 rows and 10% at 512-2048, with bit-identical outputs (measured here, interleaved). They
  are a second copy of the layer weights, so they are made only when that copy costs at most
  PACK_MAX_BYTES (SmolLM2: ~270 MB with its output head; Qwen2.5-1.5B's 2.6 GB is not
  doubled). `linear` runs a product on the packed copy where there is one. The output head
  is packed too: one row against SmolLM2's 49k-row head took 6.8 ms plain and
  2.5 ms packed, bit-identical, in every TTFT and every decode step.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

PACK_MAX_BYTES = 512 << 20


@dataclass(frozen=True, eq=False)
class FusedLayer:
    qkv_weight: torch.Tensor  # [(H + 2 Hkv) D, hidden]
    qkv_bias: torch.Tensor | None
    qkv_sizes: tuple[int, int, int]
    gate_up_weight: torch.Tensor | None  # [2 I, hidden]; None when the MLP is left unfused
    gate_up_bias: torch.Tensor | None
    intermediate: int
    packed: dict | None = None  # "qkv", "o", "gate_up", "down" -> prepacked weight, when made


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed=None) -> torch.Tensor:
    """F.linear(x, weight, bias), on the prepacked copy of weight when there is one (same bits)."""
    if packed is None:
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


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


def packable(weights: list) -> bool:
    """bf16 on a CPU whose oneDNN packs bf16, and a packed copy of these 2-D weights within
    PACK_MAX_BYTES."""
    first = weights[0]
    if first.dtype != torch.bfloat16 or first.device.type != "cpu" or not cpu_packs_bf16():
        return False
    return sum(w.numel() * w.element_size() for w in weights) <= PACK_MAX_BYTES


def pack(weight: torch.Tensor):
    """The weight reordered once for oneDNN's products (what `linear` takes as `packed`)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


def pack_layer(fused: FusedLayer, o_weight: torch.Tensor, down_weight: torch.Tensor) -> FusedLayer:
    weights = {"qkv": fused.qkv_weight, "o": o_weight, "gate_up": fused.gate_up_weight, "down": down_weight}
    return replace(fused, packed={name: pack(w) for name, w in weights.items() if w is not None})
