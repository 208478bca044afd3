"""Answers from a store: nearest known-unsafe images, near-duplicates and PDQ matches for an embedding or an id."""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

import faiss
import numpy as np

from search.answers import (
    EmbeddingAnswer,
    ExactDuplicates,
    NearDuplicate,
    NeighboursAnswer,
    Nsfw,
    Pdq,
    PdqMatch,
    SearchAnswer,
    UnsafeNeighbour,
)
from search.errors import IndexMismatch, InvalidArgument
from search.pdq import HashMatcher, match_transforms
from search.policy import SOURCES, is_nsfw
from search.probes import probes_for_vector
from search.settings import Settings
from search.store import Store
from search.vectors import IndexFiles, Snapshot, search_one, set_search_params

log = logging.getLogger(__name__)

DEFAULT_NEAR_DUPLICATE_LIMIT = 100
#: float32 rounding puts a unit vector's similarity with itself a hair above 1: that much is clamped, more is damage
SIMILARITY_SLACK = 1e-3


class Searcher:
    """The read side of a store: FAISS snapshots kept in step with SQLite by `refresh()`. Thread-safe.

    With `persist=True` (the caller holds the writer lock) catch-ups are written back to the FAISS files; readers
    leave files alone and catch up in memory, so they never block or disturb a writer. The searcher owns `store`:
    `close()` closes it.
    """

    def __init__(self, store: Store, settings: Settings, *, persist: bool = False) -> None:
        self.settings = settings
        self.store = store
        self.persist = persist
        self.files = IndexFiles(self.store, settings)
        self._lock = threading.RLock()
        self._all: Snapshot | None = None
        self._unsafe: Snapshot | None = None
        self._unsafe_map: dict[int, list[str]] = {}
        self._token: tuple[Any, ...] | None = None
        self._lists: HashMatcher | None = None
        self._list_rows: dict[int, tuple[str, str, str | None]] = {}
        self._labelled: HashMatcher | None = None
        self.loaded_at = 0.0
        self.refresh()

    @classmethod
    def open(cls, store_dir: str | os.PathLike[str], settings: Settings, *, persist: bool = False) -> Searcher:
        """A searcher over the store at `store_dir`, opened read-only unless `persist` (then the caller holds the
        writer lock)."""
        store = Store(store_dir, readonly=not persist)
        try:
            return cls(store, settings, persist=persist)
        except BaseException:
            store.close()
            raise

    # -- keeping up with the store -------------------------------------------------------------------------------------
    def state_token(self) -> tuple[Any, ...]:
        """Changes whenever anything the answers depend on changes in SQLite."""
        return (
            *self.store.answer_state(),
            str(self.store.get_info("index_factory", "Flat")),
            tuple((n, (self.files.read_manifest(n) or {}).get("generation")) for n in ("all", "unsafe")),
        )

    def refresh(self, force: bool = False) -> bool:
        """Catch up with SQLite and newer FAISS snapshots. Returns True when something changed."""
        with self._lock:
            if self.store.model_identity() is None:
                self._token = None
                return False
            token = self.state_token()
            if token == self._token and not force:
                return False
            gen_now = dict(token[-1])
            if (
                self._all is None
                or (gen_now.get("all") or 0) != self._all.generation
                or token[2] != (self._token or (0,) * 3)[2]
            ):
                self._all = self.files.open_all(persist=self.persist)  # the newer snapshot, caught up
            else:
                try:
                    self.files.catch_up_all(self._all)
                except IndexMismatch as e:  # never serve an index that disagrees with SQLite
                    log.warning("%s: reloading", e)
                    self._all = self.files.open_all(persist=self.persist)
            set_search_params(self._all.index, self.settings)
            self._unsafe_map = self.store.known_unsafe(self.settings)
            snap = self._unsafe
            if snap is None or (gen_now.get("unsafe") or 0) != snap.generation:
                snap = self.files.load("unsafe")
            rebuilt = snap is None
            self._unsafe, added, removed = self.files.sync_unsafe(snap, set(self._unsafe_map))
            if self.persist and (added or removed or (rebuilt and "unsafe" in self.files.problems)):
                self.files.save(self._unsafe)
            self._load_hash_matchers()
            self._token = self.state_token() if self.persist else token
            self.loaded_at = time.time()
            return True

    def _load_hash_matchers(self) -> None:
        rows = self.store.hash_list_entries()
        self._lists = HashMatcher() if rows else None
        if self._lists is not None:
            self._lists.add([r[0] for r in rows], [r[1] for r in rows])
        self._list_rows = {r[0]: (r[1], r[2], r[3]) for r in rows}
        human = [i for i, s in self._unsafe_map.items() if "human" in s]
        hashed = [(i, r.pdq.hash) for i, r in self.store.images(human).items() if r.pdq.hash]
        self._labelled = HashMatcher() if hashed else None
        if self._labelled is not None:
            self._labelled.add([i for i, _ in hashed], [h for _, h in hashed])

    @property
    def ready(self) -> bool:
        return self._all is not None

    def index_info(self) -> dict[str, Any]:
        with self._lock:
            return {
                "images": int(self._all.index.ntotal) if self._all else 0,
                "known_unsafe": int(self._unsafe.index.ntotal) if self._unsafe else 0,
                "generation": self._all.generation if self._all else None,
                "factory": self.files.factory_for("all"),
                "loaded_at": self.loaded_at,
                "problems": self.index_problems(),
            }

    def index_problems(self) -> list[str]:
        """Damage found in the FAISS files on disk when they were loaded (the served index was rebuilt from SQLite
        instead; a writer has rewritten the file, a reader leaves that to the next writer)."""
        with self._lock:
            return [f"{msg}; serving an index rebuilt from SQLite" for _, msg in sorted(self.files.problems.items())]

    def close(self) -> None:
        self.store.close()

    def indexed_id(self, sha256: str) -> int | None:
        """The id of this exact content in the store, if it is indexed."""
        with self._lock:
            return self.store.ids_by_sha([sha256]).get(sha256)

    def paths_of(self, image_id: int) -> list[str]:
        """The stored paths of an image (sorted; [] when it is gone)."""
        with self._lock:
            return self.store.paths_of([image_id])[image_id]

    # -- queries --
    def nearest_unsafe(
        self,
        vec: np.ndarray,
        k: int | None = None,
        *,
        sources: Sequence[str] | None = None,
        min_similarity: float | None = None,
        exclude: Sequence[int] = (),
    ) -> list[UnsafeNeighbour]:
        """The k nearest known-unsafe images (cosine), each with why it is known-unsafe."""
        k = k or self.settings.k
        if sources:
            bad = set(sources) - set(SOURCES)
            if bad:
                raise InvalidArgument(f"unknown source(s) {sorted(bad)}; sources are {list(SOURCES)}")
        with self._lock:
            if self._unsafe is None or self._unsafe.index.ntotal == 0:
                return []
            skip = set(exclude)
            q = _as_query(vec)
            if sources:  # a source filter: search only the ids it allows (exact, whatever their share)
                wanted = set(sources)
                allowed = [i for i, s in self._unsafe_map.items() if wanted.intersection(s) and i not in skip]
                if not allowed:
                    return []
                sel = faiss.IDSelectorBatch(np.asarray(allowed, dtype=np.int64))
                params = faiss.SearchParameters(sel=sel)  # type: ignore[call-arg,unused-ignore]  # SWIG stubs
                sims, ids = search_one(self._unsafe.index, q, min(k, len(allowed)), params)
            else:  # no selector to build per query: a few extra results cover the excluded ids
                sims, ids = search_one(self._unsafe.index, q, min(k + len(skip), int(self._unsafe.index.ntotal)))
            hits = [(int(i), float(s)) for i, s in zip(ids[0], sims[0], strict=True) if i >= 0 and i not in skip]
            hits = bounded(hits)[:k]
            if min_similarity is not None:
                hits = [(i, s) for i, s in hits if s >= min_similarity]
            rows = self.store.images([i for i, _ in hits])
            paths = self.store.paths_of([i for i, _ in hits])
            return [
                UnsafeNeighbour(
                    id=i,
                    similarity=s,
                    scores=rows[i].scores,
                    level=rows[i].level,
                    sources=self._unsafe_map.get(i, []),
                    paths=paths.get(i, []),
                )
                for i, s in hits
                if i in rows
            ]

    def near_duplicates(
        self,
        vec: np.ndarray,
        threshold: float | None = None,
        *,
        limit: int = DEFAULT_NEAR_DUPLICATE_LIMIT,
        exclude: Sequence[int] = (),
    ) -> list[NearDuplicate]:
        """Images of the whole corpus with cosine similarity >= threshold, most similar first (at most `limit`)."""
        t = self.settings.near_duplicate_threshold if threshold is None else threshold
        with self._lock:
            if self._all is None or self._all.index.ntotal == 0:
                return []
            q = _as_query(vec)
            # top (limit + excluded), then the threshold: the same answer as a range search cut at `limit`, without
            # materialising every vector above a low threshold (a range search at 0.5 over 1M images returns ~all)
            kk = min(self._all.index.ntotal, limit + len(exclude))
            sims, ids = self._all.search(q, kk)  # a lossy index's candidates re-ranked exactly
            hits = [(int(i), float(s)) for i, s in zip(ids[0], sims[0], strict=True) if i >= 0]
            skip = set(exclude)
            hits = sorted(((i, s) for i, s in bounded(hits) if s >= t and i not in skip), key=lambda h: (-h[1], h[0]))
            return [NearDuplicate(id=i, similarity=s) for i, s in hits[:limit]]

    def pdq_matches(
        self, pdq_hash: str | None, max_distance: int | None = None, *, dihedral: Sequence[str] | None = None
    ) -> list[PdqMatch]:
        """Imported hash-list entries and human-labelled unsafe images within the PDQ distance of the hash or of one
        of its `dihedral` hashes (the 7 others, search.pdq.DIHEDRAL[1:] order; None: the hash alone), each with the
        transform that matched (the closest one per entry or image)."""
        if not pdq_hash:
            return []
        d = self.settings.pdq_max_distance if max_distance is None else max_distance
        hashes = [[pdq_hash, *(dihedral or ())]]
        out: list[PdqMatch] = []
        with self._lock:
            if self._lists is not None:
                for hid, dist, t in match_transforms(self._lists, hashes, d)[0]:
                    h, name, note = self._list_rows[hid]
                    out.append(
                        PdqMatch(
                            source="hash_list", list=name, entry=hid, hash=h, note=note, distance=dist, transform=t
                        )
                    )
            if self._labelled is not None:
                for image_id, dist, t in match_transforms(self._labelled, hashes, d)[0]:
                    out.append(PdqMatch(source="human", id=image_id, distance=dist, transform=t))
        return sorted(out, key=lambda m: m.distance)

    def answer(
        self,
        embedding: np.ndarray,
        *,
        pdq: str | None,
        quality: int | None,
        pdq_dihedral: Sequence[str] | None = None,
        k: int | None = None,
        sources: Sequence[str] | None = None,
        min_similarity: float | None = None,
        threshold: float | None = None,
        exclude: Sequence[int] = (),
    ) -> SearchAnswer:
        """The `nearest_unsafe`, `near_duplicates` and `pdq` parts of a query answer."""
        return SearchAnswer(
            nearest_unsafe=self.nearest_unsafe(
                embedding, k, sources=sources, min_similarity=min_similarity, exclude=exclude
            ),
            near_duplicates=self.near_duplicates(embedding, threshold, exclude=exclude),
            pdq=Pdq(hash=pdq, quality=quality, matches=self.pdq_matches(pdq, dihedral=pdq_dihedral)),
            probes=self.probes(embedding),
        )

    def probes(self, embedding: np.ndarray) -> dict[str, dict[str, float]]:
        """The store's probes applied to one vector of its model (search.probes; {} when it has none)."""
        with self._lock:
            return probes_for_vector(self.store, embedding)

    def embedding_answer(
        self,
        values: Any,
        *,
        k: int | None = None,
        sources: Sequence[str] | None = None,
        min_similarity: float | None = None,
        threshold: float | None = None,
    ) -> EmbeddingAnswer:
        """The answer for a query vector, without the model: `as_embedding` checks it against the store's model
        (InvalidArgument) and L2-normalises it; nothing is left out (a stored vector finds its own image)."""
        vec = as_embedding(values, self.store.embedding_dim())
        return EmbeddingAnswer(
            nearest_unsafe=self.nearest_unsafe(vec, k, sources=sources, min_similarity=min_similarity),
            near_duplicates=self.near_duplicates(vec, threshold),
        )

    def neighbours(
        self,
        image_id: int,
        *,
        k: int | None = None,
        sources: Sequence[str] | None = None,
        min_similarity: float | None = None,
        threshold: float | None = None,
    ) -> NeighboursAnswer:
        """The answer for an indexed image, without running the model: it leaves itself out."""
        with self._lock:
            row = self.store.image(image_id)
            vec = self.store.vectors([image_id])[0]
            paths = self.store.paths_of([image_id])[image_id]
            ans = self.answer(
                vec,
                pdq=row.pdq.hash,
                quality=row.pdq.quality,
                pdq_dihedral=self.store.dihedral_hashes([image_id]).get(image_id),
                k=k,
                sources=sources,
                min_similarity=min_similarity,
                threshold=threshold,
                exclude=[image_id],
            )
            ans.pdq.matches = [m for m in ans.pdq.matches if m.id != image_id]
            sources_now = self._unsafe_map.get(image_id, [])
            override = self.store.hash_list_overrides(self.settings, [image_id]).get(image_id)
        return NeighboursAnswer(
            id=image_id,
            nsfw=Nsfw(
                probabilities=row.probabilities,
                scores=row.scores,
                level=row.level,
                is_nsfw=is_nsfw(row.scores.to_json(), self.settings),
            ),
            known_unsafe_sources=sources_now,
            exact_duplicates=ExactDuplicates(count=max(0, len(paths) - 1), paths=paths),
            nearest_unsafe=ans.nearest_unsafe,
            near_duplicates=ans.near_duplicates,
            pdq=ans.pdq,
            hash_list_override=override,
            probes=ans.probes,
        )


def bounded(hits: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """Cosine similarities of unit vectors lie in [-1, 1]: rounding is clamped; anything further out (or not finite)
    can only come from a damaged vector and is dropped, never returned."""
    out: list[tuple[int, float]] = []
    for i, s in hits:
        if not math.isfinite(s) or abs(s) > 1.0 + SIMILARITY_SLACK:
            log.error("similarity %r for image %d is impossible (damaged index?): left out", s, i)
            continue
        out.append((i, min(1.0, max(-1.0, s))))
    return out


def as_embedding(values: Any, dim: int) -> np.ndarray:
    """A query embedding from a caller: exactly `dim` finite numbers, not all zero (InvalidArgument saying which
    rule failed), L2-normalised (float32), as stored embeddings are."""
    if isinstance(values, np.ndarray) and values.dtype.kind not in "fiu":
        raise InvalidArgument(f"the embedding must hold numbers, not {values.dtype} values")
    try:
        v = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise InvalidArgument(f"the embedding must be a list of {dim} numbers") from None
    if v.ndim != 1 or v.shape[0] != dim:
        what = f"{v.shape[0]} numbers" if v.ndim == 1 else f"an array of shape {list(v.shape)}"
        raise InvalidArgument(f"the embedding must be one vector of {dim} numbers (the store's model), not {what}")
    bad = np.flatnonzero(~np.isfinite(v))
    if bad.size:
        raise InvalidArgument(f"the embedding must be finite: element {int(bad[0])} is {v[bad[0]]}")
    scale = float(np.abs(v).max())
    if scale == 0.0:
        raise InvalidArgument("the embedding is all zeros: it has no direction to compare")
    v = v / scale  # no overflow in the norm of large values
    return (v / np.linalg.norm(v)).astype(np.float32)


def _as_query(vec: np.ndarray) -> np.ndarray:
    q = np.asarray(vec, dtype=np.float32).reshape(1, -1)
    n = np.linalg.norm(q)
    if not np.isfinite(n) or n == 0:
        raise InvalidArgument("query embedding must be a finite, non-zero vector")
    return np.ascontiguousarray(q / n)
