-- 2: near-duplicate groups and k-means clusters (search/clusters.py). `clusterings` keeps one row per run,
-- `clusters` and `cluster_members` hold only the latest result, replaced in one transaction. Cluster ids come
-- from AUTOINCREMENT, so an id is never reused by a later run. No foreign key to images: a prune may delete
-- members, which readers then leave out (the result is marked stale).
CREATE TABLE clusterings (
    id INTEGER PRIMARY KEY, created_at TEXT NOT NULL, run_id INTEGER,
    threshold REAL NOT NULL, k INTEGER NOT NULL, k_requested INTEGER,
    watermark INTEGER NOT NULL, images INTEGER NOT NULL, deletion_epoch INTEGER NOT NULL,
    method TEXT NOT NULL, params TEXT NOT NULL, timings TEXT NOT NULL,
    groups INTEGER NOT NULL, grouped_images INTEGER NOT NULL, clusters INTEGER NOT NULL
);
CREATE TABLE clusters (
    id INTEGER PRIMARY KEY AUTOINCREMENT, clustering_id INTEGER NOT NULL REFERENCES clusterings(id),
    kind TEXT NOT NULL CHECK (kind IN ('group', 'cluster')), size INTEGER NOT NULL, path_count INTEGER NOT NULL,
    representative_id INTEGER NOT NULL, cohesion REAL NOT NULL, score_stats TEXT NOT NULL
);
CREATE INDEX clusters_kind_size ON clusters(kind, size DESC, id);
CREATE TABLE cluster_members (
    cluster_id INTEGER NOT NULL REFERENCES clusters(id), image_id INTEGER NOT NULL, similarity REAL NOT NULL,
    PRIMARY KEY (cluster_id, image_id)
) WITHOUT ROWID;
CREATE INDEX cluster_members_image ON cluster_members(image_id);
