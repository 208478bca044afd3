"""The cluster tables' SQL (clusterings, clusters, cluster_members): a part of `Store`."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import numpy as np

from search.settings import LEVELS
from search.store.base import StoreBase
from search.store.rows import utcnow
from search.store.sql import chunks, marks

Kind = Literal["group", "cluster"]

_CLUSTER_COLUMNS = "id, kind, size, path_count, representative_id, cohesion, score_stats"


@dataclass(frozen=True)
class ClusteringRecord:
    """One row of `clusterings`: a clustering run, its parameters and what it found."""

    id: int
    created_at: str
    run_id: int | None
    threshold: float
    k: int
    k_requested: int | None
    watermark: int
    images: int
    deletion_epoch: int
    method: str
    params: dict[str, Any]
    timings: dict[str, float]
    groups: int
    grouped_images: int
    clusters: int


@dataclass(frozen=True)
class ClusterRow:
    """One row of `clusters` (a near-duplicate group or a k-means cluster of the latest clustering)."""

    id: int
    kind: Kind
    size: int
    path_count: int
    representative_id: int
    cohesion: float
    score_stats: dict[str, list[float]]

    @classmethod
    def of(cls, row: Sequence[Any]) -> ClusterRow:
        cid, kind, size, path_count, rep, cohesion, stats = row
        return cls(int(cid), cast(Kind, kind), int(size), int(path_count), int(rep), float(cohesion), json.loads(stats))


@dataclass
class ClusterSet:
    """What `replace_clustering` writes for one kind: m sets (arrays of length m) and their members (arrays of one
    length: the set 0..m-1 of each member, its image id and its similarity to the set's representative)."""

    kind: str
    sizes: np.ndarray
    path_counts: np.ndarray
    representative_ids: np.ndarray
    cohesion: np.ndarray
    score_stats: list[dict[str, list[float]]]
    member_set: np.ndarray
    member_ids: np.ndarray
    member_similarity: np.ndarray

    @property
    def m(self) -> int:
        return len(self.sizes)


class ClusterTables(StoreBase):
    """Mixin of `Store`: every SQL statement on the cluster tables lives here."""

    # -- inputs of a run --
    def score_matrix(self, upto_id: int) -> np.ndarray:
        """The cumulative scores (one column per level, LEVELS order) of every image with id <= upto_id, in id order."""
        cols = ", ".join(f"s_{lv}" for lv in LEVELS)
        rows = self.db.execute(f"SELECT {cols} FROM images WHERE id <= ? ORDER BY id", [int(upto_id)]).fetchall()
        return np.asarray(rows, dtype=np.float64).reshape(-1, len(LEVELS))

    def path_counts_upto(self, upto_id: int) -> np.ndarray:
        """(image id, stored paths) rows, int64 N x 2, for every image with id <= upto_id that has a path."""
        rows = self.db.execute(
            "SELECT image_id, COUNT(*) FROM paths WHERE image_id <= ? GROUP BY image_id", [int(upto_id)]
        ).fetchall()
        return np.asarray(rows, dtype=np.int64).reshape(-1, 2)

    def member_path_counts(self, ids: Sequence[int]) -> dict[int, int]:
        """image id -> stored paths, for the given ids (ids without a path are left out)."""
        out: dict[int, int] = {}
        for chunk in chunks([int(i) for i in ids]):
            q = f"SELECT image_id, COUNT(*) FROM paths WHERE image_id IN ({marks(chunk)}) GROUP BY image_id"
            out.update({int(a): int(b) for a, b in self.db.execute(q, chunk)})
        return out

    # -- writing --
    def replace_clustering(
        self,
        *,
        run_id: int | None,
        threshold: float,
        k: int,
        k_requested: int | None,
        watermark: int,
        images: int,
        deletion_epoch: int,
        method: str,
        params: dict[str, Any],
        sets: Sequence[ClusterSet],
        timings: dict[str, float],
    ) -> int:
        """Replace the stored groups and clusters by `sets` and record the clustering, in one transaction; cluster ids
        continue the AUTOINCREMENT sequence (never reused). `timings` gain `write_s`. Returns the clustering id."""
        t0 = time.perf_counter()
        by_kind = {s.kind: s for s in sets}
        group = by_kind.get("group")
        with self.transaction():
            self.db.execute("DELETE FROM cluster_members")
            self.db.execute("DELETE FROM clusters")
            cur = self.db.execute(
                "INSERT INTO clusterings (created_at, run_id, threshold, k, k_requested, watermark, images, "
                "deletion_epoch, method, params, timings, groups, grouped_images, clusters) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                [
                    utcnow(),
                    run_id,
                    threshold,
                    k,
                    k_requested,
                    watermark,
                    images,
                    deletion_epoch,
                    method,
                    json.dumps(params),
                    json.dumps({}),
                    group.m if group else 0,
                    len(group.member_ids) if group else 0,
                    by_kind["cluster"].m if "cluster" in by_kind else 0,
                ],
            )
            clustering_id = int(cur.lastrowid or 0)
            seq = self.db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'clusters'").fetchone()
            base = int(seq[0]) if seq else 0
            conn = self.db.conn
            for s in sets:
                if s.m == 0:
                    continue
                conn.executemany(
                    "INSERT INTO clusters (id, clustering_id, kind, size, path_count, representative_id, cohesion, "
                    "score_stats) VALUES (?,?,?,?,?,?,?,?)",
                    [
                        (
                            base + 1 + c,
                            clustering_id,
                            s.kind,
                            int(s.sizes[c]),
                            int(s.path_counts[c]),
                            int(s.representative_ids[c]),
                            round(float(s.cohesion[c]), 6),
                            json.dumps(s.score_stats[c]),
                        )
                        for c in range(s.m)
                    ],
                )
                conn.executemany(
                    "INSERT INTO cluster_members (cluster_id, image_id, similarity) VALUES (?,?,?)",
                    zip(
                        (s.member_set + base + 1).tolist(),
                        s.member_ids.tolist(),
                        np.round(s.member_similarity, 6).tolist(),
                        strict=True,
                    ),
                )
                base += s.m
            done = {**timings, "write_s": time.perf_counter() - t0}
            self.db.execute(
                "UPDATE clusterings SET timings = ? WHERE id = ?",
                [json.dumps({k_: round(v, 3) for k_, v in done.items()}), clustering_id],
            )
        return clustering_id

    # -- reading --
    @contextlib.contextmanager
    def read_snapshot(self) -> Iterator[None]:
        """One read transaction, so that a clustering committed meanwhile is seen whole or not at all."""
        conn = self.db.conn
        if conn.in_transaction:
            yield
            return
        conn.execute("BEGIN")
        try:
            yield
        finally:
            if conn.in_transaction:
                conn.execute("COMMIT")

    def latest_clustering(self) -> ClusteringRecord | None:
        cur = self.db.execute("SELECT * FROM clusterings ORDER BY id DESC LIMIT 1")
        row = cur.fetchone()
        if row is None:
            return None
        out = dict(zip([c[0] for c in cur.description], row, strict=True))
        out["params"] = json.loads(out["params"])
        out["timings"] = json.loads(out["timings"])
        return ClusteringRecord(**out)

    def cluster_count(self, kind: str) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM clusters WHERE kind = ?", [kind]).fetchone()[0])

    def cluster_kinds(self) -> dict[int, str]:
        """cluster id -> kind (group or cluster), for every stored set."""
        return {int(i): k for i, k in self.db.execute("SELECT id, kind FROM clusters")}

    def cluster_ids(self, kind: str) -> list[int]:
        return [int(r[0]) for r in self.db.execute("SELECT id FROM clusters WHERE kind = ? ORDER BY id", [kind])]

    def largest_groups(self, limit: int = 5) -> list[int]:
        """The sizes of the `limit` largest near-duplicate groups, largest first."""
        q = "SELECT size FROM clusters WHERE kind = 'group' ORDER BY size DESC, id LIMIT ?"
        return [int(r[0]) for r in self.db.execute(q, [int(limit)])]

    def clusters_by_size(self, kind: str, *, limit: int, offset: int = 0) -> list[ClusterRow]:
        """One page of sets of `kind`, biggest first, ties by id."""
        rows = self.db.execute(
            f"SELECT {_CLUSTER_COLUMNS} FROM clusters WHERE kind = ? ORDER BY size DESC, id LIMIT ? OFFSET ?",
            [kind, int(limit), int(offset)],
        )
        return [ClusterRow.of(r) for r in rows]

    def cluster_rows(self, ids: Sequence[int]) -> list[ClusterRow]:
        """The rows of the given cluster ids, in the order given (unknown ids are left out)."""
        by_id: dict[int, ClusterRow] = {}
        for chunk in chunks([int(i) for i in ids]):
            q = f"SELECT {_CLUSTER_COLUMNS} FROM clusters WHERE id IN ({marks(chunk)})"
            by_id.update({int(r[0]): ClusterRow.of(r) for r in self.db.execute(q, chunk)})
        return [by_id[int(i)] for i in ids if int(i) in by_id]

    def cluster_row(self, cluster_id: int) -> ClusterRow | None:
        row = self.db.execute(f"SELECT {_CLUSTER_COLUMNS} FROM clusters WHERE id = ?", [int(cluster_id)]).fetchone()
        return None if row is None else ClusterRow.of(row)

    def cluster_members(self, cluster_id: int) -> list[tuple[int, float]]:
        """(image id, similarity to the representative) of one set, most similar first, ties by id."""
        rows = self.db.execute(
            "SELECT image_id, similarity FROM cluster_members WHERE cluster_id = ? ORDER BY similarity DESC, image_id",
            [int(cluster_id)],
        )
        return [(int(i), float(s)) for i, s in rows]

    def unsafe_counts(self, image_ids: Sequence[int], kind: str | None = None) -> dict[int, int]:
        """cluster id -> how many of `image_ids` (the known-unsafe images) it holds; sets holding none are left out.

        One statement over a JSON array (json_each), not IN-list chunks: the list can hold every known-unsafe image
        of the store, and the counts are grouped over all of them."""
        if not image_ids:
            return {}
        q = (
            "SELECT m.cluster_id, COUNT(*) FROM cluster_members m JOIN clusters c ON c.id = m.cluster_id "
            "WHERE m.image_id IN (SELECT value FROM json_each(?))"
            + (" AND c.kind = ?" if kind else "")
            + " GROUP BY m.cluster_id"
        )
        args: list[Any] = [json.dumps(sorted(int(i) for i in image_ids))] + ([kind] if kind else [])
        return {int(c): int(n) for c, n in self.db.execute(q, args)}

    def cluster_memberships(self, kind: str) -> dict[int, int]:
        """image id -> id of its set of `kind` in the latest clustering (images in none are left out)."""
        rows = self.db.execute(
            "SELECT m.image_id, m.cluster_id FROM cluster_members m JOIN clusters c ON c.id = m.cluster_id "
            "WHERE c.kind = ?",
            [kind],
        )
        return {int(i): int(c) for i, c in rows}
