"""The engine: model loading, kvlib's own forward, rotation, composition and generation.

The engine knows nothing about the library or retrieval: it maps token ids to
pre-RoPE KV and logits.
"""
