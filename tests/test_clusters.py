"""Near-duplicate groups and k-means clusters: brute-force parity, planted families, coverage, flags, freshness, CLI."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import photo
from PIL import Image

import search.graph as graph
from search.answers import ClusteringSummary
from search.clusters import get_cluster, list_clusters, load_vectors, memberships
from search.clusters import run_clustering as run_on_store
from search.errors import InvalidArgument, NotFound, StoreLocked
from search.graph import component_labels, default_k, kmeans_labels, threshold_sweep
from search.labels import label_images
from search.policy import ModelIdentity
from search.scores import cumulative_scores, level_of
from search.settings import Settings
from search.store import ImageRecord, Store

DIM = 16


def run_clustering(store_dir: Path, settings: Settings, **kw: Any) -> ClusteringSummary:
    """What the `cluster` verb does: open the store with its writer lock, run, close."""
    with Store.writing(store_dir, "nsfw-index cluster") as store:
        return run_on_store(store, settings, **kw)


def label(store_dir: Path, refs: list[str], name: str, settings: Settings, who: str) -> None:
    with Store(store_dir) as store:
        label_images(store, refs, name, settings, who=who)


# -- vector stores (no model) ------------------------------------------------------------------------------------------
def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def planted(n: int = 400, seed: int = 0) -> np.ndarray:
    """Random unit vectors with planted families: tight ones, and chains whose ends are below the threshold."""
    rng = np.random.default_rng(seed)
    x = unit(rng.standard_normal((n, DIM)))
    i = 0
    for f in range(20):  # tight families of 2..6 at cosine ~0.99
        size = 2 + f % 5
        for j in range(1, size):
            x[i + j] = unit(x[i] + 0.04 * rng.standard_normal(DIM))
        i += size
    for _ in range(5):  # chains: each link ~0.96, the ends much further apart (transitivity matters)
        direction = unit(rng.standard_normal(DIM))
        for j in range(1, 6):
            x[i + j] = unit(x[i + j - 1] + 0.28 * direction + 0.02 * rng.standard_normal(DIM))
        i += 6
    return x


def fill_store(root: Path, x: np.ndarray, *, start: int = 0, scores_seed: int = 1, extra_paths: int = 0) -> list[int]:
    """Write vectors straight into a store (one path each; `extra_paths` more paths for the first image)."""
    rng = np.random.default_rng(scores_seed + start)
    store = Store(root, create=True)
    try:
        store.check_model(
            ModelIdentity(architecture="test-arch", weights_sha256="0" * 64, preprocessing={}, embedding_dim=x.shape[1])
        )
        run = store.begin_run("test", {})
        records, paths = [], []
        for i, v in enumerate(x, start=start):
            p = rng.dirichlet(np.ones(4))
            sha = f"{i:064x}"
            records.append(
                ImageRecord(
                    sha256=sha,
                    size=100,
                    width=10,
                    height=10,
                    format="PNG",
                    probabilities=p,
                    scores=cumulative_scores(p),
                    level=level_of(p),
                    embedding=v,
                )
            )
            paths.append((f"/corpus/{i}.png", sha, 100, None))
        paths += [(f"/corpus/copy{j}_of_{start}.png", f"{start:064x}", 100, None) for j in range(extra_paths)]
        ids = store.write_batch(run, records, paths)
        store.finish_run(run, "done", {}, {})
        return [ids[f"{i:064x}"] for i in range(start, start + len(x))]
    finally:
        store.close()


def partition(labels: np.ndarray, ids: np.ndarray | list[int]) -> set[frozenset[int]]:
    sets: dict[int, set[int]] = defaultdict(set)
    for i, lab in zip(ids, labels, strict=True):
        sets[int(lab)].add(int(i))
    return {frozenset(s) for s in sets.values() if len(s) >= 2}


def brute_force_groups(x: np.ndarray, t: float) -> np.ndarray:
    """Connected components by an N x N matrix and a plain union-find: the reference."""
    adj = (x @ x.T) >= np.float32(t)
    parent = list(range(len(x)))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in zip(*np.nonzero(adj), strict=True):
        parent[find(int(a))] = find(int(b))
    return np.array([find(i) for i in range(len(x))])


def stored_groups(store_dir: Path, kind: str = "group") -> set[frozenset[int]]:
    with Store(store_dir, readonly=True) as store:
        by_cluster: dict[int, set[int]] = defaultdict(set)
        for image_id, cid in memberships(store, kind).items():
            by_cluster[cid].add(image_id)
    return {frozenset(s) for s in by_cluster.values()}


@pytest.fixture
def vec_store(tmp_path: Path) -> tuple[Path, np.ndarray, list[int]]:
    x = planted()
    ids = fill_store(tmp_path / "store", x)
    return tmp_path / "store", x, ids


# -- the graph ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("t", [0.9, 0.95, 0.97])
def test_groups_equal_brute_force_components(vec_store, t: float) -> None:
    store_dir, x, ids = vec_store
    expected = partition(brute_force_groups(x, t), ids)
    assert len(expected) >= 10  # the planted families are there (and chains make transitivity matter)
    out = run_clustering(store_dir, Settings(), threshold=t)
    assert out.recomputed and out.groups == len(expected)
    assert stored_groups(store_dir) == expected
    for method in ("exact", "ivf"):  # the approximate path agrees on a set this small
        _, labels, _ = component_labels(x, t, method=method)
        assert partition(labels, ids) == expected, method


def test_chain_is_one_group_although_its_ends_are_far(vec_store) -> None:
    _, x, _ = vec_store
    chain = np.arange(80, 86)  # the first chain, after 20 families of sizes 2..6 (80 rows)
    assert float(x[chain[0]] @ x[chain[-1]]) < 0.9
    _, labels, _ = component_labels(x, 0.9)
    assert len(set(labels[chain].tolist())) == 1


def test_tiles_cover_every_pair() -> None:
    x = planted(150, seed=3)
    rows, cols = [], []
    for r, c, s in graph.exact_edges(x, 0.9, tile=13):  # ragged tiles: pairs across and within tiles found once
        assert np.all(r < c) and np.all(s >= np.float32(0.9))
        rows.append(r)
        cols.append(c)
    got = set(zip(np.concatenate(rows).tolist(), np.concatenate(cols).tolist(), strict=True))
    ref = {(int(a), int(b)) for a, b in zip(*np.nonzero(np.triu(x @ x.T >= np.float32(0.9), 1)), strict=True)}
    assert got == ref


def test_large_stores_take_the_approximate_path(vec_store, monkeypatch) -> None:
    store_dir, x, ids = vec_store
    monkeypatch.setattr(graph, "EXACT_MAX_IMAGES", 100)  # 400 images count as "large" here
    logs: list[str] = []
    out = run_clustering(store_dir, Settings(), threshold=0.9, log=logs.append)
    assert out.method == "ivf" and any("IVF cells" in m for m in logs)
    assert stored_groups(store_dir) == partition(brute_force_groups(x, 0.9), ids)


def test_forest_folding_keeps_components(monkeypatch) -> None:
    x = planted(400, seed=5)
    monkeypatch.setattr(graph, "FOREST_FLUSH_EDGES", 3)  # fold after nearly every block
    monkeypatch.setattr(graph, "TILE", 32)
    _, labels, _ = graph.component_labels(x, 0.9, method="exact")
    assert partition(labels, list(range(len(x)))) == partition(brute_force_groups(x, 0.9), list(range(len(x))))


def test_threshold_sweep_is_monotone_and_matches_components() -> None:
    x = planted()
    ts = [0.85, 0.9, 0.95, 0.99]
    sweep = threshold_sweep(x, ts)
    assert [s["threshold"] for s in sweep] == ts
    grouped = [s["grouped_images"] for s in sweep]
    assert grouped == sorted(grouped, reverse=True)
    for s in sweep:
        _, labels, _ = component_labels(x, s["threshold"])
        sizes = np.bincount(labels)
        assert s["groups"] == int((sizes >= 2).sum()) and s["largest"] == int(sizes.max())
    sampled = threshold_sweep(x, [0.9], max_images=100)
    assert sampled[0]["sampled"] and sampled[0]["images"] == 100
    assert threshold_sweep(x, []) == []


def test_bad_threshold_and_k(vec_store) -> None:
    store_dir, _, _ = vec_store
    with pytest.raises(InvalidArgument):
        run_clustering(store_dir, Settings(), threshold=1.5)
    with pytest.raises(InvalidArgument):
        run_clustering(store_dir, Settings(), n_clusters=0)


# -- k-means -----------------------------------------------------------------------------------------------------------
def test_default_k_rule() -> None:
    assert default_k(1) == 1 and default_k(2) == 1 and default_k(200) == 10 and default_k(20000) == 100
    assert default_k(10**9) == 4096
    assert all(1 <= default_k(n) <= n for n in range(1, 300))


def test_kmeans_assignments_cover_every_image_once(vec_store) -> None:
    store_dir, x, ids = vec_store
    out = run_clustering(store_dir, Settings(), n_clusters=12)
    assert out.k == 12 and 1 <= out.clusters <= 12 and out.images == len(ids)
    with Store(store_dir, readonly=True) as store:
        rows = store.db.execute(
            "SELECT m.image_id FROM cluster_members m JOIN clusters c ON c.id = m.cluster_id WHERE c.kind = 'cluster'"
        ).fetchall()
        assert sorted(r[0] for r in rows) == sorted(ids)  # every image exactly once
        sizes = store.db.execute("SELECT SUM(size) FROM clusters WHERE kind = 'cluster'").fetchone()[0]
        assert sizes == len(ids)
        # the representative is a member, and has the highest mean similarity to its cluster (the medoid)
        id_pos = {i: p for p, i in enumerate(ids)}
        for item in list_clusters(store, Settings(), per_page=100).items:
            members = [m.id for m in get_cluster(store, Settings(), item.id).members]
            assert item.representative_id in members
            xs = x[[id_pos[m] for m in members]]
            mean_sim = (xs @ xs.T).mean(axis=1)
            assert mean_sim[members.index(item.representative_id)] >= mean_sim.max() - 1e-5
    labels = kmeans_labels(x, 7)
    assert labels.shape == (len(x),) and set(labels.tolist()) <= set(range(7))
    assert kmeans_labels(x[:3], 10).max() <= 2  # K <= N


def test_k_larger_than_n_is_lowered(tmp_path: Path) -> None:
    fill_store(tmp_path / "s", planted()[:5])
    logs: list[str] = []
    out = run_clustering(tmp_path / "s", Settings(), n_clusters=50, log=logs.append)
    assert out.k == 5 and any("lowered" in m for m in logs)


# -- freshness and the lock --------------------------------------------------------------------------------------------
def test_up_to_date_then_recomputes_when_the_store_grows(vec_store) -> None:
    store_dir, x, _ = vec_store
    first = run_clustering(store_dir, Settings(), threshold=0.95)
    assert first.recomputed and "first clustering" in first.reason
    again = run_clustering(store_dir, Settings(), threshold=0.95)
    assert not again.recomputed and again.reason == "up to date"
    assert again.groups == first.groups and again.clustering_id == first.clustering_id
    forced = run_clustering(store_dir, Settings(), threshold=0.95, force=True)
    assert forced.recomputed and "forced" in forced.reason
    with Store(store_dir, readonly=True) as store:
        old_ids = {c.id for c in list_clusters(store, Settings(), kind="group", per_page=1000).items}
    # a new near-duplicate of row 0 arrives: stale, then recomputed, and it joins row 0's group
    new = unit(x[0] + 0.01)
    (new_id,) = fill_store(store_dir, new[None, :], start=len(x))
    with Store(store_dir, readonly=True) as store:
        from search.clusters import cluster_summary

        assert cluster_summary(store).fresh is False
    grown = run_clustering(store_dir, Settings(), threshold=0.95)
    assert grown.recomputed and "grew by 1 images" in grown.reason and grown.images == len(x) + 1
    assert grown.fresh
    with Store(store_dir, readonly=True) as store:
        groups = list_clusters(store, Settings(), kind="group", per_page=1000).items
        assert not old_ids & {c.id for c in groups}  # ids are never reused
    assert any(new_id in g and 1 in g for g in stored_groups(store_dir))
    changed = run_clustering(store_dir, Settings(), threshold=0.9)
    assert changed.recomputed and "threshold changed" in changed.reason


def test_writer_lock_is_taken(vec_store) -> None:
    store_dir, _, _ = vec_store
    with Store(store_dir) as store, store.writer_lock("someone else"), pytest.raises(StoreLocked):
        run_clustering(store_dir, Settings())


def test_run_needs_the_writer_lock(vec_store) -> None:
    store_dir, _, _ = vec_store
    with Store(store_dir) as store, pytest.raises(StoreLocked, match=r"Store\.writing"):
        run_on_store(store, Settings())


def test_empty_store_says_what_to_do(tmp_path: Path) -> None:
    Store(tmp_path / "empty", create=True).close()
    with pytest.raises(InvalidArgument, match="index some first"):
        run_clustering(tmp_path / "empty", Settings())


# -- reading: pages, sorting, flags ------------------------------------------------------------------------------------
def test_list_and_get_paging_sorting_and_errors(vec_store) -> None:
    store_dir, _, _ = vec_store
    settings = Settings(nsfw_threshold=0.99)  # almost nothing is model-flagged: flags come from labels below
    with Store(store_dir, readonly=True) as store:
        assert list_clusters(store, settings).items == [] and list_clusters(store, settings).total == 0
    run_clustering(store_dir, settings, threshold=0.95, n_clusters=10)
    with Store(store_dir, readonly=True) as store:
        groups = list_clusters(store, settings, kind="group", per_page=1000)
        sizes = [(-g.size, g.id) for g in groups.items]
        assert sizes == sorted(sizes) and groups.total == len(groups.items) and groups.fresh
        p1 = list_clusters(store, settings, kind="group", per_page=3, page=1).items
        p2 = list_clusters(store, settings, kind="group", per_page=3, page=2).items
        assert [g.id for g in p1 + p2] == [g.id for g in groups.items[:6]]
        assert list_clusters(store, settings, kind="group", page=1000).items == []
        item = p1[0]
        assert set(item.to_json()) >= {
            "id",
            "kind",
            "size",
            "mean_score",
            "max_score",
            "unsafe_count",
            "flagged",
            "representative_id",
        }
        for bad in ({"kind": "blob"}, {"sort": "name"}, {"page": 0}, {"per_page": 0}, {"per_page": 100000}):
            with pytest.raises(InvalidArgument):
                list_clusters(store, settings, **bad)
        with pytest.raises(NotFound):
            get_cluster(store, settings, 10**9)
        full = get_cluster(store, settings, item.id)
        assert full.size == len(full.members) == full.members_total == item.size
        sims = [m.similarity for m in full.members]
        assert sims == sorted(sims, reverse=True) and sims[0] == pytest.approx(1.0, abs=1e-5)
        assert {"id", "similarity", "scores", "level", "sources"} <= set(full.members[0].to_json())
        assert len(get_cluster(store, settings, item.id, limit=1).members) == 1
        # scores: the stored mean and max agree with the members'
        vals = [m.scores["medium"] for m in full.members]
        assert full.max_score == pytest.approx(max(vals), abs=1e-5)
        assert full.mean_score == pytest.approx(sum(vals) / len(vals), abs=1e-5)
        # sort by unsafe count once two small groups hold human-labelled images
        small = [g for g in groups.items if g.size == 2][:2]
    for g in small:
        with Store(store_dir, readonly=True) as store:
            member = get_cluster(store, settings, g.id).members[0].id
        label(store_dir, [str(member)], "unsafe", settings, who="test")
    with Store(store_dir, readonly=True) as store:
        by_unsafe = list_clusters(store, settings, kind="group", sort="unsafe", per_page=1000).items
        assert {g.id for g in by_unsafe[:2]} == {g.id for g in small}
        assert [g.id for g in by_unsafe[:2]] == sorted(g.id for g in small)  # ties by id
        assert all(g.flagged for g in by_unsafe[:2]) and not any(g.flagged for g in by_unsafe[2:])


def test_exact_duplicates_are_a_group_with_their_path_count(tmp_path: Path) -> None:
    x = unit(np.random.default_rng(9).standard_normal((30, DIM)))
    ids = fill_store(tmp_path / "s", x, extra_paths=2)  # image 0 is stored at 3 paths
    out = run_clustering(tmp_path / "s", Settings(), threshold=0.99)
    assert out.groups == 1 and out.grouped_images == 1
    with Store(tmp_path / "s", readonly=True) as store:
        (g,) = list_clusters(store, Settings(), kind="group").items
        assert g.size == 1 and g.path_count == 3 and g.representative_id == ids[0]
        assert get_cluster(store, Settings(), g.id).members[0].path_count == 3


def test_search_imports_clusters_without_torch() -> None:
    code = (
        "import sys; import search.clusters, search.graph, search.stats, search.store; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


# -- real images through the tiny checkpoint ---------------------------------------------------------------------------
def family(img: Image.Image, d: Path, stem: str) -> list[Path]:
    out = [d / f"{stem}.png", d / f"{stem}_small.png", d / f"{stem}_q75.jpg"]
    img.save(out[0])
    img.resize((img.width * 3 // 4, img.height * 3 // 4), Image.BICUBIC).save(out[1])
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=75)
    out[2].write_bytes(buf.getvalue())
    return out


@pytest.fixture(scope="module")
def image_store(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> tuple[Path, list[list[Path]], Path]:
    """A store from generated photos: 3 planted near-duplicate families, one exact copy, 10 distinct photos."""
    from indexer.service import index_inputs

    root = tmp_path_factory.mktemp("clusters")
    corpus = root / "corpus"
    corpus.mkdir()
    families = [family(photo(100 + f, (96, 80)), corpus, f"fam{f}") for f in range(3)]
    for s in range(10):
        photo(200 + s, (90, 72)).save(corpus / f"solo{s}.png")
    shutil.copy(corpus / "solo0.png", corpus / "solo0_copy.png")
    with Store.writing(root / "store", "nsfw-index index", create=True) as store:
        index_inputs(store, [str(corpus)], Settings(model=str(checkpoint), workers=0, device="cpu"))
    return root / "store", families, corpus


@pytest.fixture
def image_store_copy(image_store, tmp_path: Path) -> tuple[Path, list[list[Path]], Path]:
    store_dir, families, corpus = image_store
    shutil.copytree(store_dir, tmp_path / "store")
    return tmp_path / "store", families, corpus


def ids_of(store_dir: Path, paths: list[Path]) -> set[int]:
    with Store(store_dir, readonly=True) as store:
        return {store.resolve_image(str(p)) for p in paths}


def test_planted_families_come_out_as_groups(image_store_copy) -> None:
    store_dir, families, corpus = image_store_copy
    out = run_clustering(store_dir, Settings(), threshold=0.95)
    groups = stored_groups(store_dir)
    expected = {frozenset(ids_of(store_dir, fam)) for fam in families}
    copy_id = ids_of(store_dir, [corpus / "solo0.png"])
    assert ids_of(store_dir, [corpus / "solo0_copy.png"]) == copy_id  # content-deduplicated
    assert groups == expected | {frozenset(copy_id)}
    assert out.groups == 4 and out.grouped_images == 10 and out.images == 19
    with Store(store_dir, readonly=True) as store:
        items = list_clusters(store, Settings(), kind="group").items
        assert [g.size for g in items] == [3, 3, 3, 1]
        assert items[-1].path_count == 2  # the exact duplicate: one image, two paths
        assert {m for c, m in memberships(store, "cluster").items()} and len(memberships(store, "cluster")) == 19
        x_ids, x = load_vectors(store)
        assert len(x_ids) == 19 and np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)


def test_flags_follow_labels(image_store_copy) -> None:
    store_dir, families, _ = image_store_copy
    with Store(store_dir, readonly=True) as store:
        top = store.db.execute("SELECT id, s_medium FROM images ORDER BY s_medium DESC, id LIMIT 1").fetchone()
    # exactly one image is known-unsafe by the model's score
    settings = Settings(nsfw_threshold=float(top[1]))
    out = run_clustering(store_dir, settings, threshold=0.95)
    assert out.flagged_clusters == 1
    fam_ids = ids_of(store_dir, families[0])
    target = min(fam_ids - {top[0]})

    def state() -> tuple[dict[int, dict], dict[int, dict]]:
        with Store(store_dir, readonly=True) as store:
            groups = {g.id: g.to_json() for g in list_clusters(store, settings, kind="group").items}
            clusters = {c.id: c.to_json() for c in list_clusters(store, settings, per_page=1000).items}
            return groups, clusters

    def group_of(image_id: int, kind: str) -> int:
        with Store(store_dir, readonly=True) as store:
            return memberships(store, kind)[image_id]

    groups, clusters = state()
    assert not groups[group_of(target, "group")]["flagged"]
    label(store_dir, [str(target)], "unsafe", settings, who="reviewer")  # after clustering: flags at once
    groups, clusters = state()
    assert groups[group_of(target, "group")]["flagged"] and groups[group_of(target, "group")]["unsafe_count"] == 1
    assert clusters[group_of(target, "cluster")]["flagged"]
    with Store(store_dir, readonly=True) as store:
        detail = get_cluster(store, settings, group_of(target, "group"))
        assert {m.id: m.sources for m in detail.members}[target] == ["human"]
    # --safe on the model-flagged image: its cluster loses that flag
    model_cluster = group_of(int(top[0]), "cluster")
    before = clusters[model_cluster]["unsafe_count"]
    label(store_dir, [str(top[0])], "safe", settings, who="reviewer")
    groups, clusters = state()
    assert clusters[model_cluster]["unsafe_count"] == before - 1
    if model_cluster != group_of(target, "cluster"):
        assert not clusters[model_cluster]["flagged"]
    with Store(store_dir, readonly=True) as store:
        from search.clusters import cluster_summary

        summary = cluster_summary(store, settings)
        assert summary.flagged_groups == 1 and summary.fresh


def test_cli_cluster_json(image_store_copy) -> None:
    from indexer.cli import cli

    store_dir, _, _ = image_store_copy
    args = ["cluster", "--store", str(store_dir), "--threshold", "0.95", "--json"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["groups"] == 4 and out["threshold"] == 0.95 and out["recomputed"] and out["images"] == 19
    assert {"clusters", "flagged_groups", "flagged_clusters", "reason"} <= set(out)
    again = json.loads(CliRunner().invoke(cli, args).stdout.strip().splitlines()[-1])
    assert again["recomputed"] is False and again["reason"] == "up to date"
    text = CliRunner().invoke(cli, ["cluster", "--store", str(store_dir), "--threshold", "0.95"])
    assert text.exit_code == 0 and "near-duplicate groups" in text.output


def test_stats_shows_the_clustering(vec_store) -> None:
    from search.stats import store_stats

    store_dir, _, _ = vec_store

    def stats() -> Any:
        with Store(store_dir, readonly=True) as store:
            return store_stats(store, Settings())

    assert stats().clusters is None
    out = run_clustering(store_dir, Settings(), threshold=0.95)
    cl = stats().clusters
    assert {k: getattr(cl, k) for k in ("groups", "clusters", "threshold", "fresh")} == {
        "groups": out.groups,
        "clusters": out.clusters,
        "threshold": 0.95,
        "fresh": True,
    }
    assert cl.largest_groups == sorted(cl.largest_groups, reverse=True) and len(cl.largest_groups) <= 5
