"""Chunking a document by the model's own tokens, with boundaries that stay put under local edits.

Design facts:
- A chunk is tokenized on its own: `chunk.token_ids == tokenizer.encode(chunk.text,
  add_special_tokens=False)` exactly, and never longer than `max_tokens`. Its KV is encoded
  from exactly those ids (DESIGN.md §2), so the ids here are the ones the store keys.
- Boundaries are content-defined, not packed greedily from the start of the document. Greedy
  packing makes every chunk after an edit shift, and so re-encode; here:
  - The document is split into paragraphs at blank lines.
  - A paragraph of at least `min_tokens` tokens closes its chunk. Smaller paragraphs (headings,
    one-liners) are carried forward into the chunk of the next paragraph, so a heading sits
    with the text it introduces.
  - Whether a paragraph closes a chunk depends only on that paragraph's own text, so an edit
    changes the chunk holding the edited paragraph and, at most, the chunk of the run of small
    paragraphs that follows it up to the next large one. Every other chunk keeps its text and ids.
  - The one position-dependent rule is the size cap: a run of small paragraphs that would
    overflow `max_tokens` is closed early.
- A paragraph over `max_tokens` is split at sentence ends (and single line breaks), packing
  sentences greedily within that paragraph only. A sentence over `max_tokens` is cut at the last
  word boundary that fits (at a character boundary inside one giant word), found by binary
  search on the tokenized length of the prefix, since token counts do not add across a cut.
- The policy (`chunk_document`, the one entry point for documents and passages):
  - a document's paragraphs under half the budget travel with their neighbours, so chunks
    come out near `max_tokens` rather than one short paragraph each (min_tokens = max/2);
  - a QA passage (a `ctxs` entry, DESIGN.md §4) that fits the budget is one chunk, its text
    exactly as the data gives it, so every mode sees the data's own text; a longer one is
    chunked as a document (`chunk_passage`).
- Whitespace is normalised, nothing else is lost: line endings become '\\n', runs of blank
  lines become one paragraph separator, trailing spaces of a paragraph are dropped, and every
  paragraph, the last one included, ends with '\\n\\n' so the model sees the structure and
  appending a paragraph leaves the previous last chunk unchanged.
  `"".join(c.text for c in chunks) == normalise_text(text)`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

from kvlib.errors import InputError

PARAGRAPH_SEPARATOR = "\n\n"
# Byte-level tokenizers may spend up to 4 tokens on one character; below this a chunk cannot
# reliably hold a word.
MIN_MAX_TOKENS = 8
# A prefix search never looks further than this many characters per token: real tokens cover a
# few characters, and the margin leaves room for long runs of spaces.
CHARS_PER_TOKEN_BOUND = 32

_BLANK_LINES = re.compile(r"\n(?:[ \t]*\n)+")
_LEADING_BLANK_LINES = re.compile(r"^(?:[ \t]*\n)+")
# A sentence ends after terminal punctuation (plus closing quotes or brackets) and whitespace,
# or after a line break; the whitespace stays with the sentence it follows.
_SENTENCE_END = re.compile(r"[.!?…。！？]+[\"'”’)\]]*\s+|\n\s*")
_WHITESPACE = re.compile(r"\s+")


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


@dataclass(frozen=True)
class TextChunk:
    text: str
    token_ids: tuple[int, ...]
    index: int


class _Counter:
    """Memoised standalone tokenization; the same prefix is measured many times during a split."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._cache: dict[str, tuple[int, ...]] = {}

    def ids(self, text: str) -> tuple[int, ...]:
        if text not in self._cache:
            self._cache[text] = tuple(self._tokenizer.encode(text, add_special_tokens=False))
        return self._cache[text]

    def count(self, text: str) -> int:
        return len(self.ids(text))

    def measure(self, text: str) -> int:
        """Uncached count, for the many throwaway prefixes of a hard split."""
        return len(self._tokenizer.encode(text, add_special_tokens=False))


def chunk_text(text: str, tokenizer: Tokenizer, max_tokens: int = 256, min_tokens: int = 32) -> list[TextChunk]:
    """Split `text` into chunks of at most `max_tokens` tokens, each tokenized on its own."""
    if max_tokens < MIN_MAX_TOKENS:
        raise InputError(f"max_tokens must be at least {MIN_MAX_TOKENS}, got {max_tokens}")
    counter = _Counter(tokenizer)
    texts = _group_paragraphs(paragraphs(text), counter, max_tokens, min(min_tokens, max_tokens))
    return [TextChunk(text=t, token_ids=counter.ids(t), index=i) for i, t in enumerate(texts)]


def chunk_document(text: str, tokenizer: Tokenizer, max_tokens: int = 256) -> list[TextChunk]:
    """A document's chunks as the library stores them (see the policy above)."""
    return chunk_text(text, tokenizer, max_tokens=max_tokens, min_tokens=max(1, max_tokens // 2))


def chunk_passage(text: str, tokenizer: Tokenizer, max_tokens: int) -> list[tuple[int, ...]]:
    """A QA passage's chunk ids: itself when it fits, else its document chunks."""
    ids = tuple(tokenizer.encode(text, add_special_tokens=False))
    if len(ids) <= max_tokens:
        return [ids]
    return [c.token_ids for c in chunk_document(text, tokenizer, max_tokens)]


def paragraphs(text: str) -> list[str]:
    """The document's paragraphs, whitespace-normalised, each ending with the separator."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    units = []
    for part in _BLANK_LINES.split(text):
        part = _LEADING_BLANK_LINES.sub("", part).rstrip()
        if part.strip():
            units.append(part + PARAGRAPH_SEPARATOR)
    return units


def normalise_text(text: str) -> str:
    """The text the chunks of `text` join back to."""
    return "".join(paragraphs(text))


def _group_paragraphs(units: list[str], counter: _Counter, max_tokens: int, min_tokens: int) -> list[str]:
    chunks: list[str] = []
    group = ""  # small paragraphs waiting for the paragraph they introduce
    for unit in units:
        size = counter.count(unit)
        if size > max_tokens:
            # The carried small paragraphs go in front of the split, as its first sentences.
            chunks.extend(_split_paragraph(group + unit, counter, max_tokens))
            group = ""
            continue
        if group and counter.count(group + unit) > max_tokens:
            chunks.append(group)
            group = ""
        group += unit
        if size >= min_tokens:
            chunks.append(group)
            group = ""
    if group:
        chunks.append(group)
    return chunks


def _sentences(text: str) -> list[str]:
    pieces, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        pieces.append(text[start : match.end()])
        start = match.end()
    if start < len(text):
        pieces.append(text[start:])
    return pieces


def _split_paragraph(text: str, counter: _Counter, max_tokens: int) -> list[str]:
    """Pack sentences greedily into pieces of at most `max_tokens`; hard-cut giant sentences."""
    pieces: list[str] = []
    current = ""
    for sentence in _sentences(text):
        if current and counter.count(current + sentence) <= max_tokens:
            current += sentence
            continue
        if current:
            pieces.append(current)
        current = sentence
        if counter.count(current) > max_tokens:
            # The tail of a giant sentence may still share a piece with the sentences after it.
            *head, current = _hard_split(current, counter, max_tokens)
            pieces.extend(head)
    if current:
        pieces.append(current)
    return pieces


def _hard_split(text: str, counter: _Counter, max_tokens: int) -> list[str]:
    pieces = []
    # Past the search window a remainder is cut without measuring it whole: measuring a
    # megabyte-long remainder before every cut would make the split quadratic.
    while len(text) > max_tokens * CHARS_PER_TOKEN_BOUND or counter.count(text) > max_tokens:
        cut = _fitting_prefix_length(text, counter, max_tokens)
        pieces.append(text[:cut])
        text = text[cut:]
    pieces.append(text)
    return pieces


def _fitting_prefix_length(text: str, counter: _Counter, max_tokens: int) -> int:
    """Length of a long prefix of `text` that fits in `max_tokens`, cut after whitespace if possible."""
    window = min(len(text) - 1, max_tokens * CHARS_PER_TOKEN_BOUND)
    cuts = [m.end() for m in _WHITESPACE.finditer(text, 0, window)]

    def fits(cut: int) -> bool:
        return counter.measure(text[:cut]) <= max_tokens

    if not cuts or not fits(cuts[0]):
        cuts = list(range(1, window + 1))  # one giant word: any character boundary will do
    if not cuts or not fits(cuts[0]):
        raise InputError(f"max_tokens={max_tokens} cannot hold even one character of {text[:20]!r}")
    # Token counts are not strictly monotonic in prefix length, so this finds a fitting cut that
    # is long, not provably the longest; every cut it returns has been checked to fit.
    lo, hi = 0, len(cuts) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(cuts[mid]):
            lo = mid
        else:
            hi = mid - 1
    return cuts[lo]
