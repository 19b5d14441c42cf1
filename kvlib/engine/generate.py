"""Prefill and decode on top of a composed prompt, streaming tokens, with timing.

Design facts:
- TTFT is measured from a caller-given request start (`t0`), so retrieval, KV load and
  composition count when the caller starts the clock before them.
- Decoding appends to the preallocated cache; one token per forward.
- Greedy by default; temperature/top-p sampling with a seeded generator.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from kvlib.engine.compose import Composed, as_ids
from kvlib.engine.forward import check_window, decode_batch, forward, prefill_batch


@dataclass
class Generation:
    token_ids: list[int]
    ttft_s: float  # request start to first token
    prefill_s: float  # the prefill forward alone
    decode_s: float
    prefill_tokens: int
    stopped: bool  # hit a stop token (else max_new_tokens, or cancelled)
    first_logits: torch.Tensor | None = field(default=None, repr=False)  # [V]
    cancelled: bool = False  # should_stop() said so between decode steps
    # Filled by Engine.answer, the one door (see session.py):
    spec: object = None  # the resolved ModeSpec
    timings: dict = field(default_factory=dict)  # seconds: caller stages + compose, repair, batch, prefill
    tokens: dict = field(default_factory=dict)  # prompt tokens by source: cached, recomputed, computed
    chunk_recomputed: list = field(default_factory=list)  # per chunk: its cached tokens a repair recomputed
    state: object = field(default=None, repr=False)  # the Composed context, when kept for a quality pass
    guard: dict | None = None  # a guarded spec's choice: rung, fell_back, predicted_kl, kl_bound (guard.py)

    @property
    def decode_tok_s(self) -> float:
        n = max(0, len(self.token_ids) - 1)
        return n / self.decode_s if self.decode_s > 0 else 0.0


def pick_token(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> int:
    """logits: [V]. Greedy at temperature 0, else nucleus sampling."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # always keeps the top token
        probs = torch.zeros_like(probs).scatter(0, idx[keep], sorted_p[keep])
    return int(torch.multinomial(probs.cpu(), 1, generator=gen))


def prefill(lm, composed: Composed, suffix_ids, *, logits: str = "last", attn_layers=()):
    """Prefill pending context ids plus the question suffix at their true positions."""
    ids = torch.cat([composed.pending_ids, as_ids(suffix_ids)])
    pos = torch.arange(composed.next_pos, composed.next_pos + ids.shape[0])
    out = forward(lm, ids, pos, composed.cache, logits=logits, attn_layers=attn_layers)
    return out, int(pos[-1]) + 1, int(ids.shape[0])


@dataclass(eq=False)
class Stream:
    """One sequence being decoded: what `start` left and each `advance` moves on by a token."""

    composed: Composed
    pos: int  # rotary position of the next token
    token: int  # the last token picked, not yet run through the model
    tokens: list
    stop: set
    temperature: float
    top_p: float
    gen: torch.Generator | None
    max_new_tokens: int
    on_token: Callable[[int], None] | None
    should_stop: Callable[[], bool] | None
    t0: float
    t_pre: float
    t_first: float
    prefill_tokens: int
    first_logits: torch.Tensor
    stopped: bool = False
    cancelled: bool = False

    @property
    def done(self) -> bool:
        if self.stopped or self.cancelled or len(self.tokens) >= self.max_new_tokens:
            return True
        if self.composed.cache.length >= self.composed.cache.capacity:
            return True
        if self.should_stop is not None and self.should_stop():
            self.cancelled = True
        return self.cancelled

    def take(self, token: int) -> None:
        self.pos += 1
        self.token, self.stopped = token, token in self.stop
        if not self.stopped:
            self.tokens.append(token)
            if self.on_token:
                self.on_token(token)


def start(lm, composed: Composed, suffix_ids, *, max_new_tokens: int = 64, temperature: float = 0.0,
          top_p: float = 1.0, seed: int = 0, stop: set[int] = frozenset(),
          on_token: Callable[[int], None] | None = None, t0: float | None = None,
          should_stop: Callable[[], bool] | None = None) -> Stream:
    """Prefill and pick the first token (calling on_token): a Stream that `advance` decodes."""
    t0 = time.perf_counter() if t0 is None else t0
    t_pre = time.perf_counter()
    out, pos, n_prefill = prefill(lm, composed, suffix_ids)
    return stream_from(composed, out.logits[-1], pos, n_prefill, t_pre, max_new_tokens=max_new_tokens,
                       temperature=temperature, top_p=top_p, seed=seed, stop=stop, on_token=on_token, t0=t0,
                       should_stop=should_stop)


def start_batch(lm, seqs: list) -> list[Stream]:
    """`start` for several prompts in one pass over the weights (forward.prefill_batch): each
    prompt's misses (computed in context, at their scattered slots), pending ids and question.

    seqs: [(composed, miss ids [M], miss slots [M], suffix ids, start's keyword arguments)]. Every
    stream's first token is picked after the one pass: they share its t_pre, and each t_first is
    taken when its own token is picked."""
    rows, ends = [], []
    t_pre = time.perf_counter()
    for composed, miss_ids, miss_slots, suffix_ids, _ in seqs:
        new = torch.cat([composed.pending_ids, as_ids(suffix_ids)])
        end = composed.cache.length
        check_window(lm, end + new.shape[0])
        composed.cache.commit(end + new.shape[0])
        slots = torch.cat([miss_slots, torch.arange(end, end + new.shape[0])])
        rows.append((composed.cache, torch.cat([miss_ids, new]), slots))
        ends.append((composed.next_pos + int(new.shape[0]), int(new.shape[0])))
    logits = prefill_batch(lm, rows)
    return [stream_from(composed, row.clone(), pos, n, t_pre, **kwargs)  # a row of its own: the batch's logits go
            for (composed, _, _, _, kwargs), row, (pos, n) in zip(seqs, logits, ends)]


def stream_from(composed: Composed, first_logits: torch.Tensor, pos: int, n_prefill: int, t_pre: float, *,
                max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                stop: set[int] = frozenset(), on_token: Callable[[int], None] | None = None,
                t0: float | None = None, should_stop: Callable[[], bool] | None = None) -> Stream:
    """The Stream of a prefilled prompt: its first token picked from first_logits (calling on_token)."""
    gen = torch.Generator().manual_seed(seed) if temperature > 0 else None
    token = pick_token(first_logits, temperature, top_p, gen)
    stream = Stream(composed=composed, pos=pos, token=token, tokens=[token], stop=set(stop), temperature=temperature,
                    top_p=top_p, gen=gen, max_new_tokens=max_new_tokens, on_token=on_token, should_stop=should_stop,
                    t0=t_pre if t0 is None else t0, t_pre=t_pre, t_first=time.perf_counter(), prefill_tokens=n_prefill,
                    first_logits=first_logits, stopped=token in stop)
    if on_token and not stream.stopped:
        on_token(token)
    return stream


def advance(lm, streams: list[Stream]) -> list[Stream]:
    """One decode step for every stream not done; returns the streams still going.

    One stream runs the plain forward; several run as one batch (forward.decode_batch), so
    the weights are read once per step for all of them.
    """
    live = [s for s in streams if not s.done]
    if len(live) == 1:
        s = live[0]
        out = forward(lm, torch.tensor([s.token]), torch.tensor([s.pos]), s.composed.cache, logits="last")
        s.take(pick_token(out.logits[-1], s.temperature, s.top_p, s.gen))
    elif live:
        logits = decode_batch(lm, [s.token for s in live], [s.pos for s in live], [s.composed.cache for s in live])
        for s, row in zip(live, logits):
            s.take(pick_token(row, s.temperature, s.top_p, s.gen))
    return [s for s in live if not s.done]


def finish(stream: Stream) -> Generation:
    """The finished stream's Generation. Its callbacks are dropped: they are the caller's closures,
    which usually hold the caller's own record of the answer, and so the stream (and its KV cache)
    in a reference cycle that only the garbage collector would free, long after the cache's
    buffer could have gone back to the pool."""
    tokens = [] if stream.tokens and stream.tokens[0] in stream.stop else stream.tokens
    stream.on_token = stream.should_stop = None
    return Generation(token_ids=tokens, ttft_s=stream.t_first - stream.t0, prefill_s=stream.t_first - stream.t_pre,
                      decode_s=time.perf_counter() - stream.t_first, prefill_tokens=stream.prefill_tokens,
                      stopped=stream.stopped, first_logits=stream.first_logits, cancelled=stream.cancelled)


def generate(lm, composed: Composed, suffix_ids, **kwargs) -> Generation:
    """Prefill, then decode up to max_new_tokens, calling on_token for each new id;
    should_stop (checked between decode steps) ends it early, as a cancelled request does.
    (start's keyword arguments.)"""
    stream = start(lm, composed, suffix_ids, **kwargs)
    while advance(lm, [stream]):
        pass
    return finish(stream)


def teacher_forced_logits(lm, composed: Composed, suffix_ids, gold_ids, *, attn_layers=()):
    """Logits predicting each gold token: [G, V], plus the question's attention when asked.

    The prompt is prefilled with suffix + gold[:-1]; row i predicts gold[i].
    """
    gold = as_ids(gold_ids)
    ids = torch.cat([as_ids(suffix_ids), gold[:-1]])
    out, _, _ = prefill(lm, composed, ids, logits="all", attn_layers=attn_layers)
    n_suffix = len(as_ids(suffix_ids))
    return out.logits[n_suffix - 1 :], out.attn
