"""Turn a trace request into what the caches look up: prefix nodes, segments and fixed chunks.

Design facts:
- OpenAI-form requests go through `kvlib.segment.segment_prompt`, the function `kvlib serve`
  uses, so replay cuts and keys prompts exactly as the server will.
- Prefix nodes are vLLM-style chained hashes of 16-token blocks (a trailing partial block is
  never cached). A segment trace has no token ids: its nodes are chained hashes of segment
  ids, one node per leading segment, as the issue defines prefix reuse for such traces.
- The CacheBlend-style baseline cuts the prompt into fixed 256-token chunks from its first
  token and keys each by content. A segment trace's chunk content is the list of
  (segment id, token range) it covers, which is the same as its text when ids name texts.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

from kvlib.replay.traces import TraceRequest
from kvlib.segment import DEFAULT_POLICY, SegmentPolicy, segment_key, segment_prompt, spacing_variant

PREFIX_BLOCK = 16  # tokens per prefix-cache block, vLLM's and SGLang's default
FIXED_CHUNK = 256  # tokens per chunk of the CacheBlend-style matcher


@dataclass(frozen=True)
class Piece:
    kind: str
    key: bytes
    start: int
    tokens: int
    reusable: bool
    alt_key: bytes | None = None  # the same text in its other leading spacing (segment.spacing_variant)
    alt_tokens: int = 0  # the trailing tokens the two forms share: what a hit on alt_key serves


@dataclass(frozen=True)
class Prepared:
    """One request as the caches see it. nodes: (chained hash, tokens) from the prompt's start."""

    t: float | None
    session: str
    tokens: int
    nodes: tuple[tuple[bytes, int], ...]
    pieces: tuple[Piece, ...]
    fixed: tuple[bytes, ...]  # one key per fixed chunk, the last one partial


def _chain(parts: Sequence[bytes]) -> list[bytes]:
    parent, out = b"kvlib-prefix-root", []
    for part in parts:
        parent = hashlib.blake2b(parent + part, digest_size=16).digest()
        out.append(parent)
    return out


def block_nodes(ids: Sequence[int], block: int = PREFIX_BLOCK) -> list[tuple[bytes, int]]:
    """Chained hashes of every full block of ids."""
    import numpy as np

    raw = np.asarray(ids, dtype="<i8").tobytes()
    width = 8 * block
    parts = [raw[i : i + width] for i in range(0, (len(ids) // block) * width, width)]
    return [(h, block) for h in _chain(parts)]


def fixed_chunks(ids: Sequence[int], size: int = FIXED_CHUNK) -> list[bytes]:
    return [segment_key(ids[i : i + size], salt=b"fixed") for i in range(0, len(ids), size)]


def prepare_openai(req: TraceRequest, tokenizer, policy: SegmentPolicy = DEFAULT_POLICY) -> Prepared:
    ids, segments = segment_prompt(tokenizer, list(req.messages), policy)
    pieces = tuple(_piece(tokenizer, s) for s in segments)
    return Prepared(t=req.t, session=req.session, tokens=len(ids), nodes=tuple(block_nodes(ids)),
                    pieces=pieces, fixed=tuple(fixed_chunks(ids)))


def _piece(tokenizer, s) -> Piece:
    """A segment as the library sees it; a reusable one also under its other spacing, which the
    server looks up when the exact ids miss (serve/prompt_layout.py)."""
    variant = spacing_variant(tokenizer, s.token_ids) if s.reusable else None
    alt_key, alt_tokens = (segment_key(variant[0]), variant[1]) if variant is not None else (None, 0)
    return Piece(s.kind, segment_key(s.token_ids), s.start, len(s.token_ids), s.reusable, alt_key, alt_tokens)


def _segment_fixed(req: TraceRequest, size: int) -> list[bytes]:
    """Fixed chunks over a segment trace: each chunk's content is the (id, from, to) runs it covers."""
    keys, runs, room = [], [], size
    for s in req.segments:
        done = 0
        while done < s.tokens:
            take = min(room, s.tokens - done)
            runs.append(f"{s.id}:{done}:{done + take}")
            done, room = done + take, room - take
            if room == 0:
                keys.append(hashlib.blake2b("|".join(runs).encode(), digest_size=16).digest())
                runs, room = [], size
    if runs:
        keys.append(hashlib.blake2b("|".join(runs).encode(), digest_size=16).digest())
    return keys


def prepare_segments(req: TraceRequest, policy: SegmentPolicy = DEFAULT_POLICY) -> Prepared:
    pieces, start = [], 0
    for s in req.segments:
        key = hashlib.blake2b(s.id.encode(), digest_size=16, person=b"kvlib-segid").digest()
        pieces.append(Piece(s.kind, key, start, s.tokens, s.tokens >= policy.min_tokens))
        start += s.tokens
    hashes = _chain([p.key for p in pieces])
    nodes = tuple((h, p.tokens) for h, p in zip(hashes, pieces))
    return Prepared(t=req.t, session=req.session, tokens=start, nodes=nodes, pieces=tuple(pieces),
                    fixed=tuple(_segment_fixed(req, FIXED_CHUNK)))


def prepare(req: TraceRequest, tokenizer, policy: SegmentPolicy = DEFAULT_POLICY) -> Prepared:
    if req.segments is not None:
        return prepare_segments(req, policy)
    return prepare_openai(req, tokenizer, policy)
