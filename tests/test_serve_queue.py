"""The engine queue on its own: admission, 429 beyond --max-queue, a cancelled waiter frees its slot.

The jobs are plain callables that block on an event: the queue runs whatever it is given,
so no model is needed to test who gets in and when.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from kvlib.serve.queue import EngineWorker, Job, JobCancelled, QueueFull


def make_job(loop, gate: threading.Event, started: list):
    def run(state, job):
        started.append(job)
        gate.wait(10)
        return state

    return Job(kind="chat", run=run, loop=loop, future=loop.create_future())


async def wait_for_start(started: list, n: int) -> None:
    for _ in range(200):
        if len(started) >= n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{n} jobs never started")


def test_admission_queue_full_and_cancel():
    async def scenario():
        loop, gate, started = asyncio.get_running_loop(), threading.Event(), []
        worker = EngineWorker(lambda: "state", max_queue=1)
        await asyncio.to_thread(worker.start)
        running, waiting = make_job(loop, gate, started), make_job(loop, gate, started)
        worker.submit(running)
        await wait_for_start(started, 1)
        worker.submit(waiting)
        with pytest.raises(QueueFull) as full:
            worker.submit(make_job(loop, gate, started))
        assert full.value.retry_after_s >= 1
        worker.cancel(waiting)  # its client left while it waited
        with pytest.raises(JobCancelled):
            await waiting.future
        third = make_job(loop, gate, started)
        worker.submit(third)  # the slot the cancelled job held is free again
        gate.set()
        assert await running.future == "state" and await third.future == "state"
        assert waiting not in started, "a job cancelled while waiting never reaches the engine"
        await asyncio.to_thread(worker.stop)

    asyncio.run(scenario())


def test_max_queue_zero_still_admits_when_idle():
    async def scenario():
        loop, gate, started = asyncio.get_running_loop(), threading.Event(), []
        worker = EngineWorker(lambda: "state", max_queue=0)
        await asyncio.to_thread(worker.start)
        first = make_job(loop, gate, started)
        worker.submit(first)
        await wait_for_start(started, 1)
        with pytest.raises(QueueFull):
            worker.submit(make_job(loop, gate, started))
        gate.set()
        assert await first.future == "state"
        await asyncio.to_thread(worker.stop)

    asyncio.run(scenario())


def test_startup_error_is_raised_by_start():
    def broken():
        raise RuntimeError("no model here")

    worker = EngineWorker(broken, max_queue=1)
    with pytest.raises(RuntimeError, match="no model here"):
        worker.start()


def test_poke_runs_the_idle_work_without_a_job():
    """The library answers again after an outage: the worker stores what waited, though no request comes."""
    ran = threading.Event()

    class Waiting:  # idle work that is done after one call, as ServerState.idle() is once nothing waits
        def idle(self):
            ran.set()
            return False

    worker = EngineWorker(Waiting, max_queue=1)
    worker.start()
    try:
        assert not ran.wait(0.3), "with no job and no poke the worker sleeps"
        worker.poke()
        assert ran.wait(5), "poke must run the idle work"
    finally:
        worker.stop()
