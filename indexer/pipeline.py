"""The indexing pipeline: reader -> decoder (worker processes) -> extractor (batched) -> writer, with stage timings."""

from __future__ import annotations

import hashlib
import logging
import multiprocessing as mp
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from indexer.corpus import Item, TarReader, WalkError, read_item, walk
from indexer.corpus import roots as corpus_roots
from indexer.decode import decode_image
from indexer.extractor import Extractor
from search.errors import InvalidImage
from search.labels import stored_match_distance
from search.pdq import compute_pdq
from search.settings import Settings
from search.store import ImageRecord, Store
from search.vectors import IndexFiles

log = logging.getLogger(__name__)

FAISS_CHECKPOINT_SECONDS = 60.0  # write the FAISS snapshot at least this often during a long run


# -- decoder stage (runs in worker processes) --
_WORKER: dict[str, Any] = {}


def _init_decoder(data_config: dict[str, Any], max_bytes: int, max_pixels: int) -> None:
    from timm.data import create_transform

    torch.set_num_threads(1)
    _WORKER["transform"] = create_transform(**data_config, is_training=False)
    _WORKER["max_bytes"] = max_bytes
    _WORKER["max_pixels"] = max_pixels


@dataclass
class Decoded:
    tensor: np.ndarray
    width: int
    height: int
    format: str
    pdq: str | None
    pdq_quality: int | None
    seconds: float


def decode_job(name: str, data: bytes) -> Decoded | InvalidImage:
    """Safe decode, PDQ hash and the model's preprocessing of one image (in a worker)."""
    t0 = time.perf_counter()
    try:
        img = decode_image(data, name, max_bytes=_WORKER["max_bytes"], max_pixels=_WORKER["max_pixels"])
    except InvalidImage as e:
        return e
    try:
        pdq, quality = compute_pdq(img.image)
    except Exception:  # pdq is an extra: an image it cannot hash is still indexed
        pdq, quality = None, None
    tensor = _WORKER["transform"](img.image).numpy()
    return Decoded(tensor, img.width, img.height, img.format, pdq, quality, time.perf_counter() - t0)


class _InlineExecutor(Executor):
    """`--workers 0`: decode in this process (tests, debugging)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        f: Future[Any] = Future()
        try:
            f.set_result(fn(*args, **kwargs))
        except BaseException as e:
            f.set_exception(e)
        return f


# -- the run --
@dataclass
class RunSummary:
    run_id: int = 0
    seen: int = 0
    unchanged: int = 0
    new_images: int = 0
    duplicate_paths: int = 0
    repointed: int = 0
    errors: int = 0
    pruned_paths: int = 0
    pruned_images: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    error_samples: list[tuple[str, str]] = field(default_factory=list)

    @property
    def indexed_paths(self) -> int:
        return self.new_images + self.duplicate_paths

    def counts(self) -> dict[str, int]:
        return {
            k: getattr(self, k)
            for k in (
                "seen",
                "unchanged",
                "new_images",
                "duplicate_paths",
                "repointed",
                "errors",
                "pruned_paths",
                "pruned_images",
            )
        }


@dataclass
class _Pending:
    """A content hash waiting for its decode and forward pass, with every path that holds it."""

    sha: str
    size: int
    paths: list[Item]
    future: Future[Decoded | InvalidImage]
    data: bytes  # kept until written, to resubmit when a decoder process dies


class Timer:
    def __init__(self) -> None:
        self.totals: dict[str, float] = {}

    def add(self, stage: str, seconds: float) -> None:
        self.totals[stage] = self.totals.get(stage, 0.0) + seconds

    def stage(self, name: str) -> _Stage:
        return _Stage(self, name)


class _Stage:
    def __init__(self, timer: Timer, name: str) -> None:
        self.timer, self.name = timer, name

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.timer.add(self.name, time.perf_counter() - self.t0)


class Indexer:
    """Index inputs into a store. The caller holds the store's writer lock."""

    def __init__(
        self, store: Store, extractor: Extractor, settings: Settings, *, progress: bool = False, all_files: bool = False
    ) -> None:
        self.store = store
        self.ex = extractor
        self.settings = settings
        self.progress = progress
        self.all_files = all_files
        self.timer = Timer()
        self.summary = RunSummary()
        self._errors: list[tuple[str, str, str]] = []
        self._dup_paths: list[tuple[str, str, int | None, int | None]] = []
        self._in_flight: dict[str, _Pending] = {}
        self._queue: deque[_Pending] = deque()
        self._last_faiss = time.monotonic()
        self._pool: Executor = _InlineExecutor()

    # public -----------------------------------------------------------------------------------------------------------
    def run(
        self, inputs: Sequence[str], *, prune: bool = False, rebuild: bool = False, args: dict[str, Any] | None = None
    ) -> RunSummary:
        t_start = time.perf_counter()
        ident = self.ex.identity.as_dict()
        if rebuild:
            self._drop_all_images()
        self.store.check_model(ident, adopt=rebuild)
        self.summary.run_id = self.store.begin_run("index", args or {"inputs": list(inputs)})
        status = "failed"
        try:
            self._index(inputs, prune=prune)
            status = "done"
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        finally:
            with self.timer.stage("faiss"):
                if status == "done" or self.store.count_images():
                    files = IndexFiles(self.store, self.settings)
                    files.open_all(persist=True)
                    files.open_unsafe(persist=True)
            self.summary.timings = {k: round(v, 4) for k, v in self.timer.totals.items()}
            self.summary.timings["total"] = round(time.perf_counter() - t_start, 4)
            self.store.finish_run(self.summary.run_id, status, self.summary.counts(), self.summary.timings)
            log.info(
                "index run %d %s: %s; stage seconds %s",
                self.summary.run_id,
                status,
                self.summary.counts(),
                self.summary.timings,
            )
        return self.summary

    # internals --
    def _drop_all_images(self) -> None:
        with self.store.transaction() as conn:
            conn.execute("DELETE FROM paths")
            conn.execute("DELETE FROM errors")
            self.store._drop_orphans(conn)

    def _executor(self) -> Executor:
        n = self.settings.resolved_workers()
        if n == 0:
            _init_decoder(self.ex.data_config, self.settings.max_file_bytes, self.settings.max_pixels)
            return _InlineExecutor()
        return ProcessPoolExecutor(
            max_workers=n,
            mp_context=mp.get_context("spawn"),
            initializer=_init_decoder,
            initargs=(self.ex.data_config, self.settings.max_file_bytes, self.settings.max_pixels),
        )

    def _index(self, inputs: Sequence[str], *, prune: bool) -> None:
        known = self.store.all_path_states()
        seen_keys: set[str] = set()
        bs = self.settings.batch_size
        window = bs * 3  # decodes in flight: the next batches decode while the model runs on this one
        tars = TarReader()
        entries = self._list_inputs(inputs)
        bar = self._bar(len(entries))
        self._pool = self._executor()
        try:
            for entry in entries:
                bar.set_postfix(errors=self.summary.errors, refresh=False)
                if isinstance(entry, WalkError):
                    self._error(entry.key, entry.reason, entry.kind)
                    seen_keys.add(entry.key)
                    bar.update(1)
                    continue
                item = entry
                seen_keys.add(item.key)
                self.summary.seen += 1
                state = known.get(item.key)
                if state is not None and state[0] == item.size and state[1] == item.mtime_ns:
                    self.summary.unchanged += 1
                    bar.update(1)
                    continue
                t0 = time.perf_counter()
                try:
                    data = read_item(item, self.settings.max_file_bytes, tars)
                except (OSError, ValueError, EOFError) as e:
                    self.timer.add("read+hash", time.perf_counter() - t0)
                    self._error(
                        item.key,
                        f"cannot read: {getattr(e, 'strerror', None) or e}",
                        "too_large" if "exceeds" in str(e) else "unreadable",
                    )
                    bar.update(1)
                    continue
                except Exception as e:  # tarfile errors and the like
                    self.timer.add("read+hash", time.perf_counter() - t0)
                    self._error(item.key, f"cannot read: {e}", "unreadable")
                    bar.update(1)
                    continue
                sha = hashlib.sha256(data).hexdigest()
                self.timer.add("read+hash", time.perf_counter() - t0)
                if state is not None:
                    self.summary.repointed += 1
                self._route(item, sha, data)
                bar.update(1)
                while len(self._queue) >= window or (
                    self._queue and self._queue[0].future.done() and len(self._queue) >= bs
                ):
                    self._drain(bs)
                self._flush_dups(force=False)
            while self._queue:
                self._drain(bs)
            self._flush_dups(force=True)
            self._flush_errors()
            if prune:
                with self.timer.stage("prune"):
                    # only below what the inputs cover: pruning one folder never forgets another
                    p, im = self.store.prune(seen_keys, corpus_roots(inputs))
                self.summary.pruned_paths, self.summary.pruned_images = p, im
        finally:
            bar.set_postfix(errors=self.summary.errors)
            bar.close()
            tars.close()
            self._pool.shutdown(wait=True, cancel_futures=True)

    def _list_inputs(self, inputs: Sequence[str]) -> list[Item | WalkError]:
        """The whole walk up front: cheap next to decoding, and it gives the progress bar a total and an ETA."""
        with self.timer.stage("walk"):
            return list(walk(inputs, all_files=self.all_files))

    def _route(self, item: Item, sha: str, data: bytes) -> None:
        """Known content: just record the path. In flight: attach. New: submit a decode."""
        if sha in self._in_flight:
            self._in_flight[sha].paths.append(item)
            return
        if self.store.ids_by_sha([sha]):
            self._dup_paths.append((item.key, sha, item.size, item.mtime_ns))
            self.summary.duplicate_paths += 1
            return
        p = _Pending(sha, len(data), [item], self._pool.submit(decode_job, item.key, data), data)
        self._in_flight[sha] = p
        self._queue.append(p)

    def _drain(self, bs: int) -> None:
        """Take the oldest `bs` pending decodes, run the model on them, write them (in input order)."""
        batch = [self._queue.popleft() for _ in range(min(bs, len(self._queue)))]
        with self.timer.stage("wait_decode"):
            decoded = [self._result(p) for p in batch]
        good: list[tuple[_Pending, Decoded]] = []
        for p, d in zip(batch, decoded, strict=True):
            del self._in_flight[p.sha]
            if isinstance(d, InvalidImage):
                for it in p.paths:
                    self._error(it.key, d.reason, d.kind)
            else:
                good.append((p, d))
                self.timer.add("decode(worker)", d.seconds)
        records: list[ImageRecord] = []
        paths: list[tuple[str, str, int | None, int | None]] = []
        if good:
            with self.timer.stage("model"):
                results = self.ex.run(torch.from_numpy(np.stack([d.tensor for _, d in good])))
            for (p, d), r in zip(good, results, strict=True):
                records.append(
                    r.to_record(
                        sha256=p.sha,
                        size=p.size,
                        width=d.width,
                        height=d.height,
                        format=d.format,
                        pdq=d.pdq,
                        pdq_quality=d.pdq_quality,
                    )
                )
                paths.extend((it.key, p.sha, it.size, it.mtime_ns) for it in p.paths)
                self.summary.new_images += 1
                self.summary.duplicate_paths += len(p.paths) - 1
        with self.timer.stage("write"):
            self.store.write_batch(
                self.summary.run_id,
                records,
                paths + self._take_dups(),
                self._take_errors(),
                match_distance=stored_match_distance(self.settings),
            )
        self._maybe_checkpoint_faiss()

    def _result(self, p: _Pending) -> Decoded | InvalidImage:
        """A decode's result; a decoder process that died (a hostile file can crash a C decoder) fails that file
        alone: the pool is replaced and the other pending decodes are resubmitted."""
        try:
            return p.future.result()
        except BrokenProcessPool:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = self._executor()
            for other in self._queue:
                other.future = self._pool.submit(decode_job, other.paths[0].key, other.data)
            return InvalidImage(p.paths[0].key, "the decoder process crashed on this file", kind="invalid")
        except Exception as e:  # anything else a decoder raises is that file's problem, not the run's
            return InvalidImage(p.paths[0].key, f"decoding failed: {type(e).__name__}: {e}", kind="invalid")

    def _take_dups(self) -> list[tuple[str, str, int | None, int | None]]:
        out, self._dup_paths = self._dup_paths, []
        return out

    def _take_errors(self) -> list[tuple[str, str, str]]:
        out, self._errors = self._errors, []
        return out

    def _flush_dups(self, *, force: bool) -> None:
        if self._dup_paths and (force or len(self._dup_paths) >= 256):
            with self.timer.stage("write"):
                self.store.write_batch(self.summary.run_id, [], self._take_dups(), self._take_errors())

    def _flush_errors(self) -> None:
        if self._errors:
            with self.timer.stage("write"):
                self.store.write_batch(self.summary.run_id, [], [], self._take_errors())

    def _error(self, key: str, reason: str, kind: str) -> None:
        self.summary.errors += 1
        if len(self.summary.error_samples) < 20:
            self.summary.error_samples.append((key, reason))
        self._errors.append((key, reason, kind))
        if len(self._errors) >= 256:
            self._flush_errors()

    def _maybe_checkpoint_faiss(self) -> None:
        if time.monotonic() - self._last_faiss < FAISS_CHECKPOINT_SECONDS:
            return
        with self.timer.stage("faiss"):
            IndexFiles(self.store, self.settings).open_all(persist=True)
        self._last_faiss = time.monotonic()

    def _bar(self, total: int) -> Any:
        """images/s, ETA and the error count on a terminal; nothing with --quiet or when stdout is not a TTY."""
        from tqdm import tqdm

        return tqdm(
            total=total,
            desc="indexing",
            unit="img",
            dynamic_ncols=True,
            disable=not (self.progress and sys.stdout.isatty()),
        )
