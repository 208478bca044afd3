"""The inference worker: one thread, a bounded queue, concurrent requests batched into one forward pass."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from api.errors import RETRY_AFTER_BUSY, ApiError
from indexer.analyze import Analysis, analyze
from indexer.extractor import Extractor
from search.errors import InvalidImage
from search.settings import Settings

log = logging.getLogger(__name__)

AnalyzeFn = Callable[[Extractor, Sequence[tuple[str, bytes]], Settings], list[Analysis | InvalidImage]]


@dataclass
class BatchInfo:
    """How one request fared in the worker."""

    queue_ms: float
    inference_ms: float
    batch_images: int


@dataclass
class _Job:
    items: list[tuple[str, bytes]]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[tuple[list[Analysis | InvalidImage], BatchInfo]]
    submitted: float = field(default_factory=time.perf_counter)


_STOP = object()


class Overloaded(ApiError):
    def __init__(self, message: str) -> None:
        super().__init__(503, "overloaded", message, headers={"Retry-After": str(RETRY_AFTER_BUSY)})


class InferenceWorker:
    """Takes jobs (one request's images) from a bounded queue; gathers more while the batch has room and
    `max_wait_ms` has not passed; runs `analyze` once over all their images; resolves each request's future on
    its event loop. Submitting to a full queue fails at once (503), it never waits.
    """

    def __init__(self, extractor: Extractor, settings: Settings, analyze_fn: AnalyzeFn = analyze) -> None:
        self.extractor = extractor
        self.settings = settings
        #: the function run per batch; tests may wrap it (e.g. to hold the worker busy)
        self.analyze_fn = analyze_fn
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=settings.queue_size)
        self.max_batch = settings.max_batch
        self.max_wait = settings.max_wait_ms / 1000.0
        self.batches = 0  # forward passes run (for tests and metrics)
        self.images = 0
        self._carry: _Job | None = None
        self._thread = threading.Thread(target=self._run, name="nsfw-index-inference", daemon=True)
        self._stopping = False

    # -- the event-loop side --
    def start(self) -> None:
        self._thread.start()

    def check_capacity(self) -> None:
        """Raise Overloaded now if a request would not get a place (called before reading a large body)."""
        if self._stopping:
            raise Overloaded("the server is shutting down")
        if self.queue.full():
            raise Overloaded(
                f"the inference queue is full ({self.settings.queue_size} requests waiting); retry shortly"
            )

    async def analyze(self, items: list[tuple[str, bytes]]) -> tuple[list[Analysis | InvalidImage], BatchInfo]:
        """Queue one request's images and wait (without blocking the loop) for their analyses."""
        self.check_capacity()
        loop = asyncio.get_running_loop()
        job = _Job(items, loop, loop.create_future())
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise Overloaded(
                f"the inference queue is full ({self.settings.queue_size} requests waiting); retry shortly"
            ) from None
        return await job.future

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        deadline = time.monotonic() + timeout
        while self._thread.is_alive():
            try:
                self.queue.put(_STOP, timeout=0.1)
                break
            except queue.Full:
                if time.monotonic() > deadline:
                    break
        self._thread.join(max(0.0, deadline - time.monotonic()))

    # -- the worker thread --
    def _next_batch(self) -> list[_Job] | None:
        first = self._carry if self._carry is not None else self.queue.get()
        self._carry = None
        if first is _STOP:
            return None
        jobs = [first]
        n = len(first.items)
        deadline = time.perf_counter() + self.max_wait
        while n < self.max_batch:
            remaining = deadline - time.perf_counter()
            try:
                nxt = self.queue.get(timeout=remaining) if remaining > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            if nxt is _STOP or n + len(nxt.items) > self.max_batch:
                self._carry = nxt  # starts the next batch (or stops the worker after this one)
                break
            jobs.append(nxt)
            n += len(nxt.items)
        return jobs

    def _run(self) -> None:
        while True:
            jobs = self._next_batch()
            if jobs is None:
                break
            jobs = [j for j in jobs if not j.future.cancelled()]  # the client went away while it waited
            if not jobs:
                continue
            items = [it for j in jobs for it in j.items]
            start = time.perf_counter()
            try:
                results: list[Analysis | InvalidImage] = []
                for i in range(0, len(items), self.max_batch):  # one oversized request: several passes
                    results += self.analyze_fn(self.extractor, items[i : i + self.max_batch], self.settings)
            except BaseException as e:  # not an input problem (those are InvalidImage results): fail the batch
                log.exception("inference failed for a batch of %d images", len(items))
                for j in jobs:
                    _resolve(j, exc=e if isinstance(e, Exception) else RuntimeError(str(e)))
                if not isinstance(e, Exception):
                    raise
                continue
            took = (time.perf_counter() - start) * 1000
            self.batches += 1
            self.images += len(items)
            offset = 0
            for j in jobs:
                info = BatchInfo(queue_ms=(start - j.submitted) * 1000, inference_ms=took, batch_images=len(items))
                _resolve(j, result=(results[offset : offset + len(j.items)], info))
                offset += len(j.items)
        # fail whatever is still queued
        while True:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                break
            if job is not _STOP:
                _resolve(job, exc=Overloaded("the server is shutting down"))


def _resolve(job: _Job, *, result: Any = None, exc: BaseException | None = None) -> None:
    def settle() -> None:
        if job.future.done():
            return
        if exc is not None:
            job.future.set_exception(exc)
        else:
            job.future.set_result(result)

    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
        job.loop.call_soon_threadsafe(settle)
