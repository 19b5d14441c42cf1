"""Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`.

Design facts:
- The first chunk carries the assistant role, as OpenAI's does; each text piece the
  engine emits becomes one chunk; the last choice chunk carries finish_reason, and, when
  `stream_options.include_usage` is set, a final chunk with empty choices carries usage.
  The `kvlib` object rides on the very last chunk.
- While the request waits for the engine, an SSE comment (`: waiting`) goes out every
  second. Clients ignore comments; the write is what tells us a client has gone (a
  failed send ends this generator), so a disconnected request leaves the queue within a
  second instead of when its turn comes.
- Whatever ends the generator (the client closing, a failed send, shutdown), `finally`
  cancels the job if it has not finished, which frees its slot.
"""

from __future__ import annotations

import asyncio
import json

from kvlib.errors import KvlibError
from kvlib.serve import schemas
from kvlib.serve.errors import ApiError, error_body, kvlib_error_body

HEARTBEAT_S = 1.0


def sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def stream_chat(plan, job, worker, request, request_id: str, created: int, t_arrival: float):
    def chunk(delta, **kw):
        return sse(schemas.chunk_body(request_id, plan.model, created, delta, **kw))

    try:
        yield chunk({"role": "assistant", "content": ""})
        async for piece in text_pieces(job):
            yield ": waiting\n\n" if piece is Heartbeat else chunk({"content": piece})
            if piece is not Heartbeat:  # resumed: the server has written the chunk (queue.py waits for it)
                job.first_sent.set()
        try:
            completion = job.future.result()
        except Exception as exc:  # an error after the 200 went out: an error event, then DONE
            yield sse(error_event(exc))
            yield "data: [DONE]\n\n"
            return
        plan.finish(completion, job, request.app.state.metrics, t_arrival)
        usage = schemas.usage_body(completion)
        kvlib_last = None if plan.include_usage else completion.kvlib
        yield chunk({}, finish_reason=completion.finish_reason, kvlib=kvlib_last)
        if plan.include_usage:
            yield sse(schemas.chunk_body(request_id, plan.model, created, {}, usage=usage, kvlib=completion.kvlib,
                                         choices=False))
        yield "data: [DONE]\n\n"
    finally:
        if not job.future.done():
            worker.cancel(job)
            plan.finish_abandoned(job, request.app.state.metrics, t_arrival)


async def text_pieces(job):
    """Yield text as the engine emits it, and heartbeat comments while none comes."""
    while True:
        getter = asyncio.ensure_future(job.events.get())
        done, _ = await asyncio.wait({getter, job.future}, timeout=HEARTBEAT_S,
                                     return_when=asyncio.FIRST_COMPLETED)
        if getter in done:
            yield getter.result()
            continue
        getter.cancel()
        if job.future.done():
            # results are posted to the loop after every piece, so all pieces are queued now
            while not job.events.empty():
                yield job.events.get_nowait()
            return
        yield Heartbeat


class Heartbeat:
    """Marker: an SSE comment goes out instead of a chunk."""


def error_event(exc: Exception) -> dict:
    if isinstance(exc, ApiError):
        return error_body(exc.status, exc.message, exc.code, exc.param)
    if isinstance(exc, KvlibError):
        return kvlib_error_body(exc)
    return error_body(500, f"{type(exc).__name__}: {exc}", "engine_error")
