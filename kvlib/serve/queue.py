"""The engine's queue: one worker thread owns the model, the library and the index.

Design facts:
- The engine is not thread-safe and the CPU has two cores, so exactly one thread runs
  engine work; HTTP handlers only enqueue and await. Everything the worker uses (the
  engine, SQLite connections, FAISS) is opened on that thread, since a sqlite3
  connection may only be used by the thread that opened it.
- Admission is bounded: at most `max_queue` jobs wait beside those running (`max_batch`). One
  more is refused at once with QueueFull (HTTP 429 + Retry-After), never queued to hang.
- A waiting job that is cancelled (its client went away) leaves the queue at once, so
  it frees its slot without ever reaching the engine; a running one is told through
  `Job.cancelled`, which the pipeline polls between decode steps.
- `_take_batch` hands the worker up to max_batch (`--max-batch`) chat jobs that wait together. Each is
  begun up to its prefill (prompt laid out, composed) in turn; then their prefills run, the
  small ones together in one pass over the weights (Pipeline.start), and each picks its first
  token; then what they write to the library (new documents, use counts) is written; then all
  are decoded together, one batched forward per step (the engine's generate.advance), and each
  is answered as soon as its own stream ends; a lone job runs the same way with a batch of one.
- Continuous batching: between decode steps, chat jobs that wait are begun the same way and
  join the batch in the slots that finished answers left, so a slot never idles while the
  rest of a batch decodes (a document job, which runs alone, waits for the batch to drain).
- A job that fails to begin answers with its error and the others go on (a prompt too long
  for the model's window fails in its own begin); a failed start (the prefills of the jobs
  begun together, e.g. out of memory) or decode step answers every job in it with the error.
- The library-size gauge is refreshed at most once a second while a batch decodes (it is a
  query on the manifest), and a failed refresh is logged, never an answer's error.
- After the first tokens, before the batch's library writes and decode, the worker waits (at
  most FIRST_CHUNK_WAIT_S for each) until those first text chunks have gone out: on two cores,
  the event loop that sends them would otherwise wait for a core behind the engine's threads,
  and the clients would see their first tokens that much later.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger("kvlib.serve")
MAX_BATCH = 8  # default for chat jobs decoded together: the weights are read once per step for all of them
FIRST_CHUNK_WAIT_S = 0.02  # the longest the worker waits for a job's first chunk to go out


class QueueFull(Exception):
    def __init__(self, retry_after_s: int):
        super().__init__(f"the engine queue is full; retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


class JobCancelled(Exception):
    """The job was cancelled before the engine started it."""


@dataclass(eq=False)
class Job:
    kind: str  # "chat" or "document": only chat jobs may share a batch
    run: Callable[[Any, "Job"], Any]  # run(worker_state, job) on the worker thread
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    events: asyncio.Queue | None = None  # streamed text pieces, for a streaming request
    begin: Callable[..., Any] | None = None  # chat: begin(worker_state, job, defer=True) -> pipeline.Pending
    enqueued_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None
    emitted: bool = False  # a text piece went to the loop
    first_sent: threading.Event = field(default_factory=threading.Event)  # the loop sent the first one
    _cancel: threading.Event = field(default_factory=threading.Event)

    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def emit(self, item) -> None:
        """Hand a streamed piece to the request's event loop (called on the worker thread)."""
        if self.events is not None:
            self.emitted = True
            self._post(self.events.put_nowait, item)

    def _resolve(self, value=None, error: BaseException | None = None) -> None:
        def settle():
            if not self.future.done():
                self.future.set_exception(error) if error is not None else self.future.set_result(value)
        self._post(settle)

    def _post(self, fn, *args) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the server's loop has closed (shutdown): nobody is listening
            pass


class EngineWorker:
    """Runs jobs one batch at a time on its own thread; `build()` runs there first."""

    def __init__(self, build: Callable[[], Any], *, max_queue: int, metrics=None, max_batch: int = MAX_BATCH):
        self.build, self.max_queue, self.metrics, self.max_batch = build, max_queue, metrics, max(1, max_batch)
        self.state = None  # what build() returned, once ready
        self._waiting: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._running: list[Job] = []
        self._stopping = False
        self._poked = False  # idle work asked for though no job came (poke)
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._service_s = 2.0  # moving average of a job's engine time, for Retry-After
        self._gauged_at = 0.0  # when the metrics' library gauge was last refreshed (monotonic)
        self._thread = threading.Thread(target=self._main, name="kvlib-engine", daemon=True)

    # -- lifecycle (called from the server's thread) ---------------------------------

    def start(self) -> None:
        """Start the thread and wait until build() has finished (the model is loaded)."""
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            raise self._startup_error

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            for job in list(self._waiting) + self._running:
                job._cancel.set()
            self._cond.notify_all()
        self._thread.join(timeout)

    # -- admission (called from the event loop) --------------------------------------

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    def submit(self, job: Job) -> None:
        with self._cond:
            # a job that will start at once (the engine idle, nobody ahead) waits for nothing
            idle = not self._running and not self._waiting
            if not idle and len(self._waiting) >= self.max_queue:
                raise QueueFull(self.retry_after())
            self._waiting.append(job)
            self._cond.notify()
        self._report_depth()

    def poke(self) -> None:
        """Run the idle work soon though no job comes (any thread): the library answers again,
        and the misses that waited through the outage can be stored."""
        with self._cond:
            self._poked = True
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """The client went away: drop the job if it waits, else ask the engine to stop it."""
        job._cancel.set()
        with self._cond:
            try:
                self._waiting.remove(job)
            except ValueError:
                return
        job._resolve(error=JobCancelled())
        self._report_depth()

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the queue ahead times a job's recent engine time."""
        return max(1, min(60, math.ceil(self._service_s * (len(self._waiting) + 1) / self.max_batch)))

    # -- the worker thread ------------------------------------------------------------

    def _main(self) -> None:
        try:
            self.state = self.build()
            if self.metrics is not None:
                self.metrics.after_job(self.state)
        except BaseException as exc:  # reported by start(); the thread has nothing left to do
            self._startup_error = exc
            self._ready.set()
            return
        self._ready.set()
        while (batch := self._take_batch()) is not None:
            if batch and batch[0].begin is not None:
                self._run_chat(batch)
            else:
                for job in batch:
                    self._run(job)
            with self._cond:
                self._running = []
                idle = not self._waiting
            self._report_depth()
            if idle:  # work that must not delay a waiting request (storing misses)
                self._idle_work()
        close = getattr(self.state, "close", None)
        if close:
            close()

    def _take_batch(self) -> list[Job] | None:
        """Block for the next job; take up to max_batch chat jobs together. None = stop;
        [] = no job, but poked: the idle work runs."""
        with self._cond:
            while not self._waiting and not self._stopping and not self._poked:
                self._cond.wait()
            if self._stopping:
                return None
            self._poked = False
            if not self._waiting:
                return []
            batch = [self._waiting.popleft()]
            while batch[0].kind == "chat" and len(batch) < self.max_batch and self._waiting \
                    and self._waiting[0].kind == "chat":
                batch.append(self._waiting.popleft())
            self._running = list(batch)  # a copy: jobs leave it while the batch is begun
        self._report_depth()
        return batch

    def _run(self, job: Job) -> None:
        if job.cancelled():
            job._resolve(error=JobCancelled())
            return
        job.started_at = time.perf_counter()
        try:
            value = job.run(self.state, job)
        except BaseException as exc:  # the request answers with it; the worker goes on
            if not isinstance(exc, Exception):
                raise
            job._resolve(error=exc)
        else:
            job._resolve(value)
        finally:
            spent = time.perf_counter() - job.started_at
            self._service_s = 0.8 * self._service_s + 0.2 * spent
            if self.metrics is not None:
                self.metrics.after_job(self.state)

    def _run_chat(self, jobs: list[Job]) -> None:
        """Begin the chat jobs, decode them together, answer each when its stream ends; between
        decode steps, jobs that wait join the batch in the slots the finished ones left
        (continuous batching), until no job is left under way."""
        live: dict[Job, Any] = {}  # job -> pipeline.Pending
        self._begin(jobs, live)
        try:
            while live:
                going = {id(p) for p in self.state.pipeline.step(list(live.values()))}
                done = [j for j in live if id(live[j]) not in going]
                for job in done:
                    self._finish(job, live.pop(job))
                if done:
                    self._after_jobs()
                more = self._take_more(self.max_batch - len(live))
                if more:
                    self._begin(more, live)
        except Exception as exc:  # a failed decode step: every answer under way answers with it
            for job, pending in live.items():
                job._resolve(error=exc)
                pending.release()
        finally:
            self._after_jobs(force=True)

    def _after_jobs(self, force: bool = False) -> None:
        """The metrics that follow answered jobs (the library's bytes): at most once a second
        unless forced; a failure is logged, never raised into the answers under way."""
        now = time.monotonic()
        if self.metrics is None or (not force and now - self._gauged_at < 1.0):
            return
        self._gauged_at = now
        try:
            self.metrics.after_job(self.state)
        except Exception:
            log.exception("refreshing the library gauge failed")

    def _begin(self, jobs: list[Job], live: dict) -> None:
        """Begin jobs up to their prefills, run the prefills (the small ones in one pass), let the
        first chunks out, then write what they store; the begun ones join `live`. A job that fails
        to begin answers with its error and the others go on."""
        pipeline, begun = self.state.pipeline, {}
        for job in list(jobs):  # _leave edits the running list, which may be the caller's
            if job.cancelled():
                job._resolve(error=JobCancelled())
                self._leave(job)
                continue
            job.started_at = time.perf_counter()
            try:
                begun[job] = job.begin(self.state, job, defer=True)
            except Exception as exc:
                job._resolve(error=exc)
                self._leave(job)
        try:
            pipeline.start(list(begun.values()))  # their prefills, the small ones in one pass
        except Exception as exc:
            for job, pending in begun.items():
                job._resolve(error=exc)
                pending.release()
                self._leave(job)
            return
        for job in begun:
            let_first_chunk_out(job)
        for pending in begun.values():  # stores and use counts: after every first token of these
            try:
                pipeline.after_first_token(pending)
            except Exception:  # a failed store loses a cache entry, never an answer under way
                log.exception("storing a request's new documents failed")
        live.update(begun)

    def _finish(self, job: Job, pending) -> None:
        try:
            job._resolve(self.state.pipeline.finish(pending))
        except Exception as exc:  # this answer fails; the others go on
            job._resolve(error=exc)
        finally:
            pending.release()
            self._service_s = 0.8 * self._service_s + 0.2 * (time.perf_counter() - job.started_at)
            self._leave(job)

    def _take_more(self, room: int) -> list[Job]:
        """Up to `room` chat jobs from the head of the queue, to join the batch under way (none when
        a document job is next: it runs alone, once the batch is done)."""
        if room <= 0 or not self._waiting:
            return []
        with self._cond:
            more = []
            while len(more) < room and self._waiting and self._waiting[0].kind == "chat" and not self._stopping:
                more.append(self._waiting.popleft())
            self._running.extend(more)
        if more:
            self._report_depth()
        return more

    def _leave(self, job: Job) -> None:
        with self._cond:
            if job in self._running:
                self._running.remove(job)
        self._report_depth()

    def _idle_work(self) -> None:
        """One piece of idle work at a time (state.idle() -> False when done), while nobody waits."""
        work = getattr(self.state, "idle", None)
        try:
            while work is not None and not self._waiting and not self._stopping and work():
                pass
        except Exception:  # a failed store loses a cache entry, never the server
            log.exception("idle work failed")

    def _report_depth(self) -> None:
        if self.metrics is not None:
            self.metrics.set_queue(len(self._waiting), len(self._running))


def let_first_chunk_out(job: Job, limit_s: float = FIRST_CHUNK_WAIT_S) -> None:
    """Wait until the loop has sent the job's first text chunk, if it emitted one, at most limit_s."""
    if job.emitted:
        job.first_sent.wait(limit_s)
