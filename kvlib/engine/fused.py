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
  apart); `fuse_model` is called by model.wrap_model, the one place a model is made ready.
- A layer whose projections disagree on bias (some with, some without) is left unfused and
  runs through its modules.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class FusedLayer:
    qkv_weight: torch.Tensor  # [(H + 2 Hkv) D, hidden]
    qkv_bias: torch.Tensor | None
    qkv_sizes: tuple[int, int, int]
    gate_up_weight: torch.Tensor | None  # [2 I, hidden]; None when the MLP is left unfused
    gate_up_bias: torch.Tensor | None
    intermediate: int


def _stack(modules) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """One matrix (and bias) from linear modules, whose weights (and biases) become its views."""
    biases = [m.bias is not None for m in modules]
    if any(biases) and not all(biases):
        return None
    weight = torch.cat([m.weight.detach() for m in modules], dim=0)
    bias = torch.cat([m.bias.detach() for m in modules], dim=0) if all(biases) else None
    start = 0
    for m in modules:
        n = m.weight.shape[0]
        m.weight = torch.nn.Parameter(weight[start : start + n], requires_grad=False)
        if bias is not None:
            m.bias = torch.nn.Parameter(bias[start : start + n], requires_grad=False)
        start += n
    return weight, bias


def fuse_layer(layer) -> FusedLayer | None:
    attn, mlp = layer.self_attn, layer.mlp
    qkv = _stack([attn.q_proj, attn.k_proj, attn.v_proj])
    if qkv is None:
        return None
    sizes = (attn.q_proj.weight.shape[0], attn.k_proj.weight.shape[0], attn.v_proj.weight.shape[0])
    gate_up = _stack([mlp.gate_proj, mlp.up_proj])
    return FusedLayer(qkv_weight=qkv[0], qkv_bias=qkv[1], qkv_sizes=sizes,
                      gate_up_weight=None if gate_up is None else gate_up[0],
                      gate_up_bias=None if gate_up is None else gate_up[1],
                      intermediate=mlp.gate_proj.weight.shape[0])


@torch.no_grad()
def fuse_model(hf) -> list[FusedLayer | None]:
    return [fuse_layer(layer) for layer in hf.model.layers]
