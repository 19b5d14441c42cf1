"""The accounting: request by request, in time order, which prompt tokens each cache would serve.

Design facts:
- A request's prompt tokens split three ways. prefix: the longest cached run of leading
  prefix nodes. library: tokens of reusable segments found in the library, beyond the
  prefix. new: the rest, which must be computed.
- The library is looked up and updated for every reusable segment whatever the prefix cache
  did, so its state (and `library_any`, what a library alone would serve) does not depend on
  the prefix cache; kvlib would use the prefix cache for what it covers and the library after.
- A reusable segment whose exact ids miss is served from its other leading spacing when
  that is stored (all but the first word's tokens), and is then not stored itself: what
  the server does (serve/prompt_layout.py, segment.spacing_variant).
- Lookups happen before this request's inserts: a segment repeated inside one prompt is not
  a hit (the server stores misses after the response).
- The CacheBlend-style baseline (fixed 256-token chunks) keeps its own LRU store of the same
  capacity and is counted beyond the same prefix.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field

from kvlib.replay.policies import LibraryLRU, PrefixLRU, make_library
from kvlib.replay.prepare import FIXED_CHUNK, Prepared

FIELDS = ("tokens", "prefix", "library", "new", "library_any", "fixed")
MAX_TIMELINE = 512  # points kept; the spacing doubles when it fills


@dataclass(frozen=True)
class Outcome:
    tokens: int
    prefix: int
    library: int
    new: int
    library_any: int  # tokens a library alone would serve (prefix ignored)
    fixed: int  # the fixed-chunk matcher's tokens beyond the prefix


def _blank() -> dict:
    return dict.fromkeys(FIELDS, 0)


def _add(acc: dict, o: Outcome) -> None:
    for name in FIELDS:
        acc[name] += getattr(o, name)


@dataclass
class Tally:
    total: dict = field(default_factory=_blank)
    requests: int = 0
    by_kind: dict = field(default_factory=dict)
    by_session: dict = field(default_factory=dict)
    timeline: list = field(default_factory=list)
    every: int = 1
    first_t: float | None = None
    last_t: float | None = None
    per_request: dict = field(default_factory=lambda: {n: array("q") for n in ("tokens", "prefix", "library", "library_any")})


class Accountant:
    """One shared cache state: a prefix cache, a library and the fixed-chunk baseline, each of
    `capacity_tokens` (None = unbounded)."""

    def __init__(self, capacity_tokens: int | None = None, policy: str = "lru", *,
                 attn_per_ctx_token: float = 0.0, keep_requests: bool = True) -> None:
        self.capacity = capacity_tokens
        self.policy = policy
        self.prefix = PrefixLRU(capacity_tokens)
        self.library = make_library(policy, capacity_tokens, attn_per_ctx_token)
        self.fixed = LibraryLRU(capacity_tokens)
        self.tally = Tally()
        self.keep_requests = keep_requests
        self.unique_tokens = 0  # reusable segment tokens first seen: what an unbounded library holds

    def observe(self, req: Prepared) -> Outcome:
        covered = self.prefix.match(req.nodes)
        library = library_any = new = 0
        per_kind = []
        for p in req.pieces:
            in_prefix = max(0, min(p.start + p.tokens, covered) - p.start)
            found = self._found(p)  # tokens of p the library holds: all, the shared tail of its other spacing, none
            library_any += found
            served = max(0, p.start + p.tokens - max(p.start + p.tokens - found, covered)) if found else 0
            library += served
            new += p.tokens - in_prefix - served
            per_kind.append((p.kind, p.tokens, in_prefix, served))
        fixed = self._fixed_beyond(req, covered)
        self._update(req)
        out = Outcome(req.tokens, covered, library, new, library_any, fixed)
        self._record(req, out, per_kind)
        return out

    def _found(self, p) -> int:
        """How many of a piece's tokens (its last ones) the library serves: as the server looks it up,
        the exact ids, else the other leading spacing's shared tail (the first word is computed)."""
        if not p.reusable:
            return 0
        if p.key in self.library:
            return p.tokens
        return p.alt_tokens if p.alt_key is not None and p.alt_key in self.library else 0

    def _fixed_beyond(self, req: Prepared, covered: int) -> int:
        served = 0
        for i, key in enumerate(req.fixed):
            start, end = i * FIXED_CHUNK, min((i + 1) * FIXED_CHUNK, req.tokens)
            if key in self.fixed:
                served += max(0, end - max(start, covered))
                self.fixed.hit(key, start)
        for i, key in enumerate(req.fixed):
            self.fixed.add(key, min(FIXED_CHUNK, req.tokens - i * FIXED_CHUNK), i * FIXED_CHUNK)
        return served

    def _update(self, req: Prepared) -> None:
        self.prefix.insert(req.nodes)
        for p in req.pieces:
            if not p.reusable:
                continue
            if p.key in self.library:
                self.library.hit(p.key, p.start)
            elif p.alt_key is not None and p.alt_key in self.library:
                self.library.hit(p.alt_key, p.start)  # served from the other spacing: this one is not stored
            else:
                self.library.add(p.key, p.tokens, p.start)
                self.unique_tokens += p.tokens if self.capacity is None else 0

    def _record(self, req: Prepared, out: Outcome, per_kind: list) -> None:
        t = self.tally
        t.requests += 1
        _add(t.total, out)
        for kind, tokens, prefix, library in per_kind:
            k = t.by_kind.setdefault(kind, {"tokens": 0, "prefix": 0, "library": 0, "new": 0})
            k["tokens"] += tokens
            k["prefix"] += prefix
            k["library"] += library
            k["new"] += tokens - prefix - library
        s = t.by_session.setdefault(req.session, [0, 0, 0, 0])
        s[0], s[1], s[2], s[3] = s[0] + 1, s[1] + out.tokens, s[2] + out.prefix, s[3] + out.library
        if self.keep_requests:
            for name in t.per_request:
                t.per_request[name].append(getattr(out, name))
        self._timeline(req)

    def _timeline(self, req: Prepared) -> None:
        t = self.tally
        if t.first_t is None and req.t is not None:
            t.first_t = req.t
        t.last_t = req.t if req.t is not None else t.last_t
        if t.requests % t.every:
            return
        rel = None if req.t is None or t.first_t is None else req.t - t.first_t
        t.timeline.append({"t": rel, "requests": t.requests, **dict(t.total)})
        if len(t.timeline) >= MAX_TIMELINE:
            t.timeline = t.timeline[1::2]
            t.every *= 2


def shares(acc: dict) -> dict:
    """Shares of prompt tokens; they sum to 1 over prefix, library and new."""
    n = acc["tokens"] or 1
    out = {"prefix_share": acc["prefix"] / n, "library_share": acc["library"] / n, "new_share": acc["new"] / n,
           "tokens": acc["tokens"]}
    if "library_any" in acc:
        out["library_any_share"] = acc["library_any"] / n
        out["fixed256_share"] = acc["fixed"] / n
    return out


def session_summary(by_session: dict, top: int = 50) -> dict:
    """Count and the `top` sessions by tokens (the full table could be millions of rows)."""
    rows = sorted(by_session.items(), key=lambda kv: -kv[1][1])
    shown = [{"session": s, "requests": r, "tokens": n, "prefix_share": p / (n or 1), "library_share": lib / (n or 1)}
             for s, (r, n, p, lib) in rows[:top]]
    multi = [v for v in by_session.values() if v[0] > 1]
    return {"count": len(by_session), "multi_turn": len(multi), "top": shown}


def finish_timeline(tally: Tally) -> list[dict]:
    out = []
    end = None if tally.last_t is None or tally.first_t is None else tally.last_t - tally.first_t
    for point in tally.timeline + [{"t": end, "requests": tally.requests, **dict(tally.total)}]:
        n = point["tokens"] or 1
        out.append({"t": point["t"], "requests": point["requests"], "tokens": point["tokens"],
                    "prefix_share": point["prefix"] / n, "library_share": point["library"] / n,
                    "new_share": point["new"] / n})
    return out
