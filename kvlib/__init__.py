"""kvlib: a content-addressed library of a model's reading of documents.

Chunks are encoded once; their keys are stored before rotary position embedding
("semantic" K) with their values. At query time they are rotated to the positions
they take in the prompt, composed with the live question, and repaired where
they meet new neighbours.
"""

__version__ = "0.1.0"

from kvlib.memory import cap_onednn_caches as _cap_onednn_caches
from kvlib.memory import tune_malloc as _tune_malloc

_tune_malloc()  # before the engine allocates: kvlib/memory.py says why
_cap_onednn_caches()  # before oneDNN first runs: the same
