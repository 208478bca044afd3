"""The label log's hash chain: each event's hash over its own fields and the previous event's hash, sealing the events
of an older store (migration 3's follow-up), and checking the whole chain (`Store.verify_label_chain`)."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any

#: The `prev_hash` of the first event.
GENESIS = "0" * 64
#: store_info key of the last event written by nsfw-index ({"event": id, "hash": hex}): catches a cut or grown tail.
HEAD_KEY = "label_chain_head"
#: The columns a hash covers, in order (`hash` itself excluded).
CHAIN_COLUMNS = ("id", "sha256", "label", "who", "at", "reason", "override_hash_lists", "prev_hash")
#: The triggers that keep the log append-only; `verify` reports any that is missing.
GUARD_TRIGGERS = ("labels_no_update", "labels_no_delete", "labels_no_replace", "labels_sealed")


def event_hash(
    event_id: int, sha256: str, label: str, who: str, at: str, reason: str | None, override: int, prev_hash: str
) -> str:
    """sha256 (hex) of the canonical JSON of an event's fields and its link."""
    canonical = json.dumps(
        [int(event_id), sha256, label, who, at, reason, int(override), prev_hash],
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def head(conn: sqlite3.Connection) -> tuple[int, str]:
    """(id, hash) of the last event in the log, (0, GENESIS) when it is empty."""
    row = conn.execute("SELECT id, hash FROM labels ORDER BY id DESC LIMIT 1").fetchone()
    return (0, GENESIS) if row is None else (int(row[0]), str(row[1]))


def record_head(conn: sqlite3.Connection, event_id: int, digest: str) -> None:
    """Remember the last event written (in the appending transaction)."""
    conn.execute(
        "INSERT OR REPLACE INTO store_info (key, value) VALUES (?, ?)",
        [HEAD_KEY, json.dumps({"event": event_id, "hash": digest})],
    )


def seal_label_log(conn: sqlite3.Connection) -> None:
    """Migration 3's follow-up: hash the events written before the chain existed, in id order from the genesis
    (run inside the migration's transaction; migration 3's update trigger allows exactly this)."""
    prev, last = GENESIS, 0
    rows = conn.execute(
        "SELECT id, sha256, label, who, at, reason, override_hash_lists FROM labels ORDER BY id"
    ).fetchall()
    for r in rows:
        digest = event_hash(r[0], r[1], r[2], r[3], r[4], r[5], r[6], prev)
        conn.execute("UPDATE labels SET prev_hash = ?, hash = ? WHERE id = ?", [prev, digest, r[0]])
        prev, last = digest, int(r[0])
    if rows:
        record_head(conn, last, prev)


def check_chain(rows: Iterable[Sequence[Any]], recorded_head: dict[str, Any] | None, triggers: set[str]) -> list[str]:
    """Problems of the chain, one line each naming the event (empty: intact). `rows` are (CHAIN_COLUMNS..., hash)
    in id order; `recorded_head` is the store's record of its last event; `triggers` the labels triggers present."""
    problems = [
        f"the label log's guard trigger {t} is missing: the log can be rewritten (it was dropped by hand)"
        for t in GUARD_TRIGGERS
        if t not in triggers
    ]

    def span(first: int, last: int) -> str:
        return f"event {first}" if first == last else f"events {first}..{last}"

    prev_id, prev_hash = 0, GENESIS
    for row in rows:
        event_id, sha256, label, who, at, reason, override, link, digest = row
        event_id = int(event_id)
        if event_id != prev_id + 1:
            problems.append(
                f"{span(prev_id + 1, event_id - 1)} missing: deleted from the label log "
                f"(the log resumes at event {event_id})"
            )
        if digest is None or link is None:
            problems.append(f"event {event_id}: no chain hash: written outside nsfw-index")
            prev_id, prev_hash = event_id, str(digest or "")
            continue
        if link != prev_hash:
            after = f"event {prev_id}" if prev_id else "the genesis"
            problems.append(
                f"event {event_id}: broken link: its prev_hash {str(link)[:12]}… is not the hash of {after} "
                f"({prev_hash[:12]}…): an event before it was removed, replaced or re-hashed"
            )
        want = event_hash(event_id, sha256, label, who, at, reason, override, link)
        if want != digest:
            problems.append(
                f"event {event_id}: hash mismatch: its fields (sha256, label, who, at, reason, override) were edited "
                f"after it was written (now label={label!r} who={who!r} at={at!r}; stored hash {str(digest)[:12]}…, "
                f"the fields hash to {want[:12]}…)"
            )
        prev_id, prev_hash = event_id, str(digest)
    if recorded_head is not None:
        want_id, want_hash = int(recorded_head.get("event", 0)), str(recorded_head.get("hash", ""))
        if prev_id < want_id:
            problems.append(
                f"{span(prev_id + 1, want_id)} missing: the log ends at event {prev_id} but nsfw-index last wrote "
                f"event {want_id} (the tail was cut)"
            )
        elif prev_id > want_id:
            problems.append(f"{span(want_id + 1, prev_id)} added outside nsfw-index: it last wrote event {want_id}")
        elif prev_hash != want_hash:
            problems.append(f"event {prev_id}: hash mismatch: not the last event nsfw-index wrote (it was replaced)")
    elif prev_id:
        problems.append(f"the store has no record of its last label event (events 1..{prev_id} are unanchored)")
    return problems
