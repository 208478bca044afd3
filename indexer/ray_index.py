"""`index --ray`: the index run on Ray Data, resumable by result shard, merged into the store as a local run writes."""

# The driver (this process) walks the inputs and skips what a local run skips (unchanged paths, unchanged errors);
# Ray tasks read and hash the rest (`ray_tasks.hash_batch`); the driver routes content by sha256 as a local run does
# (stored: the path only; twice in the run: decoded once); Ray tasks decode the new content (`decode_batch`) and an
# actor pool runs the model (`InferenceWorker`). The driver writes what comes back as Parquet shards in
# `<store>/ray-shards/<run key>/`, then merges them through the local run's `RunWriter` and deletes them. A killed
# run leaves its finished shards: the same command finds them and computes only the rest.

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from indexer.corpus import Item, WalkError
from indexer.corpus import roots as corpus_roots
from indexer.extractor import Extractor
from indexer.pipeline import RETRIED_KINDS, Indexer, Progress, RunSummary
from indexer.ray_cluster import (
    RayOptions,
    RayReport,
    RayRunFailed,
    actor_pool,
    require_ray,
    session,
    worker_settings,
)
from indexer.ray_shards import (
    SHARDS_DIR,
    Batch,
    Failure,
    finished_shards,
    run_key,
    shard_number,
    shard_rows,
    shard_table,
    write_shard,
)
from indexer.ray_tasks import InferenceWorker, decode_batch, hash_batch, work_row
from indexer.service import start_index_run
from indexer.writer import FLUSH_AT, PathRow, RunWriter
from search.errors import InvalidArgument, NsfwIndexError
from search.settings import Settings
from search.store import ImageRecord, Store

HASH_BATCH = 64  # files per hashing task
DECODE_WORKER_BYTES = 1 << 30  # a Ray worker and its decoder process, with torch and timm imported


class _DriverBackend:
    """The driver's stand-in backend when GPU actors run the model: it holds no graph and runs nothing."""

    name, dtype, device = "none", "fp32", "cpu"

    def forward(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise RuntimeError("the Ray driver does not run the model; its inference actors do")


def _driver_extractor(settings: Settings, options: RayOptions) -> Extractor:
    """The model's identity (and the engine a run records) in the driver. CPU actors: their very engine, built here
    first (an export it needs is cached then, for the actors of this node). GPU actors: the weights read on the CPU
    for the identity, and the backend and dtype the actors will choose on CUDA, checked before any work."""
    if settings.device not in (None, options.device):
        raise InvalidArgument(
            f"--device {settings.device} with --ray: the inference actors run on "
            + ("GPUs (--gpus-per-worker > 0)" if options.device == "cuda" else "CPUs (give --gpus-per-worker N)")
        )
    if options.device == "cpu":
        return Extractor.from_settings(worker_settings(settings, device="cpu"))
    from indexer.backends import Engine, choose
    from indexer.model import load_model

    t0 = time.perf_counter()
    lm = load_model(settings.model, settings.arch)
    choice = choose(settings.backend, settings.dtype, "cuda")
    engine = Engine(_DriverBackend(), lm.identity, lm.data_config, choice, load_seconds=time.perf_counter() - t0)
    return Extractor(engine, settings)


class _Shards:
    """Rows coming back from Ray (in any order), gathered by shard: a shard is whole once all its rows are back."""

    def __init__(self, numbers: Sequence[int]) -> None:
        self.expected: dict[int, int] = {}
        for n in numbers:
            self.expected[n] = self.expected.get(n, 0) + 1
        self.parts: dict[int, list[Batch]] = {}

    def add(self, batch: Batch) -> Iterator[tuple[int, Batch]]:
        """The shards this batch completes, each with its rows in work order."""
        for n in map(int, np.unique(batch["shard"])):
            self.parts.setdefault(n, []).append({k: v[batch["shard"] == n] for k, v in batch.items()})
            if sum(len(p["w"]) for p in self.parts[n]) == self.expected[n]:
                done = self.parts.pop(n)
                whole = {k: np.concatenate([p[k] for p in done]) for k in done[0]}
                order = np.argsort(whole["w"])
                yield n, {k: v[order] for k, v in whole.items()}


class RayIndexer(Indexer):
    """The local `Indexer`'s run (begin, writer, FAISS snapshot, finish) with its middle on Ray."""

    def __init__(self, store: Store, extractor: Extractor, settings: Settings, options: RayOptions, **kw: Any) -> None:
        super().__init__(store, extractor, settings, **kw)
        self.options = options
        self.report = RayReport(options.address)

    # -- the run --
    def _index(self, inputs: Sequence[str], writer: RunWriter, *, prune: bool) -> None:
        known = self.store.all_path_states()
        failed = {} if self.retry_errors else self.store.all_error_states()
        self.bar.stage("listing inputs ...")
        entries = self._list_inputs(inputs)
        todo: list[Item] = []
        for entry in entries:
            if isinstance(entry, WalkError):
                writer.error(entry.key, entry.reason, entry.kind)
                continue
            self.summary.seen += 1
            state = known.get(entry.key)
            if state is not None and state[0] == entry.size and state[1] == entry.mtime_ns:
                self.summary.unchanged += 1
                continue
            bad = failed.get(entry.key)
            if bad is not None and bad[:2] == (entry.size, entry.mtime_ns) and bad[2] not in RETRIED_KINDS:
                self.summary.unchanged_errors += 1
                continue
            todo.append(entry)
        key = self._run_key(inputs)
        run_dir = self.store.root / SHARDS_DIR / key
        try:
            if todo:
                self.bar.stage(f"connecting to Ray ({self.options.address}) ...")
                with session(self.options, self.report, self.summary.startup) as ray:
                    try:
                        pending = self._hash_and_route(ray, todo, known, writer)
                        shards, transient = self._shards(ray, pending, run_dir, key)
                    except NsfwIndexError:
                        raise
                    except Exception as e:  # Ray's task, actor and cluster errors: long, and not the user's fault
                        first = (str(e).strip().splitlines() or [""])[-1][:300]
                        raise RayRunFailed(
                            f"the Ray run failed ({type(e).__name__}: {first}); its finished shards (if any) stay in "
                            f"{run_dir}: run the same command again to resume (`-v` shows Ray's messages)"
                        ) from e
                self.bar.stage(f"merging {len(shards)} shards into the store ...")
                self._merge(shards, pending, transient, writer)
            writer.flush()
            if prune:
                with self.timer.stage("prune"):
                    p, im = self.store.prune({e.key for e in entries}, corpus_roots(inputs))
                self.summary.pruned_paths, self.summary.pruned_images = p, im
        finally:
            self.bar.errors(self.summary.failed, refresh=True)
            self.bar.close()
        shutil.rmtree(run_dir, ignore_errors=True)  # merged: the shards (embeddings of the user's images) go
        parent = run_dir.parent
        if parent.is_dir():
            self.report.unfinished_runs = sorted(str(p) for p in parent.iterdir() if p.is_dir())
            if not self.report.unfinished_runs:
                parent.rmdir()

    def _run_key(self, inputs: Sequence[str]) -> str:
        s = self.settings
        return run_key(
            {
                "inputs": corpus_roots(inputs),
                "all_files": self.all_files,
                "model": self.ex.identity.stored(),
                "inference": [s.backend, s.dtype, self.options.gpus_per_worker],
                "limits": [s.max_file_bytes, s.max_pixels],
                "thumbnails": self.store.thumbnails_enabled(),
            }
        )

    def _hash_and_route(
        self, ray: Any, todo: list[Item], known: dict[str, Any], writer: RunWriter
    ) -> dict[str, list[Item]]:
        """Hash on Ray; then, as a local run: stored content records only the path, content seen twice is analysed
        once. Returns the new content hashes (in input order) with every path holding each."""
        self.bar.stage(f"reading and hashing {len(todo)} files on Ray ...")
        rows = [{"i": i, **work_row(it)} for i, it in enumerate(todo)]
        ds = ray.data.from_items(rows, override_num_blocks=min(1000, math.ceil(len(rows) / HASH_BATCH)))
        ds = ds.map_batches(
            hash_batch,
            fn_kwargs={"max_bytes": self.settings.max_file_bytes, "name_node": self.report.nodes > 1},
            batch_size=HASH_BATCH,
            num_cpus=1,
        )
        hashed: dict[int, tuple[str, str, str]] = {}
        with self.timer.stage("ray:read+hash"):
            for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
                hashed.update(zip(map(int, b["i"]), zip(b["sha256"], b["error"], b["kind"], strict=True), strict=True))
        new: dict[str, list[Item]] = {}
        for i, item in enumerate(todo):
            sha, reason, kind = hashed[i]
            if reason:
                writer.error(item.key, reason, kind, size=item.size, mtime_ns=item.mtime_ns)
                continue
            if item.key in known:
                self.summary.repointed += 1
            new.setdefault(str(sha), []).append(item)
        for sha in self.store.ids_by_sha(list(new)):
            for item in new.pop(sha):
                writer.duplicate(item, sha)
        writer.flush_duplicates(force=True)
        return new

    def _shards(
        self, ray: Any, pending: dict[str, list[Item]], run_dir: Path, key: str
    ) -> tuple[list[Path], dict[str, Failure]]:
        """The finished shards of an earlier try, and new ones computed on Ray for the rest: every shard to merge,
        and the transient failures of this try (kept out of the shards)."""
        finished = finished_shards(run_dir, key)
        covered = set().union(*(shas for _, shas in finished))
        self.report.shards_reused = sum(1 for _, shas in finished if not shas.isdisjoint(pending))
        work = [(sha, items) for sha, items in pending.items() if sha not in covered]
        first = max((shard_number(p) for p, _ in finished), default=-1) + 1
        transient: dict[str, Failure] = {}
        written = self._analyse(ray, work, run_dir, key, first, transient) if work else []
        return [p for p, _ in finished] + written, transient

    def _analyse(
        self,
        ray: Any,
        work: list[tuple[str, list[Item]]],
        run_dir: Path,
        key: str,
        first: int,
        transient: dict[str, Failure],
    ) -> list[Path]:
        """Decode and run the model on Ray; write each shard once all its rows are back. Returns the shards written."""
        pool, actor_args, actor_settings = actor_pool(ray, self.options, self.report, self.settings)
        size, bs = self.options.shard_size, self.settings.batch_size
        rows = [
            {"w": j, "shard": first + j // size, "sha256": sha, **work_row(items[0])}
            for j, (sha, items) in enumerate(work)
        ]
        shards = _Shards([row["shard"] for row in rows])
        paths = {sha: [it.key for it in items] for sha, items in work}
        dim = self.ex.identity.embedding_dim
        ds = ray.data.from_items(rows, override_num_blocks=min(2000, math.ceil(len(rows) / bs)))
        ds = ds.map_batches(
            decode_batch,
            fn_kwargs={
                "data_config": self.ex.data_config,
                "max_bytes": self.settings.max_file_bytes,
                "max_pixels": self.settings.max_pixels,
                "thumbnails": self.store.thumbnails_enabled(),
                "name_node": self.report.nodes > 1,
            },
            batch_size=bs,
            num_cpus=1,
            # the most a decode task may hold: a worker with its decoder process, the largest image allowed, decoded,
            # and its file (this also keeps Ray Data from fusing decoding into the inference actors: it runs beside)
            memory=DECODE_WORKER_BYTES + 3 * self.settings.max_pixels + self.settings.max_file_bytes,
        )
        ds = ds.map_batches(
            InferenceWorker,
            fn_constructor_kwargs={"settings": actor_settings},
            batch_size=bs,
            compute=pool,
            **actor_args,
        )
        written: list[Path] = []
        self.bar.start(len(rows), "analysing on Ray")
        with self.timer.stage("ray:decode+model"):
            for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
                self.bar.update(len(b["w"]))
                self.timer.add("decode(worker)", float(b["decode_seconds"].sum()))
                self.timer.add("model(actor)", float(b["model_seconds"][b["error"] == ""].sum()))
                for number, whole in shards.add(b):
                    for sha, t, reason, kind in zip(
                        whole["sha256"], whole["transient"], whole["error"], whole["kind"], strict=True
                    ):
                        if t:
                            transient[str(sha)] = Failure(str(reason), str(kind), True)
                    with self.timer.stage("write shards"):
                        table = shard_table(whole, [paths[str(sha)] for sha in whole["sha256"]], key, dim)
                        written.append(write_shard(run_dir, number, table))
        self.report.shards_written = len(written)
        return written

    def _merge(
        self, shards: list[Path], pending: dict[str, list[Item]], transient: dict[str, Failure], writer: RunWriter
    ) -> None:
        """The shards into the store, as a local run writes its batches: each new image with every path of this
        run that holds it, failures on each such path."""
        records: list[ImageRecord] = []
        paths: list[PathRow] = []

        def flush() -> None:
            writer.images(records, paths)
            records.clear()
            paths.clear()
            self._maybe_checkpoint_faiss()

        for shard in shards:
            for row in shard_rows(shard):
                items = pending.pop(row.sha256, None)
                if items is None:  # merged by an earlier try, or no longer among the inputs
                    continue
                if row.record is None:
                    assert row.failure is not None
                    for it in items:
                        writer.error(it.key, row.failure.reason, row.failure.kind, size=it.size, mtime_ns=it.mtime_ns)
                    continue
                records.append(row.record)
                paths.extend((it.key, row.sha256, it.size, it.mtime_ns) for it in items)
                self.summary.new_images += 1
                self.summary.duplicate_paths += len(items) - 1
                if len(records) >= FLUSH_AT:
                    flush()
        if records:
            flush()
        for sha, items in pending.items():  # read failures and files changed meanwhile; or lost by Ray (retried)
            f = transient.get(sha)
            for it in items:
                if f is not None:
                    writer.error(it.key, f.reason, f.kind, size=it.size, mtime_ns=it.mtime_ns)
                else:
                    writer.error(it.key, "no result came back from Ray for this file; it is tried again", "invalid")
        pending.clear()


def index_inputs_ray(
    store: Store,
    inputs: Sequence[str],
    settings: Settings,
    options: RayOptions,
    *,
    prune: bool = False,
    rebuild: bool = False,
    all_files: bool = False,
    index_factory: str | None = None,
    progress: bool | Progress = False,
    extractor: Extractor | None = None,
    thumbnails: bool = False,
    retry_errors: bool = False,
) -> tuple[RunSummary, RayReport]:
    """`indexer.service.index_inputs` on Ray: the same checks before any work, the same store afterwards.

    The driver holds the model only for its identity (the store's model check) and the engine a run records; the
    actors load it with the run's backend, dtype and device."""
    options.check()
    require_ray()
    ex, bar = start_index_run(
        store,
        settings,
        rebuild=rebuild,
        thumbnails=thumbnails,
        index_factory=index_factory,
        progress=progress,
        extractor=extractor,
        load=lambda s: _driver_extractor(s, options),
    )
    indexer = RayIndexer(store, ex, settings, options, progress=bar, all_files=all_files, retry_errors=retry_errors)
    args = {"inputs": list(inputs), "prune": prune, "rebuild": rebuild, "model": settings.model}
    summary = indexer.run(list(inputs), prune=prune, rebuild=rebuild, args={**args, "ray": options.address})
    return summary, indexer.report
