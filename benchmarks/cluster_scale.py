"""How near-duplicate grouping and k-means scale: times the code paths of search.graph on synthetic unit vectors.

Vectors are drawn around random topic centres (so k-means has structure), and 5% of them are planted near-duplicates
of another vector (cosine ~0.97), in families of 2..6. Prints one line per N with the time of the near-duplicate
graph + components, of k-means and of the representatives, the recovered planted families and the peak RSS.

    .venv/bin/python benchmarks/cluster_scale.py                    # N = 10k and 100k (exact path)
    .venv/bin/python benchmarks/cluster_scale.py --n 1000000        # the approximate (IVF cell) path
    .venv/bin/python benchmarks/cluster_scale.py --n 100000 --method ivf --recall   # IVF pairs vs exact pairs
    .venv/bin/python benchmarks/cluster_scale.py --n 20000 --end-to-end             # through a real SQLite store

Bounded: N is capped at 2M, and the exact path refuses N > 400k unless --method exact is given.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from search.graph import (
    EXACT_MAX_IMAGES,
    IVF_NPROBE,
    Forest,
    Partition,
    component_labels,
    default_k,
    exact_edges,
    graph_method,
    ivf_edges,
    ivf_nlist,
    kmeans_labels,
    representatives,
)

MAX_N = 2_000_000


def synthetic(
    n: int, d: int, seed: int = 0, topics: int = 500, dup_fraction: float = 0.05, dup_noise: float = 0.17
) -> tuple[np.ndarray, list[np.ndarray]]:
    """(unit vectors, planted families as row arrays). A member is its family's base plus noise of norm `dup_noise`:
    cosine ~ 1/sqrt(1 + noise^2) to the base, ~ 1/(1 + noise^2) between members (0.17: ~0.97; 0.33: ~0.90)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((topics, d)).astype(np.float32)
    x = np.empty((n, d), np.float32)
    for i in range(0, n, 65536):
        m = min(n, i + 65536) - i
        x[i : i + m] = centres[rng.integers(0, topics, m)] * 0.6 + rng.standard_normal((m, d), dtype=np.float32)
    faiss.normalize_L2(x)
    families: list[np.ndarray] = []
    planted = 0
    pos = 0
    budget = int(n * dup_fraction)
    perm = rng.permutation(n)
    while planted < budget and pos + 6 < n:
        size = int(rng.integers(2, 7))
        rows = perm[pos : pos + size]
        pos += size
        base = x[rows[0]]
        noise = rng.standard_normal((size - 1, d), dtype=np.float32) * (dup_noise / np.sqrt(d))
        x[rows[1:]] = base + noise
        families.append(rows)
        planted += size - 1
    faiss.normalize_L2(x)
    return x, families


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def recovered(labels: np.ndarray, families: list[np.ndarray]) -> float:
    return float(np.mean([len(set(labels[f].tolist())) == 1 for f in families])) if families else 1.0


def knn_edges(x: np.ndarray, threshold: float, k: int = 32, nprobe: int = 16):  # type: ignore[no-untyped-def]
    """The design that was dropped, kept to compare: one kNN search per image on an IVF-Flat index, then the
    threshold. Memory-bound (each query streams its probed lists) and capped at k neighbours."""
    n, d = x.shape
    nlist = ivf_nlist(n)
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.min_points_per_centroid = 1
    sample = np.sort(np.random.default_rng(0).choice(n, min(n, 64 * nlist), replace=False))
    index.train(x[sample])
    index.add(x)
    index.nprobe = nprobe
    for i0 in range(0, n, 16384):
        sims, nbrs = index.search(x[i0 : i0 + 16384], k + 1)
        rows = np.repeat(np.arange(i0, i0 + len(sims)), k + 1)
        cols, s = nbrs.reshape(-1), sims.reshape(-1)
        keep = (cols >= 0) & (cols != rows) & (s >= np.float32(threshold))
        yield rows[keep], cols[keep], s[keep]


def pair_recall(x: np.ndarray, threshold: float, approx_edges=ivf_edges) -> tuple[int, int, float]:  # type: ignore[no-untyped-def]
    """Pairs found by the approximate path against the exact pairs at the threshold."""

    def pairs(blocks):  # type: ignore[no-untyped-def]
        out = set()
        for r, c, _ in blocks:
            a, b = np.minimum(r, c), np.maximum(r, c)
            out.update(zip(a.tolist(), b.tolist(), strict=True))
        return out

    exact = pairs(exact_edges(x, threshold))
    approx = pairs(approx_edges(x, threshold))
    return len(exact), len(approx & exact), len(approx & exact) / max(1, len(exact))


def bench(
    n: int, d: int, threshold: float, method: str, recall: bool, compare_knn: bool = False, dup_noise: float = 0.17
) -> None:
    t0 = time.perf_counter()
    x, families = synthetic(n, d, dup_noise=dup_noise)
    gen_s = time.perf_counter() - t0
    how = graph_method(n, method)
    t0 = time.perf_counter()
    _, labels, edges = component_labels(x, threshold, method=how)
    graph_s = time.perf_counter() - t0
    sizes = np.bincount(labels)
    k = default_k(n)
    t0 = time.perf_counter()
    km = kmeans_labels(x, k)
    kmeans_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    uniq, inv = np.unique(km, return_inverse=True)
    representatives(x, Partition(np.arange(n, dtype=np.int64), inv.astype(np.int64), len(uniq)))
    rep_s = time.perf_counter() - t0
    detail = f"IVF cells nlist={ivf_nlist(n)} nprobe={IVF_NPROBE}" if how == "ivf" else "exact FlatIP range search"
    print(
        f"N={n:>9,} d={d} T={threshold}  graph[{detail}]: {graph_s:8.1f}s  {edges:,} pairs, "
        f"{int((sizes >= 2).sum()):,} groups, planted families recovered {recovered(labels, families):.1%}  |  "
        f"k-means K={k}: {kmeans_s:6.1f}s  |  medoids: {rep_s:5.1f}s  |  (generate {gen_s:.1f}s, "
        f"peak RSS {peak_rss_gb():.1f} GB, {faiss.omp_get_max_threads()} threads)",
        flush=True,
    )
    if recall:
        t0 = time.perf_counter()
        total, found, r = pair_recall(x, threshold)
        print(
            f"    IVF-cell pair recall vs exact at T={threshold}: {found:,}/{total:,} = {r:.4f} "
            f"({time.perf_counter() - t0:.1f}s for both)",
            flush=True,
        )
    if compare_knn:
        t0 = time.perf_counter()
        forest = Forest(n)
        for r_, c_, _ in knn_edges(x, threshold):
            forest.add(r_, c_)
        knn_s = time.perf_counter() - t0
        _, knn_labels = forest.components()
        print(
            f"    dropped design, IVF-Flat kNN k=32 nprobe=16: {knn_s:.1f}s, planted families recovered "
            f"{recovered(knn_labels, families):.1%}",
            flush=True,
        )


def end_to_end(n: int, d: int, threshold: float) -> None:
    """Write the vectors into a real store, then time run_clustering (load + graph + k-means + SQLite write)."""
    from search.clusters import run_clustering
    from search.policy import ModelIdentity
    from search.settings import Settings
    from search.store import ImageRecord, Store

    x, _ = synthetic(n, d)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "store", create=True)
        store.check_model(
            ModelIdentity(architecture="bench", weights_sha256="0" * 64, preprocessing={}, embedding_dim=d)
        )
        run = store.begin_run("bench", {})
        t0 = time.perf_counter()
        p = [0.7, 0.1, 0.1, 0.1]
        s = [0.7, 0.3, 0.2, 0.1]
        for i in range(0, n, 5000):
            recs = [ImageRecord(f"{j:064x}", 1, 1, 1, "PNG", p, s, "neutral", x[j]) for j in range(i, min(n, i + 5000))]
            store.write_batch(run, recs, [(f"/b/{r.sha256}", r.sha256, 1, None) for r in recs])
        fill_s = time.perf_counter() - t0
        store.close()
        t0 = time.perf_counter()
        with Store.writing(Path(tmp) / "store", "nsfw-index cluster") as writer:
            out = run_clustering(writer, Settings(near_duplicate_threshold=threshold))
        total_s = time.perf_counter() - t0
        print(
            f"end to end N={n:,}: store filled in {fill_s:.1f}s; run_clustering {total_s:.1f}s "
            f"({out.timings}), {out.groups} groups, {out.clusters} clusters",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--method", choices=["auto", "exact", "ivf"], default="auto")
    ap.add_argument("--recall", action="store_true", help="Also measure IVF pair recall against exact (slow).")
    ap.add_argument("--compare-knn", action="store_true", help="Also time the dropped IVF kNN-graph design.")
    ap.add_argument("--end-to-end", action="store_true", help="Through a real SQLite store and run_clustering.")
    ap.add_argument(
        "--dup-noise",
        type=float,
        default=0.17,
        help="Noise norm of planted near-duplicates (0.17: cosine ~0.97; 0.33: ~0.90, at the threshold).",
    )
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        faiss.omp_set_num_threads(a.threads)
    for n in a.n:
        if not 2 <= n <= MAX_N:
            ap.error(f"--n must be between 2 and {MAX_N:,}")
        if a.method == "auto" and n > 2 * EXACT_MAX_IMAGES and graph_method(n) == "exact":
            ap.error("refusing an exact graph this large without --method exact")
        if a.end_to_end:
            end_to_end(n, a.dim, a.threshold)
        else:
            bench(n, a.dim, a.threshold, a.method, a.recall, a.compare_knn, a.dup_noise)


if __name__ == "__main__":
    main()
