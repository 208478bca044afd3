"""The runs and errors tables' SQL: what each writing run did, and the files that failed."""

from __future__ import annotations

import json
from typing import Any

from search.store.base import StoreBase
from search.store.rows import utcnow


class RunTables(StoreBase):
    """Mixin of `Store`: index runs (begun, finished, interrupted) and per-file errors."""

    def begin_run(self, kind: str, args: dict[str, Any]) -> int:
        with self.db.conn:
            # a run left 'running' by a killed writer is marked, now that we hold the lock
            self.db.execute("UPDATE runs SET status = 'interrupted' WHERE status = 'running'")
            cur = self.db.execute(
                "INSERT INTO runs (kind, started_at, status, args) VALUES (?, ?, 'running', ?)",
                [kind, utcnow(), json.dumps(args, default=str)],
            )
        return int(cur.lastrowid or 0)

    def finish_run(self, run_id: int, status: str, counts: dict[str, Any], timings: dict[str, Any]) -> None:
        with self.db.conn:
            self.db.execute(
                "UPDATE runs SET finished_at = ?, status = ?, counts = ?, timings = ? WHERE id = ?",
                [utcnow(), status, json.dumps(counts), json.dumps(timings), run_id],
            )

    def recent_runs(self, limit: int = 5) -> list[dict[str, Any]]:
        """id, status, started_at, finished_at of the latest runs, newest first."""
        return [
            dict(zip(("id", "status", "started_at", "finished_at"), r, strict=True))
            for r in self.db.execute(
                "SELECT id, status, started_at, finished_at FROM runs ORDER BY id DESC LIMIT ?", [int(limit)]
            )
        ]

    def errors(self, limit: int | None = None) -> list[dict[str, Any]]:
        q = "SELECT path, reason, kind, run_id, at FROM errors ORDER BY path" + (
            f" LIMIT {int(limit)}" if limit else ""
        )
        return [dict(zip(("path", "reason", "kind", "run_id", "at"), r, strict=True)) for r in self.db.execute(q)]

    def count_errors(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM errors").fetchone()[0])
