"""Per-vector costs of the FAISS pieces on this machine, and the memory and time per node they imply at 1M-1B images:
the numbers behind README "Scaling" (vector part).

Measures, each in a few seconds on synthetic 768-d unit vectors (`neighbours_scale.embeddings`):
  t_mac      k-means (training) cost per point x centroid x dimension x iteration (BLAS)
  t_flat(L)  assigning one vector to L lists with a flat quantizer (batched, as `add` does)
  t_hnsw(L)  the same with an HNSW32 quantizer (efSearch 64), at L = 16384 (built over random centroids)
  t_enc      encoding one vector: SQ8, PQ64
  t_scan     scanning one stored code at query time: Flat, SQ8, PQ64 (single query, one thread)
  SQLite     writing one image row (with its 3 KB embedding) and reading it back, bytes per image, and t_fetch:
             one stored vector fetched by id to re-rank PQ candidates (404 at a time, page cache warm)
then prints, for each size, the recommended index and the formulas evaluated:
  RAM (in memory)  = N * (code + 8) + L * d * 4          disk (on disk) = N * (code + 8) in .ivfdata
  train            = n_train * L * d * niter * t_mac       n_train = min(64 L, max(2 GiB / (4 d), 39 L)), niter 10
  add              = N * (t_assign(L) + t_enc)             (merge: one sequential write of the .ivfdata)
  query            = t_assign(L) + nprobe * N / L * t_scan [+ 404 * t_fetch for PQ: the re-ranking]
Figures are for 2 cores shared with other jobs: treat them as +-30 % and scale `train`/`add` by cores.

    .venv/bin/python benchmarks/vector_scaling.py
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from neighbours_scale import embeddings  # noqa: E402

D = 768
GIB = 2**30
#: (size, factory, in memory?, nprobe) as README "Scaling" recommends; nprobe from neighbours_scale calibrations
PLANS = [
    (1_000_000, "IVF2048,SQ8", True, 32),
    (10_000_000, "IVF16384_HNSW32,SQ8", True, 64),
    (100_000_000, "IVF65536_HNSW32,PQ64", False, 64),
    (1_000_000_000, "IVF65536_HNSW32,PQ64", False, 64),
]


def timed(fn: Any, *args: Any) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def measure() -> dict[str, float]:
    x = embeddings(120_000, D)
    q = x[:200]
    f: dict[str, float] = {}
    # k-means: 40960 points into 1024 centroids, 4 iterations
    km = faiss.Kmeans(D, 1024, niter=4, spherical=True, seed=1, max_points_per_centroid=10_000)
    f["t_mac"] = timed(km.train, x[:40960]) / (40960 * 1024 * D * 4)
    flat = faiss.IndexFlatIP(D)
    flat.add(embeddings(4096, D, seed=5))
    f["t_flat_4096"] = timed(flat.search, x[:20_000], 1) / 20_000
    hnsw = faiss.IndexHNSWFlat(D, 32, faiss.METRIC_INNER_PRODUCT)
    hnsw.add(embeddings(16384, D, seed=6))
    hnsw.hnsw.efSearch = 64
    f["t_hnsw_16384"] = timed(hnsw.search, x[:20_000], 1) / 20_000
    for name, factory in (("sq8", "SQ8"), ("pq64", "PQ64")):
        codec = faiss.index_factory(D, factory, faiss.METRIC_INNER_PRODUCT)
        if name == "pq64":
            faiss.downcast_index(codec).pq.cp.niter = 5
        codec.train(x[:20_000])
        f[f"t_enc_{name}"] = timed(codec.sa_encode, x[20_000:120_000]) / 100_000
    for name, factory in (("flat", "IVF16,Flat"), ("sq8", "IVF16,SQ8"), ("pq64", "IVF16,PQ64")):
        index = faiss.index_factory(D, factory, faiss.METRIC_INNER_PRODUCT)
        if name == "pq64":
            ivfpq = faiss.downcast_index(faiss.extract_index_ivf(index))
            ivfpq.pq.cp.niter, ivfpq.do_polysemous_training = 5, False
        index.train(x[:20_000])
        index.add(x)
        faiss.extract_index_ivf(index).nprobe = 16  # every list: the whole store scanned
        faiss.omp_set_num_threads(1)
        t = min(timed(lambda ix=index: [ix.search(q[i : i + 1], 100) for i in range(20)]) for _ in range(3))
        faiss.omp_set_num_threads(2)
        f[f"t_scan_{name}"] = t / 20 / len(x)
    f.update(sqlite_figures(x[:20_000]))
    return f


def sqlite_figures(x: np.ndarray) -> dict[str, float]:
    from neighbours_scale import write_store

    from search.store import Store

    identity = {
        "architecture": "bench",
        "weights_sha256": "0" * 64,
        "preprocessing": {},
        "num_classes": 4,
        "label_names": ["neutral", "low", "medium", "high"],
        "embedding_dim": D,
    }
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        write_s = write_store(store, x, identity, 0.02)
        with Store(store, readonly=True) as st:
            read_s = timed(lambda: sum(len(i) for i, _ in st.iter_vectors()))
            some = np.random.default_rng(3).choice(len(x), 404, replace=False) + 1
            fetch_s = min(timed(st.vectors, some.tolist()) for _ in range(5))
        size = (store / "meta.sqlite").stat().st_size
    return {
        "t_sqlite_write": write_s / len(x),
        "t_sqlite_read": read_s / len(x),
        "t_fetch": fetch_s / 404,
        "sqlite_bytes": size / len(x),
    }


def assign_time(f: dict[str, float], lists: int, hnsw: bool) -> float:
    # flat: linear in L; HNSW: ~logarithmic (measured at 16384, scaled by log L / log 16384)
    return f["t_hnsw_16384"] * np.log(lists) / np.log(16384) if hnsw else f["t_flat_4096"] * lists / 4096


def plan_row(f: dict[str, float], n: int, factory: str, in_memory: bool, nprobe: int) -> dict[str, Any]:
    lists = int(factory.split(",")[0].split("_")[0][3:])
    hnsw = "HNSW" in factory
    codec = factory.split(",")[1].lower()
    code = {"sq8": D, "pq64": 64, "flat": 4 * D}[codec]
    n_train = min(64 * lists, max(2 * GIB // (4 * D), 39 * lists))  # search.ondisk.training_size
    assign = assign_time(f, lists, hnsw)
    lists_bytes = n * (code + 8)
    refine = 4 * 101 if codec.startswith("pq") else 0  # search.snapshot.REFINE_FACTOR x (100 + the image)
    return {
        "images": n,
        "factory": factory,
        "lists": "RAM" if in_memory else "on disk (.ivfdata, memory-mapped)",
        "nprobe": nprobe,
        "index_ram_gb": round((lists_bytes if in_memory else 0) / 1e9 + lists * D * 4 / 1e9, 2),
        "ivfdata_gb": None if in_memory else round(lists_bytes / 1e9, 1),
        "sqlite_gb": round(n * f["sqlite_bytes"] / 1e9),
        "train_points": n_train,
        "train_h": round(n_train * lists * D * 10 * f["t_mac"] / 3600, 2),
        "add_h": round(n * (assign + f[f"t_enc_{codec}"]) / 3600, 1),
        "sqlite_write_h": round(n * f["t_sqlite_write"] / 3600, 1),
        "sqlite_read_h": round(n * f["t_sqlite_read"] / 3600, 2),
        "train_ram_gb": round(n_train * D * 4 / 1e9, 1),
        "query_ms": round((assign + nprobe * n / lists * f[f"t_scan_{codec}"] + refine * f["t_fetch"]) * 1000, 1),
    }


def main() -> None:
    f = measure()
    print(json.dumps({k: float(f"{v:.4g}") for k, v in f.items()}, indent=1))
    rows = [plan_row(f, *p) for p in PLANS]
    print(json.dumps(rows, indent=1))
    out = ROOT / "benchmarks" / "out" / "vector_scaling.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"figures": f, "plans": rows}, indent=1))


if __name__ == "__main__":
    main()
