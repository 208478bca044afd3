"""The probes table's SQL: linear probes on the stored embeddings (one row per name) and the labels they train on."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from search.probes import Probe
from search.store.base import StoreBase
from search.store.rows import utcnow

#: store_info key bumped in every transaction that writes the probes table: readers cache decoded probes on it.
PROBES_EPOCH = "probes_epoch"
_COLUMNS = (
    "name, classes, dim, coef, intercept, model, label_source, label_watermark, examples, metrics, params, trained_at"
)


def _probe(row: Sequence[Any]) -> Probe:
    name, classes, dim, coef, intercept, model, source, watermark, examples, metrics, params, at = row
    return Probe(
        name=str(name),
        classes=tuple(json.loads(classes)),
        coef=np.frombuffer(coef, dtype=np.float64).reshape(-1, int(dim)).copy(),
        intercept=np.frombuffer(intercept, dtype=np.float64).copy(),
        model=json.loads(model),
        label_source=str(source),
        label_watermark=int(watermark),
        examples=int(examples),
        metrics=json.loads(metrics),
        params=json.loads(params),
        trained_at=str(at),
    )


class ProbeTables(StoreBase):
    """Mixin of `Store`: stored probes (weights, classes, the embedding model's identity, the label-log watermark)."""

    def probes_epoch(self) -> int:
        return int(self.get_info(PROBES_EPOCH, 0))

    def probes(self) -> list[Probe]:
        """Every stored probe, by name (decoded once per change of the table on this handle)."""
        epoch = self.probes_epoch()
        cached: tuple[int, list[Probe]] | None = getattr(self, "_probe_cache", None)
        if cached is None or cached[0] != epoch:
            rows = self.db.execute(f"SELECT {_COLUMNS} FROM probes ORDER BY name").fetchall()
            cached = (epoch, [_probe(r) for r in rows])
            self._probe_cache = cached
        return list(cached[1])

    def save_probe(self, probe: Probe) -> str:
        """Store `probe` (replacing one of the same name) in one transaction; returns its trained_at."""
        at = utcnow()
        with self.transaction() as conn:
            conn.execute(
                f"INSERT OR REPLACE INTO probes ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                [
                    probe.name,
                    json.dumps(list(probe.classes)),
                    probe.dim,
                    np.ascontiguousarray(probe.coef, np.float64).tobytes(),
                    np.ascontiguousarray(probe.intercept, np.float64).tobytes(),
                    json.dumps(probe.model, sort_keys=True),
                    probe.label_source,
                    int(probe.label_watermark),
                    int(probe.examples),
                    json.dumps(probe.metrics),
                    json.dumps(probe.params),
                    at,
                ],
            )
            self._bump_probes_epoch(conn)
        return at

    def delete_probe(self, name: str) -> bool:
        """Drop the probe `name`; False when there is none."""
        with self.transaction() as conn:
            gone = conn.execute("DELETE FROM probes WHERE name = ?", [name]).rowcount > 0
            if gone:
                self._bump_probes_epoch(conn)
        return gone

    def _bump_probes_epoch(self, conn: Any) -> None:
        row = conn.execute("SELECT value FROM store_info WHERE key = ?", [PROBES_EPOCH]).fetchone()
        epoch = (json.loads(row[0]) if row else 0) + 1
        conn.execute("INSERT OR REPLACE INTO store_info (key, value) VALUES (?, ?)", [PROBES_EPOCH, json.dumps(epoch)])

    def probe_label_snapshot(self) -> tuple[dict[int, str], int]:
        """(image id -> current human label, `unsafe` or `safe`, for indexed images; the latest label event id),
        read in one statement so that the watermark covers exactly the labels returned."""
        rows = self.db.execute(
            "SELECT NULL, NULL, (SELECT COALESCE(MAX(id), 0) FROM labels) UNION ALL "
            "SELECT i.id, c.label, NULL FROM current_labels c JOIN images i ON i.sha256 = c.sha256 "
            "WHERE c.label IN ('unsafe', 'safe')"
        ).fetchall()
        watermark = next(int(r[2]) for r in rows if r[0] is None)
        return {int(r[0]): str(r[1]) for r in rows if r[0] is not None}, watermark
