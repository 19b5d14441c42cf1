"""The one place where the server turns messages into a completion: segments, the library, the door.

Design facts:
- Everything else in kvlib/serve calls `Pipeline.segment` and `Pipeline.complete` (or
  begin/step/finish) and reads a `Completion`; nothing else knows how the prompt's KV came to be.
- The messages are rendered with the model's chat template and cut by the segmenter that
  replay uses (kvlib/segment.py); prompt_layout.py looks the reusable segments up in the
  library and lays the prompt out for Engine.answer, the engine's one door (hits rotated
  into place, misses computed in context), under the server's spec (`--mode`/`--repair`).
- Stop strings and cancellation end the answer between decode steps (Engine.answer's
  should_stop): a client that disconnects gets finish_reason "cancelled" within one token.
- Reusable misses (`--misses`, Settings.misses):
  - `isolated` (the default): encoded on their own behind E before the first token (packed,
    attention per segment), served at their positions like hits, and stored right after the
    first tokens of the batch (`after_first_token`), so the next request already finds them.
    One encode per new segment.
  - `context`: computed in context (as full recompute would) and stored after the response,
    off its critical path (`store_pending`, which the engine thread runs when no request
    waits), by a second, isolated encode.
  Either way stored KV is encoded on its own behind E, so it never depends on who sent the
  text first, what came before it, or which other segments shared its forward. Private to
  the sending tenant; a read-only caller (anonymous) stores nothing.
- A conversation's next turn opens with the KV its earlier turn left (prefix_hits.py): the
  tenant's longest kept prefix, then the library for the segments after it. Kept after each
  rerope answer (not full, naive, a guard, or a read-only caller), in `finish`. The `prefix`
  base is that cache alone, as a serving engine's prefix caching: no library, the rest prefilled.
- The library is reached through the server's LibraryLink. While its manifest is unreachable
  (the link is degraded, or a lookup fails on it) a request is answered by full recompute,
  under the `full` spec, with `"degraded": true` and the reason in its `kvlib` object; nothing
  is stored, and misses that waited from before the outage (or whose store it cut off) are
  stored once it is over.
- The tokenizer is shared with the HTTP threads: `segment` runs there before a request is
  queued (its length decides the context check, and its segments are handed to `begin`, so
  the engine thread neither renders nor cuts the prompt again). HF fast tokenizers are not
  safe to call from two threads at once, so every use takes `_tok_lock`.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from kvlib.engine.compose import ChunkKV
from kvlib.errors import InputError, KvlibError, ManifestUnavailableError
from kvlib.serve.text_stream import TextStream

FINISH_REASONS = ("stop", "length", "cancelled")
TTFT_STAGES = ("segment", "lookup", "encode", "compose", "repair", "batch", "prefill")  # they add up to ttft_s
MISS_POLICIES = ("isolated", "context")
FULL_RECOMPUTE = "full"  # the spec a request falls back to while the manifest is unreachable
KEEPS_PREFIX = ("rerope", "prefix")  # the bases whose answers keep their KV for a next turn (prefix_hits.py)
# begun together (start): a joint pass paid up to ~600 new tokens a request (scripts/prefill_batch_ab.py)
BATCH_PREFILL_TOKENS = 512


class PipelineUnavailable(KvlibError):
    """A request asks for something this pipeline cannot do yet (answered as HTTP 501)."""


@dataclass
class Completion:
    token_ids: list[int]
    text: str
    finish_reason: str  # one of FINISH_REASONS
    prompt_tokens: int
    cached_tokens: int  # prompt tokens whose KV came from the library
    computed_tokens: int  # prompt tokens prefilled in this request
    recomputed_tokens: int  # cached prompt tokens that repair recomputed anyway
    ttft_s: float  # complete() called -> first token chosen (the queue wait is the caller's)
    timings: dict = field(default_factory=dict)  # stage -> seconds
    kvlib: dict = field(default_factory=dict)  # the response's "kvlib" object


class Pipeline:
    def __init__(self, engine, link, *, spec: str, index=None, embedder=None, misses: str = "isolated",
                 prefix_bytes: int = 0, batch_tokens: int = BATCH_PREFILL_TOKENS):
        from kvlib.engine.spec import parse_mode
        from kvlib.serve.prefix_hits import PrefixHits

        if misses not in MISS_POLICIES:
            raise InputError(f"unknown miss policy {misses!r}; choose one of {', '.join(MISS_POLICIES)}")
        self.engine, self.link, self.spec, self.misses = engine, link, spec, misses  # link: library_link.LibraryLink
        self.batch_tokens = batch_tokens  # prefills this small are begun together (start)
        self.resolved = parse_mode(spec)  # one grammar for every command (engine/spec.py)
        self.full_recompute = parse_mode(FULL_RECOMPUTE)
        self.prefix_hits = PrefixHits(engine.lm, prefix_bytes)  # a conversation's earlier turns (prefix_hits.py)
        self.calibrations: dict = {}  # encoding -> the guard's Calibration, once the library has one
        self.index, self.embedder = index, embedder  # for the retrieve extension
        self.pending: list = []  # (tenant, segment ids) to store when the engine is idle
        self.storing = 0  # misses taken off `pending` whose store has not finished (0 or 1)
        self.open_retrieval = None  # set by the server: opens the home's index and embedder on first use
        self._tok_lock = threading.Lock()
        self._registered_in = None  # the Library object the model row was written to (once per open)

    @property
    def pending_stores(self) -> int:
        """Misses of answered requests not yet in the library (read from other threads, for /healthz).

        `pending` is read before `storing`, and store_pending raises `storing` before it pops, so
        a store moving from one to the other is always counted (at worst twice, never not at all)."""
        queued = len(self.pending)
        return queued + self.storing

    @property
    def model_id(self) -> str:
        return self.engine.lm.name

    @property
    def context_length(self) -> int:
        """Longest prompt + completion the model's positions allow."""
        return int(getattr(self.engine.lm.hf.config, "max_position_embeddings", 2048))

    def segment(self, messages: list[dict]) -> "Segmented":
        """The ids full recompute would see (the chat template with the assistant header) and the
        segments that tile them (kvlib/segment.py), with the seconds it took."""
        from kvlib.segment import segment_prompt

        t0 = time.perf_counter()
        with self._tok_lock:
            ids, segments = segment_prompt(self.engine.lm.tokenizer, messages)
        return Segmented(ids, segments, time.perf_counter() - t0)

    def decode(self, ids: list[int]) -> str:
        with self._tok_lock:
            return self.engine.decode(ids)

    def complete(self, messages: list[dict], tenant: str, **kwargs) -> Completion:
        """Answer `messages` for `tenant` (begin's arguments), calling on_text with each new piece of text."""
        pending = self.begin(messages, tenant, **kwargs)
        self.after_first_token(pending)
        while self.step([pending]):
            pass
        return self.finish(pending)

    def begin(self, messages: list[dict], tenant: str, *, max_tokens: int, temperature: float = 0.0,
              top_p: float = 1.0, seed: int | None = None, stop: list[str] = (),
              on_text: Callable[[str], None] | None = None, cancelled: Callable[[], bool] = lambda: False,
              retrieve_k: int | None = None, may_store: bool = True, spec=None,
              segmented: "Segmented | None" = None, defer: bool = False) -> "Pending":
        """Segment, look up, compose, prefill, first token: an answer under way, which `step`
        decodes (together with others) and `finish` turns into a Completion. With `defer`, up to
        the prefill: `start` (over a batch of them) then prefills and picks the first token.

        may_store is False for read-only callers (anonymous): nothing they send is stored.
        spec: the request's own ModeSpec (kvlib.mode); default the server's.
        segmented: `segment(messages)`, done before the request was queued; the retrieve
        extension changes the messages, so then they are cut again here.
        """
        spec = spec or self.resolved
        calibration = self.calibration_for(spec)  # a guard without one fails before any work
        if retrieve_k is not None:
            with self.link.watching():  # retrieval needs the manifest's vectors: a 503 while it is unreachable
                messages = self.with_retrieved(messages, tenant, retrieve_k)
        t0 = time.perf_counter()
        ahead = segmented is not None and retrieve_k is None  # cut before the request was queued
        if not ahead:
            segmented = self.segment(messages)
        ids, segments = segmented.ids, segmented.segments
        t_seg = time.perf_counter()
        keeps = may_store and self.prefix_hits.enabled and spec.base in KEEPS_PREFIX and spec.guard is None
        layout, spec, degraded = self.lay_out(tenant, ids, segments, spec, prefix=keeps)
        t_lookup = time.perf_counter()
        encoded = self.encode_misses(layout) if self.misses == "isolated" else []
        t_encode = time.perf_counter()
        pending = Pending(decoder=TextStream(self, stop, on_text), layout=layout, n_prompt=len(ids),
                          max_tokens=max_tokens, tenant=tenant, may_store=may_store and degraded is None,
                          spec=spec, degraded=degraded, segmented_before_s=segmented.seconds if ahead else 0.0,
                          encoded=encoded, prompt_ids=ids if keeps and degraded is None else None)
        pending.prepared = self.engine.prepare(
            spec, layout.chunks, suffix_ids=layout.suffix, context=layout.context, prefix=layout.prefix,
            max_new_tokens=max_tokens,
            temperature=temperature, top_p=top_p, seed=self.seed_for(seed, temperature), on_token=pending.on_token,
            should_stop=lambda: pending.decoder.stopped or cancelled(), t0=t0,
            spent={"segment": t_seg - t0, "lookup": t_lookup - t_seg, "encode": t_encode - t_lookup},
            calibration=calibration if degraded is None else None, defer_misses=defer)
        if not defer:
            self.start([pending])
        return pending

    def start(self, pendings: list["Pending"]) -> None:
        """Prefill and pick the first token of begun answers (`begin(..., defer=True)`): the small
        prefills (batch_tokens at most) together in one pass over the weights, the rest one by one
        (Engine.start)."""
        answering = self.engine.start([p.prepared for p in pendings], batch_tokens=self.batch_tokens)
        for pending, a in zip(pendings, answering):
            pending.answering, pending.prepared = a, None

    def after_first_token(self, pending: "Pending") -> None:
        """Store a begun answer's new documents and count its hits' uses: after the first tokens of
        every answer begun with it (the worker begins a batch, then calls this for each), so neither
        its own first token nor a batchmate's prefill waits on the library's writes; before the
        batch's decode, so a conversation's next turn finds them."""
        if pending.encoded and pending.may_store:
            self.store_encoded(pending.tenant, pending.encoded)
        pending.encoded = []
        self.touch_served(pending.layout)

    def touch_served(self, layout) -> None:
        """Count the uses of the hits a request was served (eviction's recency), after its first token."""
        if layout.lookup is None:
            return
        try:
            layout.lookup.touch_served()
        except ManifestUnavailableError as exc:  # a lost use count; the answer is already under way
            self.link.failed(exc)

    def lay_out(self, tenant: str, ids: list, segments: list, spec, prefix: bool = False):
        """(layout, spec, degraded reason or None): the server's spec over the library (opening with
        the tenant's longest kept prefix, when `prefix`), or full recompute when the manifest is
        unreachable (the link is down, or this lookup failed)."""
        from kvlib.serve.prompt_layout import lay_out

        reason = self.link.reason
        if spec.reads_library:
            library = self.link.usable()
            if library is not None:
                try:
                    opening = self.prefix_hits.opening(tenant, spec.base, ids) if prefix else None
                    return lay_out(self.engine, library, tenant, ids, segments, reuse=True,
                                   opening=opening), spec, None
                except ManifestUnavailableError as exc:
                    self.link.failed(exc)
                    reason = str(exc)
            spec, reason = self.full_recompute, reason or self.link.reason or "the library is not open"
        # prefix caching alone (mode prefix): no library, the opening then the rest prefilled
        opening = self.prefix_hits.opening(tenant, spec.base, ids) if prefix and spec.base == "prefix" else None
        return lay_out(self.engine, None, tenant, ids, segments, reuse=False, opening=opening), spec, reason

    def store_encoded(self, tenant: str, encoded: list) -> None:
        """Store the isolated misses (ids, KV) of a request under way; if the manifest is lost on
        the way, the request still answers and the misses wait on `pending` for its return."""
        try:
            self.store_segments(tenant, [ids for ids, _ in encoded], kvs=[kv for _, kv in encoded])
        except ManifestUnavailableError as exc:
            self.link.failed(exc)
            self.pending.extend((tenant, ids) for ids, _ in encoded)

    def calibration_for(self, spec):
        """A guarded spec's calibration; the library is asked again until it has one (`kvlib calibrate`
        may run beside the server), and a guard request meanwhile is a CalibrationMissingError."""
        from kvlib.engine.guard import load_calibration

        if spec.guard is None:
            return None
        library = self.link.usable()
        if library is None:  # degraded: the request is answered by full recompute, no calibration needed
            return None
        if spec.encoding not in self.calibrations:
            self.calibrations[spec.encoding] = load_calibration(library, self.engine.lm, spec)
        return self.calibrations[spec.encoding]

    def encode_misses(self, layout) -> list:
        """The isolated miss policy: reusable misses are encoded on their own behind E (packed), as
        they will be stored, and served at their positions like hits; stored right after the first
        token. One encode per new segment, where computing it in context and storing it later costs
        two. Returns (ids, KV) pairs; the layout then has nothing left to store later."""
        if not layout.to_store:
            return []
        kvs = self.engine.encode_many(list(layout.to_store))
        for (at, skip), kv in zip(layout.store_at, kvs):  # a segment an opening cut serves from `skip` on
            ids_t = layout.chunks[at].token_ids
            layout.chunks[at] = ChunkKV(ids_t, kv.k_sem[:, :, skip:], kv.v[:, :, skip:], fresh=True)  # computed
        encoded = list(zip(layout.to_store, kvs))
        layout.to_store, layout.store_at = [], []
        return encoded

    def step(self, pendings: list["Pending"]) -> list["Pending"]:
        """One decode step for every answer under way, batched; returns those still going."""
        import torch

        from kvlib.engine.generate import advance

        by_stream = {id(p.answering.stream): p for p in pendings}
        with torch.inference_mode():
            live = advance(self.engine.lm, [p.answering.stream for p in pendings])
        return [by_stream[id(s)] for s in live]

    def finish(self, pending: "Pending") -> Completion:
        if pending.may_store:
            self.pending.extend((pending.tenant, ids) for ids in pending.layout.to_store)
        if pending.prompt_ids is not None:  # before release: the answer's KV, for the conversation's next turn
            stream = pending.answering.stream
            self.prefix_hits.keep(pending.tenant, pending.spec.base, pending.prompt_ids, stream.tokens,
                                  stream.composed.cache)
        gen = pending.answering.finish()
        pending.release()
        done = self.completion(gen, pending.decoder, pending.tokens, pending.layout,
                               pending.n_prompt, pending.max_tokens, pending.spec, pending.segmented_before_s)
        done.kvlib["degraded"] = pending.degraded is not None
        if pending.degraded is not None:
            done.kvlib["degraded_reason"] = pending.degraded
        return done

    def completion(self, gen, decoder, tokens, layout, n_prompt: int, max_tokens: int, spec,
                   segmented_before_s: float = 0.0) -> Completion:
        """ttft_s runs from begin; segmentation done before the request was queued (the server's
        TTFT holds it, from the request's arrival) is added to the "segment" stage."""
        if not (decoder.stopped or gen.cancelled):
            decoder.flush()
        finish = "stop" if gen.stopped or decoder.stopped else "cancelled" if gen.cancelled else "length"
        fates = list(layout.fates)
        chunk_fates = [f for f in fates if f["kind"] not in ("context", "prefix", "suffix")]
        for fate, n in zip(chunk_fates, gen.chunk_recomputed):
            if n:
                fate.update(fate="recomputed" if fate["fate"] == "hit" else fate["fate"], recomputed_tokens=n)
        if gen.guard is not None and gen.guard["fell_back"]:  # the guard recomputed every hit in full (E too)
            for fate in fates:
                if fate["fate"] == "hit":
                    fate.update(fate="recomputed", recomputed_tokens=fate["tokens"])
        t = dict(gen.timings, segment=gen.timings["segment"] + segmented_before_s)
        return Completion(
            token_ids=list(gen.token_ids), text=decoder.text, finish_reason=finish, prompt_tokens=n_prompt,
            cached_tokens=gen.tokens["cached"], computed_tokens=gen.tokens["computed"],
            recomputed_tokens=gen.tokens["recomputed"], ttft_s=gen.ttft_s, timings=dict(t, decode=gen.decode_s),
            kvlib={"spec": spec.as_dict(), "mode": spec.name, "tokens": gen.tokens,
                   "ttft_split_s": {k: t[k] for k in TTFT_STAGES},
                   "segments": fates, **({"guard": gen.guard} if gen.guard is not None else {})})

    @staticmethod
    def seed_for(seed: int | None, temperature: float) -> int:
        """No seed: a fresh random one, as OpenAI samples differently each call."""
        import random

        return seed if seed is not None or temperature <= 0 else random.getrandbits(63)

    def store_pending(self, limit: int | None = None) -> int:
        """Encode and store up to `limit` misses of finished requests (engine thread, when idle);
        returns how many were stored. The worker stores one at a time and looks at its queue in
        between, so a request that arrives waits for one segment's encode at most. Newest first,
        so a backlog never keeps the last request's documents from its follow-up.

        While the manifest is unreachable nothing is stored: a miss whose store it cut off goes
        back on `pending` (the library wrote no row for it) and waits for the manifest."""
        done = 0
        if self.link.usable() is None:
            return 0
        try:
            while self.pending and (limit is None or done < limit):
                self.storing += 1  # before the pop: see pending_stores
                try:
                    miss = self.pending.pop()  # newest first: the next turn of a session asks for it soonest
                    try:
                        done += self._store_one(*miss)
                    except ManifestUnavailableError:
                        self.pending.append(miss)
                        raise
                finally:
                    self.storing -= 1
        except ManifestUnavailableError as exc:
            self.link.failed(exc)
        return done

    def _store_one(self, tenant: str, ids) -> bool:
        """Encode one miss on its own behind E and store it privately; False when already stored."""
        return self.store_segments(tenant, [ids]) == 1

    def store_segments(self, tenant: str, id_lists: list, public: bool = False, kvs: list | None = None) -> int:
        """Store segments not stored yet, privately or (admin documents) publicly, each encoded on its
        own behind E (canonical isolation): here, or by the caller (kvs, one per id list, encoded so);
        how many were new. ManifestUnavailableError while the manifest is unreachable."""
        from kvlib.engine.drift import drift_scores

        engine, lm, library = self.engine, self.engine.lm, self.writable_library()
        keyed = {}
        for n, ids in enumerate(id_lists):
            key = library.key_for(tenant=tenant, public=public, model_fp=lm.fingerprint,
                                  context_id=engine.context_id, token_ids=ids)
            if key not in keyed and not library.has(key, tenant):
                keyed[key] = n
        if not keyed:
            return 0
        todo = [tuple(id_lists[n]) for n in keyed.values()]
        # packed, each chunk attending only to E and itself
        kvs = engine.encode_many(todo) if kvs is None else [kvs[n] for n in keyed.values()]
        drifts = drift_scores(lm, engine.context, [(engine.lead, kv) for kv in kvs])  # behind the neutral lead-in
        for ids, kv, drift in zip(todo, kvs, drifts):
            library.put(tenant=tenant, public=public, model_fp=lm.fingerprint, context_id=engine.context_id,
                        token_ids=ids, k_sem=kv.k_sem, v=kv.v, text_preview=engine.decode(ids), drift_score=drift,
                        read_soon=True)  # the conversation's next turn asks for it
        return len(todo)

    def writable_library(self):
        """The open Library, with this model's row written once per opened Library (at the first
        store after the server started or after the link reopened it), not once per store.
        ManifestUnavailableError while the manifest is unreachable."""
        library, lm = self.link.require(), self.engine.lm
        if self._registered_in is not library:
            library.register_model(lm.fingerprint, lm.name, lm.config_summary)
            self._registered_in = library
        return library

    def store_document(self, tenant: str, public: bool, text: str) -> int:
        """Store a document's prompt forms now (kvlib.segment.text_segments: the segments a chat that
        pastes it as a block will carry), so that chat is served from the library on its first turn."""
        from kvlib.segment import text_segments

        forms = [s.token_ids for s in text_segments(self.engine.lm.tokenizer, text) if s.reusable]
        return self.store_segments(tenant, forms, public=public)

    def with_retrieved(self, messages: list[dict], tenant: str, k: int) -> list[dict]:
        """The kvlib.retrieve extension: the tenant's top-k chunks as documents before the last user message."""
        if self.index is None and self.open_retrieval is not None:
            self.open_retrieval()
        if self.index is None or self.embedder is None:
            raise PipelineUnavailable("the kvlib.retrieve extension needs documents: POST /v1/documents first")
        question = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        hits = self.index.search(self.embedder.embed_query(question), k, tenant)
        docs = "\n\n".join(f"Document [{i}](Title: {h.doc_path}) {h.text.strip()}" for i, h in enumerate(hits, 1))
        out = [dict(m) for m in messages]
        last = max(i for i, m in enumerate(out) if m["role"] == "user")
        out[last]["content"] = f"{docs}\n\n{out[last]['content']}" if docs else out[last]["content"]
        return out


@dataclass
class Segmented:
    """A prompt rendered and cut: its ids, the segments tiling them, and the seconds that took."""

    ids: list
    segments: list
    seconds: float


@dataclass(eq=False)
class Pending:
    """One request's answer under way (Pipeline.begin): the engine's Answering and the text it streams."""

    decoder: TextStream
    layout: object  # prompt_layout.Layout
    n_prompt: int
    max_tokens: int
    tenant: str
    may_store: bool
    spec: object = None  # the ModeSpec it is answered under: the server's, or full recompute while degraded
    degraded: str | None = None  # why the manifest was unreachable, when it was
    segmented_before_s: float = 0.0  # seconds the prompt's segmentation took before it was queued
    encoded: list = field(default_factory=list)  # (ids, KV) of new documents to store (after_first_token)
    prompt_ids: list | None = None  # the prompt's ids when its KV is kept for a next turn (prefix_hits.py)
    answering: object = None  # session.Answering
    prepared: object = None  # session.Prepared, between begin(defer=True) and start
    tokens: list = field(default_factory=list)

    def release(self) -> None:
        """Let go of the engine's state (the composed KV cache, the new documents' KV) at once: the
        engine's stream calls back into this object, so without this the two would wait for the
        garbage collector, and a busy server would keep a dead request's cache meanwhile."""
        self.answering, self.prepared, self.encoded = None, None, []

    def on_token(self, token: int) -> None:
        self.tokens.append(token)
        self.decoder.stopped = self.decoder.stopped or self.decoder.push(self.tokens)
