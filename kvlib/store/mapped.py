"""Blob files held memory-mapped between reads, so that a chunk read again costs its checksum only.

Design facts:
- Mapping a blob afresh on every read cost more than the read itself: each 4 KiB page of a
  new mapping is faulted in on first touch, by the checksum pass and again by the tensors'
  first reader. On this project's VM, 8 blobs of a 4k prompt (94 MB) took 16 ms to checksum
  through a fresh mapping against 4.4 ms through a held one, and their keys 10 ms to convert
  from a fresh mapping against 4.3 ms.
- Every read still hashes the whole file (xxh3-128) and compares it with the manifest's
  checksum: corruption on disk is found as before. A mapping is private (copy on write)
  and the tensors are views of it, so the hash covers exactly the bytes the tensors hold: a
  caller that wrote into stored KV (callers treat it as read-only) would show up as a
  mismatch, and the blob is then mapped afresh from the file.
- A held mapping is used only while the path names the same file (inode and size):
  blobs are replaced by rename, so a re-stored blob is mapped anew. A deleted file's
  mapping is dropped on the next read of its key and by this process's own deletes; the
  least recently read mappings go first once `max_bytes` (256 MiB by default) is exceeded:
  mapped pages are the page cache's, but they count in the process's resident memory while
  held, which the server keeps under 2 GiB.
- Tensors are built over the mapping from the safetensors header (8-byte length, JSON
  with dtype, shape and data offsets), which safetensors' own reader cannot do from a
  buffer it did not map itself.
"""

from __future__ import annotations

import collections
import json
import mmap
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvlib.errors import CorruptBlobError

DEFAULT_MAPPED_BYTES = 256 << 20  # a 4k-token SmolLM2 prompt's chunks are 94 MB
_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "I64": "int64", "I32": "int32"}


@dataclass
class _Held:
    ident: tuple
    buffer: mmap.mmap | bytes  # b"" for an empty file
    nbytes: int
    tensors: dict | None = None  # parsed on the first read whose checksum matched
    metadata: dict | None = None


def _ident(st: os.stat_result) -> tuple:
    return st.st_dev, st.st_ino, st.st_size  # not mtime: the local tier's reads touch it (its LRU order)


def parse_tensors(buffer: Any, names: tuple[str, ...], short: str) -> tuple[dict, dict]:
    """Views of the named tensors over a safetensors file's bytes, and its string metadata."""
    import torch

    try:
        (n,) = struct.unpack_from("<Q", buffer, 0)
        header = json.loads(bytes(buffer[8 : 8 + n]))
        tensors = {}
        for name in names:
            spec = header[name]
            start, end = spec["data_offsets"]
            dtype = getattr(torch, _DTYPES[spec["dtype"]])
            count = (end - start) // dtype.itemsize
            if not 0 <= start <= end <= len(buffer) - 8 - n or count * dtype.itemsize != end - start:
                raise ValueError(f"tensor {name} lies outside the file")
            flat = torch.frombuffer(buffer, dtype=dtype, count=count, offset=8 + n + start) if count else torch.empty(0, dtype=dtype)
            tensors[name] = flat.view(spec["shape"])
        return tensors, dict(header.get("__metadata__") or {})
    except KeyError as exc:
        raise CorruptBlobError(f"blob {short} lacks {exc}") from exc
    except (ValueError, RuntimeError, struct.error, TypeError) as exc:
        raise CorruptBlobError(f"blob {short} is unreadable: {type(exc).__name__}: {exc}") from exc


class MappedBlobs:
    """Verified reads of blob files through mappings held across reads (least recently read out first)."""

    def __init__(self, max_bytes: int = DEFAULT_MAPPED_BYTES) -> None:
        self.max_bytes = max_bytes
        self._held: collections.OrderedDict[Path, _Held] = collections.OrderedDict()
        self._lock = threading.Lock()

    def read(self, path: Path, expected: str, names: tuple[str, ...], short: str):
        """(actual checksum, (tensors, metadata) or None): None when the file is missing (actual
        None) or its bytes are not the expected ones."""
        from kvlib.store.blobs import checksum_bytes

        for fresh in (False, True):  # a held mapping that no longer matches is mapped afresh once
            found = self._mapping(path, fresh)
            if found is None:
                return None, None
            held, was_held = found
            actual = checksum_bytes(held.buffer)
            if actual == expected:
                if held.tensors is None:
                    held.tensors, held.metadata = parse_tensors(held.buffer, names, short)
                self._keep(path, held)
                return actual, (held.tensors, held.metadata)
            self.forget(path)
            if not was_held:  # a fresh mapping of the file itself differs
                return actual, None

    def forget(self, path: Path) -> None:
        with self._lock:
            self._held.pop(Path(path), None)

    def held_bytes(self) -> int:
        with self._lock:
            return sum(h.nbytes for h in self._held.values())

    def _mapping(self, path: Path, fresh: bool) -> tuple[_Held, bool] | None:
        """(the mapping, whether it was a held one), or None when the file is missing."""
        path = Path(path)
        try:
            with open(path, "rb") as handle:
                st = os.fstat(handle.fileno())
                with self._lock:
                    held = self._held.get(path)
                if held is not None and held.ident == _ident(st) and not fresh:
                    return held, True
                # mmap refuses empty files; their bytes hash, and fail to parse, like any others
                buffer = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY) if st.st_size else b""
                return _Held(_ident(st), buffer, st.st_size), False
        except FileNotFoundError:
            self.forget(path)
            return None

    def _keep(self, path: Path, held: _Held) -> None:
        with self._lock:
            self._held[path] = held
            self._held.move_to_end(path)
            total = sum(h.nbytes for h in self._held.values())
            while total > self.max_bytes and self._held:
                _, out = self._held.popitem(last=False)  # tensors still in use keep their mapping alive
                total -= out.nbytes
