-- 8: hash lists as banks (search/store/hashlists.py, search/labels.py) and PDQ's dihedral hashes.
-- `pdq_dihedral`: the PDQ hashes of an image's 7 other dihedral transforms (rot90, rot180, rot270, flipV, flipH,
-- transpose, transverse: search.pdq.DIHEDRAL[1:], in that order), 32 bytes each, concatenated; the original is
-- images.pdq. Computed in indexer/prepare.py from the same decode. Images indexed before this migration have no row:
-- they are matched on their original hash alone until `nsfw-index index ... --rebuild` re-hashes them. Dropped with
-- their image (the trigger), like thumbnails.
CREATE TABLE pdq_dihedral (
    image_id INTEGER PRIMARY KEY,
    hashes BLOB NOT NULL CHECK (length(hashes) = 224)
);
CREATE TRIGGER pdq_dihedral_drop_with_image AFTER DELETE ON images
    BEGIN DELETE FROM pdq_dihedral WHERE image_id = OLD.id; END;
-- which of the image's dihedral hashes made the (closest) match; matches stored before are of the original
ALTER TABLE hash_matches ADD COLUMN transform TEXT NOT NULL DEFAULT 'original';
-- who imported a list (the login name or --who of the CLI, the API key name over HTTP); lists imported over HTTP
-- before this migration recorded it in `source`
ALTER TABLE hash_lists ADD COLUMN imported_by TEXT;
UPDATE hash_lists SET imported_by = substr(source, 16) WHERE source LIKE 'http-upload by %';
-- an entry's note (a CSV's `note` or `comment` column)
ALTER TABLE list_hashes ADD COLUMN note TEXT;
-- what was done to lists, by whom and when: import (a new list or more entries), replace, delete. Append-only, and it
-- outlives the list: a deleted list's history stays. `entries`: what the list held after the event (0 after a
-- delete); `changed`: entries added (import, replace) or removed (delete).
CREATE TABLE hash_list_events (
    id INTEGER PRIMARY KEY,
    list TEXT NOT NULL,
    action TEXT NOT NULL CHECK (action IN ('import', 'replace', 'delete')),
    who TEXT NOT NULL,
    at TEXT NOT NULL,
    entries INTEGER NOT NULL,
    changed INTEGER NOT NULL,
    source TEXT,
    reason TEXT
);
CREATE INDEX hash_list_events_list ON hash_list_events(list, id);
CREATE TRIGGER hash_list_events_no_update BEFORE UPDATE ON hash_list_events
    BEGIN SELECT RAISE(ABORT, 'hash list events are append-only'); END;
CREATE TRIGGER hash_list_events_no_delete BEFORE DELETE ON hash_list_events
    BEGIN SELECT RAISE(ABORT, 'hash list events are append-only'); END;
-- the lists already in the store: their (latest) import, as far as it was recorded
INSERT INTO hash_list_events (list, action, who, at, entries, changed, source)
    SELECT name, 'import', COALESCE(imported_by, 'unknown'), imported_at, count, count, source FROM hash_lists ORDER BY id;
