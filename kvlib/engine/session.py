"""`Engine`: one loaded model with its prompt template and encoding contexts, and the one door.

Design facts:
- `Engine.answer(spec, chunks, question)` is the one pipeline every caller uses (query,
  bench, doctor, serve): compose the context from cached chunks (and a prefix hit), compute
  misses in context, run the spec's repair, prefill the question, decode. It returns a
  Generation with the TTFT split and the token accounting, defined here and nowhere else:
  - cached: prompt tokens whose KV came from a cache (E, library chunks, a prefix hit),
    less those a repair recomputed;
  - recomputed: cached tokens a repair recomputed;
  - computed: every other prompt token: the question, pending context ids, misses, and
    chunks the caller marked `fresh` (encoded for this request).
- `answer` = `begin` + decode; `begin` = `prepare` (compose, misses, repair) + `start` (prefill,
  first token). A server prepares a batch of requests, then starts them together: the small
  prefills (misses deferred to it, the question) run in one pass over the weights.
- A `+guard:B` spec composes as rerope, measures the guard's features, and climbs its
  calibration's ladder (guard.py) before the repair stage; falling back, it composes as full.
- `Engine.teacher_force(state, ...)` is the second entry point: the bench's quality pass,
  on the context KV an answer left behind (`keep_state=True`), never a rebuilt cache.
- The engine knows nothing about storage or retrieval: callers load chunks and report how
  long that took (`spent`), and TTFT runs from their `t0`.
- The encoding contexts' KV is computed once when the engine starts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kvlib.engine import rope_kernel
from kvlib.engine.compose import ChunkKV, Composed, ContextKV, PrefixHit, compose, encode_context, encode_packed
from kvlib.engine.forward import check_window
from kvlib.engine.generate import Generation, Stream, advance, finish, start, start_batch, teacher_forced_logits
from kvlib.engine.guard import choose_rung, measure_features, require_calibration
from kvlib.engine.model import LoadedModel, load_model
from kvlib.engine.prompt import PromptTemplate, context_id_of, stop_ids, template_for
from kvlib.engine.spec import ModeSpec

BARE_CONTEXT_ID = "bare"
# "lead" encodes a chunk behind E and this neutral passage, then drops both: the chunk's first
# tokens then follow *some* document, as they will in a prompt, instead of the user header.
# The text is fixed and generic on purpose (a lead-in tuned to a dataset would be tuning to it).
LEAD_TEXT = ("The following notes were collected from several reference works. Each entry gives a "
             "name, a short description and a few facts, in the order the sources list them.\n\n")


class Engine:
    """Chunks are encoded behind E ("sink", the default), with nothing before them ("bare"),
    or behind E and a neutral lead-in passage ("lead")."""

    def __init__(self, lm: LoadedModel, template: PromptTemplate | None = None):
        self.lm = lm
        self.template = template or template_for(lm.tokenizer)
        self.context = encode_context(lm, self.template.context_ids)
        self.bare = encode_context(lm, [])
        lead_ids = list(self.template.context_ids) + (self.tokenize(LEAD_TEXT) if lm.tokenizer is not None else [])
        self.lead = encode_context(lm, lead_ids)
        self.lead_id = context_id_of(lead_ids)
        self.stop = stop_ids(lm.tokenizer) if lm.tokenizer is not None else set()
        if lm.device.type == "cpu" and lm.dtype == torch.float32 and lm.kv_dtype == torch.float16:
            rope_kernel.status()  # built (once per machine) or found now, not inside the first request's TTFT
        # (the attention and linear kernels were built or found above: packing and encode_context use them)

    @classmethod
    def load(cls, model: str | None, home: Path, *, dtype: str | None = None, device: str | None = None) -> "Engine":
        return cls(load_model(model, home, dtype=dtype, device=device))

    @property
    def context_id(self) -> str:
        return self.template.context_id

    def context_id_for(self, encoding: str) -> str:
        """Part of every chunk key: which encoding context the chunk was computed behind."""
        return {"bare": BARE_CONTEXT_ID, "lead": self.lead_id}.get(encoding, self.context_id)

    def encoded_at(self, context_id: str) -> int:
        """First position a stored chunk was encoded at, from its context id."""
        if context_id == BARE_CONTEXT_ID:
            return 0
        return self.lead.n_tokens if context_id == self.lead_id else self.context.n_tokens

    def encoding_context(self, encoding: str):
        return {"bare": self.bare, "lead": self.lead}.get(encoding, self.context)

    def tokenize(self, text: str) -> list[int]:
        return list(self.lm.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids) -> str:
        return self.lm.tokenizer.decode(list(ids), skip_special_tokens=True)

    def suffix_ids(self, question: str) -> list[int]:
        return self.template.suffix_ids(self.lm.tokenizer, question)

    def encode(self, token_ids) -> ChunkKV:
        """Pre-RoPE KV of one chunk, cast to the storage dtype, on the CPU."""
        return self.encode_many([token_ids])[0]

    def encode_many(self, chunk_ids: list, max_batch_tokens: int = 2048, encoding: str = "sink") -> list[ChunkKV]:
        """Encode chunks in packed batches; storage dtype, CPU.

        Packing makes the matmuls large while attention stays per chunk. Measured on this
        project's bf16 CPU (tok/s, packs of at most 512 / 1024 / 2048 / 4096 tokens, and one
        chunk per forward): examples/corpus 1882 / 1956 / 2071 / 1982 / 1498; 200 HotpotQA
        passages 1510 / 1617 / 1672 / 1630 / 1307.
        """
        out, batch, size = [], [], 0
        for ids in list(chunk_ids) + [None]:
            if batch and (ids is None or size + len(ids) > max_batch_tokens):
                ctx = self.encoding_context(encoding)
                out += [self._to_storage(kv) for kv in encode_packed(self.lm, ctx, batch)]
                batch, size = [], 0
            if ids is not None:
                batch.append(ids)
                size += len(ids)
        return out

    def _to_storage(self, kv: ChunkKV) -> ChunkKV:
        dt = self.lm.kv_dtype
        return ChunkKV(token_ids=kv.token_ids.cpu(), k_sem=kv.k_sem.to("cpu", dt), v=kv.v.to("cpu", dt),
                       encoded_at=kv.encoded_at)

    def answer(self, spec: ModeSpec, chunks: list[ChunkKV], question: str | None = None, **kwargs) -> Generation:
        """Compose, compute misses, repair, prefill the question, decode: the one pipeline.

        chunks: library KV (a chunk with k_sem None is a miss, computed in context); ignored
        beyond their ids by full and prefix. suffix_ids replaces the question's template.
        TTFT counts from t0 (default: now); `spent` holds the caller's stages before this call.
        context: the cached opening the chunks follow (default E; `self.bare` when the caller's
        prompt has its own opening, passed as the first chunks). See `begin` for the rest.
        """
        answering = self.begin(spec, chunks, question, **kwargs)
        with torch.inference_mode():
            while advance(self.lm, [answering.stream]):
                pass
        return answering.finish()

    def begin(self, spec: ModeSpec, chunks: list[ChunkKV], question: str | None = None, **kwargs) -> "Answering":
        """Everything of `answer` up to the first token; a server decodes many of them together
        (generate.advance over their streams), then calls `finish` on each. (prepare's arguments.)"""
        return self.start([self.prepare(spec, chunks, question, **kwargs)])[0]

    @torch.inference_mode()
    def prepare(self, spec: ModeSpec, chunks: list[ChunkKV], question: str | None = None, *, suffix_ids=None,
                prefix: PrefixHit | None = None, max_new_tokens: int = 64, temperature: float = 0.0,
                top_p: float = 1.0, seed: int = 0, on_token=None, should_stop=None, t0: float | None = None,
                spent: dict | None = None, extra: int | None = None, keep_state: bool = False,
                context: ContextKV | None = None, calibration=None, defer_misses: bool = False) -> "Prepared":
        """`begin` up to the prefill: composed, misses computed, the guard's rung and the repair run.

        defer_misses: a spec without repair or guard leaves its misses for `start`, which computes
        them in its prefill (with other prompts', in one pass; their time then counts as prefill).
        calibration: the guard's (calibration.Calibration), needed by a `+guard:B` spec only."""
        from kvlib.engine.repair import parse_repair

        t0 = time.perf_counter() if t0 is None else t0
        if spec.guard is not None:  # no work before the missing-calibration error
            calibration = require_calibration(calibration, self.lm, spec)
        suffix = list(self.suffix_ids(question) if suffix_ids is None else suffix_ids)
        room = len(suffix) + max_new_tokens + 1 if extra is None else extra
        ctx = self.context if context is None else context
        composed = compose(self.lm, ctx, chunks, "rerope" if spec.guard is not None else spec.base, extra=room,
                           prefix=prefix)
        check_window(self.lm, composed.n_context + len(suffix))  # here, so it fails this prompt alone
        deferred = defer_misses and spec.guard is None and not spec.repair
        if not deferred:
            compute_misses(self.lm, composed, chunks)
        t_comp = time.perf_counter()
        repair, choice = spec.repair, None
        if spec.guard is not None:  # its measurement counts in the repair stage
            composed, repair, choice = self._climb(spec, calibration, composed, ctx, chunks, suffix, room)
        repaired = parse_repair(repair)(self.lm, composed, chunks, suffix) if repair else None
        sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                        stop=self.stop, on_token=on_token, t0=t0, should_stop=should_stop)
        return Prepared(spec, chunks, composed, suffix, repaired, choice, keep_state, sampling, dict(spent or {}),
                        t_comp, time.perf_counter(), deferred)

    @torch.inference_mode()
    def start(self, prepared: list["Prepared"], batch_tokens: int = 0) -> list["Answering"]:
        """Prefill and pick the first token of each prepared prompt: those with deferred misses and
        at most `batch_tokens` new tokens in one pass (generate.start_batch, when two or more), the
        rest one at a time. A prompt's time from its own preparation to the start of its prefill (its
        batchmates' preparation, and the prefills run before its own) is its "batch" stage."""
        joined = [p for p in prepared if p.deferred and p.tail_tokens > 0 and p.new_tokens <= batch_tokens]
        joined = joined if len(joined) > 1 else []
        streams = {}
        if joined:
            rows = [(p.composed, *miss_rows(p.composed, p.chunks), p.suffix, p.sampling) for p in joined]
            streams = {id(p): s for p, s in zip(joined, start_batch(self.lm, rows))}
        out = []
        for p in prepared:
            if id(p) in streams:
                began = streams[id(p)].t_pre
            else:  # alone (Engine.begin) it waited for nobody: its "batch" stage is 0
                began = p.t_rep if len(prepared) == 1 else time.perf_counter()
                if p.deferred:
                    compute_misses(self.lm, p.composed, p.chunks)
                streams[id(p)] = start(self.lm, p.composed, p.suffix, **p.sampling)
            out.append(p.answering(streams[id(p)], began))
        return out

    def _climb(self, spec: ModeSpec, calibration, composed: Composed, ctx: ContextKV, chunks, suffix, room: int):
        """A guarded spec's rung on its rerope composition: (composition, repair to run, GuardChoice).
        Falling back, the composition is exactly what mode full composes."""
        choice = choose_rung(self.lm, calibration, spec, composed, chunks, suffix)
        if choice.fell_back:
            composed = compose(self.lm, ctx, chunks, "full", extra=room)
        return composed, choice.repair, choice

    @torch.inference_mode()
    def guard_features(self, chunks: list[ChunkKV], suffix_ids) -> dict:
        """What a `+guard:B` answer measures before choosing its rung (guard.FEATURES), on the
        same rerope composition behind E: `kvlib calibrate` records it beside each rung's KL."""
        composed = compose(self.lm, self.context, chunks, "rerope", extra=len(suffix_ids) + 1)
        compute_misses(self.lm, composed, chunks)
        return measure_features(self.lm, composed, chunks, list(suffix_ids))

    @torch.inference_mode()
    def teacher_force(self, state: Composed, suffix_ids, gold_ids, *, attn_layers=()):
        """The quality pass: rewind an answer's context KV, teacher-force suffix + gold.

        Returns logits predicting each gold token [G, V] and, per asked layer, the suffix's
        attention over the context [H, suffix, context] (on the CPU).
        """
        state.rewind()
        n_ctx, n_suffix = state.n_context, len(suffix_ids)
        logits, attn = teacher_forced_logits(self.lm, state, suffix_ids, gold_ids, attn_layers=attn_layers)
        attn = [a[:, :n_suffix, :n_ctx].float().cpu() for a in attn] if attn_layers else None
        return logits.cpu(), attn


@dataclass(eq=False)
class Prepared:
    """A prompt composed (and repaired) by Engine.prepare, waiting for its prefill in Engine.start."""

    spec: ModeSpec
    chunks: list
    composed: Composed
    suffix: list
    repaired: torch.Tensor | None
    choice: object  # the guard's GuardChoice, or None
    keep_state: bool
    sampling: dict  # generate.start's keyword arguments
    spent: dict  # the caller's stages before prepare
    t_comp: float
    t_rep: float
    deferred: bool  # misses left for the prefill

    @property
    def tail_tokens(self) -> int:
        """Tokens after the context: pending ids and the question (the first token is picked from the last)."""
        return int(self.composed.pending_ids.shape[0]) + len(self.suffix)

    @property
    def new_tokens(self) -> int:
        """Tokens its prefill computes: deferred misses, pending ids and the question."""
        misses = sum(self.chunks[i].n_tokens for _, i in self.composed.misses) if self.deferred else 0
        return misses + self.tail_tokens

    def answering(self, stream: Stream, began: float) -> "Answering":
        """began: when this prompt's prefill work began (its deferred misses included); from t_rep
        until then it waited for its batchmates ("batch")."""
        tokens, per_chunk = token_accounting(self.composed, self.chunks, self.repaired, len(self.suffix))
        t0 = self.sampling["t0"]
        # compose takes whatever the caller's stages leave before it, so the stages add up to TTFT exactly
        timings = {**self.spent, "compose": self.t_comp - t0 - sum(self.spent.values()),
                   "repair": self.t_rep - self.t_comp, "batch": began - self.t_rep, "prefill": stream.t_first - began}
        return Answering(self.spec, stream, timings, tokens, per_chunk, self.composed if self.keep_state else None,
                         None if self.choice is None else self.choice.as_dict())


@dataclass
class Answering:
    """An answer under way: its stream (generate.Stream) and what the door measured before it."""

    spec: ModeSpec
    stream: Stream
    timings: dict
    tokens: dict
    chunk_recomputed: list
    state: Composed | None
    guard: dict | None = None  # GuardChoice.as_dict() of a guarded spec

    def finish(self) -> Generation:
        gen = finish(self.stream)
        gen.spec, gen.timings, gen.tokens = self.spec, self.timings, self.tokens
        gen.chunk_recomputed, gen.state, gen.guard = self.chunk_recomputed, self.state, self.guard
        return gen


def compute_misses(lm, composed: Composed, chunks) -> None:
    """Chunks without KV are computed in context, in place: each token attends to every slot
    before it (its own chunk's earlier tokens included), as in full recompute."""
    from kvlib.engine.repair import recompute_slots

    if not composed.misses:
        return
    ids, slots = miss_rows(composed, chunks)
    recompute_slots(lm, composed.cache, ids, slots, range(lm.n_layers))


def miss_rows(composed: Composed, chunks) -> tuple[torch.Tensor, torch.Tensor]:
    """The misses' ids and their slots, in order (empty when there are none)."""
    if not composed.misses:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    slots = torch.cat([torch.arange(s, s + chunks[i].n_tokens) for s, i in composed.misses])
    return torch.cat([chunks[i].token_ids for _, i in composed.misses]), slots


def token_accounting(composed: Composed, chunks, repaired, n_suffix: int) -> tuple[dict, list[int]]:
    """Prompt tokens by source (see the module docstring), which add up to the prompt; and per
    chunk, how many of its cached tokens the repair recomputed."""
    n_ctx = composed.n_context
    from_cache = torch.zeros(n_ctx, dtype=torch.bool)
    # the opening: E behind library chunks, or the prefix hit (full: nothing)
    from_cache[: composed.cached_tokens if composed.context_ids is None else composed.context_ids.numel()] = True
    for (slot, n), c in zip(composed.spans, chunks):
        if c.k_sem is not None and not c.fresh:
            from_cache[slot : slot + n] = True
    rewritten = torch.zeros(n_ctx, dtype=torch.bool)
    if repaired is not None and repaired.numel():
        rewritten[repaired.cpu()] = True
    recomputed = int((from_cache & rewritten).sum())
    cached = int(from_cache.sum()) - recomputed
    tokens = {"cached": cached, "recomputed": recomputed, "computed": n_ctx + n_suffix - cached - recomputed}
    return tokens, [int((from_cache & rewritten)[s : s + n].sum()) for s, n in composed.spans]


def sync(lm) -> None:
    """Wait for queued GPU work so timings are honest."""
    if lm.device.type == "cuda":
        torch.cuda.synchronize()
