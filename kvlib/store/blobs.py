"""Blobs: one safetensors file per chunk at `<home>/blobs/ab/<key>.safetensors`.

A blob holds `k_sem` and `v` as [layers, kv_heads, tokens, head_dim] in exactly
the dtype given (float16 or bfloat16), the 1-D `token_ids`, and a string
metadata header (key, model fingerprint, encoding context, dtype, shapes, format).

Writes are staged: the bytes go to a temp file in the blob's own folder, are
flushed and fsynced, and only then renamed over the final name (os.replace is
atomic within one filesystem) and the folder fsynced. The temp file is written
with O_DIRECT where the filesystem allows it (from a reused page-aligned buffer,
padded to 4 KiB, then truncated to size): a blob is megabytes that no one reads
right away, so it bypasses the page cache instead of evicting hot blobs, and the
copy costs the CPU little (on this project's VM a buffered write of a fresh 4 MB
blob took 5-10 ms of CPU, a direct one 0.5 ms). Where O_DIRECT is refused the
write is buffered as before. A blob that will be read soon (`read_soon`: the server
stores a conversation's new documents, which its next turn asks for seconds later) is
still written direct, then handed to the kernel's readahead (POSIX_FADV_WILLNEED), so
the page cache fills in the background instead of the next read waiting on the disk
(on this VM: 10-13 ms for a 4 MB blob, against 0.5 ms from the cache). A reader therefore sees
either no blob or a whole one, never a partial one. The staging writer holds an
flock on its temp file until it publishes, so `gc` can tell a live writer's temp
file from a crashed one's: a crashed process's locks die with it.

Reads hash the memory-mapped file with xxh3-128 and compare against the checksum
the manifest recorded at write time; a mismatch is a CorruptBlobError. The mappings are
held between reads (store/mapped.py), and the tensors are views of them.
This module knows nothing about SQLite, tenants or documents.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import xxhash

from kvlib.errors import CorruptBlobError, KvlibError
from kvlib.store.keys import KEY_HEX_LEN, ChunkKey
from kvlib.store.mapped import MappedBlobs

FORMAT_VERSION = "1"
BLOB_SUFFIX = ".safetensors"
BLOBS_DIR = "blobs"  # the home's blob folder
TEMP_PREFIX = ".tmp-"
TEMP_SUFFIX = ".part"
SUPPORTED_DTYPES = ("float16", "bfloat16")
TENSOR_NAMES = ("k_sem", "v", "token_ids")
# A gc can unlink a temp file in the instant between mkstemp and flock; the
# writer notices (its inode is gone from the folder) and stages again.
_STAGE_ATTEMPTS = 3


@dataclass(frozen=True, eq=False)
class BlobContents:
    """What one blob holds, tensors memory-mapped from the file by safetensors."""

    k_sem: Any  # torch.Tensor [layers, kv_heads, tokens, head_dim]
    v: Any  # torch.Tensor [layers, kv_heads, tokens, head_dim_v]
    token_ids: Any  # torch.Tensor [tokens], int32 or int64 as written
    metadata: dict[str, str]


def checksum_bytes(data: bytes | memoryview) -> str:
    """xxh3-128 hex digest: fast enough to re-hash every blob on every read."""
    return xxhash.xxh3_128_hexdigest(data)


def checksum_file(path: Path) -> str | None:
    """Checksum of a file's bytes through mmap, or None if the file is absent."""
    try:
        with open(path, "rb") as handle:
            if os.fstat(handle.fileno()).st_size == 0:
                return checksum_bytes(b"")  # mmap refuses empty files
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                return checksum_bytes(mapped)
    except FileNotFoundError:
        return None


def dtype_name(tensor: Any) -> str:
    """'float16' / 'bfloat16' / ... from a torch tensor's dtype."""
    return str(tensor.dtype).removeprefix("torch.")


def serialize_blob(*, k_sem: Any, v: Any, token_ids: Any, metadata: dict[str, str]) -> bytes:
    """The safetensors bytes of one chunk; tensors are moved to CPU, never cast."""
    from safetensors.torch import save

    tensors = {
        "k_sem": k_sem.detach().cpu().contiguous(),
        "v": v.detach().cpu().contiguous(),
        "token_ids": token_ids.detach().cpu().contiguous(),
    }
    return save(tensors, metadata=metadata)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable across power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StagedBlob:
    """A fully written, fsynced, locked temp file waiting to be published or discarded."""

    def __init__(self, final: Path, temp: Path, handle: Any) -> None:
        self.final = final
        self.temp = temp
        self._handle = handle

    def publish(self) -> None:
        """Atomically put the blob at its final name (replacing any earlier file)."""
        if self._handle is None:
            raise KvlibError(f"staged blob {self.final.name} was already published or discarded")
        try:
            os.replace(self.temp, self.final)
        except BaseException:
            self.discard()
            raise
        try:
            fsync_dir(self.final.parent)
        finally:
            self._close()

    def discard(self) -> None:
        """Drop the temp file unless it was published; safe to call more than once."""
        if self._handle is None:
            return  # settled: the temp name may even belong to another writer by now
        try:
            self.temp.unlink(missing_ok=True)
        finally:
            self._close()

    def _close(self) -> None:
        if self._handle is not None:
            self._handle.close()  # releases the flock
            self._handle = None


class BlobStore:
    """The `blobs/` folder: paths, staged writes, verified reads, orphan scans."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.mapped = MappedBlobs()

    def path_for(self, key: ChunkKey) -> Path:
        return self.root / key.fanout / f"{key.hex}{BLOB_SUFFIX}"

    def exists(self, key: ChunkKey) -> bool:
        return self.path_for(key).is_file()

    def file_checksum(self, key: ChunkKey) -> str | None:
        return checksum_file(self.path_for(key))

    def stage(self, key: ChunkKey, data: bytes, read_soon: bool = False) -> StagedBlob:
        """Write `data` to a locked temp file next to the blob's final name; with read_soon, also
        start reading it back into the page cache (the write itself bypassed it)."""
        final = self.path_for(key)
        self._ensure_dir(final.parent)
        for _ in range(_STAGE_ATTEMPTS):
            fd, name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX, dir=final.parent)
            handle = os.fdopen(fd, "wb")
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            if _still_linked(Path(name), handle):
                if not _write_direct(Path(name), data):
                    handle.write(data)
                    handle.truncate(len(data))  # a failed direct write may have left padding
                    handle.flush()
                    os.fsync(handle.fileno())
                elif read_soon and hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_WILLNEED)  # 0: to the end
                return StagedBlob(final, Path(name), handle)
            handle.close()
        raise KvlibError(f"could not stage blob {key.short}: its temp files kept disappearing")

    def read(self, key: ChunkKey, expected_checksum: str) -> BlobContents:
        """Load a blob after checking its bytes against the manifest's checksum."""
        contents, actual = self.try_read(key, expected_checksum)
        if actual is None:
            raise CorruptBlobError(f"blob {key.short} is missing from {self.path_for(key).parent} (run `kvlib gc`)")
        if contents is None:
            raise CorruptBlobError(f"blob {key.short} is corrupt: checksum {actual[:12]} != manifest {expected_checksum[:12]}")
        return contents

    def try_read(self, key: ChunkKey, expected_checksum: str) -> tuple[BlobContents | None, str | None]:
        """(contents or None, the file's checksum or None if it is missing): contents only when
        the bytes are the expected ones."""
        actual, parsed = self.mapped.read(self.path_for(key), expected_checksum, TENSOR_NAMES, key.short)
        if parsed is None:
            return None, actual
        tensors, metadata = parsed
        return BlobContents(tensors["k_sem"], tensors["v"], tensors["token_ids"], metadata), actual

    def warm(self, key: ChunkKey, checksum: str) -> None:
        """Map and verify a blob now, so that its next read finds the mapping held. A missing or
        corrupt blob is left for that read to report."""
        try:
            self.try_read(key, checksum)
        except CorruptBlobError:
            pass

    def publish(self, staged: StagedBlob, key: ChunkKey, checksum: str) -> None:
        """Make a staged blob the stored one (a remote tier also uploads it: store/tiered.py)."""
        staged.publish()

    def intact(self, key: ChunkKey, checksum: str) -> bool:
        """Whether the stored blob is whole and is the one the manifest describes."""
        return self.file_checksum(key) == checksum

    def status(self, key: ChunkKey, checksum: str) -> str:
        """'ok', 'missing' or 'mismatch', checked now (inspect shows it)."""
        actual = self.file_checksum(key)
        return "missing" if actual is None else ("ok" if actual == checksum else "mismatch")

    def orphan_candidates(self, rows: set[str]) -> list[str]:
        """Stored keys without a manifest row. Under the manifest's write lock no put is in
        flight here, so every one of them is garbage."""
        return sorted(key for key, _ in self.iter_blobs() if key not in rows)

    def stored_keys(self) -> set[str]:
        return {key for key, _ in self.iter_blobs()}

    def delete(self, key: ChunkKey) -> bool:
        """Remove a blob file; True if there was one."""
        self.mapped.forget(self.path_for(key))
        try:
            self.path_for(key).unlink()
            return True
        except FileNotFoundError:
            return False

    def iter_blobs(self) -> Iterator[tuple[str, Path]]:
        """(key hex, path) of every well-named blob file on disk."""
        for path in self.root.glob(f"??/*{BLOB_SUFFIX}"):
            name = path.name[: -len(BLOB_SUFFIX)]
            if len(name) == KEY_HEX_LEN and path.parent.name == name[:2]:
                yield name, path

    def remove_abandoned_temps(self) -> list[Path]:
        """Delete temp files no live writer holds (their writer crashed or was killed)."""
        removed = []
        for path in self.root.glob(f"??/{TEMP_PREFIX}*{TEMP_SUFFIX}"):
            if _unlink_if_unlocked(path):
                removed.append(path)
        return removed

    def _ensure_dir(self, folder: Path) -> None:
        if not folder.is_dir():
            folder.mkdir(parents=True, exist_ok=True)
            fsync_dir(folder.parent)  # the new fan-out folder itself must survive a crash


_ALIGN = 4096  # O_DIRECT wants buffer, length and offset aligned to the logical block size
_buffers = threading.local()  # one page-aligned buffer per writing thread, grown on demand


def _aligned_buffer(size: int) -> mmap.mmap:
    buf = getattr(_buffers, "buf", None)
    if buf is None or len(buf) < size:
        buf = _buffers.buf = mmap.mmap(-1, size)  # anonymous maps are page-aligned
    return buf


def _write_direct(path: Path, data: bytes) -> bool:
    """Write `data` to the file at `path` with O_DIRECT and fsync it; False if the filesystem
    refuses (then nothing usable was written and the caller writes buffered)."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag or not data:
        return False
    padded = -(-len(data) // _ALIGN) * _ALIGN
    buf = _aligned_buffer(padded)
    buf[: len(data)] = data
    buf[len(data) : padded] = bytes(padded - len(data))
    try:
        fd = os.open(path, os.O_WRONLY | flag)
    except OSError as exc:
        return _direct_refused(path, exc)
    try:
        view, done = memoryview(buf)[:padded], 0
        while done < padded:
            wrote = os.write(fd, view[done:])
            if wrote <= 0:
                return _direct_refused(path, OSError(f"short write of {wrote} bytes"))
            done += wrote
        os.ftruncate(fd, len(data))
        os.fsync(fd)
        return True
    except OSError as exc:
        return _direct_refused(path, exc)
    finally:
        os.close(fd)


_direct_warned = False


def _direct_refused(path: Path, exc: OSError) -> bool:
    """Say once per process that blob writes fall back to the page cache, and why."""
    global _direct_warned
    if not _direct_warned:
        _direct_warned = True
        warnings.warn(f"blob writes under {path.parent.parent} are buffered: O_DIRECT was refused ({exc})",
                      RuntimeWarning, stacklevel=3)
    return False


def _still_linked(path: Path, handle: Any) -> bool:
    """True if `path` is still the file we hold open (no gc unlinked it before our lock)."""
    try:
        return os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
    except FileNotFoundError:
        return False


def _unlink_if_unlocked(path: Path) -> bool:
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        return False  # its writer published or discarded it meanwhile
    with handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a live writer still holds it
        if not _still_linked(path, handle):
            return False
        path.unlink()
        return True
