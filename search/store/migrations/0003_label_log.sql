-- 3: the label log, explicit and tamper-evident (search/store/labels.py, search/store/chain.py).
-- `override_hash_lists`: 1 on a `safe` event that also overrides the image's hash-list matches (a separate, explicit
-- act with a reason); a plain `safe` overrides the model only.
-- `prev_hash` and `hash`: a hash chain. `hash` = sha256 over the canonical JSON of (id, sha256, label, who, at,
-- reason, override_hash_lists, prev_hash); `prev_hash` is the previous event's `hash` (64 zeros for the first).
-- Events already in the store are sealed by this migration's Python follow-up (search/store/chain.py, run in the
-- same transaction), so the chain covers the whole log from its first event.
ALTER TABLE labels ADD COLUMN override_hash_lists INTEGER NOT NULL DEFAULT 0 CHECK (override_hash_lists IN (0, 1));
ALTER TABLE labels ADD COLUMN prev_hash TEXT;
ALTER TABLE labels ADD COLUMN hash TEXT;
-- an override is a `safe` event, never an `unsafe` or a `clear`
CREATE TRIGGER labels_override_is_safe BEFORE INSERT ON labels WHEN NEW.override_hash_lists != 0 AND NEW.label != 'safe'
    BEGIN SELECT RAISE(ABORT, 'only a safe label can override hash lists'); END;
-- REPLACE (INSERT OR REPLACE, REPLACE INTO, an upsert) on an existing event id would rewrite it without firing the
-- delete trigger (recursive triggers are off by default): no insert may name an id the log already holds
CREATE TRIGGER labels_no_replace BEFORE INSERT ON labels WHEN EXISTS (SELECT 1 FROM labels WHERE id = NEW.id)
    BEGIN SELECT RAISE(ABORT, 'labels are append-only: an event id is never reused or replaced'); END;
-- every new event carries its link and hash (written by nsfw-index in the appending transaction)
CREATE TRIGGER labels_sealed BEFORE INSERT ON labels WHEN NEW.hash IS NULL OR NEW.prev_hash IS NULL
    BEGIN SELECT RAISE(ABORT, 'a label event needs its chain hash: label through nsfw-index'); END;
-- the one update ever allowed: sealing an event written before this migration (hash still NULL), fields unchanged
DROP TRIGGER labels_no_update;
CREATE TRIGGER labels_no_update BEFORE UPDATE ON labels
    WHEN NOT (OLD.hash IS NULL AND OLD.prev_hash IS NULL AND NEW.hash IS NOT NULL AND NEW.prev_hash IS NOT NULL
              AND NEW.id = OLD.id AND NEW.sha256 = OLD.sha256 AND NEW.label = OLD.label AND NEW.who = OLD.who
              AND NEW.at = OLD.at AND NEW.reason IS OLD.reason AND NEW.override_hash_lists = OLD.override_hash_lists)
    BEGIN SELECT RAISE(ABORT, 'labels are append-only: add a new event instead'); END;
DROP VIEW current_labels;
CREATE VIEW current_labels AS
    SELECT l.sha256, l.label, l.who, l.at, l.reason, l.id AS event_id, l.override_hash_lists FROM labels l
    JOIN (SELECT sha256, MAX(id) AS mid FROM labels GROUP BY sha256) m ON l.id = m.mid;
