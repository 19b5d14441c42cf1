"""Prometheus metrics, named `kvlib_<thing>_<unit>` as vLLM names its own.

Design facts:
- Each app has its own CollectorRegistry, so two apps in one process never collide.
- Prompt tokens are counted by source: `cached` (KV served from the library or the prefix cache), `computed`
  (prefilled in the request) and `recomputed` (cached, then recomputed by repair). Their
  sum is the prompt tokens; cached / sum is the reuse share the load benchmark reports.
- Library bytes are refreshed by the engine thread after each job (the thread that owns
  the library's SQLite connection), not at scrape time; while the manifest is unreachable
  the gauge keeps its last value.
- `kvlib_degraded` (1 while the manifest is unreachable and requests are answered by full
  recompute), `kvlib_upload_queue_blobs` and `kvlib_prefix_cache_bytes` are read at scrape time (`watch`).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# TTFT on this CPU spans ~50 ms (a cached prompt) to tens of seconds (a long prompt behind a queue)
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
TOKEN_SOURCES = ("cached", "computed", "recomputed")


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("kvlib_http_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=r)
        self.ttft = Histogram("kvlib_time_to_first_token_seconds",
                              "Request arrival to first token, queue wait included", buckets=TTFT_BUCKETS, registry=r)
        self.e2e = Histogram("kvlib_request_duration_seconds", "Chat request arrival to last token",
                             buckets=TTFT_BUCKETS, registry=r)
        self.prompt_tokens = Counter("kvlib_prompt_tokens", "Prompt tokens by where their KV came from",
                                     ["source"], registry=r)
        self.completion_tokens = Counter("kvlib_completion_tokens", "Tokens generated", registry=r)
        self.finished = Counter("kvlib_chat_completions", "Chat completions by finish reason",
                                ["finish_reason"], registry=r)
        self.queue = Gauge("kvlib_queue_depth_requests", "Requests waiting for the engine", registry=r)
        self.running = Gauge("kvlib_running_requests", "Requests the engine is working on", registry=r)
        self.rejected = Counter("kvlib_rejected_requests", "Requests refused because the queue was full",
                                registry=r)
        self.library_bytes = Gauge("kvlib_library_bytes", "Bytes of KV stored in the library", registry=r)
        self.degraded = Gauge("kvlib_degraded", "1 while the manifest is unreachable (answers by full recompute)",
                              registry=r)
        self.upload_queue = Gauge("kvlib_upload_queue_blobs", "Blobs queued for the remote store", registry=r)
        self.prefix_bytes = Gauge("kvlib_prefix_cache_bytes", "Bytes of conversations' KV kept for their next turns",
                                  registry=r)
        for source in TOKEN_SOURCES:
            self.prompt_tokens.labels(source)

    def set_queue(self, waiting: int, running: int) -> None:
        self.queue.set(waiting)
        self.running.set(running)

    def watch(self, link, upload_queue, prefix_bytes=lambda: 0) -> None:
        """Read the degraded flag (a LibraryLink), upload_queue() and prefix_bytes() at each scrape."""
        self.degraded.set_function(lambda: float(link.degraded))
        self.upload_queue.set_function(lambda: float(upload_queue()))
        self.prefix_bytes.set_function(lambda: float(prefix_bytes()))

    def after_job(self, state) -> None:
        stored = state.library_bytes()
        if stored is not None:  # None: the manifest is unreachable
            self.library_bytes.set(stored)

    def observe_completion(self, completion, ttft_s: float, duration_s: float) -> None:
        self.ttft.observe(ttft_s)
        self.e2e.observe(duration_s)
        self.prompt_tokens.labels("cached").inc(completion.cached_tokens)
        self.prompt_tokens.labels("computed").inc(completion.computed_tokens)
        self.prompt_tokens.labels("recomputed").inc(completion.recomputed_tokens)
        self.completion_tokens.inc(len(completion.token_ids))
        self.finished.labels(completion.finish_reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
