"""Read request logs as a stream: OpenAI request logs and segment traces, detected per file.

Design facts:
- A file is read line by line and never held whole; files are merged by timestamp
  (each file is assumed to be in time order; lines that go back in time are counted and
  kept in file order).
- A malformed line (bad JSON, missing or ill-typed fields) is counted and a few are
  quoted with their line number; it never stops the replay.
- The form is decided by the first line that fits either; a file whose first lines
  fit neither is refused with one line (an InputError).
"""

from __future__ import annotations

import gzip
import heapq
import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

from kvlib.errors import InputError

OPENAI, SEGMENTS = "openai", "segments"
DETECT_LINES = 50  # lines looked at before a file is refused as neither form
MAX_EXAMPLES = 5  # malformed lines quoted per file


@dataclass(frozen=True)
class SegmentRef:
    kind: str
    id: str  # same id, same text
    tokens: int


@dataclass(frozen=True)
class TraceRequest:
    """One request: `messages` (OpenAI form) or `segments` (segment traces), never both."""

    t: float | None
    session: str
    source: str  # file name
    line: int
    messages: tuple | None = None
    segments: tuple[SegmentRef, ...] | None = None
    body: dict | None = field(default=None, compare=False)


@dataclass
class FileStats:
    path: str
    form: str | None = None
    lines: int = 0
    requests: int = 0
    skipped: int = 0  # recorded exchanges of another type (responses, errors)
    malformed: int = 0
    out_of_order: int = 0
    examples: list = field(default_factory=list)

    def bad(self, line: int, why: str) -> None:
        self.malformed += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(f"line {line}: {why}")

    def as_dict(self) -> dict:
        return {"path": self.path, "form": self.form, "lines": self.lines, "requests": self.requests,
                "skipped": self.skipped, "malformed": self.malformed, "out_of_order": self.out_of_order,
                "malformed_examples": list(self.examples)}


class _Bad(ValueError):
    """A malformed line; its message says why."""


def _open(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return path.open("r", encoding="utf-8", errors="replace")


def form_of(obj: Any) -> str | None:
    """Which trace form a parsed line has, or None."""
    if not isinstance(obj, dict):
        return None
    if "segments" in obj:
        return SEGMENTS
    body = obj.get("body")
    if "messages" in obj or (isinstance(body, dict) and "messages" in body):
        return OPENAI
    return None


def detect_form(path: Path) -> str:
    """The form of a file from its first lines; InputError when neither fits."""
    try:
        with _open(path) as f:
            for i, line in enumerate(f):
                if i >= DETECT_LINES:
                    break
                try:
                    form = form_of(json.loads(line))
                except ValueError:
                    continue
                if form:
                    return form
    except OSError as exc:
        raise InputError(f"cannot read trace {path}: {exc.strerror or exc}") from exc
    raise InputError(f"{path}: neither an OpenAI request log (lines with 'messages' or 'body.messages') "
                     f"nor a segment trace (lines with 'segments') in its first {DETECT_LINES} lines")


def _timestamp(obj: dict) -> float | None:
    for name in ("timestamp_rel_s", "timestamp", "timestamp_utc", "t"):
        value = obj.get(name)
        if value is None:
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                raise _Bad(f"unreadable {name} {value[:40]!r}") from None
        raise _Bad(f"{name} must be a number or an ISO time")
    return None


def _session(obj: dict, body: dict) -> str:
    meta = body.get("metadata") if isinstance(body.get("metadata"), dict) else {}
    for value in (obj.get("session"), obj.get("session_id"), obj.get("user"), obj.get("user_id"),
                  body.get("user"), meta.get("session_id")):
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            return str(value)
    return "-"


def _parse_openai(obj: dict) -> tuple[str, dict] | None:
    """('request', body) for a request line, None for another recorded type."""
    if "messages" in obj:
        body = obj
    else:
        if obj.get("type", "request") != "request":
            return None
        body = obj.get("body")
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
        raise _Bad("no non-empty 'messages' list")
    for m in body["messages"]:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _Bad("a message without a string 'role'")
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise _Bad("message content is neither a string nor a list of parts")
    return "request", body


def _parse_segments(obj: dict) -> tuple[SegmentRef, ...]:
    segs = obj.get("segments")
    if not isinstance(segs, list) or not segs:
        raise _Bad("'segments' is not a non-empty list")
    out = []
    for s in segs:
        if not isinstance(s, dict):
            raise _Bad("a segment is not an object")
        tokens, sid = s.get("tokens"), s.get("id")
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise _Bad(f"segment tokens must be a non-negative int, got {tokens!r}")
        if sid is None or isinstance(sid, (dict, list, bool)):
            raise _Bad(f"segment id must be a number or string, got {sid!r}")
        out.append(SegmentRef(kind=str(s.get("kind", "segment")), id=str(sid), tokens=tokens))
    return tuple(out)


def _parse_line(line: str, form: str, name: str, n: int) -> TraceRequest | None:
    try:
        obj = json.loads(line)
    except ValueError as exc:
        raise _Bad(f"not JSON ({exc.msg})") from None
    if not isinstance(obj, dict):
        raise _Bad("not a JSON object")
    t = _timestamp(obj)
    if form == SEGMENTS:
        return TraceRequest(t=t, session=_session(obj, {}), source=name, line=n, segments=_parse_segments(obj))
    parsed = _parse_openai(obj)
    if parsed is None:
        return None
    body = parsed[1]
    return TraceRequest(t=t, session=_session(obj, body), source=name, line=n,
                        messages=tuple(body["messages"]), body=body)


def read_file(path: Path, stats: FileStats) -> Iterator[TraceRequest]:
    """Requests of one file in file order; malformed and skipped lines are counted in `stats`."""
    stats.form = stats.form or detect_form(path)
    last_t = None
    with _open(path) as f:
        for n, line in enumerate(f, 1):
            stats.lines += 1
            if not line.strip():
                continue
            try:
                req = _parse_line(line, stats.form, path.name, n)
            except _Bad as exc:
                stats.bad(n, str(exc))
                continue
            if req is None:
                stats.skipped += 1
                continue
            if req.t is not None and last_t is not None and req.t < last_t:
                stats.out_of_order += 1
            last_t = req.t if req.t is not None else last_t
            stats.requests += 1
            yield req


def read_traces(paths: list[Path]) -> tuple[Iterator[TraceRequest], list[FileStats]]:
    """All files' requests merged in time order (a missing time keeps the file's order)."""
    stats = [FileStats(path=str(p)) for p in paths]
    for p, s in zip(paths, stats):
        if not p.exists():
            raise InputError(f"trace not found: {p}")
        s.form = detect_form(p)
    streams = [_keyed(read_file(p, s), i) for i, (p, s) in enumerate(zip(paths, stats))]
    merged = heapq.merge(*streams, key=lambda item: item[0])
    return (req for _, req in merged), stats


def _keyed(requests: Iterator[TraceRequest], index: int):
    """(sort key, request): the latest time seen so far in the file, so untimed lines stay in place."""
    t, seq = float("-inf"), 0
    for req in requests:
        if req.t is not None:
            t = max(t, req.t)
        seq += 1
        yield (t, index, seq), req
