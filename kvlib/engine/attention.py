"""Attention of new tokens over a KV cache: one mask type, and the kernel each layout runs on.

Design facts:
- `Mask` is the one description of what new tokens see. Three layouts survive, each for a
  reason:
  - `causal`: T new tokens in the slots after P filled ones, each seeing every past slot
    and the new tokens up to itself. Prefill, decode and encoding all are this.
  - `packed`: several sequences in one forward, each behind the same P past slots (and
    optionally a span of past slots only it sees), causal within itself and blind to the
    others. Ingest packs chunks so the linear layers run on large matmuls; the drift
    score packs chunk heads, each behind its own neighbour.
  - `slots`: new tokens written at scattered slots of a filled cache, each seeing every
    slot up to its own. Repair recomputes tokens in the middle of a prompt this way.
- Kernels, chosen from the layout and sizes (measured on this project's CPU):
  - float32 on an x86 CPU with AVX2 and FMA: the C kernel of attn_kernel.py for every layout
    (causal behind any past, a single query, packed sequences, slots). In-process A/B,
    SmolLM2: rerope TTFT 1.06x faster at 1.5k context, 1.25x at 4k; rerope+blend:0.3 1.17x
    and 1.32x; full prefill at 1.5k 1.03x; decode at 4k 1.17x. Where it is not built, the
    kernels below;
  - one new token on CPU: in bf16, the bf16 C kernel where the CPU has AMX or AVX-512 BF16
    (attn_kernel.py; AMX: 0.13 against 0.19 ms a layer at 4k slots, level at 1k; AVX-512 BF16
    EPYC: 0.16 against 0.37), else SDPA on grouped rows as below (0.18
    against 0.39 ms a layer at 4k slots, 0.05 against 0.12 at 1k, for two float32 matmuls, on a
    2-core AMX Xeon; SDPA with every query head reading the keys cost ~8x more than those
    matmuls on an earlier AVX-512 CPU); in float16, the two matmuls; in float32, SDPA's kernel
    (one op where the matmuls take ten: SmolLM2 decode steps 3-6% faster at batch 1-8, level at
    a 4k context, in-process A/B on an AVX2 EPYC);
  - causal with no past: SDPA's is_causal kernel;
  - causal behind a past longer than the new tokens (a question over cached chunks) on CPU
    in bf16: the bf16 C kernel (attn_kernel.attend_behind_bf16). On AMX: 0.42 against 0.74 ms a
    layer at 4k, 0.13 / 0.21 at 1k, 0.8 / 1.5 at 8k; rerope TTFT 80.6 -> 70.9 ms at 4k (in-process
    A/B on a 2-core AMX Xeon). On AVX-512 BF16 dot products: 1.05 against 2.61 ms a layer at 4k;
    rerope TTFT 137 -> 87 ms at 4k, 237 -> 125 at 8k (hot-path runs on a 2-core EPYC). Without
    either, SDPA on grouped rows (`grouped_sdpa`: the query
    heads of a KV head as one head of G * T rows, so each key is read once for all of them,
    under the causal mask in additive form, repeated per head of the group and built once per
    forward). On a 2-core AMX Xeon, SmolLM2's 75 rows a KV head: 0.20 / 0.71 / 1.47 ms a layer
    at 1k / 4k / 8k slots against 0.41 / 1.47 / 2.67 for two float32-score matmuls
    (`few_queries`, still the path for other half dtypes), within the same error of float64
    attention. (Earlier, on an AVX-512 CPU
    without AMX, few_queries ran 1.9 ms against SDPA's 2.6 ms a layer for 30 queries over 4k
    slots with every query head reading the keys: SDPA's kernel cost ~4.6 ns a score there.)
    In float32 (an AVX2-only CPU) SDPA's blocked kernel is the faster one behind a long past,
    which it reads once instead of writing and re-reading the scores: SmolLM2 rerope TTFT
    233 -> 219 ms at 4k context, 204 -> 189 at 3k, 154 -> 144 at 1.5k (in-process A/B on an
    AVX2 EPYC), level at 1k; so float32 behind FEW_QUERIES_SDPA_PAST slots or more
    runs SDPA with the causal mask in additive form (what SDPA makes of a bool mask on every
    call), built once per forward and shared by its layers (`Mask.additive`: same bits, rerope
    TTFT 2-7% lower at 4k, in-process A/B);
  - causal behind P <= T past slots: P zero queries padded in front so is_causal (aligned
    top-left) gives each new token every past slot; the kernel skips masked blocks, where a
    dense mask would compute all T x (P+T) scores (twice the work at P << T). Behind a
    longer past the padding would cost more than it saves, and a dense mask is used;
  - packed: the causal kernel per sequence, costing sum(n x (P + n)) instead of a dense
    block-diagonal mask's T x (P + T);
  - slots: SDPA per block of 64 queries over the slots up to the block's last (`at_slots`);
  - any layout whose probabilities are asked for: a dense boolean mask.
- Shapes: q [1, H, T, D]; keys/values [Hkv, S, D]; grouped-query attention maps query head h
  to KV head h // (H / Hkv).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvlib.engine import attn_kernel


@dataclass(frozen=True, eq=False)
class Mask:
    kind: str  # "causal", "packed" or "slots"
    t_new: int = 0
    t_past: int = 0
    lengths: tuple[int, ...] = ()  # packed: each sequence's token count
    own_past: tuple[tuple[int, int], ...] = ()  # packed: (first slot, count) of each sequence's own past
    slots: torch.Tensor | None = None  # slots: the slot of each new token
    total: int = 0  # slots: the cache slots attended over

    @classmethod
    def causal(cls, t_new: int, t_past: int) -> "Mask":
        return cls("causal", t_new=t_new, t_past=t_past)

    @classmethod
    def packed(cls, lengths: tuple[int, ...], t_past: int, own_past: tuple = ()) -> "Mask":
        return cls("packed", t_new=sum(lengths), t_past=t_past, lengths=tuple(lengths), own_past=tuple(own_past))

    @classmethod
    def at_slots(cls, slots: torch.Tensor, total: int) -> "Mask":
        return cls("slots", t_new=int(slots.numel()), slots=slots, total=total)

    @property
    def first_new_slot(self) -> int:
        """Packed: the slot of the first new token (after every shared and own past slot)."""
        return max([self.t_past] + [a + n for a, n in self.own_past])

    def seen_slots(self, i: int, start: int) -> list[slice]:
        """Packed: the cache slots sequence i sees, in order; it starts at packed offset `start`."""
        seen = [slice(0, self.t_past)] if self.t_past else []
        if self.own_past:
            a, n = self.own_past[i]
            seen.append(slice(a, a + n))
        new = self.first_new_slot + start
        return seen + [slice(new, new + self.lengths[i])]

    def dense(self, device) -> torch.Tensor:
        """Bool [T, S]: True where a new token sees a slot."""
        if self.kind == "causal":
            return torch.ones(self.t_new, self.t_past + self.t_new, dtype=torch.bool, device=device).tril(
                diagonal=self.t_past)
        if self.kind == "slots":
            return torch.arange(self.total, device=device)[None, :] <= self.slots.to(device)[:, None]
        return self._packed_dense(device)

    def additive(self, device, dtype, group: int = 1) -> torch.Tensor:
        """Float [group * T, S]: 0 where a new token sees a slot, -inf elsewhere, which SDPA adds to
        the scores (what it turns a bool mask into on every call); `group` copies one under the
        other (grouped_sdpa's rows). Built once per Mask: a forward hands the same Mask to every layer."""
        key = (torch.device(device), dtype, group)
        cached = self.__dict__.get("_additive")
        if cached is None or cached[0] != key:
            dense = self.dense(device)
            mask = torch.zeros(dense.shape, dtype=dtype, device=device).masked_fill_(~dense, float("-inf"))
            cached = (key, mask.repeat(group, 1) if group > 1 else mask)
            object.__setattr__(self, "_additive", cached)
        return cached[1]

    def _packed_dense(self, device) -> torch.Tensor:
        total = sum(self.lengths)
        mask = torch.zeros(total, self.first_new_slot + total, dtype=torch.bool, device=device)
        start = 0
        for i, n in enumerate(self.lengths):
            *past, own = self.seen_slots(i, start)
            for cols in past:
                mask[start : start + n, cols] = True
            mask[start : start + n, own] = torch.ones(n, n, dtype=torch.bool, device=device).tril()
            start += n
        return mask


def attention_probs(q, keys, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Explicit softmax(QK^T) for analysis. q: [1, H, T, D]; keys: [Hkv, S, D] -> [H, T, S]."""
    rep = q.shape[1] // keys.shape[0]
    kk = keys.repeat_interleave(rep, dim=0).to(torch.float32)
    scores = torch.einsum("htd,hsd->hts", q[0].to(torch.float32), kk) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1)


def single_query_attention(q, keys, values, scale: float) -> torch.Tensor:
    """One new token over every slot, float32 scores, the probabilities meeting the values in the
    cache dtype (as few_queries and SDPA's CPU kernel do). q: [1, H, 1, D] -> [1, H, 1, D].

    On CPU, SDPA's kernel costs ~8x more than these two matmuls for a single bf16 query
    (2.1 vs 0.25 ms per layer at 2.6k slots, one thread), so decoding uses this path there.
    """
    hkv, group = keys.shape[0], q.shape[1] // keys.shape[0]
    qg = q[0].reshape(hkv, group, q.shape[3]).float()
    scores = torch.matmul(qg, keys.float().transpose(-1, -2)) * scale  # [Hkv, G, S]
    out = torch.matmul(scores.softmax(dim=-1).to(values.dtype), values)  # [Hkv, G, D]: no float copy of V
    return out.to(q.dtype).reshape(1, q.shape[1], 1, q.shape[3])


def sdpa(q, keys, values, scale: float, *, mask: torch.Tensor | None = None, causal: bool = False):
    return F.scaled_dot_product_attention(q, keys[None], values[None], attn_mask=mask, is_causal=causal,
                                          scale=scale, enable_gqa=True)


def few_queries(q, keys, values, t_past: int, scale: float):
    """T new queries over a past longer than themselves, as two batched matmuls per KV head.

    Scores are float32 (q and keys cast up: a bf16 product would round every score), the
    scale is applied to q (exact for a power-of-two scale, as head_dim 64 has), the causal
    corner is masked in place, and the probabilities meet the values in the cache
    dtype, as SDPA's CPU kernel does too. The query heads that share a KV head ride
    together as one [G*T, D] operand. q: [1, H, T, D]; keys/values: [Hkv, P+T, D].
    """
    hkv, t, dim = keys.shape[0], q.shape[2], q.shape[3]
    group = q.shape[1] // hkv
    qg = q[0].reshape(hkv, group * t, dim).float() * scale  # scaled before: one pass over [G*T, D], not [G*T, S]
    scores = torch.bmm(qg, keys.float().transpose(1, 2))  # [Hkv, G*T, S]
    corner = torch.ones(t, t, dtype=torch.bool, device=q.device).triu_(1)  # a new token's later neighbours
    scores.view(hkv, group, t, -1)[..., t_past:].masked_fill_(corner, float("-inf"))
    out = torch.bmm(scores.softmax(dim=-1).to(values.dtype), values)  # [Hkv, G*T, D]
    return out.to(q.dtype).reshape(1, q.shape[1], t, dim)


# Scores of the matmul path beyond this many elements (float32) are left to SDPA's kernel.
FEW_QUERIES_MAX_SCORES = 1 << 24
# A float32 past this long or longer is attended by SDPA's kernel (module docstring).
FEW_QUERIES_SDPA_PAST = 1536


def grouped_sdpa(q, keys, values, scale: float, mask: Mask | None):
    """SDPA with the G query heads of each KV head as one head of G * T rows (head h = kv * G + g,
    row g * T + t), under the mask repeated per group: each key is read once for the group.
    q: [1, H, T, D]; keys/values: [Hkv, S, D]; mask: a causal Mask of T new tokens, or None for
    one token that sees every slot."""
    hkv, t, dim = keys.shape[0], q.shape[2], q.shape[3]
    group = q.shape[1] // hkv
    rows = q.reshape(1, hkv, group * t, dim)
    out = sdpa(rows, keys, values, scale, mask=None if mask is None else mask.additive(q.device, q.dtype, group))
    return out.reshape(1, q.shape[1], t, dim)


def causal_behind(q, keys, values, t_past: int, scale: float, mask: Mask | None = None):
    """T new queries over t_past past slots and, causally, themselves. keys/values: [Hkv, P+T, D];
    mask: the forward's Mask.causal(T, t_past), whose dense form every layer shares."""
    t = q.shape[2]
    out = attn_kernel.attend_behind(q, keys, values, t_past, scale) if q.dtype == torch.float32 else None
    if out is not None:
        return out
    if t_past > t:  # padding would cost more than it saves
        if q.device.type == "cpu" and q.dtype == torch.float32 and t_past >= FEW_QUERIES_SDPA_PAST:
            mask = Mask.causal(t, t_past) if mask is None else mask
            return sdpa(q, keys, values, scale, mask=mask.additive(q.device, q.dtype))
        if q.device.type == "cpu" and q.dtype == torch.bfloat16:
            out = attn_kernel.attend_behind_bf16(q, keys, values, t_past, scale)
            return out if out is not None else grouped_sdpa(q, keys, values, scale,
                                                            Mask.causal(t, t_past) if mask is None else mask)
        if q.device.type == "cpu" and q.shape[1] * t * keys.shape[1] <= FEW_QUERIES_MAX_SCORES:
            return few_queries(q, keys, values, t_past, scale)
        return at_slots(q, keys, values, torch.arange(t_past, t_past + t), scale)  # blocks skip the masked corner
    if t_past:
        q = torch.cat([q.new_zeros(1, q.shape[1], t_past, q.shape[3]), q], dim=2)
    return sdpa(q, keys, values, scale, causal=True)[:, :, t_past:]


def packed_attention(q, keys, values, mask: Mask, scale: float):
    parts, start = [], 0
    for i, n in enumerate(mask.lengths):
        seen = mask.seen_slots(i, start)
        k_seq = torch.cat([keys[:, s] for s in seen], dim=1) if len(seen) > 1 else keys[:, seen[0]]
        v_seq = torch.cat([values[:, s] for s in seen], dim=1) if len(seen) > 1 else values[:, seen[0]]
        parts.append(causal_behind(q[:, :, start : start + n], k_seq, v_seq, k_seq.shape[1] - n, scale))
        start += n
    return torch.cat(parts, dim=2)


# Queries per block of `at_slots` (48-128 measured alike; 64 best at 0.5-1.2k repaired tokens).
SLOTS_BLOCK_ROWS = 64


def at_slots(q, keys, values, slots: torch.Tensor, scale: float):
    """T new tokens at scattered slots of a filled cache, each seeing every slot up to its own.

    SDPA's kernel computes every score of a dense mask, masked or not. Here it runs per block
    of queries over only the slots up to the block's last query, so sorted slots (as repairs
    give) skip most of the masked scores: 16 against 23-29 ms a layer for 534 tokens repaired
    in a 1.8k SmolLM2 prompt, 77 against 111 for 1.2k in 4.1k. Same kernel, so the same
    float32 scores for bf16 as the dense call; masked slots weigh exactly 0 in either. In float32
    on an AVX2 CPU the C kernel (attn_kernel.py) takes it, skipping alike per block of rows; in bf16
    its bf16 twin (AMX or AVX-512 BF16), 2.3-2.6x faster than these blocks for 300-1,330 repaired
    tokens of a 1.3k SmolLM2 prompt.
    q: [1, H, T, D]; slots: [T], any order (unsorted ones skip less)."""
    until = {torch.float32: attn_kernel.attend_until, torch.bfloat16: attn_kernel.attend_until_bf16}.get(q.dtype)
    out = None if until is None else until(q, keys, values, slots, scale)
    if out is not None:
        return out
    slots = slots.to(q.device)
    out = torch.empty_like(q)
    for a in range(0, q.shape[2], SLOTS_BLOCK_ROWS):
        blk = slots[a : a + SLOTS_BLOCK_ROWS]
        end = int(blk.max()) + 1
        seen = torch.arange(end, device=q.device)[None, :] <= blk[:, None]
        out[:, :, a : a + blk.numel()] = sdpa(q[:, :, a : a + blk.numel()], keys[:, :end], values[:, :end], scale,
                                              mask=seen)
    return out


def attend(q, keys, values, mask: Mask, scale: float, want_probs: bool = False):
    """Attention output [1, H, T, D] and, when asked, probabilities [H, T, S]."""
    t = q.shape[2]
    if want_probs:  # the probabilities need the mask itself
        dense = mask.dense(q.device)
        if mask.kind == "causal" and mask.t_past == 0 and t > 1:
            out = sdpa(q, keys, values, scale, causal=True)
        elif mask.kind == "causal" and t == 1:
            out = one_query(q, keys, values, scale)
        else:
            out = sdpa(q, keys, values, scale, mask=dense)
        return out, attention_probs(q, keys, dense, scale) if want_probs else None
    if mask.kind == "packed":
        return packed_attention(q, keys, values, mask, scale), None
    if mask.kind == "slots":
        return at_slots(q, keys, values, mask.slots, scale), None
    if t == 1:
        return one_query(q, keys, values, scale), None
    return causal_behind(q, keys, values, mask.t_past, scale, mask), None


def one_query(q, keys, values, scale: float):
    """One new token over every slot of keys/values (decode). q: [1, H, 1, D]."""
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        out = attn_kernel.attend_behind_bf16(q, keys, values, keys.shape[1] - 1, scale)
        return out if out is not None else grouped_sdpa(q, keys, values, scale, None)
    if q.device.type == "cpu" and q.dtype != torch.float32:
        return single_query_attention(q, keys, values, scale)
    out = attn_kernel.attend_behind(q, keys, values, keys.shape[1] - 1, scale) if q.dtype == torch.float32 else None
    return out if out is not None else sdpa(q, keys, values, scale)
