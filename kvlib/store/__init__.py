"""The library: content-addressed chunk KV on disk, one safetensors blob per chunk.

The store knows nothing about models or tokenizers: it keeps tensors under keys
derived from (model fingerprint, encoding context, token ids, tenant salt) and
answers who may see what. `Library` is the facade; the other modules are its rooms.
"""

from kvlib.store.capacity import BudgetReport, BudgetWarning, GcReport
from kvlib.store.keys import ChunkKey
from kvlib.store.library import Library, PutResult, StoredChunk
from kvlib.store.reports import Problem

__all__ = [
    "BudgetReport", "BudgetWarning", "ChunkKey", "GcReport", "Library", "Problem", "PutResult", "StoredChunk",
]
