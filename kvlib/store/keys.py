"""Chunk keys: content addresses of a model's reading of one chunk.

A key is sha256 over (model fingerprint, encoding context id, token ids,
namespace salt). Public chunks use an empty salt and so deduplicate across all
tenants; private chunks use their tenant's random salt, so the same private text
of two tenants shares no key and nobody can probe for another's text by hashing.

Fields are length-prefixed before hashing so that no two different field tuples
can serialize to the same byte string. Token ids are hashed as little-endian
int64 whatever integer dtype they arrive in, so int32 and int64 ids give one key.
"""

from __future__ import annotations

import functools
import hashlib
import re
import struct
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from kvlib.errors import AmbiguousKeyError, InputError, NotFoundError

# Bump only with a migration: changing the serialization re-addresses every chunk.
KEY_SCHEME = b"kvlib-chunk-key-v1"
KEY_HEX_LEN = 64
MIN_PREFIX_LEN = 6
# Enough candidates to show the user; more is noise on one error line.
MAX_SHOWN_CANDIDATES = 8

_HEX = re.compile(r"^[0-9a-f]+$")


@dataclass(frozen=True)
class ChunkKey:
    """A full 64-hex-digit sha256 chunk address."""

    hex: str

    def __post_init__(self) -> None:
        if len(self.hex) != KEY_HEX_LEN or not _HEX.match(self.hex):
            raise InputError(f"not a chunk key (64 lowercase hex digits): {self.hex!r}")

    @property
    def short(self) -> str:
        """The first 12 hex digits, as shown in tables."""
        return self.hex[:12]

    @property
    def fanout(self) -> str:
        """The blob folder name: the first 2 hex digits."""
        return self.hex[:2]

    def __str__(self) -> str:
        return self.hex


def as_key(key: "ChunkKey | str") -> ChunkKey:
    """Accept a ChunkKey or its full hex string (case-insensitive)."""
    if isinstance(key, ChunkKey):
        return key
    if isinstance(key, str):
        return ChunkKey(key.strip().lower())
    raise InputError(f"not a chunk key: {key!r}")


def normalize_token_ids(token_ids: Any) -> list[int]:
    """Token ids as a flat list of non-negative ints (list, tuple, numpy or torch 1-D)."""
    values = token_ids.tolist() if hasattr(token_ids, "tolist") else token_ids
    if not isinstance(values, (list, tuple)) or not values:
        raise InputError("token ids must be a non-empty 1-D sequence of ints")
    # The usual case checked in builtins (every serve lookup keys each segment); `type(v) is int`
    # also refuses bool, an int subclass: a mask passed by mistake must not hash as ids.
    if all(type(value) is int for value in values) and min(values) >= 0:
        return list(values)
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InputError(f"token ids must be non-negative ints, got {value!r}")
    return list(values)


def compute_key(*, model_fp: str, context_id: str, token_ids: Sequence[int] | Any, salt: str) -> ChunkKey:
    """The content address of one chunk's KV for one model, context and namespace."""
    return compute_keys(model_fp=model_fp, context_id=context_id, token_ids=token_ids, salts=(salt,))[0]


def compute_keys(*, model_fp: str, context_id: str, token_ids: Sequence[int] | Any,
                 salts: Sequence[str]) -> list[ChunkKey]:
    """compute_key for each salt; the ids are checked, packed and hashed once (the salt is the last field).
    Ids given as a tuple (the server's segments, which recur from turn to turn) are remembered."""
    if isinstance(token_ids, tuple):
        return list(_tuple_keys(model_fp, context_id, token_ids, tuple(salts)))
    return _keys(model_fp, context_id, token_ids, salts)


@functools.lru_cache(maxsize=2048)  # a pure function of its arguments; ~2k segments of ~100-300 ids
def _tuple_keys(model_fp: str, context_id: str, token_ids: tuple, salts: tuple) -> tuple[ChunkKey, ...]:
    return tuple(_keys(model_fp, context_id, token_ids, salts))


def _keys(model_fp: str, context_id: str, token_ids: Any, salts: Sequence[str]) -> list[ChunkKey]:
    ids = normalize_token_ids(token_ids)
    digest = hashlib.sha256()
    for field in (KEY_SCHEME, model_fp.encode("utf-8"), context_id.encode("utf-8"), struct.pack(f"<{len(ids)}q", *ids)):
        digest.update(struct.pack("<Q", len(field)))
        digest.update(field)
    keys = []
    for salt in salts:
        salted, field = digest.copy(), salt.encode("utf-8")
        salted.update(struct.pack("<Q", len(field)))
        salted.update(field)
        keys.append(ChunkKey(salted.hexdigest()))
    return keys


def normalize_prefix(prefix: str) -> str:
    """Validate a user-typed key prefix: hex, at least 6 digits, like a git hash."""
    text = (prefix or "").strip().lower()
    if not _HEX.match(text) or len(text) > KEY_HEX_LEN:
        raise InputError(f"not a chunk key or prefix (hex digits expected): {prefix!r}")
    if len(text) < MIN_PREFIX_LEN:
        raise InputError(f"key prefix {text!r} is too short: give at least {MIN_PREFIX_LEN} hex digits")
    return text


def prefix_range(prefix: str) -> tuple[str, str]:
    """Half-open [low, high) string range holding every key with this prefix.

    'g' sorts after every hex digit, so a range scan on the primary key index
    replaces a LIKE that SQLite could not serve from the index.
    """
    return prefix, prefix + "g"


def pick_unique(prefix: str, matches: Iterable[str]) -> ChunkKey:
    """The single match for a prefix, or the not-found / ambiguity error.

    `matches` must already be restricted to what the caller may see, so that
    the error never names another tenant's key.
    """
    found = sorted(set(matches))
    if not found:
        raise NotFoundError(f"chunk {prefix} not found")
    if len(found) > 1:
        width = max(12, len(prefix) + 4)
        shown = ", ".join(key[:width] for key in found[:MAX_SHOWN_CANDIDATES])
        more = f" and {len(found) - MAX_SHOWN_CANDIDATES} more" if len(found) > MAX_SHOWN_CANDIDATES else ""
        error = AmbiguousKeyError(f"key prefix {prefix} is ambiguous: matches {shown}{more}")
        error.candidates = [ChunkKey(key) for key in found]  # type: ignore[attr-defined]
        raise error
    return ChunkKey(found[0])
