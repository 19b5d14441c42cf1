"""The engine: model loading, kvlib's own forward, rotation, composition, repair and generation.

The door: `Engine.answer(spec, chunks, question) -> Generation` (session.py) is the one
pipeline from cached chunk KV to an answer: compose, compute misses in context, repair,
prefill, decode, with the TTFT split and the token accounting. `Engine.teacher_force` is the
second entry point (the bench's quality pass, on the context an answer left behind).
A `ModeSpec` (spec.py, parsed by `parse_mode` and nowhere else) says what a mode is.

What may call what:
- callers (rag/, bench/, serve/, cli/) use Engine, ModeSpec, ChunkKV/PrefixHit and the
  encode entry points; they never build caches or call layers themselves;
- session.py -> compose.py, repair.py, generate.py; repair.py and drift.py -> forward.py's
  `run_layers`/`project_kv`; forward.py -> attention.py (masks, kernels), cache.py, rope.py;
- only model.py and forward.py touch transformers' modules.

The engine knows nothing about the library or retrieval: it maps token ids to pre-RoPE KV,
logits and answers.
"""
