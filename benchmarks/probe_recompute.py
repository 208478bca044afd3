"""Probe outputs recomputed for a whole store from its stored vectors (no model pass): a real store of N random 768-d
unit vectors, a 2-class probe trained on 2,000 labels and a 5-class one on a CSV-style label set.

    .venv/bin/python benchmarks/probe_recompute.py [N]        # default 100000; the store is kept in benchmarks/out

Prints, three times: the whole store scored by both probes (vectors read from SQLite chunk by chunk), the read
alone, the matrix products alone, and one image.
"""

import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# ruff: noqa: E402
from search.policy import ModelIdentity
from search.probes import active_probes, probe_outputs, score_store, train_probe
from search.scores import cumulative_scores, level_of
from search.settings import Settings
from search.store import ImageRecord, Store

N, DIM = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000, 768
root = ROOT / "benchmarks" / "out" / f"probe_store_{N}"
if not (root / "meta.sqlite").exists():
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(0)
    with Store(root, create=True) as store:
        store.check_model(
            ModelIdentity(architecture="bench", weights_sha256="0" * 64, preprocessing={}, embedding_dim=DIM)
        )
        run = store.begin_run("bench", {})
        p = rng.dirichlet(np.ones(4))
        s = cumulative_scores(p)
        lv = level_of(p)
        for start in range(0, N, 5000):
            x = rng.standard_normal((5000, DIM)).astype(np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            recs = [ImageRecord(f"{start + i:064x}", 1, 1, 1, "PNG", p, s, lv, v) for i, v in enumerate(x)]
            store.write_batch(run, recs, [(f"/c/{start + i}", f"{start + i:064x}", 1, None) for i in range(5000)])
        ids = store.image_ids()
        store.append_labels([(i, "unsafe" if j % 3 == 0 else "safe", None) for j, i in enumerate(ids[:2000])], "b")
        train_probe(store, "bin", Settings())
        rows = [(k, "id", str(i), f"c{j % 5}") for k, (j, i) in enumerate(enumerate(ids[:2000]))]
        train_probe(store, "five", Settings(), assignments=rows, label_source="csv:x")
with Store(root, readonly=True) as store:
    n = store.count_images()
    probes = active_probes(store)
    for _rep in range(3):
        t0 = time.perf_counter()
        total = 0
        for ids, _outs in score_store(store, probes):
            total += len(ids)
        t_all = time.perf_counter() - t0
        t0 = time.perf_counter()
        vecs = [c for _, c in store.iter_vectors()]
        t_read = time.perf_counter() - t0
        x = np.concatenate(vecs)
        t0 = time.perf_counter()
        for p in probes:
            p.predict(x)
        t_mm = time.perf_counter() - t0
        t0 = time.perf_counter()
        probe_outputs(probes, x[:1])
        t_one = time.perf_counter() - t0
        print(
            f"{n} images, probes {[(p.name, len(p.classes)) for p in probes]}: whole store (read from SQLite + "
            f"both probes) {t_all:.2f}s; reading vectors alone {t_read:.2f}s; matmul+sigmoid/softmax alone "
            f"{t_mm * 1000:.0f} ms; one image {t_one * 1e6:.0f} us"
        )
