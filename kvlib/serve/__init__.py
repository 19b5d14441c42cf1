"""`kvlib serve`: an OpenAI-compatible HTTP server over one warm engine and library.

Design facts:
- One app object built by `app.create_app(settings)`; auth is a dependency; every error is
  an OpenAI error object (errors.py).
- The engine is touched by exactly one worker thread (queue.py), which owns the model, the
  library and the index; HTTP handlers only validate, enqueue and stream.
- How a completion is computed lives in one module, pipeline.py. Nothing else in this
  package knows whether the prompt was recomputed or served from the library.
"""
