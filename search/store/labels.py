"""The label log's SQL (an append-only, hash-chained event log keyed by content sha256) and the known-unsafe query."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any, NamedTuple

from search.answers import HashListOverride, LabelEvent
from search.policy import model_flags, unsafe_sources
from search.settings import Settings
from search.store.chain import HEAD_KEY, check_chain, event_hash, head, record_head
from search.store.images import ImageTables
from search.store.rows import utcnow
from search.store.sql import chunks, marks

_EVENT_COLUMNS = "l.id, l.label, l.who, l.at, l.reason, l.override_hash_lists"


class _Current(NamedTuple):
    """An image's current (latest) label event."""

    event: int
    label: str
    who: str
    at: str
    reason: str | None
    override: bool


def _event(row: Sequence[Any]) -> LabelEvent:
    return LabelEvent(
        event=int(row[0]), label=row[1], who=row[2], at=row[3], reason=row[4], override_hash_lists=bool(row[5])
    )


class LabelTables(ImageTables):
    """Mixin of `Store`: label events, current labels, and which images are known-unsafe and why."""

    def append_labels(
        self, events: Sequence[tuple[int, str, str | None]], who: str, *, override_hash_lists: bool = False
    ) -> list[LabelEvent]:
        """Append one event (image id, label, reason) per item, all at one time, in one transaction; each event is
        chained to the one before it (search/store/chain.py). `override_hash_lists` marks `safe` events that also
        override hash-list matches."""
        out = []
        with self.transaction() as conn:
            now = utcnow()
            last_id, prev = head(conn)
            for image_id, label, reason in events:
                row = conn.execute("SELECT sha256 FROM images WHERE id = ?", [image_id]).fetchone()
                if row is None:
                    raise ValueError(f"internal: no image with id {image_id}")
                last_id, flag = last_id + 1, int(override_hash_lists)
                digest = event_hash(last_id, row[0], label, who, now, reason, flag, prev)
                conn.execute(
                    "INSERT INTO labels (id, sha256, label, who, at, reason, override_hash_lists, prev_hash, hash) "
                    "VALUES (?,?,?,?,?,?,?,?,?)",
                    [last_id, row[0], label, who, now, reason, flag, prev, digest],
                )
                prev = digest
                out.append(
                    LabelEvent(
                        event=last_id, label=label, who=who, at=now, reason=reason, override_hash_lists=bool(flag)
                    )
                )
            if out:
                record_head(conn, last_id, prev)
        return out

    def label_history(self, image_id: int) -> list[LabelEvent]:
        """The label events of this image's content, oldest first."""
        cur = self.db.execute(
            f"SELECT {_EVENT_COLUMNS} FROM labels l JOIN images i ON i.sha256 = l.sha256 WHERE i.id = ? ORDER BY l.id",
            [image_id],
        )
        return [_event(r) for r in cur]

    def _current_events(self, ids: Sequence[int] | None = None) -> dict[int, _Current]:
        """image id -> its latest label event, for images whose latest event is not a `clear`."""
        q = (
            "SELECT i.id, c.event_id, c.label, c.who, c.at, c.reason, c.override_hash_lists FROM current_labels c "
            "JOIN images i ON i.sha256 = c.sha256 WHERE c.label != 'clear'"
        )
        rows: list[Any] = []
        if ids is None:
            rows = self.db.execute(q).fetchall()
        else:
            for chunk in chunks([int(i) for i in ids]):
                rows += self.db.execute(f"{q} AND i.id IN ({marks(chunk)})", chunk).fetchall()
        return {int(r[0]): _Current(int(r[1]), str(r[2]), str(r[3]), str(r[4]), r[5], bool(r[6])) for r in rows}

    def current_labels(self, ids: Sequence[int] | None = None) -> dict[int, str]:
        """image id -> its latest label (`unsafe` or `safe`; a `clear` leaves the image out)."""
        return {i: c.label for i, c in self._current_events(ids).items()}

    def label_counts(self) -> dict[str, int]:
        """Current labels (clear included) -> how many contents carry them."""
        return {
            str(lab): int(n) for lab, n in self.db.execute("SELECT label, COUNT(*) FROM current_labels GROUP BY label")
        }

    def last_label_event(self) -> int:
        return int(self.db.execute("SELECT COALESCE(MAX(id), 0) FROM labels").fetchone()[0])

    def model_flagged(self, settings: Settings, ids: Sequence[int] | None = None) -> set[int]:
        """Images whose score at the configured level reaches the threshold (only among `ids` when given)."""
        col, threshold = model_flags(settings)
        q = f"SELECT id FROM images WHERE {col} >= ?"
        if ids is None:
            return {int(r[0]) for r in self.db.execute(q, [threshold])}
        out: set[int] = set()
        for chunk in chunks([int(i) for i in ids]):
            out.update(int(r[0]) for r in self.db.execute(f"{q} AND id IN ({marks(chunk)})", [threshold, *chunk]))
        return out

    def hash_list_imports(self, max_distance: int, ids: Sequence[int] | None = None) -> dict[int, str]:
        """Images with a hash-list match within `max_distance` bits -> when the latest of their matching lists was
        imported (only among `ids` when given)."""
        q = (
            "SELECT m.image_id, MAX(l.imported_at) FROM hash_matches m JOIN list_hashes h ON h.id = m.list_hash_id "
            "JOIN hash_lists l ON l.id = h.list_id WHERE m.distance <= ?"
        )
        if ids is None:
            return {int(r[0]): str(r[1]) for r in self.db.execute(f"{q} GROUP BY m.image_id", [max_distance])}
        out: dict[int, str] = {}
        for chunk in chunks([int(i) for i in ids]):
            cur = self.db.execute(f"{q} AND m.image_id IN ({marks(chunk)}) GROUP BY m.image_id", [max_distance, *chunk])
            out.update({int(r[0]): str(r[1]) for r in cur})
        return out

    def hash_list_overrides(self, settings: Settings, ids: Sequence[int] | None = None) -> dict[int, HashListOverride]:
        """Images whose current label is an explicit override of their hash-list matches -> that override. It is in
        force unless a matching list was imported (or imported again) after it."""
        listed = self.hash_list_imports(settings.pdq_max_distance, ids)
        return {
            i: HashListOverride(event=c.event, who=c.who, at=c.at, reason=c.reason, in_force=listed.get(i, "") <= c.at)
            for i, c in self._current_events(ids).items()
            if c.override and c.label == "safe"
        }

    def known_unsafe(self, settings: Settings, ids: Sequence[int] | None = None) -> dict[int, list[str]]:
        """Why images are known-unsafe (search.policy.unsafe_sources). `ids` None: every known-unsafe image ->
        its sources; `ids` given: every given id -> its sources (possibly [])."""
        events = self._current_events(ids)
        listed = self.hash_list_imports(settings.pdq_max_distance, ids)
        flagged = self.model_flagged(settings, ids)
        if ids is None:
            candidates = list(
                dict.fromkeys(
                    [*(i for i, c in events.items() if c.label == "unsafe"), *sorted(listed), *sorted(flagged)]
                )
            )
        else:
            candidates = [int(i) for i in ids]
        out: dict[int, list[str]] = {}
        for i in candidates:
            c = events.get(i)
            sources = unsafe_sources(
                label=c.label if c else None,
                hash_listed=i in listed,
                model_flagged=i in flagged,
                hash_list_overridden=bool(c and c.override and listed.get(i, "") <= c.at),
            )
            if sources or ids is not None:
                out[i] = sources
        return out

    def verify_label_chain(self) -> list[str]:
        """Problems of the label log's hash chain, one line each naming the event and what is wrong (an edited field,
        a broken link, a missing or added event, a hash mismatch, a dropped guard trigger); empty: intact."""
        conn: sqlite3.Connection = self.db.conn
        triggers = {
            str(r[0])
            for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'labels'")
        }
        rows = conn.execute(
            "SELECT id, sha256, label, who, at, reason, override_hash_lists, prev_hash, hash FROM labels ORDER BY id"
        )
        return check_chain(rows, self.get_info(HEAD_KEY), triggers)

    def label_chain_head(self) -> tuple[int, str]:
        """(id, hash) of the last label event: keep it elsewhere to anchor the chain (64 zeros when empty)."""
        return head(self.db.conn)
