"""Retrieval: reading a corpus, chunking by model tokens, sentence embeddings, the FAISS index.

- sources.py: files and folders -> SourceDoc, or Skipped with a reason.
- chunker.py: text -> TextChunk, each tokenized on its own, boundaries stable under edits.
- embed.py: Embedder over the bundled all-MiniLM-L6-v2 (sentence-transformers, offline).
- index.py: VectorIndex, FAISS inner product plus a SQLite sidecar, filtered by tenant.

Nothing here imports torch, sentence-transformers or faiss at import time.
"""
