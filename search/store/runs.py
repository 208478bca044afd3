"""The runs and errors tables' SQL: what each writing run did, and the files that failed."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from search.store.base import StoreBase
from search.store.rows import utcnow
from search.store.sql import marks

_ERROR_COLUMNS = ("path", "reason", "kind", "run_id", "at", "size", "mtime_ns")


class RunTables(StoreBase):
    """Mixin of `Store`: index runs (begun, finished, interrupted) and per-file errors."""

    def begin_run(self, kind: str, args: dict[str, Any], *, engine: Mapping[str, str] | None = None) -> int:
        """A new run, `running`; `engine`: the backend, dtype and runtime writing its vectors (`Extractor.describe`)."""
        e = engine or {}
        with self.db.conn:
            # a run left 'running' by a killed writer is marked, now that we hold the lock
            self.db.execute("UPDATE runs SET status = 'interrupted' WHERE status = 'running'")
            cur = self.db.execute(
                "INSERT INTO runs (kind, started_at, status, args, backend, dtype, runtime)"
                " VALUES (?, ?, 'running', ?, ?, ?, ?)",
                [kind, utcnow(), json.dumps(args, default=str), e.get("backend"), e.get("dtype"), e.get("runtime")],
            )
        return int(cur.lastrowid or 0)

    def vectors_by_engine(self) -> list[dict[str, Any]]:
        """How many stored images each backend/dtype produced (NULLs: written before runs recorded it)."""
        rows = self.db.execute(
            "SELECT r.backend, r.dtype, r.runtime, COUNT(*) FROM images i LEFT JOIN runs r ON r.id = i.run_id"
            " GROUP BY r.backend, r.dtype, r.runtime ORDER BY COUNT(*) DESC"
        )
        return [{"backend": b, "dtype": d, "runtime": rt, "images": int(n)} for b, d, rt, n in rows]

    def finish_run(self, run_id: int, status: str, counts: dict[str, Any], timings: dict[str, Any]) -> None:
        with self.db.conn:
            self.db.execute(
                "UPDATE runs SET finished_at = ?, status = ?, counts = ?, timings = ? WHERE id = ?",
                [utcnow(), status, json.dumps(counts), json.dumps(timings), run_id],
            )

    def recent_runs(self, limit: int = 5) -> list[dict[str, Any]]:
        """id, kind, status, started_at, finished_at, backend, dtype of the latest runs, newest first."""
        cols = ("id", "kind", "status", "started_at", "finished_at", "backend", "dtype")
        return [
            dict(zip(cols, r, strict=True))
            for r in self.db.execute(f"SELECT {', '.join(cols)} FROM runs ORDER BY id DESC LIMIT ?", [int(limit)])
        ]

    def errors(self, limit: int | None = None, *, kinds: Sequence[str] = ()) -> list[dict[str, Any]]:
        """The per-file errors (path, reason, kind, run_id, at, size, mtime_ns) by path, only `kinds` if given."""
        where = f" WHERE kind IN ({marks(list(kinds))})" if kinds else ""
        q = f"SELECT {', '.join(_ERROR_COLUMNS)} FROM errors{where} ORDER BY path" + (
            f" LIMIT {int(limit)}" if limit else ""
        )
        return [dict(zip(_ERROR_COLUMNS, r, strict=True)) for r in self.db.execute(q, list(kinds))]

    def count_errors(self, *, kinds: Sequence[str] = ()) -> int:
        where = f" WHERE kind IN ({marks(list(kinds))})" if kinds else ""
        return int(self.db.execute(f"SELECT COUNT(*) FROM errors{where}", list(kinds)).fetchone()[0])

    def error_kinds(self) -> dict[str, int]:
        """kind -> how many files have an error of that kind."""
        return {str(k): int(n) for k, n in self.db.execute("SELECT kind, COUNT(*) FROM errors GROUP BY kind")}

    def all_error_states(self) -> dict[str, tuple[int, int, str]]:
        """path -> (size, mtime_ns, kind) of every failed file whose size and mtime are known (an index run skips it
        while both are unchanged)."""
        return {
            r[0]: (int(r[1]), int(r[2]), str(r[3]))
            for r in self.db.execute(
                "SELECT path, size, mtime_ns, kind FROM errors WHERE size IS NOT NULL AND mtime_ns IS NOT NULL"
            )
        }
