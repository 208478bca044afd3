"""Indexing a corpus: exact duplicates, incremental re-runs, crash safety, one writer, model guard, bad files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import index_dir, make_checkpoint, photo, run_cli

from indexer import decoder, pipeline
from indexer.cli import cli
from indexer.extractor import Extractor
from search.errors import ModelMismatch, StoreLocked
from search.query import Searcher
from search.store import Store
from search.vectors import IndexFiles, index_ids


def _corpus(d: Path, n: int, size: tuple[int, int] = (64, 48), start: int = 0) -> list[Path]:
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(start, start + n):
        p = d / f"img{i:04d}.png"
        photo(i, size).save(p)
        out.append(p)
    return out


def _snapshot(store_dir: Path) -> dict[str, tuple]:
    """Content of a store that must not depend on how it was built: sha -> (paths, scores, embedding)."""
    with Store(store_dir, readonly=True) as s:
        rows = s.db.execute("SELECT id, sha256, s_neutral, s_low, s_medium, s_high, embedding FROM images").fetchall()
        paths = s.paths_of([r[0] for r in rows])
        return {
            r[1]: (
                tuple(paths[r[0]]),
                tuple(round(x, 5) for x in r[2:6]),
                np.frombuffer(r[6], np.float32).round(5).tobytes(),
            )
            for r in rows
        }


def _faiss_agrees(store_dir: Path, settings) -> None:
    """The FAISS files, once opened, hold exactly the SQLite ids: same ids, no duplicates, none missing."""
    with Store(store_dir) as s:
        if s.model_identity() is None:  # killed before the model was recorded: nothing was committed
            assert s.count_images() == 0
            return
        files = IndexFiles(s, settings)
        snap = files.open_all(persist=False)
        ids = index_ids(snap.index)
        sql_ids = [r[0] for r in s.db.execute("SELECT id FROM images ORDER BY id")]
        assert sorted(ids.tolist()) == sql_ids
        assert len(set(ids.tolist())) == len(ids)
        unsafe = files.open_unsafe(persist=False)
        assert sorted(index_ids(unsafe.index).tolist()) == sorted(s.known_unsafe(settings))


def test_exact_duplicates_are_embedded_once_and_all_paths_recorded(tmp_path, settings_for, extractor) -> None:
    corpus = tmp_path / "c"
    files = _corpus(corpus, 4)
    (corpus / "sub").mkdir()
    shutil.copy(files[0], corpus / "sub" / "copy_a.png")
    shutil.copy(files[0], corpus / "copy_b.png")
    s = index_dir(tmp_path / "store", [str(corpus)], settings_for(), extractor=extractor)
    assert s.new_images == 4  # the model ran on 4 images, not 6
    assert s.duplicate_paths == 2
    with Store(tmp_path / "store", readonly=True) as st:
        assert st.count_images() == 4
        image_id = st.resolve_image(str(files[0]))
        assert st.paths_of([image_id])[image_id] == sorted(
            [str(files[0]), str(corpus / "sub" / "copy_a.png"), str(corpus / "copy_b.png")]
        )
        assert st.counts(settings_for())["exact_duplicates"] == {"images": 1, "extra_paths": 2}


def test_rerun_does_no_model_work_changed_content_is_reindexed_and_prune_drops(
    tmp_path, settings_for, extractor
) -> None:
    corpus = tmp_path / "c"
    files = _corpus(corpus, 5)
    store = tmp_path / "store"
    index_dir(store, [str(corpus)], settings_for(), extractor=extractor)
    again = index_dir(store, [str(corpus)], settings_for(), extractor=extractor)
    assert (again.new_images, again.unchanged, again.duplicate_paths) == (0, 5, 0)
    assert "model" not in again.timings  # no forward pass at all

    old_id = Store(store, readonly=True).resolve_image(str(files[1]))
    photo(999, (64, 48)).save(files[1])  # same path, new content
    os.utime(files[1], ns=(time.time_ns(), time.time_ns() + 10**9))
    changed = index_dir(store, [str(corpus)], settings_for(), extractor=extractor)
    assert changed.new_images == 1 and changed.repointed == 1 and changed.unchanged == 4
    with Store(store, readonly=True) as st:
        new_id = st.resolve_image(str(files[1]))
        assert new_id != old_id
        assert st.images([old_id]) == {}  # the old content lost its only path
        assert st.count_images() == 5

    files[2].unlink()
    kept = index_dir(store, [str(corpus)], settings_for(), extractor=extractor)
    assert kept.pruned_paths == 0
    with Store(store, readonly=True) as st:
        assert st.path_state(str(files[2])) is not None  # without --prune nothing is forgotten
    pruned = index_dir(store, [str(corpus)], settings_for(), prune=True, extractor=extractor)
    assert (pruned.pruned_paths, pruned.pruned_images) == (1, 1)
    with Store(store, readonly=True) as st:
        assert st.path_state(str(files[2])) is None and st.count_images() == 4
    _faiss_agrees(store, settings_for())


@pytest.mark.slow
def test_rerun_over_1000_unchanged_files_does_no_file_or_model_work(
    tmp_path, settings_for, extractor, monkeypatch
) -> None:
    corpus = tmp_path / "c"
    corpus.mkdir()
    base = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    from PIL import Image

    for i in range(1000):
        arr = base.copy()
        arr[i % 16, (i // 16) % 16] = [i % 256, (i // 256) * 40, 7]
        Image.fromarray(arr).save(corpus / f"{i:04d}.png")
    first = index_dir(tmp_path / "store", [str(corpus)], settings_for(batch_size=64), extractor=extractor)
    assert first.new_images == 1000
    p = run_cli(
        "index",
        str(corpus),
        "--store",
        str(tmp_path / "store"),
        "--model",
        settings_for().model,
        "--workers",
        "0",
        "--json",
        "--quiet",
    )
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["unchanged"] == 1000 and out["new_images"] == 0
    # the work an unchanged re-run does, counted: no file is read, decoded or hashed, no forward pass runs
    calls = _count_calls(monkeypatch, [(pipeline, "read_item"), (decoder, "prepare_or_error"), (Extractor, "run")])
    again = index_dir(tmp_path / "store", [str(corpus)], settings_for(batch_size=64), extractor=extractor)
    assert (again.unchanged, again.new_images) == (1000, 0)
    assert calls == {"read_item": 0, "prepare_or_error": 0, "run": 0}
    assert "model" not in again.timings and "wait_decode" not in again.timings


def _count_calls(monkeypatch: pytest.MonkeyPatch, targets: list[tuple[object, str]]) -> dict[str, int]:
    """Wrap each `owner.name` with a counter; the returned dict holds the counts (by name) as calls happen."""
    counts: dict[str, int] = {}
    for owner, name in targets:
        fn = getattr(owner, name)
        counts[name] = 0

        def counting(*args: object, _fn=fn, _name=name, **kwargs: object) -> object:
            counts[_name] += 1
            return _fn(*args, **kwargs)

        monkeypatch.setattr(owner, name, counting)
    return counts


def _store_count(store: Path) -> int:
    try:
        c = sqlite3.connect(f"file:{store / 'meta.sqlite'}?mode=ro", uri=True, timeout=5)
        try:
            return int(c.execute("SELECT COUNT(*) FROM images").fetchone()[0])
        finally:
            c.close()
    except sqlite3.Error:
        return -1


@pytest.mark.slow
def test_kill_9_at_several_points_then_rerun_equals_a_clean_build(tmp_path, settings_for, extractor) -> None:
    corpus = tmp_path / "c"
    _corpus(corpus, 60, size=(160, 120))
    shutil.copy(corpus / "img0003.png", corpus / "zz_dup.png")
    clean = tmp_path / "clean"
    index_dir(clean, [str(corpus)], settings_for(), extractor=extractor)
    want = _snapshot(clean)

    store = tmp_path / "store"
    args = [
        "index",
        str(corpus),
        "--store",
        str(store),
        "--model",
        settings_for().model,
        "--workers",
        "1",
        "--batch-size",
        "4",
        "--quiet",
    ]
    # kill when: the store file exists, the first batch committed, about half committed, everything committed
    # (FAISS files being written), and finally at a fixed delay after start
    points = [lambda n: n >= 0, lambda n: n >= 1, lambda n: n >= 30, lambda n: n >= 60]
    committed_before = []
    for until in points:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "nsfw-index"), *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None and not until(_store_count(store)):
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        committed_before.append(_store_count(store))
        # after each kill the store opens and FAISS agrees with SQLite
        _faiss_agrees(store, settings_for())
    assert committed_before == sorted(committed_before)  # nothing committed was ever lost

    before = _store_count(store)
    p = run_cli(*args, "--json")
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stdout)
    assert summary["new_images"] == 60 - before  # nothing committed is computed again
    assert _snapshot(store) == want
    _faiss_agrees(store, settings_for())
    with Store(store, readonly=True) as st:
        statuses = [r[0] for r in st.db.execute("SELECT status FROM runs ORDER BY id")]
    assert statuses[-1] == "done" and "running" not in statuses


def test_second_writer_exits_at_once_and_readers_keep_working(tmp_path, settings_for, extractor, monkeypatch) -> None:
    corpus = tmp_path / "c"
    _corpus(corpus, 3)
    store = tmp_path / "store"
    index_dir(store, [str(corpus)], settings_for(), extractor=extractor)
    holder = Store(store).writer_lock("test holder").acquire()
    try:
        p = run_cli("index", str(corpus), "--store", str(store), "--model", settings_for().model, "--workers", "0")
        assert p.returncode == 2
        assert "another nsfw-index writer holds" in p.stderr and "test holder" in p.stderr
        # refused at once: before the model is loaded or any file is read
        loads = _count_calls(monkeypatch, [(Extractor, "from_settings"), (pipeline, "walk")])
        res = CliRunner().invoke(
            cli, ["index", str(corpus), "--store", str(store), "--model", settings_for().model, "--workers", "0"]
        )
        assert res.exit_code == 2 and "test holder" in res.output
        assert loads == {"from_settings": 0, "walk": 0}
        with pytest.raises(StoreLocked):
            index_dir(store, [str(corpus)], settings_for(), extractor=extractor)
        # readers are never blocked by the writer
        s = Searcher.open(store, settings_for())
        assert s.neighbours(1).id == 1
        s.close()
        st = run_cli("stats", "--store", str(store), "--json")
        assert st.returncode == 0 and json.loads(st.stdout)["images"] == 3
    finally:
        holder.release()
    assert index_dir(store, [str(corpus)], settings_for(), extractor=extractor).unchanged == 3


def test_store_built_with_other_weights_or_preprocessing_is_refused_unless_rebuild(
    tmp_path, settings_for, extractor
) -> None:
    corpus = tmp_path / "c"
    _corpus(corpus, 3)
    store = tmp_path / "store"
    index_dir(store, [str(corpus)], settings_for(), extractor=extractor)
    other = make_checkpoint(tmp_path / "other", seed=7)
    with pytest.raises(ModelMismatch, match="weights_sha256"):
        index_dir(store, [str(corpus)], settings_for(model=str(other)))
    p = run_cli("index", str(corpus), "--store", str(store), "--model", str(other), "--workers", "0")
    assert p.returncode == 2 and "--rebuild" in p.stderr and "weights_sha256" in p.stderr

    # same weights, other preprocessing: refused too, and the message says what differs
    prep = tmp_path / "prep"
    shutil.copytree(Path(settings_for().model), prep)
    cfg = json.loads((prep / "config.json").read_text())
    cfg["pretrained_cfg"]["interpolation"] = "bilinear"
    (prep / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelMismatch, match="preprocessing") as e:
        index_dir(store, [str(corpus)], settings_for(model=str(prep)))
    assert "weights_sha256" not in str(e.value)

    with Store(store, readonly=True) as st:
        before = st.model_identity()
        n = st.count_images()
    s = index_dir(store, [str(corpus)], settings_for(model=str(other)), rebuild=True)
    assert s.new_images == n
    with Store(store, readonly=True) as st:
        assert st.model_identity().weights_sha256 != before.weights_sha256
    _faiss_agrees(store, settings_for(model=str(other)))


def test_bad_files_never_stop_a_run(tmp_path, settings_for, extractor) -> None:
    corpus = tmp_path / "c"
    good = _corpus(corpus, 2)
    (corpus / "text.jpg").write_text("not an image")
    (corpus / "empty.png").write_bytes(b"")
    data = good[0].read_bytes()
    (corpus / "truncated.png").write_bytes(data[: len(data) // 2])
    photo(50, (300, 300)).save(corpus / "big.png")  # over the byte cap below
    (corpus / "loop").symlink_to(corpus, target_is_directory=True)
    (corpus / "dangling.jpg").symlink_to(corpus / "nowhere.jpg")
    settings = settings_for(max_file_bytes=60_000)
    assert (corpus / "big.png").stat().st_size > 60_000
    s = index_dir(tmp_path / "store", [str(corpus), str(tmp_path / "missing-dir")], settings, extractor=extractor)
    assert s.new_images == 2
    with Store(tmp_path / "store", readonly=True) as st:
        errors = {Path(e["path"]).name: e for e in st.errors()}
    assert set(errors) == {"text.jpg", "empty.png", "truncated.png", "big.png", "loop", "dangling.jpg", "missing-dir"}
    assert s.errors == 7
    assert errors["loop"]["kind"] == "symlink_loop"
    assert errors["big.png"]["kind"] == "too_large"
    assert "zero-byte" in errors["empty.png"]["reason"]
    assert errors["text.jpg"]["kind"] == "unsupported_format"
    # exit status (README): 1 whenever some input is in error, 0 only when every input was indexed or unchanged
    p = run_cli(
        "index",
        str(corpus / "text.jpg"),
        "--store",
        str(tmp_path / "s2"),
        "--model",
        settings.model,
        "--workers",
        "0",
        "--json",
    )
    assert p.returncode == 1 and json.loads(p.stdout)["errors"] == 1
    p = run_cli(
        "index", str(corpus), "--store", str(tmp_path / "s3"), "--model", settings.model, "--workers", "0", "--json"
    )
    assert p.returncode == 1 and json.loads(p.stdout)["new_images"] == 3, p.stderr  # big.png fits the default cap
    p = run_cli("index", str(good[0]), "--store", str(tmp_path / "s4"), "--model", settings.model, "--workers", "0")
    assert p.returncode == 0, p.stderr


def test_unreadable_directory_is_recorded(tmp_path) -> None:
    """As root chmod does not bite, so there the walk runs without the capabilities that bypass it (setpriv)."""
    base = tmp_path / "walk"
    base.mkdir()
    try:
        (base / "ok").mkdir()
        photo(1).save(base / "ok" / "a.png")
        (base / "locked").mkdir()
        photo(2).save(base / "locked" / "b.png")
        os.chmod(base / "locked", 0o000)
        code = (
            "import json, sys; from indexer.corpus import walk, WalkError; "
            "print(json.dumps([[type(e).__name__, e.key] for e in walk([sys.argv[1]])]))"
        )
        cmd = [sys.executable, "-c", code, str(base)]
        if os.geteuid() == 0:
            setpriv = shutil.which("setpriv")
            assert setpriv, "running as root needs util-linux setpriv to drop CAP_DAC_OVERRIDE for this test"
            cmd = [setpriv, "--bounding-set=-dac_override,-dac_read_search", *cmd]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=str(Path(__file__).parent.parent))
        assert out.returncode == 0, out.stderr
        entries = json.loads(out.stdout)
        assert ["Item", str(base / "ok" / "a.png")] in entries
        assert ["WalkError", str(base / "locked")] in entries
    finally:
        os.chmod(base / "locked", 0o755)


def test_tar_shards_and_list_files(tmp_path, settings_for, extractor) -> None:
    src = tmp_path / "src"
    files = _corpus(src, 4)
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tf:
        for i, f in enumerate(files[:3]):
            tf.add(f, arcname=f"{i:05d}.png")
            meta = tmp_path / f"{i}.json"
            meta.write_text("{}")
            tf.add(meta, arcname=f"{i:05d}.json")  # webdataset sidecar: skipped
    lst = tmp_path / "list.txt"
    lst.write_text(f"# a comment\n{files[3]}\n{files[0].name}\n")
    shutil.copy(files[0], tmp_path / files[0].name)  # relative entries resolve against the list's directory
    s = index_dir(tmp_path / "store", [str(shard), "@" + str(lst)], settings_for(), extractor=extractor)
    assert s.new_images == 4 and s.duplicate_paths == 1 and s.errors == 0
    with Store(tmp_path / "store", readonly=True) as st:
        i0 = st.resolve_image(f"{shard}::00000.png")
        assert st.paths_of([i0])[i0] == sorted([f"{shard}::00000.png", str(tmp_path / files[0].name)])
    again = index_dir(tmp_path / "store", [str(shard), "@" + str(lst)], settings_for(), extractor=extractor)
    assert again.new_images == 0 and again.unchanged == 5


def test_decoder_processes_give_the_same_store_as_in_process(tmp_path, settings_for, extractor) -> None:
    corpus = tmp_path / "c"
    _corpus(corpus, 10)
    (corpus / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    a = index_dir(tmp_path / "a", [str(corpus)], settings_for(workers=0), extractor=extractor)
    b = index_dir(tmp_path / "b", [str(corpus)], settings_for(workers=2, batch_size=3), extractor=extractor)
    assert (a.new_images, a.errors) == (b.new_images, b.errors) == (10, 1)
    assert _snapshot(tmp_path / "a") == _snapshot(tmp_path / "b")
    for stage in ("walk", "read+hash", "wait_decode", "decode(worker)", "model", "write", "faiss", "total"):
        assert stage in b.timings, stage


def test_stats_rebuild_and_export(tmp_path, settings_for, extractor) -> None:
    import pyarrow.parquet as pq

    corpus = tmp_path / "c"
    files = _corpus(corpus, 5)
    shutil.copy(files[0], corpus / "dup.png")
    (corpus / "bad.jpg").write_text("x")
    store = tmp_path / "store"
    index_dir(store, [str(corpus)], settings_for(), extractor=extractor)
    p = run_cli("stats", "--store", str(store), "--json", check=True)
    st = json.loads(p.stdout)
    assert (st["images"], st["paths"], st["errors"]) == (5, 6, 1)
    assert set(st["levels"]) == {"neutral", "low", "medium", "high"} and sum(st["levels"].values()) == 5
    assert st["model"]["architecture"].startswith("eva02_base_patch14_448")
    assert len(st["model"]["weights_sha256"]) == 64
    assert st["indexes"]["all"]["fresh"] and st["indexes"]["all"]["count"] == 5

    shutil.rmtree(store / "faiss")
    assert run_cli("stats", "--store", str(store), "--json").returncode == 0
    p = run_cli("rebuild", "--store", str(store), check=True)
    assert "5 vectors" in p.stderr
    _faiss_agrees(store, settings_for())

    out = tmp_path / "x.parquet"
    run_cli("export", "--store", str(store), "--out", str(out), check=True)
    t = pq.read_table(out)
    assert t.num_rows == 5
    with Store(store, readonly=True) as s:
        ids = t.column("id").to_pylist()
        np.testing.assert_array_equal(np.array(t.column("embedding").to_pylist(), np.float32), s.vectors(ids))
        i0 = s.resolve_image(str(files[0]))
        assert sorted(t.column("paths").to_pylist()[ids.index(i0)]) == sorted([str(files[0]), str(corpus / "dup.png")])


def test_damaged_faiss_file_is_rebuilt_not_served(tmp_path, settings_for, extractor) -> None:
    corpus = tmp_path / "c"
    _corpus(corpus, 4)
    store = tmp_path / "store"
    index_dir(store, [str(corpus)], settings_for(), extractor=extractor)
    manifest = json.loads((store / "faiss" / "all.manifest.json").read_text())
    (store / "faiss" / manifest["file"]).write_bytes(b"garbage")
    _faiss_agrees(store, settings_for())
    # a manifest that lies about the factory is caught too
    manifest["factory"] = "HNSW32"
    (store / "faiss" / "all.manifest.json").write_text(json.dumps(manifest))
    with Store(store) as st:
        assert IndexFiles(st, settings_for()).load("all") is None


def test_prune_only_forgets_what_the_inputs_cover(tmp_path, settings_for, extractor) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    fa = _corpus(a, 2)
    fb = _corpus(b, 2, start=10)
    store = tmp_path / "store"
    index_dir(store, [str(a), str(b)], settings_for(), extractor=extractor)
    fa[0].unlink()
    fb[0].unlink()
    lst = tmp_path / "b.txt"
    lst.write_text(f"{fb[1]}\n")
    # a list file covers exactly what it names: b's vanished file is not in it, a's folder is not touched
    s = index_dir(store, ["@" + str(lst)], settings_for(), prune=True, extractor=extractor)
    assert s.pruned_paths == 0
    s = index_dir(store, [str(b)], settings_for(), prune=True, extractor=extractor)
    assert s.pruned_paths == 1
    with Store(store, readonly=True) as st:
        assert st.path_state(str(fb[0])) is None
        assert st.path_state(str(fa[0])) is not None  # folder a was not an input: nothing there is forgotten
    s = index_dir(store, ["@" + str(tmp_path / "missing.txt")], settings_for(), prune=True, extractor=extractor)
    assert s.pruned_paths == 0 and s.errors == 1


@pytest.mark.slow
def test_a_crashed_decoder_process_fails_its_file_alone(tmp_path, settings_for, extractor) -> None:
    import io
    from concurrent.futures import Future

    from indexer.decoder import DecodeJob, DecoderPool
    from indexer.prepare import Prepared
    from search.errors import InvalidImage

    def png(seed: int) -> bytes:
        buf = io.BytesIO()
        photo(seed).save(buf, "PNG")
        return buf.getvalue()

    settings = settings_for()
    pool = DecoderPool(
        workers=1,
        data_config=extractor.data_config,
        transform=extractor.transform,
        max_bytes=settings.max_file_bytes,
        max_pixels=settings.max_pixels,
    )
    try:
        # a job whose worker dies as a hostile file can make a C decoder die, then good files queued behind it
        dying: Future = pool._executor.submit(os._exit, 1)
        crash = DecodeJob("hostile.png", "0" * 64, b"", dying)
        good = [pool.submit(f"{i}.png", png(i), f"{i:064d}") for i in range(3)]
        out = pool.outcome(crash, waiting=good)
        assert isinstance(out, InvalidImage) and "crashed" in out.reason and out.name == "hostile.png"
        assert pool.restarts == 1
        done = [pool.outcome(job) for job in good]
        assert all(isinstance(d, Prepared) for d in done), done
        assert [d.name for d in done] == ["0.png", "1.png", "2.png"]
        assert [d.sha256 for d in done] == [f"{i:064d}" for i in range(3)]  # the caller's hash, not computed again
    finally:
        pool.close()
