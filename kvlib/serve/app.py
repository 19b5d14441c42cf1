"""The FastAPI app: routes, auth as a dependency, the engine queue, metrics.

`create_app(settings)` builds one app. Its lifespan loads the model on the engine thread
before uvicorn opens the port, so a server that accepts connections is ready to answer.
Routes validate and enqueue; the engine thread computes (queue.py, pipeline.py).
The lifespan also runs the background upload of the home's queue with a remote store
(store/sync_loop.py, every `--sync-interval` s) and stops it, then the engine, on shutdown.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from kvlib.serve import schemas
from kvlib.serve.auth import Caller, caller
from kvlib.serve.chat import ChatRequestPlan, plan_chat
from kvlib.serve.errors import ApiError, install_handlers
from kvlib.serve.metrics import Metrics
from kvlib.serve.middleware import Guard
from kvlib.serve.queue import EngineWorker, Job, JobCancelled, QueueFull
from kvlib.serve.settings import Settings
from kvlib.serve.streaming import stream_chat
from kvlib.store.tiered import queue_length

DISCONNECT_POLL_S = 0.25  # how soon a non-streaming request notices that its client left


class DocumentRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(min_length=1)
    name: str | None = Field(None, min_length=1, max_length=200)
    public: bool = False
    chunk_tokens: int = Field(256, ge=16, le=4096)


def create_app(settings: Settings, *, build=None) -> FastAPI:
    """build(settings) -> the engine thread's state; default worker.build_state."""
    from kvlib.serve.keys import KeyStore

    if build is None:
        from kvlib.serve.worker import build_state as build
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        from kvlib.serve.library_link import sync_loop_for

        worker = EngineWorker(lambda: build(settings), max_queue=settings.max_queue, metrics=metrics,
                              max_batch=settings.max_batch)
        await asyncio.to_thread(worker.start)
        app.state.worker = worker
        link = worker.state.link
        link.on_recover = worker.poke  # misses that waited through an outage are stored at once
        metrics.watch(link, lambda: queue_length(settings.home), lambda: worker.state.pipeline.prefix_hits.bytes)
        app.state.sync = await asyncio.to_thread(sync_loop_for, settings)
        try:
            yield
        finally:
            if app.state.sync is not None:
                await asyncio.to_thread(app.state.sync.stop)
            await asyncio.to_thread(worker.stop)
            app.state.keys.close()

    app = FastAPI(title="kvlib", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.settings, app.state.metrics, app.state.keys = settings, metrics, KeyStore(settings.home)
    install_handlers(app)
    add_routes(app)
    app.add_middleware(Guard, max_body_bytes=settings.max_body_bytes, metrics=metrics)
    return app


def add_routes(app: FastAPI) -> None:
    app.post("/v1/chat/completions")(chat_completions)
    app.get("/v1/models")(list_models)
    app.post("/v1/documents")(add_document)
    app.get("/healthz")(healthz)
    app.get("/metrics")(metrics_text)


async def chat_completions(body: schemas.ChatCompletionRequest, request: Request, who: Caller = Depends(caller)):
    t_arrival = time.perf_counter()
    worker: EngineWorker = request.app.state.worker
    plan = await plan_chat(body, who, worker.state.pipeline, request.app.state.settings)
    job = Job(kind="chat", run=plan.run, begin=plan.begin, loop=asyncio.get_running_loop(),
              future=asyncio.get_running_loop().create_future(), events=asyncio.Queue() if body.stream else None)
    submit(worker, job, request.app.state.metrics)
    request_id, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", schemas.now()
    if body.stream:
        events = stream_chat(plan, job, worker, request, request_id, created, t_arrival)
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        completion = await wait_for(job, worker, request)
    except ApiError:
        if job.cancelled():
            plan.finish_abandoned(job, request.app.state.metrics, t_arrival)
        raise
    plan.finish(completion, job, request.app.state.metrics, t_arrival)
    return JSONResponse(schemas.completion_body(request_id, plan.model, created, completion))


def submit(worker: EngineWorker, job: Job, metrics: Metrics) -> None:
    try:
        worker.submit(job)
    except QueueFull as exc:
        metrics.rejected.inc()
        raise ApiError(429, f"the server is busy: {worker.max_queue} requests are already waiting; "
                       f"retry in {exc.retry_after_s} s", "queue_full",
                       headers={"Retry-After": str(exc.retry_after_s)}) from None


async def wait_for(job: Job, worker: EngineWorker, request: Request):
    """The job's result; if the client disconnects first, the job is cancelled."""
    while True:
        done, _ = await asyncio.wait({job.future}, timeout=DISCONNECT_POLL_S)
        if done:
            try:
                return job.future.result()
            except JobCancelled:
                raise ApiError(499, "request cancelled", "cancelled") from None
        if await request.is_disconnected():
            worker.cancel(job)
            raise ApiError(499, "client disconnected", "cancelled")


async def list_models(request: Request, who: Caller = Depends(caller)):
    pipeline = request.app.state.worker.state.pipeline
    return {"object": "list", "data": [{"id": pipeline.model_id, "object": "model", "created": 0,
                                        "owned_by": "kvlib", "max_model_len": pipeline.context_length}]}


async def add_document(body: DocumentRequest, request: Request, who: Caller = Depends(caller)):
    if who.read_only:
        raise ApiError(403, "anonymous callers are read-only: send an API key to add documents", "read_only")
    if body.public and not who.admin:
        raise ApiError(403, "only an admin key may add public documents", "admin_required", "public")
    public = body.public or who.tenant == "public"
    worker = request.app.state.worker
    link = worker.state.link
    if link.degraded:
        raise ApiError(503, f"documents cannot be added while the library's manifest is unreachable ({link.reason}); "
                       "chat completions are answered by full recompute until it is back", "manifest_unavailable")

    def run(state, job):
        return state.ingest_text(who.tenant, public, body.name, body.text, body.chunk_tokens)

    job = Job(kind="document", run=run, loop=asyncio.get_running_loop(),
              future=asyncio.get_running_loop().create_future())
    submit(worker, job, request.app.state.metrics)
    return await wait_for(job, worker, request)


async def healthz(request: Request):
    """Always 200 once started: `status` is "degraded" (with the reason) while the manifest is unreachable."""
    worker, sync, settings = request.app.state.worker, request.app.state.sync, request.app.state.settings
    link = worker.state.link
    body = {"status": "degraded" if link.degraded else "ok", "model": worker.state.pipeline.model_id,
            "spec": settings.spec, "waiting": worker.waiting, "running": worker.running,
            "pending_stores": worker.state.pipeline.pending_stores,
            "prefix_cache_tokens": worker.state.pipeline.prefix_hits.capacity_tokens,
            "upload_queue": await run_in_threadpool(queue_length, settings.home),
            "sync_error": None if sync is None else sync.last_error}
    if link.degraded:
        body["degraded_reason"] = link.reason
    return body


async def metrics_text(request: Request):
    metrics: Metrics = request.app.state.metrics
    return Response(await run_in_threadpool(metrics.render), media_type=metrics.content_type)
