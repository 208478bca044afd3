"""Human labels (an append-only event log) and imported PDQ hash lists: the inputs of known-unsafe."""

from __future__ import annotations

import contextlib
import csv
import getpass
import os
from collections.abc import Iterable, Sequence

from search.answers import BadLine, HashListImport, LabelResult
from search.errors import InvalidArgument, NotFound, StoreLocked
from search.pdq import parse_hash_list
from search.policy import LABELS
from search.settings import Settings
from search.store import Store
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


def import_hash_list(
    store: Store,
    lines: Iterable[str] | str,
    name: str,
    settings: Settings,
    *,
    replace: bool = False,
    source: str | None = None,
) -> HashListImport:
    """Import a PDQ hash list (its text, or its lines) under `name` and match every indexed image against it
    (Hamming <= the configured distance). `source` is what the store records as the list's origin (the CLI passes
    the file's absolute path) and what messages about the input name."""
    if not name.strip():
        raise InvalidArgument("a hash list needs a --name")
    parsed = parse_hash_list(lines)
    list_id, total, matched = store.add_hash_list(
        name,
        [h for _, h in parsed.hashes],
        source=source,
        bad_lines=len(parsed.bad_lines),
        replace=replace,
        match_distance=stored_match_distance(settings),
        within=settings.pdq_max_distance,
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
