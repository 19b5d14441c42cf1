"""Rotation math only: rotary position embedding with the model's own inv_freq and scaling.

Design facts:
- kvlib never recomputes inv_freq itself. It reads `inv_freq` and `attention_scaling`
  from the model's rotary module, so every position-independent rope type that
  transformers implements (default, linear, llama3, yarn) is reproduced exactly.
- Rope types whose frequencies depend on the sequence length (dynamic NTK, longrope)
  cannot be stored position-free: a chunk's keys would depend on the prompt it lands
  in. They are refused rather than approximated.
- `apply_rope(k, p)` matches transformers' `apply_rotary_pos_emb`, including the yarn
  attention factor. `rotate(k, delta)` is the pure rotation (no scaling), so
  `rotate(apply_rope(k, a), b) == apply_rope(k, a + b)` and
  `unapply_rope(apply_rope(k, p), p) == k`.
- Angles are computed in float32, as transformers does, then the product is taken
  in float32 and cast back, so bf16/fp16 keys lose no precision to the rotation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvlib.errors import UnsupportedModelError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True, eq=False)
class RopeSpec:
    """The model's rotary parameters. inv_freq: [D/2] float32."""

    inv_freq: torch.Tensor
    attention_scaling: float
    rope_type: str


def rope_spec_from_rotary(rotary: torch.nn.Module) -> RopeSpec:
    """Read the spec from a transformers rotary-embedding module, refusing unsafe types."""
    rope_type = getattr(rotary, "rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope type '{rope_type}' scales with sequence length and cannot be cached "
            f"position-free; supported rope types: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    # original_inv_freq is the unscaled-by-dynamic-update copy; for the supported
    # (static) types the two are identical, and inv_freq is what forward() uses.
    inv_freq = rotary.inv_freq.detach().to(device="cpu", dtype=torch.float32).clone()
    return RopeSpec(inv_freq=inv_freq, attention_scaling=float(rotary.attention_scaling), rope_type=rope_type)


def _freqs(spec: RopeSpec, positions: torch.Tensor, device) -> torch.Tensor:
    """positions: [T] -> angles [T, D/2] in float32."""
    return positions.to(device=device, dtype=torch.float32)[:, None] * spec.inv_freq.to(device)[None, :]


def _angles(spec: RopeSpec, positions: torch.Tensor, device: torch.device) -> torch.Tensor:
    # positions: [T] -> angles [T, D] laid out as transformers does: cat(freqs, freqs)
    freqs = _freqs(spec, positions, device)
    return torch.cat((freqs, freqs), dim=-1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _LastTables:
    """cos/sin of the last positions tensor seen: a forward rotates q and k of every layer at
    the same positions, so the tables are computed once per forward, not 2 x L times. The
    tensor itself is held, so its identity cannot be reused by another tensor while cached."""

    def __init__(self, make):
        self.make, self.entry = make, None

    def get(self, spec: RopeSpec, positions: torch.Tensor, device):
        entry = self.entry  # one tuple, replaced whole: a concurrent forward sees old or new, never a mix
        if entry is None or entry[0] is not positions or entry[1] is not spec or entry[2] != device:
            entry = (positions, spec, device, self.make(spec, positions, device))
            self.entry = entry
        return entry[3]


def _full_tables(spec: RopeSpec, positions: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    emb = _angles(spec, positions, device)
    return emb.cos(), emb.sin()


_TABLES = _LastTables(_full_tables)


def _rotate_f32(x: torch.Tensor, positions: torch.Tensor, spec: RopeSpec, scale: float) -> torch.Tensor:
    cos, sin = _TABLES.get(spec, positions, x.device)
    xf = x.to(torch.float32)
    out = xf * (cos * scale) + rotate_half(xf) * (sin * scale)
    return out.to(x.dtype)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, spec: RopeSpec) -> torch.Tensor:
    """Position-encode semantic keys. x: [..., T, D]; positions: [T] (any integers)."""
    return _rotate_f32(x, positions, spec, spec.attention_scaling)


@dataclass(frozen=True, eq=False)
class HalfTables:
    """cos and sin of a run of positions, attention scaling folded in: [T, D/2] float32 each.
    transformers' tables are cat(freqs, freqs), so one half holds all of it."""

    cos: torch.Tensor
    sin: torch.Tensor

    def slice(self, start: int, n: int) -> "HalfTables":
        return HalfTables(self.cos[start : start + n], self.sin[start : start + n])


def half_tables(spec: RopeSpec, positions: torch.Tensor, device) -> HalfTables:
    freqs = _freqs(spec, positions, device)
    return HalfTables(freqs.cos() * spec.attention_scaling, freqs.sin() * spec.attention_scaling)


_HALF_TABLES = _LastTables(half_tables)


def forward_half_tables(spec: RopeSpec, positions: torch.Tensor, device) -> HalfTables:
    """half_tables of a forward's positions, made once for all its layers (as apply_rope's are)."""
    return _HALF_TABLES.get(spec, positions, device)


@torch.no_grad()
def rope_into_(dst: torch.Tensor, src: torch.Tensor, tables: HalfTables) -> None:
    """dst[l] = apply_rope(src[l]) for each leading index l; dst: [L, ..., T, D] (a cache's
    slots), src the same shape (the stored pre-RoPE keys, or dst itself: in place).

    The same arithmetic as apply_rope (float32 products, one rounding back), so the same
    bits: x * [c, c] + swap(x) * [-s, s], where swap exchanges the halves, is element by
    element what x * cos + rotate_half(x) * sin computes (x2 * -s is -(x2 * s) exactly).
    Full-width passes over one layer's temporaries, allocated once and reused so they stay
    in cache, with the result written into the cache slots: 13.3 against 16.2 ms for 4k keys
    of 30 layers with half-width products (written out= per half), 35 ms per chunk before.
    A float32 cache rotated in place (what a float32 model composes) is worked on where it lies:
    no float32 copy in and out, two passes of seven fewer.
    """
    half = dst.shape[-1] // 2
    cos = torch.cat([tables.cos, tables.cos], dim=-1)
    sin = torch.cat([-tables.sin, tables.sin], dim=-1)
    in_place_f32 = dst.dtype == torch.float32 and dst.data_ptr() == src.data_ptr() and dst.stride() == src.stride()
    swapped = torch.empty(src.shape[1:], dtype=torch.float32, device=src.device)  # one layer's, reused
    xf = None if in_place_f32 else torch.empty_like(swapped)
    for i in range(dst.shape[0]):
        x = dst[i] if in_place_f32 else xf.copy_(src[i])
        swapped[..., :half] = x[..., half:]
        swapped[..., half:] = x[..., :half]
        x.mul_(cos).add_(swapped.mul_(sin))
        if not in_place_f32:
            dst[i].copy_(x)  # src[i] was read in full before: dst may be src


def apply_rope_(x: torch.Tensor, positions: torch.Tensor, spec: RopeSpec) -> None:
    """apply_rope in place on x: [L, ..., T, D], one leading index at a time (rope_into_)."""
    rope_into_(x, x, half_tables(spec, positions, x.device))


def rotate(x: torch.Tensor, delta: torch.Tensor, spec: RopeSpec) -> torch.Tensor:
    """Pure rotation by `delta` positions, no attention scaling: re-anchors rotated keys."""
    return _rotate_f32(x, delta, spec, 1.0)


def unapply_rope(x: torch.Tensor, positions: torch.Tensor, spec: RopeSpec) -> torch.Tensor:
    """Inverse of apply_rope: rotate back by -positions and undo the attention scaling."""
    return _rotate_f32(x, -positions, spec, 1.0 / spec.attention_scaling)
