"""Evaluation data for `kvlib bench`: question, gold answers and passages, one record per question.

Design facts:
- Two input forms (DESIGN.md §4), detected per file from the first record that names
  a passage list, and reported in `LoadResult.form`:
  - "ctxs" (DPR, FiD, lost-in-the-middle, CacheBlend): `question`, `answers` (list) or
    `answer` (string), `ctxs = [{"title"?, "text"}, ...]`;
  - "hotpotqa": `question`, `answer`, `context = [[title, [sentence, ...]], ...]`
    (the HF-datasets layout `{"title": [...], "sentences": [[...]]}` is accepted too).
- Containers: a JSON list, JSONL (one object per line), or gzip of either. Gzip is
  recognised by its magic bytes, not by the file name.
- HotpotQA sentences keep their own separating whitespace (in the shipped data 99% of
  non-first sentences start with a space, and the rest continue a quotation such as
  `"` + `Doogie Howser"`), so a passage is `"".join(sentences)`; `" ".join` would double
  spaces and break quoted titles.
- Titles and texts are stripped of surrounding whitespace, so a chunk never starts with
  a stray space token.
- A malformed record is skipped and reported with its location (`line 7` for JSONL,
  `index 3` for a JSON list) and a reason; only a file with no usable record, a missing
  file, or a JSON list that does not parse raises `InputError`.
- `ctxs=K` keeps the first K passages *before* validation, so a broken passage beyond K
  does not cost the record.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from kvlib.errors import InputError

FORMS = ("ctxs", "hotpotqa")
ORDERS = ("given", "shuffled", "reversed")
_PASSAGE_KEY = {"ctxs": "ctxs", "hotpotqa": "context"}
_GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True)
class Passage:
    title: str
    text: str


@dataclass(frozen=True)
class QARecord:
    id: str
    question: str
    answers: tuple[str, ...]
    passages: tuple[Passage, ...]
    # titles of the passages that support the answer (HotpotQA `supporting_facts`); () when unknown
    gold_titles: tuple[str, ...] = ()


@dataclass(frozen=True)
class LoadResult:
    records: list[QARecord]
    form: str
    # (location, reason), e.g. ("line 7", "no answers")
    skipped: list[tuple[str, str]]


class _BadRecord(Exception):
    """A record is malformed; carries the reason. Never leaves this module."""


def load_records(
    path: str | Path, *, limit: int | None = None, ctxs: int | None = None, seed: int = 0, answers: bool = True
) -> LoadResult:
    """Read QA records from `path`, keeping the first `limit` usable ones with `ctxs` passages each.

    `seed` is accepted for the runner's convenience and recorded by it; loading itself
    is deterministic and order-preserving (use `permute` to reorder passages).
    answers False accepts records without gold answers (their `answers` is ()): a label-free
    calibration (`kvlib calibrate --target full`) needs only questions and passages.
    """
    del seed  # loading never samples; the argument keeps one call signature for the runner
    _check_positive("limit", limit)
    _check_positive("ctxs", ctxs)
    path = Path(path)
    raw = list(_iter_raw(path))
    form = _detect_form(raw, path)
    records: list[QARecord] = []
    skipped: list[tuple[str, str]] = []
    for location, obj in raw:
        if limit is not None and len(records) >= limit:
            break
        try:
            records.append(_parse_record(obj, form, location, ctxs, answers))
        except _BadRecord as exc:
            skipped.append((location, str(exc)))
    if not records:
        first = f" (first problem: {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        raise InputError(f"no usable record in {path}{first}")
    return LoadResult(records=records, form=form, skipped=skipped)


def permute(passages: tuple | list, order: str, seed: int, record_id: str) -> tuple:
    """Reorder passages: 'given', 'reversed', or 'shuffled' (same seed + record -> same order).

    The shuffle seed is derived with sha256, not Python's `hash()`, which is salted per
    process and would make runs unrepeatable.
    """
    items = tuple(passages)
    if order == "given":
        return items
    if order == "reversed":
        return items[::-1]
    if order == "shuffled":
        digest = hashlib.sha256(f"{seed}\x00{record_id}".encode()).digest()
        shuffled = list(items)
        random.Random(int.from_bytes(digest[:8], "big")).shuffle(shuffled)
        return tuple(shuffled)
    raise InputError(f"unknown passage order {order!r}; choose one of {', '.join(ORDERS)}")


def _check_positive(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise InputError(f"{name} must be a positive integer, got {value!r}")


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise InputError(f"data file not found: {path}")
    try:
        blob = path.read_bytes()
        if blob[:2] == _GZIP_MAGIC:
            blob = gzip.decompress(blob)
        return blob.decode("utf-8-sig")  # -sig: tolerate a BOM written by Windows tools
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from None


def _iter_raw(path: Path) -> Iterator[tuple[str, Any]]:
    """Yield (location, decoded JSON value) per record, for a JSON list or JSONL text."""
    text = _read_text(path)
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            items = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise InputError(f"invalid JSON in {path}: {exc}") from None
        yield from ((f"index {i}", obj) for i, obj in enumerate(items))
        return
    if stripped.startswith("{"):
        try:  # a single (possibly pretty-printed) object is a one-record file
            yield "line 1", json.loads(stripped)
            return
        except json.JSONDecodeError:
            pass  # "Extra data" after the first object: it is JSONL
    # JSONL: a bad line is one malformed record, not a broken file.
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"line {n}", json.loads(line)
        except json.JSONDecodeError as exc:
            yield f"line {n}", _BadRecord(f"invalid JSON: {exc}")


def _detect_form(raw: list[tuple[str, Any]], path: Path) -> str:
    for _, obj in raw:
        if isinstance(obj, dict):
            for form in FORMS:
                if _PASSAGE_KEY[form] in obj:
                    return form
    if not raw:
        raise InputError(f"no records in {path}")
    bad = [(loc, obj) for loc, obj in raw if isinstance(obj, _BadRecord)]
    if bad:
        raise InputError(f"no usable record in {path} (first problem: {bad[0][0]}: {bad[0][1]})")
    raise InputError(
        f"no usable record in {path}: no record has 'ctxs' (DPR/FiD form) or 'context' (HotpotQA form)"
    )


def _parse_record(obj: Any, form: str, location: str, ctxs: int | None, need_answers: bool = True) -> QARecord:
    if isinstance(obj, _BadRecord):
        raise obj
    if not isinstance(obj, dict):
        raise _BadRecord(f"expected a JSON object, got {type(obj).__name__}")
    question = _nonempty_str(obj.get("question"), "question")
    answers = _parse_answers(obj) if need_answers or "answers" in obj or "answer" in obj else ()
    key = _PASSAGE_KEY[form]
    if key not in obj:
        raise _BadRecord(f"missing {key!r} (file is in {form} form)")
    entries = _passage_entries(obj[key], key)
    if ctxs is not None:
        entries = entries[:ctxs]
    parse = _parse_ctx if form == "ctxs" else _parse_hotpot_passage
    passages = tuple(parse(entry, f"{key}[{i}]") for i, entry in enumerate(entries))
    if not passages:
        raise _BadRecord(f"no passages ({key!r} is empty)")
    return QARecord(id=_record_id(obj, location), question=question, answers=answers, passages=passages,
                    gold_titles=_gold_titles(obj))


def _nonempty_str(value: Any, name: str) -> str:
    if value is None:
        raise _BadRecord(f"missing {name!r}")
    if not isinstance(value, str):
        raise _BadRecord(f"{name!r} is {type(value).__name__}, expected a string")
    if not value.strip():
        raise _BadRecord(f"{name!r} is empty")
    return value.strip()


def _parse_answers(obj: dict) -> tuple[str, ...]:
    """`answers` (list, or a lone string) wins over `answer` (string, or a list)."""
    name = "answers" if "answers" in obj else "answer"
    value = obj.get(name)
    if value is None:
        raise _BadRecord("no answers: neither 'answers' nor 'answer' is given")
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise _BadRecord(f"{name!r} must be a string or a list of strings")
    answers = tuple(v.strip() for v in values if v.strip())
    if not answers:
        raise _BadRecord(f"no answers: {name!r} is empty")
    return answers


def _passage_entries(value: Any, key: str) -> list:
    # HF datasets store HotpotQA context column-wise: {"title": [...], "sentences": [[...]]}.
    if key == "context" and isinstance(value, dict) and {"title", "sentences"} <= value.keys():
        titles, sentences = value["title"], value["sentences"]
        if isinstance(titles, list) and isinstance(sentences, list) and len(titles) == len(sentences):
            return [list(pair) for pair in zip(titles, sentences)]
    if not isinstance(value, list):
        raise _BadRecord(f"{key!r} is {type(value).__name__}, expected a list")
    return value


def _parse_ctx(entry: Any, where: str) -> Passage:
    if not isinstance(entry, dict):
        raise _BadRecord(f"{where} is {type(entry).__name__}, expected an object with 'text'")
    title = entry.get("title") or ""
    if not isinstance(title, str):
        raise _BadRecord(f"{where}.title is {type(title).__name__}, expected a string")
    return Passage(title=title.strip(), text=_nonempty_str(entry.get("text"), f"{where}.text"))


def _parse_hotpot_passage(entry: Any, where: str) -> Passage:
    if not (isinstance(entry, list) and len(entry) == 2):
        raise _BadRecord(f"{where} must be [title, [sentence, ...]]")
    title, sentences = entry
    if not isinstance(title, str):
        raise _BadRecord(f"{where} title is {type(title).__name__}, expected a string")
    if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
        raise _BadRecord(f"{where} sentences must be a list of strings")
    text = "".join(sentences)  # sentences carry their own leading spaces (module docstring)
    return Passage(title=title.strip(), text=_nonempty_str(text, f"{where} text"))


def _gold_titles(obj: dict) -> tuple[str, ...]:
    """Distinct titles named by HotpotQA `supporting_facts` ([[title, sentence_index], ...]), in order."""
    facts = obj.get("supporting_facts")
    if isinstance(facts, dict):  # HF-datasets column layout {"title": [...], "sent_id": [...]}
        facts = [[t] for t in facts.get("title") or []]
    titles = [f[0].strip() for f in facts or [] if isinstance(f, list) and f and isinstance(f[0], str)]
    return tuple(dict.fromkeys(t for t in titles if t))


def _record_id(obj: dict, location: str) -> str:
    for key in ("id", "_id", "qid", "question_id"):
        value = obj.get(key)
        if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value):
            return str(value)
    # No id in the data: the location is stable for a given file.
    return location.replace(" ", "-")
