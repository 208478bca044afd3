"""Human labels (an append-only event log) and PDQ hash lists as banks (import, list, show, export, delete)."""

from __future__ import annotations

import contextlib
import csv
import getpass
import io
import os
from collections.abc import Iterable, Sequence

from search.answers import BadLine, HashListDeleted, HashListDetail, HashListImport, HashListSummary, LabelResult
from search.errors import InvalidArgument, NotFound, StoreLocked
from search.pdq import parse_hash_list
from search.policy import LABELS
from search.settings import Settings
from search.store import Store
from search.vectors import IndexFiles

# Matches are stored up to this distance so that raising --pdq-max-distance later needs no re-matching; what counts
# as known-unsafe is filtered at the configured distance (default 31). Unrelated PDQ hashes sit near 128 bits apart.
STORED_MATCH_DISTANCE = 64
#: The longest hash list name.
MAX_LIST_NAME = 200


def stored_match_distance(settings: Settings) -> int:
    return max(STORED_MATCH_DISTANCE, settings.pdq_max_distance)


def default_who() -> str:
    with contextlib.suppress(Exception):
        return getpass.getuser()
    return "unknown"


def _refresh_unsafe_file(store: Store, settings: Settings) -> bool:
    """Bring the known-unsafe FAISS file in step now if no writer is busy (or this handle is the writer); otherwise
    the next open catches up."""
    if store.holds_writer_lock:
        IndexFiles(store, settings).open_unsafe(persist=True)
        return True
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
    store: Store,
    refs: Sequence[str],
    label: str | None,
    settings: Settings,
    *,
    who: str | None = None,
    reason: str | None = None,
    from_file: str | os.PathLike[str] | None = None,
    override_hash_lists: bool = False,
) -> list[LabelResult]:
    """Append label events for images named by id, path or sha256 (`store` open writable). All refs are resolved
    and checked before anything is written, so one bad ref changes nothing.

    A `safe` overrides the model only. `override_hash_lists` makes each event a `safe` that also overrides the
    image's hash-list matches: every item must be `safe`, have a reason, and match a hash list now."""
    items: list[tuple[str, str | None, str | None]] = [(r, label, reason) for r in refs]
    if from_file:
        items += [(r, lab or label, why or reason) for r, lab, why in read_label_csv(from_file)]
    if not items:
        raise InvalidArgument("nothing to label: give image ids, paths or sha256s, or --from-file CSV")
    who = who or default_who()
    resolved: list[tuple[str, int, str, str | None]] = []
    for ref, lab, why in items:
        if lab not in LABELS:
            raise InvalidArgument(f"{ref}: label must be unsafe, safe or clear, not {lab!r}")
        if override_hash_lists and lab != "safe":
            raise InvalidArgument(
                f"{ref}: only a safe label can override hash lists (this one is {lab}); nothing was labelled"
            )
        if override_hash_lists and not (why and why.strip()):
            raise InvalidArgument(
                f"{ref}: overriding a hash-list match needs a reason (--reason, or a reason column); "
                "nothing was labelled"
            )
        try:
            resolved.append((ref, store.resolve_image(ref), lab, why))
        except NotFound as e:
            raise NotFound(f"{e}; nothing was labelled") from None
    if override_hash_lists:
        listed = store.hash_list_imports(settings.pdq_max_distance, [image_id for _, image_id, _, _ in resolved])
        for ref, image_id, _, _ in resolved:
            if image_id not in listed:
                raise InvalidArgument(
                    f"{ref} (image {image_id}) matches no hash list within PDQ distance {settings.pdq_max_distance}: "
                    "there is nothing to override, a plain --safe is enough; nothing was labelled"
                )
    events = store.append_labels(
        [(image_id, lab, why) for _, image_id, lab, why in resolved], who, override_hash_lists=override_hash_lists
    )
    _refresh_unsafe_file(store, settings)
    return [
        LabelResult(
            ref=ref,
            id=image_id,
            label=ev.label,
            event=ev.event,
            who=ev.who,
            at=ev.at,
            override_hash_lists=ev.override_hash_lists,
        )
        for (ref, image_id, _, _), ev in zip(resolved, events, strict=True)
    ]


def check_list_name(name: str) -> str:
    """A new hash list's name, stripped; InvalidArgument when it is empty, too long, or holds `/` or control
    characters (the name is a path segment of `/v1/hash-lists/{name}`)."""
    name = name.strip()
    if not name:
        raise InvalidArgument("a hash list needs a --name")
    if len(name) > MAX_LIST_NAME or "/" in name or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise InvalidArgument(
            f"hash list name {name[:80]!r}: use 1 to {MAX_LIST_NAME} characters without `/` or control characters "
            "(it names the list in `/v1/hash-lists/{name}`)"
        )
    return name


def import_hash_list(
    store: Store,
    lines: Iterable[str] | str,
    name: str,
    settings: Settings,
    *,
    replace: bool = False,
    source: str | None = None,
    who: str | None = None,
) -> HashListImport:
    """Import a PDQ hash list (its text, or its lines) under `name` and match every indexed image against it
    (Hamming <= the configured distance, on any of the image's dihedral hashes). `source` is what the store records
    as the list's origin (the CLI passes the file's absolute path) and what messages about the input name; `who`
    (default: the login name) is recorded with the import."""
    name = check_list_name(name)
    parsed = parse_hash_list(lines)
    list_id, total, matched = store.add_hash_list(
        name,
        [h for _, h in parsed.hashes],
        source=source,
        bad_lines=len(parsed.bad_lines),
        replace=replace,
        match_distance=stored_match_distance(settings),
        within=settings.pdq_max_distance,
        who=who or default_who(),
        notes=parsed.notes,
    )
    refreshed = _refresh_unsafe_file(store, settings) if store.model_identity() else False
    return HashListImport(
        list=name,
        list_id=list_id,
        hashes=total,
        imported=len(parsed.hashes),
        bad_lines=[BadLine(line=n, text=t, reason=r) for n, t, r in parsed.bad_lines],
        matched_images=matched,
        unsafe_index_updated=refreshed,
    )


# -- hash lists as banks: list, show, export, delete ----------------------------------------------------------------
def list_hash_lists(store: Store, settings: Settings) -> list[HashListSummary]:
    """Every imported list: size, latest import (when, by whom, from where), images it matches now (at the
    configured distance, any dihedral transform)."""
    return store.hash_list_summaries(settings.pdq_max_distance)


def show_hash_list(store: Store, name: str, settings: Settings) -> HashListDetail:
    """One list with its history (imports, replaces, deletes of that name); NotFound if there is no such list (saying
    who deleted it when, if it was deleted)."""
    try:
        summary = store.hash_list_summaries(settings.pdq_max_distance, name)[0]
    except NotFound as e:
        events = store.hash_list_events(name)
        if events and events[-1].action == "delete":
            last = events[-1]
            why = f" ({last.reason})" if last.reason else ""
            raise NotFound(f"{e}; a list of that name was deleted by {last.who} at {last.at}{why}") from None
        raise
    return HashListDetail(
        **summary.model_dump(),
        max_distance=settings.pdq_max_distance,
        images_without_dihedral=store.count_without_dihedral(),
        events=store.hash_list_events(name),
    )


def export_hash_list(store: Store, name: str, *, csv_format: bool = False) -> str:
    """The list as text that `import_hash_list` reads back: one lowercase hex PDQ hash per line (the plain format
    ThreatExchange tools exchange), or with `csv_format` a CSV with `hash` and `note` columns."""
    entries = store.hash_list_hashes(name)
    if not csv_format:
        return "".join(f"{h}\n" for h, _ in entries)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["hash", "note"])
    writer.writerows([h, note or ""] for h, note in entries)
    return buf.getvalue()


def delete_hash_list(
    store: Store, name: str, settings: Settings, *, who: str | None = None, reason: str | None = None
) -> HashListDeleted:
    """Delete a list with its entries and matches (`store` open writable), recording who did it, when and why in
    the hash-list event log; label events are untouched. Images known-unsafe only through this list stop being so
    (the known-unsafe FAISS file follows now, or at the next open when a writer is busy)."""
    who = who or default_who()
    matched = sorted(store.list_matched_images(name, settings.pdq_max_distance))
    before = store.known_unsafe(settings, matched)
    removed, event = store.delete_hash_list(name, who, reason)
    after = store.known_unsafe(settings, matched)
    refreshed = _refresh_unsafe_file(store, settings) if store.model_identity() else False
    return HashListDeleted(
        name=name,
        entries_removed=removed,
        images_unmatched=len(set(matched) - store.hash_listed(settings.pdq_max_distance, matched)),
        no_longer_known_unsafe=[i for i in matched if before.get(i) and not after.get(i)],
        event=event,
        unsafe_index_updated=refreshed,
    )
