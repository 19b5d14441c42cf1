"""Shared builders for the store tests: tiny seeded chunks and a writer script for subprocesses."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_FP = "test-model-fp"
CONTEXT_ID = "bos"
# Tiny stand-in shapes: 2 layers, 2 KV heads, head_dim 8 keep a blob around 1-2 KB.
LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 8


def make_chunk(seed: int, tokens: int = 6, dtype: torch.dtype = torch.float16, value_seed: int | None = None):
    """(token_ids, k_sem, v) for one chunk; the ids follow `seed`, the values `value_seed` (default `seed`)."""
    torch.manual_seed(seed)
    token_ids = torch.randint(0, 50_000, (tokens,), dtype=torch.int64)
    torch.manual_seed(seed if value_seed is None else value_seed)
    k_sem = torch.randn(LAYERS, KV_HEADS, tokens, HEAD_DIM).to(dtype)
    v = torch.randn(LAYERS, KV_HEADS, tokens, HEAD_DIM).to(dtype)
    return token_ids, k_sem, v


def put_chunk(library, seed: int, *, tenant: str = "public", public: bool = True, **kwargs):
    """Put the chunk built from `seed` and return the PutResult."""
    token_ids, k_sem, v = make_chunk(seed, **kwargs)
    return library.put(
        tenant=tenant, public=public, model_fp=MODEL_FP, context_id=CONTEXT_ID,
        token_ids=token_ids, k_sem=k_sem, v=v, text_preview=f"chunk {seed}",
    )


def blob_files(home: Path) -> list[Path]:
    return sorted((home / "blobs").glob("??/*.safetensors"))


def temp_files(home: Path) -> list[Path]:
    return sorted((home / "blobs").glob("??/.tmp-*"))


# Run as `python writer.py HOME GO_FILE VALUE_OFFSET TOKENS SEED...`: waits for
# GO_FILE (so concurrent writers start together), then puts one public chunk per
# seed, printing each key as it lands. VALUE_OFFSET changes the tensor values but
# not the token ids, i.e. the same keys with different bytes.
WRITER_SCRIPT = """
import sys, time
from pathlib import Path
from kvlib.store import Library
from store_helpers import MODEL_FP, CONTEXT_ID, make_chunk

home, go, offset, tokens = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
while not go.exists():
    time.sleep(0.01)
with Library(home) as library:
    for seed in map(int, sys.argv[5:]):
        ids, k, v = make_chunk(seed, tokens=tokens, value_seed=seed + offset)
        result = library.put(tenant="public", public=True, model_fp=MODEL_FP, context_id=CONTEXT_ID,
                             token_ids=ids, k_sem=k, v=v)
        print(result.key.hex, flush=True)
"""


def writer_command(tmp_path: Path) -> list[str]:
    """The interpreter and script path for a writer subprocess."""
    script = tmp_path / "writer.py"
    script.write_text(WRITER_SCRIPT)
    return [sys.executable, str(script)]


def writer_env() -> dict[str, str]:
    """Environment in which the writer can import kvlib and these helpers."""
    paths = [str(REPO_ROOT), str(REPO_ROOT / "tests"), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def flip_bytes(path, offset_from_end: int = 40) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) - offset_from_end, len(data) - offset_from_end + 4):
        data[i] ^= 0xFF  # inside the tensor payload, so the header still parses
    path.write_bytes(bytes(data))
