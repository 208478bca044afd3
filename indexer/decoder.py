"""The decoder stage of an index run: `prepare_image` in worker processes; a crashed worker fails one file."""

from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import torch

from indexer.prepare import Prepared, Transform, prepare_or_error
from search.errors import InvalidImage

Outcome = Prepared | InvalidImage

# -- in a worker process --
_WORKER: dict[str, Any] = {}


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
WATCHDOG_SECONDS = 0.5


def _die_with_parent(parent: int) -> None:
    """Never outlive the indexing process, whatever kills it: the kernel sends SIGKILL when the parent dies
    (Linux), and a watchdog thread exits once this process has been re-parented (everywhere)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the watchdog below still holds
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(WATCHDOG_SECONDS)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def _init_worker(
    data_config: dict[str, Any], max_bytes: int, max_pixels: int, thumbnails: bool = False, parent: int | None = None
) -> None:
    """Build the model's transform once per worker (from the data config: the model itself stays in the parent);
    first make sure the worker dies with its parent."""
    _die_with_parent(os.getppid() if parent is None else parent)
    from indexer.model import eval_transform

    torch.set_num_threads(1)  # workers are many; one thread each
    _WORKER["transform"] = eval_transform(data_config)
    _WORKER["max_bytes"] = max_bytes
    _WORKER["max_pixels"] = max_pixels
    _WORKER["thumbnails"] = thumbnails


def _ready() -> int:
    return os.getpid()


def _prepare_in_worker(name: str, data: bytes, sha256: str) -> Outcome:
    return prepare_or_error(
        name,
        data,
        transform=_WORKER["transform"],
        max_bytes=_WORKER["max_bytes"],
        max_pixels=_WORKER["max_pixels"],
        sha256=sha256,
        thumbnail=_WORKER["thumbnails"],
    )


class _InlineExecutor(Executor):
    """`--workers 0`: prepare in this process, at submit (tests, debugging)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        f: Future[Any] = Future()
        try:
            f.set_result(fn(*args, **kwargs))
        except BaseException as e:
            f.set_exception(e)
        return f


# -- in the indexing process --
def _lost(future: Future[Outcome]) -> bool:
    """A job the broken pool will never finish (a job it finished before breaking keeps its result)."""
    if not future.done() or future.cancelled():
        return True
    return isinstance(future.exception(), BrokenProcessPool)


@dataclass
class DecodeJob:
    """One content hash being prepared; keeps its bytes so that it can be resubmitted after a worker crash."""

    name: str
    sha256: str
    data: bytes
    future: Future[Outcome]


class DecoderPool:
    """Prepares images with `workers` processes (0: inline). `outcome` turns a crash or an unexpected error of one
    decode into that file's InvalidImage, replacing a broken pool and resubmitting the jobs still waiting."""

    def __init__(
        self,
        *,
        workers: int,
        data_config: dict[str, Any],
        transform: Transform,
        max_bytes: int,
        max_pixels: int,
        thumbnails: bool = False,
    ) -> None:
        self.workers = workers
        self.data_config = data_config
        self.transform = transform
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.thumbnails = thumbnails  # also make thumbnails (a store created with `index --thumbnails`)
        self.restarts = 0
        self._executor = self._start()

    def _start(self) -> Executor:
        if self.workers == 0:
            return _InlineExecutor()
        return ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=mp.get_context("spawn"),
            initializer=_init_worker,
            initargs=(self.data_config, self.max_bytes, self.max_pixels, self.thumbnails, os.getpid()),
        )

    def _prepare_here(self, name: str, data: bytes, sha256: str) -> Outcome:
        return prepare_or_error(
            name,
            data,
            transform=self.transform,
            max_bytes=self.max_bytes,
            max_pixels=self.max_pixels,
            sha256=sha256,
            thumbnail=self.thumbnails,
        )

    def _submit(self, name: str, data: bytes, sha256: str) -> Future[Outcome]:
        fn = self._prepare_here if self.workers == 0 else _prepare_in_worker
        return self._executor.submit(fn, name, data, sha256)

    def submit(self, name: str, data: bytes, sha256: str) -> DecodeJob:
        return DecodeJob(name, sha256, data, self._submit(name, data, sha256))

    def outcome(self, job: DecodeJob, waiting: Iterable[DecodeJob] = ()) -> Outcome:
        """The job's result. When its worker died (a hostile file can crash a C decoder) the job fails alone: the
        pool is replaced and every job in `waiting` (not yet collected) is submitted again."""
        try:
            return job.future.result()
        except BrokenProcessPool:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = self._start()
            self.restarts += 1
            for other in waiting:
                if _lost(other.future):
                    other.future = self._submit(other.name, other.data, other.sha256)
            return InvalidImage(job.name, "the decoder process crashed on this file", kind="invalid")
        except Exception as e:  # anything else a decoder raises is that file's problem, not the run's
            return InvalidImage(job.name, f"decoding failed: {type(e).__name__}: {e}", kind="invalid")

    def warm(self) -> float:
        """Start every worker process now (spawn, imports, the transform) and wait for them: seconds it took. Paid once
        per run, reported as start-up rather than hidden in the first batch's wait."""
        t0 = time.perf_counter()
        if self.workers:
            for f in [self._executor.submit(_ready) for _ in range(self.workers)]:
                f.result()
        return time.perf_counter() - t0

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
