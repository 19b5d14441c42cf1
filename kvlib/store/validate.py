"""Validation of what callers hand the library: one clear InputError line per bad value."""

from __future__ import annotations

import json
import math
from typing import Any

from kvlib.errors import InputError
from kvlib.store.blobs import SUPPORTED_DTYPES, dtype_name
from kvlib.store.keys import normalize_token_ids


def check_text(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise InputError(f"{name} must be a non-empty string, got {value!r}")


def check_drift(score: Any) -> None:
    if score is not None and (isinstance(score, bool) or not math.isfinite(float(score))):
        raise InputError(f"drift score must be a finite number or None, got {score!r}")


def to_json(value: Any, what: str) -> str:
    try:
        return json.dumps(value, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{what} must be JSON-serializable: {exc}") from exc


def check_kv(k_sem: Any, v: Any, token_ids: Any) -> Any:
    """Validate the tensors of one chunk; returns the token ids as a 1-D int tensor."""
    import torch

    if not isinstance(k_sem, torch.Tensor) or not isinstance(v, torch.Tensor):
        raise InputError("k_sem and v must be torch tensors")
    if k_sem.dim() != 4 or v.dim() != 4 or k_sem.shape[:3] != v.shape[:3]:
        raise InputError(
            f"k_sem and v must be [layers, kv_heads, tokens, head_dim] with matching leading dims, "
            f"got {list(k_sem.shape)} and {list(v.shape)}"
        )
    if dtype_name(k_sem) not in SUPPORTED_DTYPES or k_sem.dtype != v.dtype:
        raise InputError(f"k_sem and v must both be float16 or bfloat16, got {k_sem.dtype} and {v.dtype}")
    ids = normalize_token_ids(token_ids)
    if len(ids) != k_sem.shape[2]:
        raise InputError(f"{len(ids)} token ids for a chunk of {k_sem.shape[2]} tokens")
    if isinstance(token_ids, torch.Tensor) and token_ids.dtype in (torch.int32, torch.int64):
        return token_ids.reshape(-1)
    return torch.tensor(ids, dtype=torch.int64)
