"""The label log's SQL (an append-only event log keyed by content sha256) and the known-unsafe query."""

from __future__ import annotations

from collections.abc import Sequence

from search.answers import LabelEvent
from search.policy import model_flags, unsafe_sources
from search.settings import Settings
from search.store.images import ImageTables
from search.store.rows import utcnow
from search.store.sql import chunks, marks

_EVENT_FIELDS = ("event", "label", "who", "at", "reason")


class LabelTables(ImageTables):
    """Mixin of `Store`: label events, current labels, and which images are known-unsafe and why."""

    def append_labels(self, events: Sequence[tuple[int, str, str | None]], who: str) -> list[LabelEvent]:
        """Append one event (image id, label, reason) per item, all at one time, in one transaction."""
        out = []
        with self.transaction() as conn:
            now = utcnow()
            for image_id, label, reason in events:
                row = conn.execute("SELECT sha256 FROM images WHERE id = ?", [image_id]).fetchone()
                if row is None:
                    raise ValueError(f"internal: no image with id {image_id}")
                cur = conn.execute(
                    "INSERT INTO labels (sha256, label, who, at, reason) VALUES (?,?,?,?,?)",
                    [row[0], label, who, now, reason],
                )
                out.append(LabelEvent(event=int(cur.lastrowid or 0), label=label, who=who, at=now, reason=reason))
        return out

    def label_history(self, image_id: int) -> list[LabelEvent]:
        """The label events of this image's content, oldest first."""
        cur = self.db.execute(
            "SELECT l.id, l.label, l.who, l.at, l.reason FROM labels l JOIN images i ON i.sha256 = l.sha256 "
            "WHERE i.id = ? ORDER BY l.id",
            [image_id],
        )
        return [LabelEvent(**dict(zip(_EVENT_FIELDS, r, strict=True))) for r in cur]

    def current_labels(self, ids: Sequence[int] | None = None) -> dict[int, str]:
        """image id -> its latest label (`unsafe` or `safe`; a `clear` leaves the image out)."""
        q = "SELECT i.id, c.label FROM current_labels c JOIN images i ON i.sha256 = c.sha256 WHERE c.label != 'clear'"
        if ids is None:
            return {int(r[0]): str(r[1]) for r in self.db.execute(q)}
        out: dict[int, str] = {}
        for chunk in chunks([int(i) for i in ids]):
            out.update({int(r[0]): str(r[1]) for r in self.db.execute(f"{q} AND i.id IN ({marks(chunk)})", chunk)})
        return out

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

    def known_unsafe(self, settings: Settings, ids: Sequence[int] | None = None) -> dict[int, list[str]]:
        """Why images are known-unsafe (search.policy.unsafe_sources). `ids` None: every known-unsafe image ->
        its sources; `ids` given: every given id -> its sources (possibly [])."""
        labels = self.current_labels(ids)
        hashed = self.hash_listed(settings.pdq_max_distance, ids)
        flagged = self.model_flagged(settings, ids)
        if ids is None:
            candidates = list(
                dict.fromkeys([*(i for i, lab in labels.items() if lab == "unsafe"), *sorted(hashed), *sorted(flagged)])
            )
        else:
            candidates = [int(i) for i in ids]
        out: dict[int, list[str]] = {}
        for i in candidates:
            sources = unsafe_sources(label=labels.get(i), hash_listed=i in hashed, model_flagged=i in flagged)
            if sources or ids is not None:
                out[i] = sources
        return out
