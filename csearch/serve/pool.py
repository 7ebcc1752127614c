"""The worker pool: one thread per engine (thread confinement: no model has to be thread-safe),
first-in first-out, and admission control that answers 503 at once when it is full."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from .errors import ApiError


class Slot:
    """A place in the pool (running or queued). Freed when its job ends, or on exit if it never
    got one, so a client that disconnects cannot leak it."""

    def __init__(self, pool: WorkerPool):
        self._pool, self._handed_over, self._released = pool, False, False
        self._lock = threading.Lock()

    def hand_over(self, future: Future) -> None:
        self._handed_over = True
        future.add_done_callback(lambda _: self.release())

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        self._pool._release()

    def __enter__(self) -> Slot:
        return self

    def __exit__(self, *exc) -> None:
        if not self._handed_over:
            self.release()


class WorkerPool:
    """`len(engines)` threads, one engine each, fed first-in first-out; at most
    `workers + queue_limit` slots, the next request is refused at once (503)."""

    def __init__(self, engines: list, queue_limit: int):
        self.workers = len(engines)
        self.capacity = self.workers + int(queue_limit)
        self._idle: queue.SimpleQueue = queue.SimpleQueue()
        for engine in engines:
            self._idle.put(engine)
        self.engines = list(engines)
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="csearch-worker")
        self._lock = threading.Lock()
        self.in_use = 0
        self.rejected = 0

    def admit(self) -> Slot:
        with self._lock:
            if self.in_use >= self.capacity:
                self.rejected += 1
                raise ApiError(
                    503,
                    "overloaded",
                    f"server busy: {self.capacity} requests running or queued; retry shortly",
                    {"Retry-After": "1"},
                )
            self.in_use += 1
        return Slot(self)

    def _release(self) -> None:
        with self._lock:
            self.in_use -= 1

    async def run(self, slot: Slot, job: Callable, *args):
        """`job(engine, *args)` on a worker; returns (its result, ms spent waiting in the queue)."""
        queued = time.perf_counter()

        def on_worker():
            waited_ms = (time.perf_counter() - queued) * 1e3
            engine = self._idle.get_nowait()  # never empty: as many engines as threads
            try:
                return job(engine, *args), waited_ms
            finally:
                self._idle.put(engine)

        future = self._executor.submit(on_worker)
        slot.hand_over(future)
        return await asyncio.wrap_future(future)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
