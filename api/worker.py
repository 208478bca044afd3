"""The inference worker: uploads prepared in a bounded thread pool under a pixel budget, then one inference thread
with a bounded queue batching concurrent requests into one forward pass."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import heapq
import itertools
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from api.errors import RETRY_AFTER_BUSY, ApiError
from api.limits import PixelBudget
from indexer.analyze import Analysis, analyze_prepared
from indexer.decode import decode_cost
from indexer.extractor import Extractor
from indexer.prepare import Prepared, decode_side, prepare_or_error
from search.errors import InvalidImage
from search.settings import Settings

log = logging.getLogger(__name__)

#: One forward pass over prepared images (refusals pass through in place).
AnalyzeFn = Callable[[Extractor, Sequence[Prepared | InvalidImage], Settings], list[Analysis | InvalidImage]]
#: Prepares one upload (name, bytes): decode, hashes, transform.
PrepareFn = Callable[[str, bytes], Prepared | InvalidImage]

#: An upload whose decode holds at most this many pixels takes the small lane: it never waits behind large ones.
SMALL_PIXELS = 4_000_000


def _forward(ex: Extractor, prepared: Sequence[Prepared | InvalidImage], settings: Settings) -> list[Any]:
    return analyze_prepared(ex, prepared)


@dataclass
class BatchInfo:
    """How one request fared in the worker."""

    queue_ms: float
    inference_ms: float
    batch_images: int


@dataclass
class _Job:
    items: list[Prepared | InvalidImage]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[tuple[list[Analysis | InvalidImage], BatchInfo]]
    submitted: float = field(default_factory=time.perf_counter)


_STOP = object()


class Overloaded(ApiError):
    def __init__(self, message: str) -> None:
        super().__init__(503, "overloaded", message, headers={"Retry-After": str(RETRY_AFTER_BUSY)})


#: niceness added to the threads that decode large uploads: on a machine with few cores the forward pass (and the
#: small-upload lane) get the CPU first, so a small query is not slowed by a big decode beside it
LARGE_DECODE_NICENESS = 10


def _lower_priority() -> None:
    """Lower this thread's CPU priority (Linux schedules threads as tasks: setpriority on the thread id)."""
    with contextlib.suppress(AttributeError, OSError):
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + LARGE_DECODE_NICENESS))


#: Seconds of queue position a request gives up per image beyond its first (at most PRIORITY_MAX_DELAY): a one-image
#: query goes ahead of multi-image requests that arrived shortly before it, and nothing waits behind newer work
#: for longer than that.
PRIORITY_DELAY_PER_IMAGE = 1.0
PRIORITY_MAX_DELAY = 5.0


class _JobQueue(queue.Queue[Any]):
    """The inference queue, ordered by arrival time plus a small delay per extra image (bounded, so no request
    starves); the stop sentinel after everything queued."""

    def _init(self, maxsize: int) -> None:
        self._heap: list[tuple[float, int, Any]] = []
        self._seq = itertools.count()

    def _qsize(self) -> int:
        return len(self._heap)

    def _put(self, item: Any) -> None:
        if item is _STOP:
            key = math.inf
        else:
            key = item.submitted + min(PRIORITY_MAX_DELAY, PRIORITY_DELAY_PER_IMAGE * max(0, len(item.items) - 1))
        heapq.heappush(self._heap, (key, next(self._seq), item))

    def _get(self) -> Any:
        return heapq.heappop(self._heap)[2]


class PreparePool:
    """Prepares uploads in threads, off the event loop and off the inference thread: `threads` for large images and
    one lane of their own for small ones (decode holding at most SMALL_PIXELS), so a small query never queues
    behind a large decode. `completed` counts prepared images per lane (for tests and metrics)."""

    def __init__(self, prepare_fn: PrepareFn, threads: int) -> None:
        #: the function run per upload; tests may wrap it (e.g. to hold large images)
        self.prepare_fn = prepare_fn
        self._large = concurrent.futures.ThreadPoolExecutor(
            threads, thread_name_prefix="nsfw-index-prepare", initializer=_lower_priority
        )
        self._small = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="nsfw-index-prepare-small")
        self.completed = {"small": 0, "large": 0}
        self._lock = threading.Lock()

    def submit(self, name: str, data: bytes, cost: int) -> concurrent.futures.Future[Prepared | InvalidImage]:
        lane = "small" if cost <= SMALL_PIXELS else "large"

        def run() -> Prepared | InvalidImage:
            try:
                return self.prepare_fn(name, data)
            finally:
                with self._lock:
                    self.completed[lane] += 1

        return (self._small if lane == "small" else self._large).submit(run)

    def shutdown(self) -> None:
        for pool in (self._small, self._large):
            pool.shutdown(wait=False, cancel_futures=True)


class InferenceWorker:
    """Admits a request's uploads under the server's pixel budget (503 at once when they do not fit), prepares them
    in the PreparePool, then queues them for the inference thread. That thread only runs forward passes: it takes
    jobs (one request's prepared images) from a bounded queue, gathers more while the batch has room and
    `max_wait_ms` has not passed, runs `analyze_fn` once over all their images and resolves each request's future
    on its event loop. Submitting to a full queue fails at once (503), it never waits.
    """

    def __init__(self, extractor: Extractor, settings: Settings, analyze_fn: AnalyzeFn = _forward) -> None:
        self.extractor = extractor
        self.settings = settings
        #: the function run per batch; tests may wrap it (e.g. to hold the worker busy)
        self.analyze_fn = analyze_fn
        self.side = decode_side(extractor.transform)
        self.max_pixels = min(settings.max_pixels, settings.http_max_pixels)
        self.budget = PixelBudget(settings.decode_pixel_budget)
        self.pool = PreparePool(self._prepare, settings.decode_threads)
        self.queue: queue.Queue[Any] = _JobQueue(maxsize=settings.queue_size)
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

    def _prepare(self, name: str, data: bytes) -> Prepared | InvalidImage:
        s = self.settings
        return prepare_or_error(
            name, data, transform=self.extractor.transform, max_bytes=s.max_file_bytes, max_pixels=self.max_pixels
        )

    def cost(self, data: bytes) -> int:
        """Pixels one upload holds while it is decoded and waits for inference (its header read, nothing decoded)."""
        return decode_cost(data, max_pixels=self.max_pixels, min_side=self.side) + self.side * self.side

    async def analyze(self, items: list[tuple[str, bytes]]) -> tuple[list[Analysis | InvalidImage], BatchInfo]:
        """Prepare one request's images (pool, pixel budget), queue them, and wait (without blocking the loop) for
        their analyses. 413 past max_images_per_request or the whole budget; 503 at once when the budget is taken."""
        self.check_capacity()
        limit = self.settings.max_images_per_request
        if len(items) > limit:
            raise ApiError(
                413,
                "too_large",
                f"{len(items)} images in one request; at most {limit} (setting max_images_per_request)",
            )
        costs = [self.cost(data) for _, data in items]
        release = self.budget.claim(sum(costs))  # ApiError 413/503 at once; nothing is decoded yet
        futures = [self.pool.submit(name, data, c) for (name, data), c in zip(items, costs, strict=True)]
        try:
            prepared = list(await asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))
            return await self._infer(prepared)
        finally:
            for f in futures:
                f.cancel()  # those not started yet (the client went away)
            _when_all_done(futures, release)  # the pixels count until the last decode really stops

    async def _infer(self, prepared: list[Prepared | InvalidImage]) -> tuple[list[Analysis | InvalidImage], BatchInfo]:
        self.check_capacity()
        loop = asyncio.get_running_loop()
        job = _Job(prepared, loop, loop.create_future())
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise Overloaded(
                f"the inference queue is full ({self.settings.queue_size} requests waiting); retry shortly"
            ) from None
        return await job.future

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self.pool.shutdown()
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


def _when_all_done(futures: list[concurrent.futures.Future[Any]], callback: Callable[[], None]) -> None:
    """Call `callback` once every future is done (at once if they all are)."""
    pending = [f for f in futures if not f.done()]
    if not pending:
        callback()
        return
    lock = threading.Lock()
    left = [len(pending)]

    def one_done(_: object) -> None:
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if last:
            callback()

    for f in pending:
        f.add_done_callback(one_done)


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
