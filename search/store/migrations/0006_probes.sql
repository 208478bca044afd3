-- 6: linear probes on the stored embeddings (search/probes.py, search/store/probes.py): custom classifiers trained
-- on frozen features and the team's labels. One row per probe name; training again under the same name replaces the
-- row. `coef` is float64 (rows x dim, row-major; 1 row for two classes: the logit of the second class) and
-- `intercept` float64 (rows). `model` is the JSON identity of the embedding model the vectors came from (search.policy
-- ModelIdentity.stored()): a probe is never applied to vectors of another model. `label_watermark` is the latest
-- label event id the training read (0: none); `label_source` says where the classes came from ('labels' or
-- 'csv:<file name>'). No per-image outputs are stored: they are one matmul away from the stored vectors.
CREATE TABLE probes (
    name TEXT PRIMARY KEY,
    classes TEXT NOT NULL,
    dim INTEGER NOT NULL,
    coef BLOB NOT NULL,
    intercept BLOB NOT NULL,
    model TEXT NOT NULL,
    label_source TEXT NOT NULL,
    label_watermark INTEGER NOT NULL,
    examples INTEGER NOT NULL,
    metrics TEXT NOT NULL,
    params TEXT NOT NULL,
    trained_at TEXT NOT NULL
);
