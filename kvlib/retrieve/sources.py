"""Reading a corpus: files and folders become `SourceDoc`s, everything else a `Skipped` with a reason.

Design facts:
- Supported: `.txt`, `.md` (read whole) and `.jsonl` (one document per record with a string
  `text` field; optional `title`, prepended as a `# title` heading line, and optional `id`).
  Extensions are matched case-insensitively.
- A JSONL record's path is `file.jsonl#<id>`, or `file.jsonl#<line number>` when it has no id,
  so a record keeps its identity when other records are added or edited.
- One bad file or record never stops a run: binary (NUL bytes), non-UTF-8, empty or
  whitespace-only content, an unsupported extension and bad JSONL lines are reported in
  `skipped` (with the line number for JSONL). Only a path that does not exist raises
  `InputError`, because that is a typo in the command, not a property of the corpus.
- Folders are walked recursively in sorted order, so two runs over the same tree produce the
  same documents in the same order. Hidden entries (names starting with '.') inside a folder
  are reported as skipped rather than read: they are usually `.git` or editor state. Symlinked
  folders are not followed, which keeps the walk finite.
- A document's path is the path as the user gave it (relative stays relative, absolute stays
  absolute), normalised with `os.path.normpath`; files found in a folder extend that path.
  A file reached twice (for example a folder and a file inside it) is read once.
- `content_hash` is the sha256 of the document text encoded as UTF-8; a leading UTF-8 BOM is
  not part of the text.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from kvlib.errors import InputError

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIX = ".jsonl"


@dataclass(frozen=True)
class SourceDoc:
    path: str
    text: str
    content_hash: str


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


def iter_sources(paths: list[Path]) -> tuple[list[SourceDoc], list[Skipped]]:
    """Read every supported document under `paths`; report the rest in `skipped`."""
    missing = [p for p in paths if not os.path.lexists(p)]
    if missing:
        raise InputError(f"path not found: {missing[0]}")
    documents: list[SourceDoc] = []
    skipped: list[Skipped] = []
    seen: set[str] = set()
    for given in paths:
        for file, reason in _walk(Path(os.path.normpath(given))):
            if reason is not None:
                skipped.append(Skipped(str(file), reason))
                continue
            real = os.path.realpath(file)
            if real in seen:
                continue
            seen.add(real)
            docs, skips = read_file(file)
            documents.extend(docs)
            skipped.extend(skips)
    return documents, skipped


def _walk(root: Path):
    """Yield (file, None) for files to read and (path, reason) for entries skipped by the walk."""
    if not root.is_dir():
        yield root, None
        return
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        for name in sorted(dirnames):
            if name.startswith("."):
                yield base / name, "hidden directory"
        # Pruning in place is how os.walk is told not to descend; sorting makes the order stable.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                yield base / name, "hidden file"
            else:
                yield base / name, None


def read_file(path: Path) -> tuple[list[SourceDoc], list[Skipped]]:
    """Read one file; a file that cannot become documents comes back as one `Skipped`."""
    suffix = path.suffix.lower()
    if suffix not in TEXT_SUFFIXES and suffix != JSONL_SUFFIX:
        return [], [Skipped(str(path), f"unsupported extension '{path.suffix or '(none)'}'")]
    try:
        text = _read_text(path)
    except InputError as err:
        return [], [Skipped(str(path), str(err))]
    if suffix == JSONL_SUFFIX:
        return _read_jsonl(str(path), text)
    if not text.strip():
        return [], [Skipped(str(path), "empty or whitespace-only")]
    return [make_doc(str(path), text)], []


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise InputError(f"unreadable: {err.strerror or err}") from err
    # NUL never occurs in UTF-8 text; it is the cheap, reliable mark of a binary file (or UTF-16).
    if b"\x00" in data:
        raise InputError("binary file (contains NUL bytes)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise InputError(f"not valid UTF-8 (byte offset {err.start})") from err


def _read_jsonl(path: str, text: str) -> tuple[list[SourceDoc], list[Skipped]]:
    documents: list[SourceDoc] = []
    skipped: list[Skipped] = []
    used: set[str] = set()
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            doc = _parse_record(path, number, line)
        except InputError as err:
            skipped.append(Skipped(path, f"line {number}: {err}"))
            continue
        if doc.path in used:
            skipped.append(Skipped(path, f"line {number}: duplicate record path {doc.path}"))
            continue
        used.add(doc.path)
        documents.append(doc)
    if not documents and not skipped:
        skipped.append(Skipped(path, "empty or whitespace-only"))
    return documents, skipped


def _parse_record(path: str, number: int, line: str) -> SourceDoc:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise InputError(f"invalid JSON ({err.msg})") from err
    if not isinstance(record, dict):
        raise InputError("record is not a JSON object")
    body = record.get("text")
    if not isinstance(body, str):
        raise InputError("no string 'text' field")
    if not body.strip():
        raise InputError("empty 'text'")
    body = titled(record.get("title"), body)
    ident = record.get("id")
    # A bool is an int to Python but never a meaningful id.
    usable = isinstance(ident, (str, int)) and not isinstance(ident, bool) and str(ident).strip()
    suffix = str(ident).strip() if usable else str(number)
    return make_doc(f"{path}#{suffix}", body)


def titled(title, body: str) -> str:
    """A record's text as ingested: a `# title` heading line, then the body (no heading without a title)."""
    return f"# {title.strip()}\n\n{body}" if isinstance(title, str) and title.strip() else body


def make_doc(path: str, text: str) -> SourceDoc:
    return SourceDoc(path=path, text=text, content_hash=hashlib.sha256(text.encode("utf-8")).hexdigest())
