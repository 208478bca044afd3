-- 9: which backend and dtype produced a run's vectors (indexer/backends: torch, onnxruntime or openvino; fp32, bf16
-- or int8), and the runtime's version. Vectors of one weights file under different backends stay comparable within
-- the documented drift, so a store may hold both; `stats` counts images per backend and dtype through images.run_id.
-- NULL: a run before this migration (torch) or one that ran no model (label, rebuild).
ALTER TABLE runs ADD COLUMN backend TEXT;
ALTER TABLE runs ADD COLUMN dtype TEXT;
ALTER TABLE runs ADD COLUMN runtime TEXT;
