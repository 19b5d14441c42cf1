"""Wall-clock time by stage inside the engine, for the hot-path profile; free when off.

Design facts:
- `stage(name)` marks a span of engine code. With no recording active it returns one
  shared null context (a dictionary lookup and a call: well under a microsecond), so the
  marks stay in the hot path; torch.profiler's record_function costs tens of microseconds
  a mark on this CPU, which at ~150 marks a request would be a measurable share of it.
- `recording()` collects seconds per stage name (summed over calls) for the code run inside
  it, synchronising the GPU at each mark so the times are the work's, not the launch's.
- Stages may nest; a nested stage's time is also inside its parent's.
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext

_NULL = nullcontext()
_active: dict | None = None
_device = None


class _Span:
    __slots__ = ("name", "t0")

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        _sync()
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        _sync()
        if _active is not None:
            _active[self.name] = _active.get(self.name, 0.0) + time.perf_counter() - self.t0


def _sync() -> None:
    if _device is not None and _device.type == "cuda":
        import torch

        torch.cuda.synchronize(_device)


def stage(name: str):
    return _NULL if _active is None else _Span(name)


def active() -> bool:
    """Whether a recording is on (code that times itself, such as layer_loop.c, then reports)."""
    return _active is not None


def add(name: str, seconds: float) -> None:
    """Add time measured elsewhere (inside a C call) to a stage of the recording on, if any."""
    if _active is not None:
        _active[name] = _active.get(name, 0.0) + seconds


@contextmanager
def recording(device=None):
    """Collect {stage: seconds} for the code run inside; yields the dict."""
    global _active, _device
    previous, _active, _device = _active, {}, device
    try:
        yield _active
    finally:
        _active, _device = previous, None
