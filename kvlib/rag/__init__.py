"""The RAG pipeline: ingest (corpus -> chunks -> KV -> library + index) and query
(question -> retrieve -> load KV -> compose -> generate)."""
