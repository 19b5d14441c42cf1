"""`query`: question -> retrieve -> store.get -> engine.compose -> generate, timed per stage.

Design facts:
- TTFT runs from the moment the question arrives to the first answer token, and is
  split into retrieval, KV load, compose and prefill (which includes the first token).
- A retrieved chunk missing from the library (evicted, never stored, or stored for
  another model) is encoded on the spot, stored, and counted as computed. A corrupt
  blob is treated the same way, with a warning; neither is an error.
- `full` loads no KV: it prefills the same token ids the cached modes compose.
- `--repair` (boundary:k, blend:r, query:r, auto) runs after composition and counts
  in the compose stage; the tokens it recomputes count as computed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from kvlib.engine.compose import ChunkKV
from kvlib.engine.generate import generate
from kvlib.engine.repair import parse_repair
from kvlib.errors import CorruptBlobError, NotFoundError
from kvlib.retrieve.index import PUBLIC


@dataclass
class Answer:
    answer: str
    mode: str
    ttft_s: float
    timings: dict
    sources: list
    cached_tokens: int
    computed_tokens: int
    decode_tok_s: float
    token_ids: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    repair: str | None = None

    def as_dict(self, model: str) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "token_ids"}
        d["model"] = model
        return d


@dataclass
class Retrieved:
    chunks: list  # [ChunkKV]
    sources: list  # [{doc, key, score}]
    computed_tokens: int  # chunk tokens encoded on the spot
    warnings: list


@dataclass
class QueryRunner:
    engine: object  # Engine
    library: object  # Library
    index: object  # VectorIndex
    embedder: object  # Embedder
    tenant: str = PUBLIC
    public: bool = False

    def retrieve(self, question: str, k: int):
        hits = self.index.search(self.embedder.embed_query(question), k, self.tenant)
        return hits

    def load(self, hits, *, need_kv: bool = True) -> Retrieved:
        chunks, sources, computed, warnings = [], [], 0, []
        for hit in hits:
            chunk, fresh, warning = self.load_one(hit, need_kv)
            chunks.append(chunk)
            computed += chunk.n_tokens if fresh else 0
            warnings += [warning] if warning else []
            sources.append({"doc": hit.doc_path, "key": hit.chunk_key, "score": round(float(hit.score), 4)})
        return Retrieved(chunks, sources, computed, warnings)

    def load_one(self, hit, need_kv: bool):
        """(ChunkKV, encoded_now, warning). Without need_kv only token ids are filled."""
        lm = self.engine.lm
        if not need_kv:
            ids = torch.tensor(self.engine.tokenize(hit.text), dtype=torch.long)
            return ChunkKV(ids, None, None), False, None
        warning = None
        try:
            stored = self.library.get(hit.chunk_key, self.tenant)
            if stored.model_fp == lm.fingerprint and stored.context_id == self.engine.context_id:
                return ChunkKV(stored.token_ids, stored.k_sem, stored.v, drift=stored.drift_score), False, None
        except NotFoundError:
            pass
        except CorruptBlobError as exc:
            warning = f"{exc}; re-encoded"
        ids = self.engine.tokenize(hit.text)
        kv = self.engine.encode(ids)
        self.library.put(tenant=self.tenant, public=hit.owner == PUBLIC, model_fp=lm.fingerprint,
                         context_id=self.engine.context_id, token_ids=ids, k_sem=kv.k_sem, v=kv.v,
                         text_preview=hit.text)
        return kv, True, warning

    def answer(self, question: str, *, k: int = 4, mode: str = "rerope", max_new_tokens: int = 64,
               on_token=None, hits=None, repair: str | None = None, t0: float | None = None) -> Answer:
        """With `hits` already retrieved, pass `t0` from before retrieval so TTFT includes it."""
        t0 = time.perf_counter() if t0 is None else t0
        hits = self.retrieve(question, k) if hits is None else hits
        t_ret = time.perf_counter()
        got = self.load(hits, need_kv=mode != "full")
        t_load = time.perf_counter()
        suffix = self.engine.suffix_ids(question)
        composed = self.engine.compose(got.chunks, mode, extra=len(suffix) + max_new_tokens + 1)
        if repair and mode != "full":
            composed.recomputed = parse_repair(repair)(self.engine, composed, got.chunks, suffix)
        t_comp = time.perf_counter()
        gen = generate(self.engine.lm, composed, suffix, max_new_tokens=max_new_tokens,
                       stop=self.engine.stop, on_token=on_token, t0=t0)
        timings = {"retrieval": t_ret - t0, "load": t_load - t_ret, "compose": t_comp - t_load,
                   "prefill": gen.ttft_s - (t_comp - t0)}
        return Answer(answer=self.engine.decode(gen.token_ids).strip(), mode=mode, ttft_s=gen.ttft_s,
                      timings=timings, sources=got.sources,
                      cached_tokens=composed.cached_tokens - got.computed_tokens - composed.recomputed,
                      computed_tokens=gen.prefill_tokens + got.computed_tokens + composed.recomputed,
                      decode_tok_s=gen.decode_tok_s, token_ids=gen.token_ids, warnings=got.warnings,
                      repair=repair if mode != "full" else None)
