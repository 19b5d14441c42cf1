"""Cut a chat prompt into segments that can recur: one module shared by `kvlib serve` and `kvlib replay`.

Design facts:
- The prompt is the chat template's rendering of the messages, tokenized once with offsets,
  so the ids are exactly what full recompute sees. Cuts are decided on characters and
  mapped to token boundaries; segments tile the ids exactly, in order.
- Cuts fall at message boundaries, at document-like blocks inside a message (blank lines,
  markdown headings, `Document [n](Title: ...)` headers, `<document>` tags) and, inside a
  block longer than `max_tokens`, at content-defined points of a gear rolling hash over the
  token ids. A block's body starts at its first non-blank character, so its ids do not
  depend on the numbering, header or neighbours it sits among.
- Scaffolding (the template's role headers, document headers and tags, blank lines) is kind
  "template" and never reusable: it is short, and its numbering changes from prompt to prompt.
- Nothing here knows one prompt format: the block rules are generic text structure.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import re
from dataclasses import dataclass, field
from typing import Sequence

from kvlib.errors import InputError

# Document headers as in the lost-in-the-middle prompts, and XML-ish document tags.
_SCAFFOLD = re.compile(r"^[ \t]*Document \[\d+\]\s*\(Title:[^\n]*?\)[ \t]*|</?document\b[^>\n]*>", re.M | re.I)
_BLANK = re.compile(r"\n[ \t]*\n\s*")
_HEADING = re.compile(r"^#{1,6}[ \t]", re.M)


@dataclass(frozen=True)
class Segment:
    kind: str  # template | system | message | document | question | cdc
    start: int  # token offset in the prompt's ids
    token_ids: tuple[int, ...]
    reusable: bool  # worth a library lookup and store: useful length, not scaffolding

    @property
    def end(self) -> int:
        return self.start + len(self.token_ids)


@dataclass(frozen=True)
class SegmentPolicy:
    """min_tokens: shortest reusable segment and shortest CDC piece; max_tokens: longest block kept
    whole (longer ones are cut by CDC); avg_tokens: the CDC pieces' target mean length."""

    min_tokens: int = 32
    avg_tokens: int = 256
    max_tokens: int = 1024
    # Tokens a CDC cut decision looks back at. Short, so that cut points resynchronise soon after
    # the text around a passage changes (byte-level CDC looks back 32-64 bytes, a dozen tokens).
    cdc_window: int = 16
    part_separator: str = field(default="\n")  # joins a message's text parts, as vLLM does

    def __post_init__(self) -> None:
        if not 1 <= self.min_tokens < self.avg_tokens < self.max_tokens:
            raise InputError(f"segment policy needs 1 <= min < avg < max tokens, got "
                             f"{self.min_tokens}/{self.avg_tokens}/{self.max_tokens}")
        if not self.mask_bits <= self.cdc_window <= 64:
            raise InputError(f"cdc_window must be {self.mask_bits}..64 tokens, got {self.cdc_window}")

    @property
    def mask_bits(self) -> int:
        # A cut candidate every 2**bits tokens on average, after the first min_tokens.
        return max(1, round(math.log2(self.avg_tokens - self.min_tokens)))


DEFAULT_POLICY = SegmentPolicy()
FIRST_WORD_TOKENS = 4  # spacing_variant: a toggled leading space re-tokenizes the first word only


def message_text(message: dict, policy: SegmentPolicy = DEFAULT_POLICY) -> str:
    """A message's content as one string: text parts joined by the policy's separator."""
    content = message.get("content") if isinstance(message, dict) else None
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InputError(f"only text content parts are supported, got {str(part)[:60]!r}")
            texts.append(part["text"])
        return policy.part_separator.join(texts)
    raise InputError(f"message content must be a string or a list of text parts, got {type(content).__name__}")


def normalize_messages(messages: list[dict], policy: SegmentPolicy = DEFAULT_POLICY) -> list[dict]:
    """Messages with string content, which every chat template renders the same way."""
    if not isinstance(messages, list) or not messages:
        raise InputError("messages must be a non-empty list")
    out = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise InputError(f"each message needs a string 'role', got {str(m)[:60]!r}")
        out.append({"role": m["role"], "content": message_text(m, policy)})
    return out


def render_text(tokenizer, messages: list[dict], policy: SegmentPolicy = DEFAULT_POLICY) -> str:
    msgs = normalize_messages(messages, policy)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    # No template (a base model): plain role-prefixed turns, stated rather than guessed per model.
    bos = tokenizer.bos_token or ""
    return bos + "".join(f"{m['role']}: {m['content']}\n\n" for m in msgs) + "assistant:"


def render_prompt(tokenizer, messages: list[dict], policy: SegmentPolicy = DEFAULT_POLICY) -> list[int]:
    """The chat template's token ids, exactly what full recompute sees (add_generation_prompt=True)."""
    return list(tokenizer(render_text(tokenizer, messages, policy), add_special_tokens=False)["input_ids"])


def segment_key(token_ids: Sequence[int], salt: bytes = b"") -> bytes:
    """Content key of a segment's ids (16-byte blake2b); the caller or the store applies a tenant salt."""
    import numpy as np

    h = hashlib.blake2b(digest_size=16, person=b"kvlib-segment", key=salt[:64])
    h.update(np.asarray(token_ids, dtype="<i8").tobytes())
    return h.digest()


# -- character-level layout -----------------------------------------------------------------


@dataclass(frozen=True)
class _Span:
    start: int  # characters in the rendered text
    end: int
    kind: str


def _locate_contents(text: str, msgs: list[dict]) -> list[tuple[int, int, dict]]:
    """Where each message's content lies in the rendered text, in order; unlocated ones are skipped
    (their text then counts as template, visibly unreusable rather than guessed at)."""
    found, pos = [], 0
    for m in msgs:
        for content in (m["content"], m["content"].strip()):
            at = text.find(content, pos) if content else -1
            if at >= 0:
                found.append((at, at + len(content), m))
                pos = at + len(content)
                break
    return found


def _block_cuts(content: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Cut points inside one message's content, and its scaffold spans (headers, tags)."""
    scaffold = [(m.start(), m.end()) for m in _SCAFFOLD.finditer(content)]
    cuts = {0, len(content)}
    for a, b in scaffold:
        cuts.update((a, b))
    for m in _BLANK.finditer(content):
        cuts.update((m.start(), m.end()))
    cuts.update(m.start() for m in _HEADING.finditer(content))
    return sorted(cuts), scaffold


def _content_spans(content: str, base: int) -> list[_Span]:
    """Blocks of one message as spans: scaffold and blank runs are 'template', bodies 'block'.

    A body is trimmed to its non-blank characters so its ids never carry a neighbour's whitespace."""
    cuts, scaffold = _block_cuts(content)
    spans = []
    for a, b in zip(cuts, cuts[1:]):
        piece = content[a:b]
        if any(sa <= a and b <= sb for sa, sb in scaffold) or not piece.strip():
            spans.append(_Span(base + a, base + b, "template"))
            continue
        lead = len(piece) - len(piece.lstrip())
        trail = len(piece) - len(piece.rstrip())
        if lead:
            spans.append(_Span(base + a, base + a + lead, "template"))
        spans.append(_Span(base + a + lead, base + b - trail, "block"))
        if trail:
            spans.append(_Span(base + b - trail, base + b, "template"))
    return spans


def _label_blocks(spans: list[_Span], role: str, last_user: bool) -> list[_Span]:
    """Kinds for one message's blocks: system text, documents, the closing question, plain messages."""
    blocks = [i for i, s in enumerate(spans) if s.kind == "block"]
    out = list(spans)
    for n, i in enumerate(blocks):
        after_header = i > 0 and spans[i - 1].kind == "template" and spans[i - 1].end - spans[i - 1].start > 0
        if role == "system":
            kind = "system"
        elif last_user and n == len(blocks) - 1:
            kind = "question"
        elif len(blocks) > 1 or after_header:
            kind = "document"
        else:
            kind = "message"
        out[i] = _Span(spans[i].start, spans[i].end, kind)
    return out


def _layout(text: str, msgs: list[dict]) -> list[_Span]:
    """Every character of the rendered text in one span, in order."""
    located = _locate_contents(text, msgs)
    last_user = max((i for i, (_, _, m) in enumerate(located) if m["role"] == "user"), default=-1)
    spans, pos = [], 0
    for i, (a, b, m) in enumerate(located):
        if a > pos:
            spans.append(_Span(pos, a, "template"))
        spans += _label_blocks(_content_spans(text[a:b], a), m["role"], i == last_user)
        pos = b
    if pos < len(text):
        spans.append(_Span(pos, len(text), "template"))
    return spans


# -- token-level segments ----------------------------------------------------------------------


def _token_cut(ends: list[int], char: int) -> int:
    """Token index of a character cut: a token that straddles the cut goes with the text after it
    (so ' Foo' stays with the body that 'Foo' starts)."""
    return bisect.bisect_right(ends, char)


def cdc_lengths(token_ids: Sequence[int], policy: SegmentPolicy = DEFAULT_POLICY) -> list[int]:
    """Content-defined piece lengths over token ids (gear hash, FastCDC-style min/avg/max).

    Each piece is min..max tokens, except that the last may be shorter than min. A cut
    candidate is a token whose gear hash over the last `cdc_window` tokens has its top
    `mask_bits` bits (of those window bits) zero, so cut points depend only on nearby content
    and resynchronise after an insertion."""
    import numpy as np

    n = len(token_ids)
    if n <= policy.max_tokens:
        return [n] if n else []
    g = _gear_table()[np.asarray(token_ids, dtype=np.int64) & 0xFFFF]
    h = np.zeros(n, dtype=np.uint64)
    w = policy.cdc_window
    for j in range(min(w, n)):  # h[i] = sum_j g[i-j] << j, the gear hash unrolled
        h[j:] += g[: n - j] << np.uint64(j)
    # Bit k of h depends on the last k+1 tokens only: bits w-mask_bits .. w-1 see exactly the window.
    top = (h >> np.uint64(w - policy.mask_bits)) & np.uint64((1 << policy.mask_bits) - 1)
    candidates = np.flatnonzero(top == 0) + 1  # cut after token i
    return _pick_cuts(candidates.tolist(), n, policy)


def _pick_cuts(candidates: list[int], n: int, policy: SegmentPolicy) -> list[int]:
    lengths, start, k = [], 0, 0
    while n - start > policy.max_tokens:
        while k < len(candidates) and candidates[k] - start < policy.min_tokens:
            k += 1
        cut = candidates[k] if k < len(candidates) and candidates[k] - start <= policy.max_tokens else None
        cut = start + policy.max_tokens if cut is None else cut
        lengths.append(cut - start)
        start = cut
    if n > start:
        lengths.append(n - start)
    return lengths


_GEAR: list = []


def _gear_table():
    """65,536 fixed pseudo-random 64-bit values (token id mod 2**16), the same in every process."""
    import numpy as np

    if not _GEAR:
        _GEAR.append(np.frombuffer(hashlib.shake_256(b"kvlib-gear-v1").digest(8 << 16), dtype="<u8").copy())
    return _GEAR[0]


def _segments_of(ids: list[int], ends: list[int], spans: list[_Span], policy: SegmentPolicy) -> list[Segment]:
    out: list[Segment] = []
    for s in spans:
        a, b = _token_cut(ends, s.start), _token_cut(ends, s.end)
        if b <= a:
            continue
        if s.kind == "template":
            if out and out[-1].kind == "template":  # adjacent scaffolding is one segment
                prev = out.pop()
                a = prev.start
            out.append(Segment("template", a, tuple(ids[a:b]), False))
            continue
        pieces = cdc_lengths(ids[a:b], policy)
        kind = "cdc" if len(pieces) > 1 else s.kind
        for n in pieces:
            out.append(Segment(kind, a, tuple(ids[a : a + n]), n >= policy.min_tokens))
            a += n
    return out


def segment_prompt(tokenizer, messages: list[dict], policy: SegmentPolicy = DEFAULT_POLICY) -> tuple[list[int], list[Segment]]:
    """The rendered ids and segments that tile them exactly, in order (concatenation == ids)."""
    msgs = normalize_messages(messages, policy)
    text = render_text(tokenizer, msgs, policy)
    return _tiled(tokenizer, text, _layout(text, msgs), policy)


def text_segments(tokenizer, text: str, policy: SegmentPolicy = DEFAULT_POLICY) -> list[Segment]:
    """The segments a text gets when a prompt carries it as a block of its own (behind a blank line,
    a document tag or a message start): what a client pasting this document into a chat will send.
    POST /v1/documents stores these, so a later chat holding the document finds them."""
    if not text.strip():
        return []
    spans = _label_blocks(_content_spans(text, 0), "user", last_user=False)
    return _tiled(tokenizer, text, spans, policy)[1]


def _tiled(tokenizer, text: str, spans: list[_Span], policy: SegmentPolicy) -> tuple[list[int], list[Segment]]:
    ids, offsets = _Codec(tokenizer).encode_with_offsets(text)
    # Running maximum: byte-level pieces of one character may repeat an offset; cuts need order.
    ends, top = [], 0
    for _, e in offsets:
        top = max(top, e)
        ends.append(top)
    segments = _segments_of(ids, ends, spans, policy)
    covered = sum(len(s.token_ids) for s in segments)
    if covered != len(ids):  # tiling is the contract; a gap would silently drop tokens
        segments = _fill_gaps(ids, segments)
    return ids, segments


def spacing_variant(tokenizer, token_ids: Sequence[int]) -> tuple[tuple[int, ...], int] | None:
    """The same text with its leading space toggled, and how many trailing ids the two share,
    when only the first word's tokens differ (at most FIRST_WORD_TOKENS of them).

    A block after a header on the same line (`Document [1](Title: T) Kell...`) starts with
    ' Kell' (one token); the same block behind a blank line, or stored from POST /v1/documents,
    starts with 'K', 'ell'. Everything after the first word is the same ids, so a lookup may serve
    those from either form and compute the first word in context."""
    return spacing_variants(tokenizer, [token_ids])[0]


def spacing_variants(tokenizer, id_lists: Sequence[Sequence[int]]) -> list[tuple[tuple[int, ...], int] | None]:
    """spacing_variant of each id list, re-tokenizing only a head of a few words.

    Toggling the leading space re-tokenizes the first word only: a token that starts with a space
    starts a word the tokenizer's pre-tokenizer splits off, whatever came before it. So the head up
    to the first spaced token after FIRST_WORD_TOKENS is decoded, toggled and encoded, and the rest
    of the ids are kept; a list with no such token near its start is re-tokenized whole. Were a
    tokenizer to break that rule, the variant would be ids no stored chunk has: a lookup that
    misses, never KV served for other ids (a hit's key is its exact ids). One call per piece into
    the fast tokenizer's backend: its batch calls cost more than they save at a few short texts."""
    codec = _Codec(tokenizer)
    out: list = []
    for ids in map(tuple, id_lists):
        if len(ids) < 2:
            out.append(None)
            continue
        end = next((k for k in range(FIRST_WORD_TOKENS + 1, min(len(ids), HEAD_SCAN_TOKENS))
                    if codec.decode(ids[k : k + 1]).startswith(" ")), len(ids))
        head = codec.decode(ids[:end])
        alt_head = codec.encode(head[1:] if head.startswith(" ") else " " + head)
        out.append(_shared_tail(ids, alt_head + ids[end:]))
    return out


# How far into a list the head may reach for its first spaced token (then the whole list is re-tokenized).
HEAD_SCAN_TOKENS = 24


class _Codec:
    """decode and encode (no special tokens) as the tokenizer does them, through its fast backend
    where decode adds nothing to the backend's (no clean-up of tokenization spaces)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.fast = getattr(tokenizer, "backend_tokenizer", None)  # encoding: the tokenizer's own call's
        self.backend = None if getattr(tokenizer, "clean_up_tokenization_spaces", False) else self.fast

    def decode(self, ids: Sequence[int]) -> str:
        if self.backend is None:
            return self.tokenizer.decode(list(ids))
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def encode(self, text: str) -> tuple[int, ...]:
        if self.backend is None:
            return tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return tuple(self.backend.encode(text, add_special_tokens=False).ids)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list]:
        """(ids, (start, end) character offsets of each), no special tokens added."""
        if self.fast is None:
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            return list(enc["input_ids"]), list(enc["offset_mapping"])
        enc = self.fast.encode(text, add_special_tokens=False)
        return list(enc.ids), list(enc.offsets)


def _shared_tail(ids: tuple[int, ...], alt: tuple[int, ...]) -> tuple[tuple[int, ...], int] | None:
    shared = 0
    while shared < min(len(ids), len(alt)) and ids[-1 - shared] == alt[-1 - shared]:
        shared += 1
    if shared == 0 or len(ids) - shared > FIRST_WORD_TOKENS or len(alt) - shared > FIRST_WORD_TOKENS:
        return None
    if shared == len(ids) or shared == len(alt):  # one is a suffix of the other: nothing was toggled
        return None
    return alt, shared


def _fill_gaps(ids: list[int], segments: list[Segment]) -> list[Segment]:
    """Template segments over any ids no span claimed (tokens past the last character cut)."""
    out, pos = [], 0
    for s in segments:
        if s.start > pos:
            out.append(Segment("template", pos, tuple(ids[pos : s.start]), False))
        out.append(s)
        pos = s.end
    if pos < len(ids):
        out.append(Segment("template", pos, tuple(ids[pos:]), False))
    return out
