"""`query`: question -> retrieve -> store.get -> Engine.answer, timed per stage.

Design facts:
- TTFT runs from the moment the question arrives to the first answer token, and is
  split into retrieval, KV load, then the engine's compose, repair and prefill (which
  includes the first token). The token accounting is the engine's (Engine.answer).
- A retrieved chunk missing from the library (evicted, never stored, stored for another
  model, or in another encoding) is encoded on the spot in the spec's encoding, stored,
  and counted as computed. A corrupt blob is treated the same way, with a warning;
  neither is an error.
- `full` and `prefix` load no KV: they prefill the same token ids the cached modes compose.
- A `+guard:B` mode reads its calibration from the library once, before the clock starts;
  without one it is a CalibrationMissingError.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from kvlib.config import PUBLIC
from kvlib.engine.compose import ChunkKV
from kvlib.engine.spec import ModeSpec, parse_mode
from kvlib.errors import CorruptBlobError, ManifestUnavailableError, NotFoundError

if TYPE_CHECKING:
    from kvlib.engine.session import Engine
    from kvlib.retrieve.embed import Embedder
    from kvlib.retrieve.index import VectorIndex
    from kvlib.store.library import Library


@dataclass
class Answer:
    answer: str
    spec: ModeSpec
    ttft_s: float
    timings: dict
    sources: list
    tokens: dict  # prompt tokens by source: cached, recomputed, computed (Engine.answer)
    decode_tok_s: float
    token_ids: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    guard: dict | None = None  # a guarded mode's choice: rung, fell_back, predicted_kl, kl_bound

    @property
    def mode(self) -> str:
        return self.spec.name

    def as_dict(self, model: str) -> dict:
        out = {"answer": self.answer, "mode": self.mode, "spec": self.spec.as_dict(), "ttft_s": self.ttft_s,
               "timings": self.timings, "sources": self.sources, "tokens": self.tokens,
               "decode_tok_s": self.decode_tok_s, "warnings": self.warnings, "model": model}
        return out if self.guard is None else {**out, "guard": self.guard}


@dataclass
class Retrieved:
    chunks: list  # [ChunkKV]
    sources: list  # [{doc, key, score}]
    warnings: list
    served: list = field(default_factory=list)  # keys read from the library, their use counted after the answer


@dataclass
class QueryRunner:
    engine: "Engine"
    library: "Library"
    index: "VectorIndex"
    embedder: "Embedder"
    tenant: str = PUBLIC
    public: bool = False
    calibrations: dict = field(default_factory=dict)  # encoding -> the guard's Calibration

    def calibration_for(self, spec: ModeSpec):
        """A guarded spec's calibration from the library (CalibrationMissingError without one); else None."""
        from kvlib.engine.guard import load_calibration

        if spec.guard is not None and spec.encoding not in self.calibrations:
            self.calibrations[spec.encoding] = load_calibration(self.library, self.engine.lm, spec)
        return self.calibrations.get(spec.encoding) if spec.guard is not None else None

    def retrieve(self, question: str, k: int):
        return self.index.search(self.embedder.embed_query(question), k, self.tenant)

    def load(self, hits, spec: ModeSpec) -> Retrieved:
        got = Retrieved([], [], [])
        for hit in hits:
            chunk, warning = self.load_one(hit, spec, got.served)
            got.chunks.append(chunk)
            got.warnings += [warning] if warning else []
            got.sources.append({"doc": hit.doc_path, "key": hit.chunk_key, "score": round(float(hit.score), 4)})
        return got

    def load_one(self, hit, spec: ModeSpec, served: list):
        """(ChunkKV, warning); a key read from the library is added to `served`. A mode that reads no
        library gets token ids only."""
        if not spec.reads_library:
            return ChunkKV(torch.tensor(self.engine.tokenize(hit.text), dtype=torch.long), None, None), None
        engine, lm, warning = self.engine, self.engine.lm, None
        context_id = engine.context_id_for(spec.encoding)
        key = hit.chunk_key if context_id == engine.context_id else self.library.key_for(
            tenant=self.tenant, public=hit.owner == PUBLIC, model_fp=lm.fingerprint, context_id=context_id,
            token_ids=engine.tokenize(hit.text))  # the index keys the library's default encoding
        try:
            stored = self.library.get(key, self.tenant, touch=False)
            if stored.model_fp == lm.fingerprint and stored.context_id == context_id:
                served.append(key)
                return ChunkKV(stored.token_ids, stored.k_sem, stored.v, engine.encoded_at(context_id),
                               stored.drift_score), None
        except NotFoundError:
            pass
        except CorruptBlobError as exc:
            warning = f"{exc}; re-encoded"
        return self.encode_now(hit, spec), warning

    def encode_now(self, hit, spec: ModeSpec) -> ChunkKV:
        """Encode a chunk the library cannot serve, store it, and mark it computed for this request."""
        lm, ids = self.engine.lm, self.engine.tokenize(hit.text)
        kv = self.engine.encode_many([ids], encoding=spec.encoding)[0]
        self.library.put(tenant=self.tenant, public=hit.owner == PUBLIC, model_fp=lm.fingerprint,
                         context_id=self.engine.context_id_for(spec.encoding), token_ids=ids, k_sem=kv.k_sem,
                         v=kv.v, text_preview=hit.text)
        kv.fresh = True
        return kv

    def answer(self, question: str, *, k: int = 4, mode: ModeSpec | str = "rerope", max_new_tokens: int = 64,
               on_token=None, hits=None, t0: float | None = None) -> Answer:
        """With `hits` already retrieved, pass `t0` from before retrieval so TTFT includes it."""
        spec = parse_mode(mode) if isinstance(mode, str) else mode
        calibration = self.calibration_for(spec)
        t0 = time.perf_counter() if t0 is None else t0
        hits = self.retrieve(question, k) if hits is None else hits
        t_ret = time.perf_counter()
        got = self.load(hits, spec)
        t_load = time.perf_counter()
        gen = self.engine.answer(spec, got.chunks, question, max_new_tokens=max_new_tokens, on_token=on_token,
                                 t0=t0, spent={"retrieval": t_ret - t0, "load": t_load - t_ret},
                                 calibration=calibration)
        try:
            self.library.touch(got.served)  # after the answer, off its time to first token
        except ManifestUnavailableError as exc:  # a lost use count; the answer stands
            got.warnings.append(f"use counts not written: {exc}")
        return Answer(answer=self.engine.decode(gen.token_ids).strip(), spec=spec, ttft_s=gen.ttft_s,
                      timings=gen.timings, sources=got.sources, tokens=gen.tokens, decode_tok_s=gen.decode_tok_s,
                      token_ids=gen.token_ids, warnings=got.warnings, guard=gen.guard)
