"""Human labels (an append-only event log) and imported PDQ hash lists: the inputs of known-unsafe."""

from __future__ import annotations

import contextlib
import csv
import getpass
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from search.errors import InvalidArgument, NotFound, StoreLocked
from search.pdq import HashMatcher, parse_hash_list
from search.settings import Settings
from search.store import LABELS, Store, utcnow
from search.vectors import IndexFiles

# Matches are stored up to this distance so that raising --pdq-max-distance later needs no re-matching; what counts
# as known-unsafe is filtered at the configured distance (default 31). Unrelated PDQ hashes sit near 128 bits apart.
STORED_MATCH_DISTANCE = 64


def stored_match_distance(settings: Settings) -> int:
    return max(STORED_MATCH_DISTANCE, settings.pdq_max_distance)


def default_who() -> str:
    with contextlib.suppress(Exception):
        return getpass.getuser()
    return "unknown"


def _refresh_unsafe_file(store: Store, settings: Settings) -> bool:
    """Bring the known-unsafe FAISS file in step now if no writer is busy; otherwise the next open catches up."""
    try:
        with store.writer_lock("nsfw-index label"):
            IndexFiles(store, settings).open_unsafe(persist=True)
        return True
    except StoreLocked:
        return False


def read_label_csv(path: str | os.PathLike[str]) -> list[tuple[str, str | None, str | None]]:
    """Rows of a labels CSV: a column `id`, `path` or `sha256` (or `image`), optional `label` and `reason`."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = {(c or "").strip().lower(): c for c in (reader.fieldnames or [])}
            key = next((fields[c] for c in ("id", "image", "sha256", "path") if c in fields), None)
            if key is None:
                raise InvalidArgument(f"{path}: the CSV needs a column named id, image, sha256 or path")
            out = []
            for row in reader:
                ref = (row.get(key) or "").strip()
                if not ref:
                    continue
                label = (row.get(fields["label"]) or "").strip().lower() or None if "label" in fields else None
                reason = (row.get(fields["reason"]) or "").strip() or None if "reason" in fields else None
                out.append((ref, label, reason))
            return out
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InvalidArgument(f"cannot read the labels CSV {path}: {e}") from e


def label_images(
    store_dir: Path,
    refs: Sequence[str],
    label: str | None,
    settings: Settings,
    *,
    who: str | None = None,
    reason: str | None = None,
    from_file: str | None = None,
) -> list[dict[str, Any]]:
    """Append label events for images named by id, path or sha256. All refs are resolved before anything is written,
    so one unknown ref changes nothing."""
    items: list[tuple[str, str | None, str | None]] = [(r, label, reason) for r in refs]
    if from_file:
        items += [(r, lab or label, why or reason) for r, lab, why in read_label_csv(from_file)]
    if not items:
        raise InvalidArgument("nothing to label: give image ids, paths or sha256s, or --from-file CSV")
    who = who or default_who()
    with Store(store_dir) as store:
        resolved = []
        for ref, lab, why in items:
            if lab not in LABELS:
                raise InvalidArgument(f"{ref}: label must be unsafe, safe or clear, not {lab!r}")
            try:
                resolved.append((ref, store.resolve_image(ref), lab, why))
            except NotFound as e:
                raise NotFound(f"{e}; nothing was labelled") from None
        out = []
        with store.transaction() as conn:
            now = utcnow()
            for ref, image_id, lab, why in resolved:
                sha = conn.execute("SELECT sha256 FROM images WHERE id = ?", [image_id]).fetchone()[0]
                cur = conn.execute(
                    "INSERT INTO labels (sha256, label, who, at, reason) VALUES (?,?,?,?,?)", [sha, lab, who, now, why]
                )
                out.append({"ref": ref, "id": image_id, "label": lab, "event": cur.lastrowid, "who": who, "at": now})
        _refresh_unsafe_file(store, settings)
        return out


def import_hash_list(
    store_dir: Path,
    file: str | os.PathLike[str],
    name: str,
    settings: Settings,
    *,
    replace: bool = False,
    source: str | None = None,
) -> dict[str, Any]:
    """Import a PDQ hash list under `name` and match every indexed image against it (Hamming <= max distance).

    `source` is what the store records as the list's origin (default: the file's absolute path)."""
    parsed = parse_hash_list(file)
    if not name.strip():
        raise InvalidArgument("a hash list needs a --name")
    with Store(store_dir, create=True) as store:
        with store.transaction() as conn:
            row = conn.execute("SELECT id FROM hash_lists WHERE name = ?", [name]).fetchone()
            if row and not replace:
                list_id = int(row[0])
            else:
                if row:
                    conn.execute(
                        "DELETE FROM hash_matches WHERE list_hash_id IN (SELECT id FROM list_hashes WHERE list_id = ?)",
                        [row[0]],
                    )
                    conn.execute("DELETE FROM list_hashes WHERE list_id = ?", [row[0]])
                    conn.execute("DELETE FROM hash_lists WHERE id = ?", [row[0]])
                cur = conn.execute(
                    "INSERT INTO hash_lists (name, source, imported_at, count, bad_lines) VALUES (?,?,?,0,0)",
                    [name, source or str(Path(file).resolve()), utcnow()],
                )
                list_id = int(cur.lastrowid or 0)
            conn.executemany(
                "INSERT OR IGNORE INTO list_hashes (list_id, hash) VALUES (?, ?)",
                [(list_id, h) for _, h in parsed.hashes],
            )
            total = conn.execute("SELECT COUNT(*) FROM list_hashes WHERE list_id = ?", [list_id]).fetchone()[0]
            conn.execute(
                "UPDATE hash_lists SET count = ?, bad_lines = bad_lines + ?, imported_at = ? WHERE id = ?",
                [total, len(parsed.bad_lines), utcnow(), list_id],
            )
            # match the whole store against this list (FAISS binary index over the list)
            entries = conn.execute("SELECT id, hash FROM list_hashes WHERE list_id = ?", [list_id]).fetchall()
            matcher = HashMatcher()
            matcher.add([e[0] for e in entries], [e[1] for e in entries])
            images = conn.execute("SELECT id, pdq FROM images WHERE pdq IS NOT NULL").fetchall()
            matched: set[int] = set()  # images within the configured distance
            for i in range(0, len(images), 10000):
                chunk = images[i : i + 10000]
                found = (
                    matcher.match([r[1] for r in chunk], stored_match_distance(settings))
                    if len(matcher)
                    else [[] for _ in chunk]
                )
                rows = [(img[0], hid, dist) for img, hits in zip(chunk, found, strict=True) for hid, dist in hits]
                conn.executemany(
                    "INSERT OR IGNORE INTO hash_matches (image_id, list_hash_id, distance) VALUES (?,?,?)", rows
                )
                matched.update(r[0] for r in rows if r[2] <= settings.pdq_max_distance)
        refreshed = _refresh_unsafe_file(store, settings) if store.model_identity() else False
    return {
        "list": name,
        "list_id": list_id,
        "hashes": int(total),
        "imported": len(parsed.hashes),
        "bad_lines": [{"line": n, "text": t, "reason": r} for n, t, r in parsed.bad_lines],
        "matched_images": len(matched),
        "unsafe_index_updated": refreshed,
    }
