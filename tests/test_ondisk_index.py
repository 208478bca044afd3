"""On-disk IVF indexes (issue 15): `rebuild --on-disk` writes the inverted lists to an .ivfdata file that readers map
read-only; recall against exact search, catching up new images, verify, and refused factories that change nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import run_cli

N = 30_000
FACTORY = "IVF64,Flat"


def clustered(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Unit vectors around 300 centres (neighbourhood structure, unlike uniform noise), 2% planted near-copies."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((300, d)).astype(np.float32)
    x = centres[rng.integers(0, 300, n)] + 0.6 * rng.standard_normal((n, d), dtype=np.float32)
    src, dst = rng.integers(0, n, n // 50), rng.integers(0, n, n // 50)
    x[dst] = x[src] + 0.05 * rng.standard_normal((len(dst), d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_vectors(store_dir: Path, x: np.ndarray, identity, first: int = 0) -> None:
    """Rows straight into the store (no model run): sha256 keys are the row numbers; 1 in 100 scores as unsafe."""
    from search.store import ImageRecord, Store

    with Store.writing(store_dir, "test", create=True) as st:
        st.check_model(identity)
        run = st.begin_run("test", {})
        for i in range(0, len(x), 10_000):
            recs = []
            for j in range(i, min(len(x), i + 10_000)):
                unsafe = (first + j) % 100 == 0
                s = [0.1, 0.9, 0.8, 0.6] if unsafe else [0.9, 0.2, 0.1, 0.05]
                level = "high" if unsafe else "neutral"
                recs.append(ImageRecord(f"{first + j:064x}", 1, 8, 8, "PNG", [0.25] * 4, s, level, x[j]))
            st.write_batch(run, recs, [(f"/v/{r.sha256[-8:]}.png", r.sha256, 1, None) for r in recs])
        st.finish_run(run, "done", {}, {})


def manifest(store_dir: Path) -> dict:
    return json.loads((store_dir / "faiss" / "all.manifest.json").read_text())


def rss_anon_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    raise AssertionError("no RssAnon in /proc/self/status")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, extractor) -> tuple[Path, np.ndarray]:
    """A store of N clustered vectors of the tiny model's width, rebuilt on disk by the real verb."""
    store_dir = tmp_path_factory.mktemp("ondisk") / "store"
    x = clustered(N, extractor.identity.embedding_dim)
    write_vectors(store_dir, x, extractor.identity)
    p = run_cli("rebuild", "--store", str(store_dir), "--index-factory", FACTORY, "--on-disk", check=True)
    assert f"{N} vectors" in p.stderr
    return store_dir, x


def test_rebuild_writes_ivfdata_that_readers_map_read_only(built, settings_for):
    from search.ondisk import on_disk_lists
    from search.query import Searcher

    store_dir, _ = built
    m = manifest(store_dir)
    ivfdata = store_dir / "faiss" / m["ivfdata"]
    assert m["on_disk"] is True and m["factory"] == FACTORY and m["count"] == N
    assert ivfdata.stat().st_size == m["ivfdata_size"] > N * 64 * 4  # the vectors are there, not in the .faiss
    assert (store_dir / "faiss" / m["file"]).stat().st_size < m["ivfdata_size"] / 50
    assert not [p.name for p in (store_dir / "faiss").iterdir() if p.name.startswith(".")]  # no temp files left

    before = rss_anon_kb()
    searcher = Searcher.open(store_dir, settings_for(store=str(store_dir)))
    try:
        grown = (rss_anon_kb() - before) * 1024
        assert searcher._all is not None and searcher._all.on_disk
        lists = on_disk_lists(searcher._all.index)
        assert lists is not None and lists.read_only and Path(lists.filename) == ivfdata
        assert grown < m["ivfdata_size"] / 3, (grown, m["ivfdata_size"])  # mapped, not read into memory
    finally:
        searcher.close()


def test_stats_recall_and_neighbours_agree_with_exact_search(built, settings_for):
    from search.query import Searcher

    store_dir, x = built
    stats = json.loads(run_cli("stats", "--store", str(store_dir), "--json", check=True).stdout)
    assert stats["indexes"]["all"]["on_disk"] is True and stats["indexes"]["all"]["fresh"] is True
    assert stats["recall_at_10"] >= 0.9, stats["recall_at_10"]

    rng = np.random.default_rng(3)
    ids = rng.choice(N, 40, replace=False) + 1  # row j is image j + 1
    exact = np.argsort(-(x[ids - 1] @ x.T), axis=1)[:, :11] + 1
    searcher = Searcher.open(store_dir, settings_for(store=str(store_dir), nprobe=8))
    try:
        overlap = []
        for image_id, truth in zip(ids.tolist(), exact, strict=True):
            ans = searcher.neighbours(image_id, threshold=-1.0)
            got = [d.id for d in ans.near_duplicates[:10]]
            overlap.append(len(set(got) & set(truth.tolist()) - {image_id}) / 10)
            assert image_id not in got
        assert np.mean(overlap) >= 0.9, overlap
    finally:
        searcher.close()


def test_pq_codes_on_disk_are_re_ranked_with_the_stored_vectors(built, tmp_path, settings_for):
    """Product-quantised lists (what 100M+ images need) lose the ranking; the answers re-rank their candidates with
    SQLite's exact vectors, and `stats` measures what the answers return."""
    from search.query import Searcher
    from search.service import rebuild_indexes
    from search.stats import recall_at_k
    from search.store import Store
    from search.vectors import IndexFiles

    store_dir = tmp_path / "store"
    shutil.copytree(built[0], store_dir)
    settings = settings_for(store=str(store_dir), nprobe=16)
    with Store.writing(store_dir, "test") as st:
        rebuild_indexes(st, settings, index_factory="IVF64,PQ8")  # 8 bytes a vector: a coarse code
        files = IndexFiles(st, settings)
        snap = files.load("all")
        assert snap is not None and snap.on_disk and snap.refine is not None
        refined = recall_at_k(st, files, settings, 100)
    assert manifest(store_dir)["ivfdata_size"] == N * (8 + 8)
    assert refined is not None and refined >= 0.9, refined
    x = built[1]
    searcher = Searcher.open(store_dir, settings)
    try:
        ids = np.random.default_rng(4).choice(N, 20, replace=False) + 1
        exact = np.argsort(-(x[ids - 1] @ x.T), axis=1)[:, 1:11] + 1
        raw = [set(searcher._all.index.search(x[i - 1 : i], 11)[1][0].tolist()) - {i} for i in ids.tolist()]
        served = [{d.id for d in searcher.neighbours(i, threshold=-1.0).near_duplicates[:10]} for i in ids.tolist()]
    finally:
        searcher.close()
    found = [len(s & set(t.tolist())) / 10 for s, t in zip(served, exact, strict=True)]
    unrefined = [len(s & set(t.tolist())) / 10 for s, t in zip(raw, exact, strict=True)]
    assert np.mean(found) >= 0.9 and np.mean(found) > np.mean(unrefined) + 0.1, (found, unrefined)


def test_images_added_after_the_build_are_found_then_merged_by_a_writer(built, tmp_path, settings_for, extractor):
    from search.ondisk import DELTA_MERGE_MIN
    from search.query import Searcher
    from search.store import Store
    from search.vectors import IndexFiles, index_ids
    from search.verify import verify_store

    store_dir = tmp_path / "store"
    shutil.copytree(built[0], store_dir)
    settings = settings_for(store=str(store_dir))
    searcher = Searcher.open(store_dir, settings)
    try:
        new = clustered(DELTA_MERGE_MIN, extractor.identity.embedding_dim, seed=7)
        write_vectors(store_dir, new[:1], extractor.identity, first=N)
        assert searcher.refresh()
        hits = searcher.near_duplicates(new[0], 0.99)
        assert [h.id for h in hits] == [N + 1]  # from the in-memory delta, beside the mapped lists
        gen = manifest(store_dir)["generation"]
        with Store.writing(store_dir, "test") as st:  # a writer with a small delta leaves the files as they are
            assert IndexFiles(st, settings).open_all(persist=True).delta_count == 1
        assert manifest(store_dir)["generation"] == gen
        p = run_cli("neighbours", str(N + 1), "--store", str(store_dir), "--threshold", "0.5", "--json", check=True)
        assert json.loads(p.stdout)["id"] == N + 1  # another process, the same index and delta

        write_vectors(store_dir, new[1:], extractor.identity, first=N + 1)
        with Store.writing(store_dir, "test") as st:  # a delta this large is merged into a new .ivfdata
            snap = IndexFiles(st, settings).open_all(persist=True)
            assert snap.on_disk and snap.delta_count == 0 and snap.index.ntotal == N + DELTA_MERGE_MIN
        m = manifest(store_dir)
        assert m["generation"] == gen + 1 and m["count"] == N + DELTA_MERGE_MIN
        left = [p.name for p in (store_dir / "faiss").iterdir() if p.suffix in (".faiss", ".ivfdata", ".tmp")]
        assert sorted(n for n in left if "all." in n) == sorted([m["file"], m["ivfdata"]])  # the old ones dropped
        with Store(store_dir, readonly=True) as st:
            assert verify_store(st, settings).ok
            loaded = IndexFiles(st, settings).load("all")
            assert loaded is not None and N + DELTA_MERGE_MIN in set(index_ids(loaded.index).tolist())
        assert searcher.refresh()
        assert [h.id for h in searcher.near_duplicates(new[-1], 0.99)] == [N + DELTA_MERGE_MIN]
    finally:
        searcher.close()


def test_verify_names_a_damaged_ivfdata_and_readers_never_serve_it(built, tmp_path, settings_for):
    from search.query import Searcher

    store_dir = tmp_path / "store"
    shutil.copytree(built[0], store_dir)
    ivfdata = store_dir / "faiss" / manifest(store_dir)["ivfdata"]
    with open(ivfdata, "r+b") as f:  # one bit of one stored vector
        f.seek(ivfdata.stat().st_size // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x10]))
    p = run_cli("verify", "--store", str(store_dir))
    assert p.returncode == 1 and f"{ivfdata.name} is damaged: sha256" in p.stdout, p.stdout
    searcher = Searcher.open(store_dir, settings_for(store=str(store_dir)))
    try:
        assert any(ivfdata.name in problem for problem in searcher.index_problems())
        assert searcher._all is not None and searcher._all.on_disk  # rebuilt privately, still on disk
        assert searcher.neighbours(5, threshold=-1.0).near_duplicates
    finally:
        searcher.close()
    assert ivfdata.read_bytes() != b""  # a reader leaves the store's files alone

    ivfdata.write_bytes(ivfdata.read_bytes()[:4096])  # truncated: refused by its size, never mapped past the end
    p = run_cli("verify", "--store", str(store_dir))
    assert p.returncode == 1 and "4096 bytes, manifest says" in p.stdout, p.stdout


def test_refused_factories_change_nothing_and_the_old_index_keeps_serving(built, tmp_path, settings_for, extractor):
    from api.app import create_app
    from api.server import BackgroundServer
    from search.store import Store

    store_dir = tmp_path / "store"
    shutil.copytree(built[0], store_dir)
    before = manifest(store_dir)
    cases = [
        (["--index-factory", "IVF64,Bogus"], "FAISS cannot build index factory 'IVF64,Bogus'"),
        (["--index-factory", "HNSW32", "--on-disk"], "an on-disk index needs an IVF factory"),
        (["--index-factory", f"IVF{N * 2},Flat"], f"training 'IVF{N * 2},Flat' on"),  # more lists than vectors
    ]
    for flags, message in cases:
        p = run_cli("rebuild", "--store", str(store_dir), *flags)
        assert p.returncode == 2 and message in p.stderr, (flags, p.stderr)
        assert manifest(store_dir) == before
    assert not [p.name for p in (store_dir / "faiss").iterdir() if p.name.startswith(".")]
    with Store(store_dir, readonly=True) as st:
        assert st.get_info("index_factory") == FACTORY and st.get_info("index_on_disk") is True

    settings = settings_for(store=str(store_dir))
    app = create_app(settings, extractor=extractor)
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        r = client.get("/v1/images/5/neighbours", params={"threshold": -1.0})
        assert r.status_code == 200, r.text
        assert r.json()["near_duplicates"] and r.json()["id"] == 5
        searcher = app.state.service.searcher
        assert searcher is not None and searcher._all.on_disk and searcher._all.generation == before["generation"]
