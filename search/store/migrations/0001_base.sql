-- 1: the base schema
CREATE TABLE store_info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE runs (
    id INTEGER PRIMARY KEY, kind TEXT NOT NULL, started_at TEXT NOT NULL, finished_at TEXT,
    status TEXT NOT NULL, args TEXT, counts TEXT, timings TEXT
);
-- AUTOINCREMENT: an id is never reused after its image is dropped (API clients and clusters hold ids)
CREATE TABLE images (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sha256 TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL, width INTEGER NOT NULL, height INTEGER NOT NULL, format TEXT NOT NULL,
    p_neutral REAL NOT NULL, p_low REAL NOT NULL, p_medium REAL NOT NULL, p_high REAL NOT NULL,
    s_neutral REAL NOT NULL, s_low REAL NOT NULL, s_medium REAL NOT NULL, s_high REAL NOT NULL,
    level TEXT NOT NULL,
    embedding BLOB NOT NULL,
    pdq TEXT, pdq_quality INTEGER,
    run_id INTEGER REFERENCES runs(id), indexed_at TEXT NOT NULL
);
CREATE TABLE paths (
    path TEXT PRIMARY KEY, image_id INTEGER NOT NULL REFERENCES images(id),
    size INTEGER, mtime_ns INTEGER, run_id INTEGER, seen_at TEXT NOT NULL
);
CREATE INDEX paths_image_id ON paths(image_id);
CREATE TABLE errors (
    path TEXT PRIMARY KEY, reason TEXT NOT NULL, kind TEXT NOT NULL, run_id INTEGER, at TEXT NOT NULL
);
-- labels are an append-only event log keyed by content, so that they survive a prune and a re-add
CREATE TABLE labels (
    id INTEGER PRIMARY KEY, sha256 TEXT NOT NULL, label TEXT NOT NULL CHECK (label IN ('unsafe', 'safe', 'clear')),
    who TEXT NOT NULL, at TEXT NOT NULL, reason TEXT
);
CREATE INDEX labels_sha256 ON labels(sha256, id);
CREATE TRIGGER labels_no_update BEFORE UPDATE ON labels
    BEGIN SELECT RAISE(ABORT, 'labels are append-only: add a new event instead'); END;
CREATE TRIGGER labels_no_delete BEFORE DELETE ON labels
    BEGIN SELECT RAISE(ABORT, 'labels are append-only: add a clear event instead'); END;
CREATE VIEW current_labels AS
    SELECT l.sha256, l.label, l.who, l.at, l.reason, l.id AS event_id FROM labels l
    JOIN (SELECT sha256, MAX(id) AS mid FROM labels GROUP BY sha256) m ON l.id = m.mid;
CREATE TABLE hash_lists (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, source TEXT, imported_at TEXT NOT NULL,
    count INTEGER NOT NULL, bad_lines INTEGER NOT NULL
);
CREATE TABLE list_hashes (
    id INTEGER PRIMARY KEY, list_id INTEGER NOT NULL REFERENCES hash_lists(id), hash TEXT NOT NULL,
    UNIQUE (list_id, hash)
);
CREATE TABLE hash_matches (
    image_id INTEGER NOT NULL, list_hash_id INTEGER NOT NULL, distance INTEGER NOT NULL,
    PRIMARY KEY (image_id, list_hash_id)
);
CREATE INDEX hash_matches_list ON hash_matches(list_hash_id);
