"""The index run: walk -> read -> decoder -> extractor (batched) -> writer, incremental, with stage timings."""

from __future__ import annotations

import hashlib
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from indexer.analyze import Analysis
from indexer.corpus import Item, TarReader, WalkError, read_item, walk
from indexer.corpus import roots as corpus_roots
from indexer.decoder import DecodeJob, DecoderPool
from indexer.extractor import Extractor
from indexer.prepare import Prepared
from indexer.summary import Progress, RunSummary, Timer
from indexer.writer import PathRow, RunWriter
from search.errors import IndexWriteFailed
from search.labels import stored_match_distance
from search.settings import Settings
from search.store import ImageRecord, Store
from search.vectors import IndexFiles

__all__ = ["Indexer", "Progress", "RunSummary", "Timer"]

log = logging.getLogger(__name__)

FAISS_CHECKPOINT_SECONDS = 60.0  # write the FAISS snapshot at least this often during a long run

#: Error kinds tried again even when the file is unchanged: they depend on limits a re-run may have raised.
RETRIED_KINDS = frozenset({"too_large"})


@dataclass
class _Pending:
    """A content hash waiting for its decode and forward pass, with every path that holds it."""

    job: DecodeJob
    paths: list[Item]


class Indexer:
    """Index inputs into a store. The caller holds the store's writer lock (`Store.writing`)."""

    def __init__(
        self,
        store: Store,
        extractor: Extractor,
        settings: Settings,
        *,
        progress: bool | Progress = False,
        all_files: bool = False,
        retry_errors: bool = False,
    ) -> None:
        self.store = store
        self.ex = extractor
        self.settings = settings
        self.bar = progress if isinstance(progress, Progress) else Progress(progress)
        self.all_files = all_files
        self.retry_errors = retry_errors  # try files that failed before even when unchanged
        self.timer = Timer()
        self.summary = RunSummary()
        self._in_flight: dict[str, _Pending] = {}
        self._queue: deque[_Pending] = deque()
        self._last_faiss = time.monotonic()

    # public -----------------------------------------------------------------------------------------------------------
    def run(
        self, inputs: Sequence[str], *, prune: bool = False, rebuild: bool = False, args: dict[str, Any] | None = None
    ) -> RunSummary:
        t_start = time.perf_counter()
        if rebuild:
            self.store.forget_all_paths()
        self.store.check_model(self.ex.identity, adopt=rebuild)
        self.summary.run_id = self.store.begin_run(
            "index", args or {"inputs": list(inputs)}, engine=self.ex.describe()
        )
        writer = RunWriter(
            self.store,
            self.summary.run_id,
            self.summary,
            self.timer,
            match_distance=stored_match_distance(self.settings),
        )
        status = "failed"
        try:
            self._index(inputs, writer, prune=prune)
            status = "done"
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        finally:
            write_error: IndexWriteFailed | None = None
            with self.timer.stage("faiss"):
                if status == "done" or self.store.count_images():
                    files = IndexFiles(self.store, self.settings)
                    try:
                        files.open_all(persist=True)
                        files.open_unsafe(persist=True)
                    except IndexWriteFailed as e:  # e.g. no space left: the run is recorded as failed, then says so
                        status, write_error = "failed", e
            self.summary.timings = {k: round(v, 4) for k, v in self.timer.totals.items()}
            self.summary.timings["total"] = round(time.perf_counter() - t_start, 4)
            self.summary.startup["model_load"] = round(self.ex.engine.load_seconds, 4)
            self.summary.engine = self.ex.describe()
            self.store.finish_run(self.summary.run_id, status, self.summary.counts(), self.summary.timings)
            log.info(
                "index run %d %s: %s; stage seconds %s",
                self.summary.run_id,
                status,
                self.summary.counts(),
                self.summary.timings,
            )
            if write_error is not None:
                raise write_error
        return self.summary

    # internals --
    def _decoders(self) -> DecoderPool:
        return DecoderPool(
            workers=self.settings.resolved_workers(),
            data_config=self.ex.data_config,
            transform=self.ex.transform,
            max_bytes=self.settings.max_file_bytes,
            max_pixels=self.settings.max_pixels,
            thumbnails=self.store.thumbnails_enabled(),
        )

    def _index(self, inputs: Sequence[str], writer: RunWriter, *, prune: bool) -> None:
        known = self.store.all_path_states()
        failed = {} if self.retry_errors else self.store.all_error_states()
        seen_keys: set[str] = set()
        bs = self.ex.batch_size
        window = bs * 3  # decodes in flight: the next batches decode while the model runs on this one
        tars = TarReader()
        bar = self.bar
        bar.stage("listing inputs ...")
        entries = self._list_inputs(inputs)
        workers = self.settings.resolved_workers()
        bar.stage(f"starting decoders ({workers} process{'es' if workers != 1 else ''}) ..." if workers else "...")
        pool = self._decoders()
        self.summary.startup["decoders"] = round(pool.warm(), 4)
        bar.start(len(entries))
        try:
            for entry in entries:
                bar.errors(self.summary.failed)
                seen_keys.add(entry.key)
                if isinstance(entry, WalkError):
                    writer.error(entry.key, entry.reason, entry.kind)
                    bar.update(1)
                    continue
                self.summary.seen += 1
                state = known.get(entry.key)
                if state is not None and state[0] == entry.size and state[1] == entry.mtime_ns:
                    self.summary.unchanged += 1
                    bar.update(1)
                    continue
                bad = failed.get(entry.key)
                if bad is not None and bad[:2] == (entry.size, entry.mtime_ns) and bad[2] not in RETRIED_KINDS:
                    self.summary.unchanged_errors += 1  # failed before and unchanged: not decoded (nor warned) again
                    bar.update(1)
                    continue
                data = self._read(entry, tars, writer)
                if data is not None:
                    if state is not None:
                        self.summary.repointed += 1
                    self._route(entry, data, pool, writer)
                bar.update(1)
                while len(self._queue) >= window or (
                    self._queue and self._queue[0].job.future.done() and len(self._queue) >= bs
                ):
                    self._drain(bs, pool, writer)
                writer.flush_duplicates()
            while self._queue:
                self._drain(bs, pool, writer)
            writer.flush()
            if prune:
                with self.timer.stage("prune"):
                    # only below what the inputs cover: pruning one folder never forgets another
                    p, im = self.store.prune(seen_keys, corpus_roots(inputs))
                self.summary.pruned_paths, self.summary.pruned_images = p, im
        finally:
            bar.errors(self.summary.failed, refresh=True)
            bar.close()
            tars.close()
            pool.close()

    def _list_inputs(self, inputs: Sequence[str]) -> list[Item | WalkError]:
        """The whole walk up front: cheap next to decoding, and it gives the progress bar a total and an ETA."""
        with self.timer.stage("walk"):
            return list(walk(inputs, all_files=self.all_files))

    def _read(self, item: Item, tars: TarReader, writer: RunWriter) -> bytes | None:
        """The item's bytes (None: it failed, and the failure is recorded)."""
        with self.timer.stage("read+hash"):
            try:
                return read_item(item, self.settings.max_file_bytes, tars)
            except (OSError, ValueError, EOFError) as e:
                reason = f"cannot read: {getattr(e, 'strerror', None) or e}"
                kind = "too_large" if "exceeds" in str(e) else "unreadable"
                writer.error(item.key, reason, kind, size=item.size, mtime_ns=item.mtime_ns)
            except Exception as e:  # tarfile errors and the like
                writer.error(item.key, f"cannot read: {e}", "unreadable", size=item.size, mtime_ns=item.mtime_ns)
        return None

    def _route(self, item: Item, data: bytes, pool: DecoderPool, writer: RunWriter) -> None:
        """Known content: just record the path. In flight: attach. New: submit a decode."""
        with self.timer.stage("read+hash"):
            sha = hashlib.sha256(data).hexdigest()
        if sha in self._in_flight:
            self._in_flight[sha].paths.append(item)
            return
        if self.store.ids_by_sha([sha]):
            writer.duplicate(item, sha)
            return
        p = _Pending(pool.submit(item.key, data, sha), [item])
        self._in_flight[sha] = p
        self._queue.append(p)

    def _drain(self, bs: int, pool: DecoderPool, writer: RunWriter) -> None:
        """Take the oldest `bs` pending decodes, run the model on them, write them (in input order)."""
        batch = [self._queue.popleft() for _ in range(min(bs, len(self._queue)))]
        good: list[tuple[_Pending, Prepared]] = []
        with self.timer.stage("wait_decode"):
            for i, p in enumerate(batch):
                out = pool.outcome(p.job, waiting=[q.job for q in (*batch[i + 1 :], *self._queue)])
                del self._in_flight[p.job.sha256]
                if isinstance(out, Prepared):
                    good.append((p, out))
                    self.timer.add("decode(worker)", out.seconds)
                else:
                    for it in p.paths:
                        writer.error(it.key, out.reason, out.kind, size=it.size, mtime_ns=it.mtime_ns)
        records: list[ImageRecord] = []
        paths: list[PathRow] = []
        if good:
            with self.timer.stage("model"):
                results = self.ex.run_prepared([d for _, d in good])
            for (p, d), r in zip(good, results, strict=True):
                records.append(Analysis(d, r).record())
                paths.extend((it.key, d.sha256, it.size, it.mtime_ns) for it in p.paths)
                self.summary.new_images += 1
                self.summary.duplicate_paths += len(p.paths) - 1
        writer.images(records, paths)
        self._maybe_checkpoint_faiss()

    def _maybe_checkpoint_faiss(self) -> None:
        if time.monotonic() - self._last_faiss < FAISS_CHECKPOINT_SECONDS:
            return
        with self.timer.stage("faiss"):
            IndexFiles(self.store, self.settings).open_all(persist=True)
        self._last_faiss = time.monotonic()
