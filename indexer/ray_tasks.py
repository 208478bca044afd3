"""What runs on the Ray workers of `index --ray`: reading and hashing, decoding (`prepare_image`), the forward pass."""

# Each function reads files by path (plain files and tar members, as `indexer.corpus.read_item` does): on a
# multi-node cluster every node must see the inputs at the same paths. Decoding goes through the local run's
# `DecoderPool` (one decoder process per Ray worker, kept between tasks), so a file that crashes a C decoder fails
# alone, as in a local run, instead of failing its Ray task over and over.

from __future__ import annotations

import hashlib
import json
import time
from typing import TYPE_CHECKING, Any

from indexer.corpus import Item, TarReader, read_item
from indexer.prepare import Prepared
from indexer.ray_shards import Batch, Failure, objects, prepared_batch, prepared_from_batch, result_batch
from search.settings import Settings

if TYPE_CHECKING:  # torch comes with these: imported where used, so that hashing tasks start without it
    from indexer.decoder import DecodeJob, DecoderPool

#: The decoder pools of this worker process, by their settings (a pool's process starts once, on its first task).
_POOLS: dict[str, DecoderPool] = {}


def read_failure(e: Exception, name_node: bool = False) -> Failure:
    """What a local run records for a file it cannot read (`Indexer._read`): the reason and kind; on a cluster of
    several nodes the reason names the node (one that does not see the inputs' paths, say)."""
    where = ""
    if name_node:
        import ray

        where = f" (on Ray node {ray.util.get_node_ip_address()})"
    if isinstance(e, (OSError, ValueError, EOFError)):
        reason = f"cannot read{where}: {getattr(e, 'strerror', None) or e}"
        return Failure(reason, "too_large" if "exceeds" in str(e) else "unreadable", transient=True)
    return Failure(f"cannot read{where}: {e}", "unreadable", transient=True)  # tarfile errors and the like


def work_row(item: Item) -> dict[str, Any]:
    """An item as a row of a Ray dataset (absent parts as "")."""
    return {
        "key": item.key,
        "size": item.size,
        "mtime_ns": item.mtime_ns,
        "file": item.file or "",
        "tar": item.tar or "",
        "member": item.member or "",
    }


def _items(batch: Batch) -> list[Item]:
    return [
        Item(str(k), int(s), int(m), file=str(f) or None, tar=str(t) or None, member=str(mb) or None)
        for k, s, m, f, t, mb in zip(
            batch["key"], batch["size"], batch["mtime_ns"], batch["file"], batch["tar"], batch["member"], strict=True
        )
    ]


def hash_batch(batch: Batch, *, max_bytes: int, name_node: bool = False) -> Batch:
    """Read each file and hash it: the driver routes content by sha256 (known, a duplicate, or new) before decoding."""
    tars = TarReader()
    shas, reasons, kinds = [], [], []
    try:
        for item in _items(batch):
            try:
                data = read_item(item, max_bytes, tars)
            except Exception as e:
                f = read_failure(e, name_node)
                shas.append("")
                reasons.append(f.reason)
                kinds.append(f.kind)
                continue
            shas.append(hashlib.sha256(data).hexdigest())
            reasons.append("")
            kinds.append("")
    finally:
        tars.close()
    return {"i": batch["i"], "sha256": objects(shas), "error": objects(reasons), "kind": objects(kinds)}


def _pool(data_config: dict[str, Any], max_bytes: int, max_pixels: int, thumbnails: bool) -> DecoderPool:
    key = json.dumps([data_config, max_bytes, max_pixels, thumbnails], sort_keys=True, default=str)
    if key not in _POOLS:
        from indexer.decoder import DecoderPool
        from indexer.model import eval_transform

        _POOLS[key] = DecoderPool(
            workers=1,
            data_config=data_config,
            transform=eval_transform(data_config),
            max_bytes=max_bytes,
            max_pixels=max_pixels,
            thumbnails=thumbnails,
        )
    return _POOLS[key]


def decode_batch(
    batch: Batch,
    *,
    data_config: dict[str, Any],
    max_bytes: int,
    max_pixels: int,
    thumbnails: bool,
    name_node: bool = False,
) -> Batch:
    """Read each file again, check it is still the content the driver routed, and prepare it (`prepare_image`, in
    the decoder process) under the run's limits."""
    from indexer.decoder import DecodeJob

    pool = _pool(data_config, max_bytes, max_pixels, thumbnails)
    tars = TarReader()
    jobs: list[DecodeJob | Failure] = []
    try:
        for item, sha in zip(_items(batch), batch["sha256"], strict=True):
            try:
                data = read_item(item, max_bytes, tars)
            except Exception as e:
                jobs.append(read_failure(e, name_node))
                continue
            if hashlib.sha256(data).hexdigest() != sha:
                jobs.append(Failure("the file changed while it was being indexed: run again", "unreadable", True))
                continue
            jobs.append(pool.submit(item.key, data, str(sha)))
    finally:
        tars.close()
    outcomes: list[Prepared | Failure] = []
    for i, job in enumerate(jobs):
        if isinstance(job, Failure):
            outcomes.append(job)
            continue
        out = pool.outcome(job, waiting=[j for j in jobs[i + 1 :] if isinstance(j, DecodeJob)])
        outcomes.append(out if isinstance(out, Prepared) else Failure(out.reason, out.kind))
    return prepared_batch(batch, outcomes)


class InferenceWorker:
    """An actor of the inference pool: the model loaded once (`Extractor.from_settings`: the run's backend, dtype
    and device), each batch through `run_prepared`, each image's store row from `Analysis.record()`."""

    def __init__(self, settings: Settings) -> None:
        from indexer.extractor import Extractor

        self.ex = Extractor.from_settings(settings)

    def __call__(self, batch: Batch) -> Batch:
        from indexer.analyze import Analysis

        t0 = time.perf_counter()
        prepared = prepared_from_batch(batch)
        good = [p for p in prepared if p is not None]
        results = iter(self.ex.run_prepared(good))
        records = [None if p is None else Analysis(p, next(results)).record() for p in prepared]
        return result_batch(batch, records, time.perf_counter() - t0)
