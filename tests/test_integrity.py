"""A damaged FAISS file is never served (checksums, rebuild, bounded similarities); decoder workers die with the
indexer; `nsfw-index verify`."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import index_dir, photo, run_cli, save_family
from stress.procs import alive, descendants


def _fam(root: Path) -> Path:
    d = root / "imgs"
    for i in range(6):
        save_family(photo(100 + i), d, f"f{i}")
    return d


@pytest.fixture(scope="module")
def clean_store(tmp_path_factory: pytest.TempPathFactory, settings_for) -> Path:
    """A store of 6 near-duplicate families (24 images), 3 labelled unsafe: both FAISS files are non-trivial."""
    from search.labels import label_images
    from search.store import Store

    root = tmp_path_factory.mktemp("integrity")
    store_dir = root / "store"
    index_dir(store_dir, [str(_fam(root))], settings_for())
    with Store.writing(store_dir, "test label") as store:
        label_images(store, ["1", "5", "9"], "unsafe", settings_for())
    return store_dir


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _index_file(store_dir: Path, name: str) -> Path:
    m = json.loads((store_dir / "faiss" / f"{name}.manifest.json").read_text())
    return store_dir / "faiss" / m["file"]


def _answers(store_dir: Path, settings) -> dict[int, dict]:
    """Every image's neighbours answer (from the stored embedding), through a read-only Searcher."""
    from search.query import Searcher

    s = Searcher.open(store_dir, settings)
    try:
        ids = s.store.image_ids()
        return {i: s.neighbours(i, k=5).to_json() for i in ids}
    finally:
        s.close()


def _similarities(answers: dict[int, dict]) -> list[float]:
    return [
        n["similarity"] for a in answers.values() for part in ("nearest_unsafe", "near_duplicates") for n in a[part]
    ]


def _flip_vector_bit(path: Path, store_dir: Path, image_id: int) -> None:
    """Flip an exponent bit of the first float of `image_id`'s vector inside the FAISS file (found by its bytes)."""
    from search.store import Store

    with Store(store_dir, readonly=True) as st:
        vec = st.vectors([image_id])[0].astype(np.float32).tobytes()
    data = bytearray(path.read_bytes())
    at = data.find(vec)
    assert at > 0, "the stored vector is not in the index file"
    data[at + 3] ^= 0x40  # exponent bit: 0.05 becomes ~1e37
    path.write_bytes(bytes(data))


def _flip_id(path: Path, old: int, new: int) -> None:
    """Rewrite one id of the id map (the int64s at the end of an IDMap2 file)."""
    data = bytearray(path.read_bytes())
    at = data.rfind(np.int64(old).tobytes())
    assert at > 0
    data[at : at + 8] = np.int64(new).tobytes()
    path.write_bytes(bytes(data))


DAMAGE = ["all-vector", "unsafe-vector", "id-map", "truncated"]


def _damage(store_dir: Path, kind: str) -> str:
    if kind == "all-vector":
        _flip_vector_bit(_index_file(store_dir, "all"), store_dir, 7)
        return "all"
    if kind == "unsafe-vector":
        _flip_vector_bit(_index_file(store_dir, "unsafe"), store_dir, 5)
        return "unsafe"
    if kind == "id-map":
        _flip_id(_index_file(store_dir, "all"), 15, 13)  # the case: image 15 reported as image 13
        return "all"
    path = _index_file(store_dir, "all")
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    return "all"


@pytest.mark.parametrize("kind", DAMAGE)
def test_damaged_index_is_detected_rebuilt_and_never_served(kind: str, clean_store: Path, tmp_path: Path, settings_for):
    from search.query import Searcher
    from search.stats import store_stats
    from search.store import Store
    from search.vectors import IndexFiles
    from search.verify import verify_store

    settings = settings_for()
    clean = _answers(clean_store, settings)
    assert any(a["near_duplicates"] for a in clean.values()) and any(a["nearest_unsafe"] for a in clean.values())
    store_dir = _copy(clean_store, tmp_path / "store")
    name = _damage(store_dir, kind)
    damaged_file = _index_file(store_dir, name)
    damaged_sha = hashlib.sha256(damaged_file.read_bytes()).hexdigest()

    with Store(store_dir, readonly=True) as st:  # stats and verify report it
        info = store_stats(st, settings, recall_sample=0).indexes[name]
        assert info["fresh"] is False and info["checksum"] == "mismatch" and "damaged" in info["stale_because"]
        report = verify_store(st, settings)
        assert not report.ok
        (check,) = [c for c in report.checks if c.name == "index checksums"]
        assert any(f"index {name}" in p and damaged_file.name in p for p in check.problems), check.problems

    # a reader serves an index rebuilt in memory: the same answers as a clean build, the file left alone
    s = Searcher.open(store_dir, settings)
    try:
        assert any(name in p for p in s.index_problems())
        assert s.index_info()["problems"]
    finally:
        s.close()
    got = _answers(store_dir, settings)
    assert got == clean
    assert all(-1.0 <= x <= 1.0 for x in _similarities(got))
    assert hashlib.sha256(damaged_file.read_bytes()).hexdigest() == damaged_sha

    # a writer rewrites the file; then everything verifies
    with Store.writing(store_dir, "test") as st:
        files = IndexFiles(st, settings)
        files.open_all(persist=True)
        files.open_unsafe(persist=True)
        assert name not in files.problems
    assert not damaged_file.exists() or hashlib.sha256(damaged_file.read_bytes()).hexdigest() != damaged_sha
    with Store(store_dir, readonly=True) as st:
        assert verify_store(st, settings).ok
        assert store_stats(st, settings, recall_sample=0).indexes[name]["checksum"] == "ok"
    assert _answers(store_dir, settings) == clean


def test_similarities_outside_unit_range_are_never_returned(clean_store: Path, tmp_path: Path, settings_for):
    """Even a vector damaged after the checksum (here: in memory) cannot produce a similarity outside [-1, 1]."""
    from search.query import Searcher, bounded

    assert bounded([(1, 2.7e35), (2, float("nan")), (3, 1.0000002), (4, -1.0000001), (5, 0.5)]) == [
        (3, 1.0),
        (4, -1.0),
        (5, 0.5),
    ]
    s = Searcher.open(_copy(clean_store, tmp_path / "store"), settings_for())
    try:
        q = s.store.vectors([7])[0]
        bad = (q * 1e30).astype(np.float32).reshape(1, -1)
        s._all.index.add_with_ids(bad, np.asarray([999], dtype=np.int64))  # a huge vector near the query
        s._unsafe.index.add_with_ids(bad, np.asarray([998], dtype=np.int64))
        dups = s.near_duplicates(q, 0.5)
        near = s.nearest_unsafe(q, 10)
        assert dups and all(-1 <= d.similarity <= 1 for d in dups) and 999 not in {d.id for d in dups}
        assert all(-1 <= n.similarity <= 1 for n in near) and 998 not in {n.id for n in near}
    finally:
        s.close()


def test_verify_cli_names_the_problem_and_exits_1(clean_store: Path, tmp_path: Path):
    store_dir = _copy(clean_store, tmp_path / "store")
    ok = run_cli("verify", "--store", str(store_dir), "--json")
    assert ok.returncode == 0, ok.stderr
    report = json.loads(ok.stdout)
    assert report["ok"] is True
    assert {c["name"] for c in report["checks"]} == {"sqlite integrity", "label chain", "index checksums", "index ids"}
    _damage(store_dir, "id-map")
    bad = run_cli("verify", "--store", str(store_dir))
    assert bad.returncode == 1
    assert "FAIL  index checksums" in bad.stdout and "sha256" in bad.stdout, bad.stdout
    assert "problems found" in bad.stdout


def test_verify_finds_faiss_ids_that_sqlite_lacks(clean_store: Path, tmp_path: Path, settings_for):
    """An index written consistently (valid checksum) but holding the wrong ids: the id check names them."""
    import faiss

    from search.store import Store
    from search.vectors import IndexFiles, Snapshot
    from search.verify import verify_store

    settings = settings_for()
    store_dir = _copy(clean_store, tmp_path / "store")
    with Store.writing(store_dir, "test") as st:
        files = IndexFiles(st, settings)
        snap = files.load("all")
        assert snap is not None
        snap.index.remove_ids(np.asarray([4], dtype=np.int64))
        v = st.vectors([4])
        snap.index.add_with_ids(v, np.asarray([4000], dtype=np.int64))
        files.save(Snapshot("all", snap.index, snap.manifest))
        assert isinstance(snap.index, faiss.IndexIDMap2)
    with Store(store_dir, readonly=True) as st:
        report = verify_store(st, settings)
    (check,) = [c for c in report.checks if c.name == "index ids"]
    assert not check.ok
    assert any("lacks 1" in p and "4" in p for p in check.problems), check.problems
    assert any("4000" in p for p in check.problems), check.problems


def test_server_readiness_reports_damage_and_serves_the_rebuilt_index(
    clean_store: Path, tmp_path: Path, settings_for, extractor
):
    """/readyz's body: ready (the answers come from an index rebuilt from SQLite) with `index.problems` naming it."""
    from api.state import Service

    store_dir = _copy(clean_store, tmp_path / "store")
    _damage(store_dir, "all-vector")
    svc = Service(settings_for(store=str(store_dir)), extractor)
    svc.open()
    try:
        summary = svc.index_summary()
        assert summary.ready is True
        assert summary.problems and "index all" in summary.problems[0] and "sha256" in summary.problems[0]
        searcher = svc.query_searcher()
        assert searcher is not None
        hits = searcher.near_duplicates(searcher.store.vectors([7])[0], 0.0)
        assert hits and all(-1 <= h.similarity <= 1 for h in hits)
    finally:
        svc.close()


# -- decoder workers die with the indexer ---------------------------------------------------------------------------
def _paths_done(store_dir: Path) -> int:
    try:
        with sqlite3.connect(f"file:{store_dir / 'meta.sqlite'}?mode=ro", uri=True, timeout=1) as c:
            return int(c.execute("SELECT COUNT(*) FROM paths").fetchone()[0])
    except sqlite3.Error:
        return 0


def _corpus(d: Path, n: int) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    from PIL import Image

    base = photo(7, (320, 240))
    for i in range(n):  # cheap to write, a real decode and resize each
        arr = np.asarray(base).copy()
        arr[rng.integers(0, 230), :, :] = rng.integers(0, 255, 3)
        Image.fromarray(arr).save(d / f"x{i:04d}.jpg", quality=85)
    return d


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts processes through /proc")
def test_kill_9_of_the_indexer_leaves_no_decoder_process(tmp_path: Path, checkpoint: Path):
    """A real `nsfw-index index --workers 2`, killed with SIGKILL mid-run: its decoder processes are gone soon after."""
    corpus = _corpus(tmp_path / "c", 1500)
    store_dir = tmp_path / "store"
    exe = Path(sys.executable).parent / "nsfw-index"
    args = [str(exe), "index", str(corpus), "--store", str(store_dir), "--model", str(checkpoint)]
    proc = subprocess.Popen(
        [*args, "--workers", "2", "--device", "cpu", "--batch-size", "4", "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        workers: set[int] = set()
        for _ in range(1200):  # until the workers exist and the store shows progress (mid-run, not start-up)
            workers = descendants(proc.pid)
            if len(workers) >= 2 and _paths_done(store_dir) > 0:
                break
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            time.sleep(0.05)
        done = _paths_done(store_dir)
        assert len(workers) >= 2 and 0 < done < 1500, (workers, done)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        for _ in range(100):  # bounded wait: the watchdog polls every 0.5 s, PDEATHSIG is immediate
            if not alive(workers):
                break
            time.sleep(0.1)
        assert alive(workers) == set(), f"decoder processes outlived the indexer: {alive(workers)}"
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in alive(descendants(proc.pid)):
            os.kill(p, signal.SIGKILL)
