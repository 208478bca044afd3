"""Search answers on stores whose answers are known: planted near-duplicates, labels, sources, PDQ hash lists."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import photo, run_cli, save_family

from indexer.service import index_inputs
from search.errors import InvalidArgument, NotFound
from search.labels import import_hash_list, label_images
from search.pdq import compute_pdq, read_hash_list_file
from search.query import Searcher
from search.settings import Settings
from search.store import Store
from search.vectors import IndexFiles, index_ids

FAMILIES = 4  # originals 0..3 each with resized, re-encoded and cropped copies
SINGLES = 8


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    d = tmp_path / "corpus"
    for f in range(FAMILIES):
        save_family(photo(500 + f, (128, 96)), d / "families", f"fam{f}")
    for i in range(SINGLES):
        photo(600 + i, (128, 96)).save(d / f"single{i}.png")
    return d


def _index(store: Path, inputs: list[str], settings: Settings, extractor) -> None:
    with Store.writing(store, "nsfw-index index", create=True) as st:
        index_inputs(st, inputs, settings, extractor=extractor)


def _label(store: Path, refs: list[str], label: str, settings: Settings, **kw) -> list[dict]:
    with Store(store) as st:
        return [e.to_json() for e in label_images(st, refs, label, settings, **kw)]


def _import(store: Path, listed: Path, name: str, settings: Settings) -> dict:
    with Store(store, create=True) as st:
        out = import_hash_list(st, read_hash_list_file(listed), name, settings, source=str(listed.resolve()))
        return out.to_json()


@pytest.fixture
def store(tmp_path: Path, corpus: Path, settings_for, extractor) -> Path:
    s = tmp_path / "store"
    _index(s, [str(corpus)], settings_for(), extractor)
    return s


def _all(store: Path) -> tuple[np.ndarray, np.ndarray]:
    with Store(store, readonly=True) as s:
        ids, vecs = zip(*s.iter_vectors(), strict=True)
        return np.concatenate(ids), np.concatenate(vecs)


def _id(store: Path, path: Path) -> int:
    with Store(store, readonly=True) as s:
        return s.resolve_image(str(path))


def test_planted_near_duplicates_are_found_and_strangers_are_not(store, corpus, settings_for) -> None:
    settings = settings_for(near_duplicate_threshold=0.95)
    s = Searcher.open(store, settings)
    fam = corpus / "families"
    for f in range(FAMILIES):
        me = _id(store, fam / f"fam{f}.png")
        copies = {_id(store, fam / f"fam{f}{suffix}") for suffix in ("_small.png", "_q70.jpg", "_crop.png")}
        ans = s.neighbours(me).to_json()
        found = {d["id"] for d in ans["near_duplicates"]}
        assert found == copies, f"family {f}"
        assert me not in found  # an indexed image leaves itself out
        assert all(d["similarity"] >= 0.95 for d in ans["near_duplicates"])
    s.close()


def test_near_duplicates_and_nearest_unsafe_equal_brute_force(store, settings_for) -> None:
    settings = settings_for(near_duplicate_threshold=0.5, k=5)
    ids, x = _all(store)
    s = Searcher.open(store, settings)
    with Store(store, readonly=True) as st:
        unsafe = st.known_unsafe(settings)
    assert 0 < len(unsafe) < len(ids)  # the tiny model flags some images and not others
    umask = np.array([i in unsafe for i in ids])
    for qi in range(0, len(ids), 3):
        sims = x @ x[qi]
        want_dups = {int(i) for i, v in zip(ids, sims, strict=True) if v >= 0.5 and i != ids[qi]}
        got = s.neighbours(int(ids[qi])).to_json()
        assert {d["id"] for d in got["near_duplicates"]} == want_dups
        order = np.argsort(-np.where(umask & (ids != ids[qi]), sims, -np.inf), kind="stable")
        want_unsafe = [int(ids[j]) for j in order[: min(5, int(umask.sum() - umask[qi]))]]
        got_unsafe = got["nearest_unsafe"]
        assert [n["id"] for n in got_unsafe] == want_unsafe
        np.testing.assert_allclose([n["similarity"] for n in got_unsafe], sims[order[: len(want_unsafe)]], atol=1e-5)
        for n in got_unsafe:
            assert n["sources"] == unsafe[n["id"]]
    s.close()


def test_labels_sources_and_a_human_safe_over_the_model(store, corpus, settings_for) -> None:
    settings = settings_for()
    with Store(store, readonly=True) as st:
        model_flagged = sorted(i for i, src in st.known_unsafe(settings).items() if src == ["model"])
        clean = [i for i in range(1, st.max_image_id() + 1) if i not in st.known_unsafe(settings)]
    assert model_flagged and clean
    human = clean[0]
    overridden = model_flagged[0]
    events = _label(store, [str(human)], "unsafe", settings, who="alice", reason="removed")
    assert events[0]["id"] == human
    _label(store, [str(overridden)], "safe", settings, who="bob")
    with Store(store, readonly=True) as st:
        ku = st.known_unsafe(settings)
        assert ku[human] == ["human"]
        assert overridden not in ku
        hist = [e.to_json() for e in st.label_history(human)]
        assert hist[-1]["label"] == "unsafe" and hist[-1]["who"] == "alice" and hist[-1]["reason"] == "removed"

    s = Searcher.open(store, settings)
    probe = next(i for i in clean if i != human)
    ans = s.neighbours(probe, k=50).to_json()
    ids = [n["id"] for n in ans["nearest_unsafe"]]
    assert human in ids and overridden not in ids
    only_human = s.neighbours(probe, k=50, sources=["human"]).to_json()["nearest_unsafe"]
    assert [n["id"] for n in only_human] == [human]
    assert all("human" in n["sources"] for n in only_human)
    only_model = s.neighbours(probe, k=50, sources=["model"]).to_json()["nearest_unsafe"]
    assert human not in {n["id"] for n in only_model} and only_model
    far = s.neighbours(probe, k=50, min_similarity=0.99).to_json()["nearest_unsafe"]
    assert all(n["similarity"] >= 0.99 for n in far)
    with pytest.raises(InvalidArgument):
        s.neighbours(probe, sources=["rumour"])

    # the log is append-only; clearing restores the model's verdict
    with Store(store) as st, pytest.raises(Exception, match="append-only"):
        st.db.execute("DELETE FROM labels")
    _label(store, [str(overridden)], "clear", settings)
    assert s.refresh()
    assert overridden in {n["id"] for n in s.neighbours(probe, k=50).to_json()["nearest_unsafe"]}
    s.close()


def test_labelling_is_all_or_nothing_and_refs_resolve_by_path_and_sha(store, corpus, settings_for) -> None:
    settings = settings_for()
    path = corpus / "single0.png"
    with Store(store, readonly=True) as st:
        sha = st.image(st.resolve_image(str(path))).sha256
    with pytest.raises(NotFound, match="nothing was labelled"):
        _label(store, [str(path), "999999"], "unsafe", settings)
    with Store(store, readonly=True) as st:
        assert st.label_history(st.resolve_image(str(path))) == []
    out = _label(store, [sha, str(path)], "unsafe", settings)
    assert out[0]["id"] == out[1]["id"]
    csv = store.parent / "labels.csv"
    csv.write_text(f"path,label,reason\n{corpus / 'single1.png'},unsafe,ticket 9\n{corpus / 'single2.png'},safe,\n")
    p = run_cli("label", "--store", str(store), "--from-file", str(csv), "--json", check=True)
    rows = [json.loads(line) for line in p.stdout.splitlines()]
    assert [r["label"] for r in rows] == ["unsafe", "safe"]


def test_unsafe_index_updates_without_a_full_rebuild_and_agrees_after_a_crash(store, settings_for) -> None:
    settings = settings_for()
    files_dir = store / "faiss"
    all_gen = json.loads((files_dir / "all.manifest.json").read_text())["generation"]
    unsafe_gen = json.loads((files_dir / "unsafe.manifest.json").read_text())["generation"]
    with Store(store, readonly=True) as st:
        target = next(i for i in range(1, st.max_image_id() + 1) if i not in st.known_unsafe(settings))
    _label(store, [str(target)], "unsafe", settings)
    m_all = json.loads((files_dir / "all.manifest.json").read_text())
    m_unsafe = json.loads((files_dir / "unsafe.manifest.json").read_text())
    assert m_all["generation"] == all_gen  # the big index was not touched
    assert m_unsafe["generation"] == unsafe_gen + 1
    with Store(store) as st:
        snap = IndexFiles(st, settings).load("unsafe")
        assert target in set(index_ids(snap.index).tolist())
        # a label committed by a writer that died before updating the FAISS file (the log's own append, without
        # label_images' FAISS refresh):
        st.append_labels([(target, "safe", None)], "t")
    s = Searcher.open(store, settings)
    with Store(store, readonly=True) as st:
        assert sorted(index_ids(s._unsafe.index).tolist()) == sorted(st.known_unsafe(settings))
    assert target not in set(index_ids(s._unsafe.index).tolist())
    s.close()


def test_hash_list_matches_reencoded_copies_without_their_images(tmp_path, settings_for, extractor) -> None:
    originals = [photo(700 + i, (256, 192)) for i in range(3)]
    listed = tmp_path / "list.csv"
    rows = ["id,hash,note"] + [f"{i},{compute_pdq(im)[0]},x" for i, im in enumerate(originals[:2])] + ["9,zz,bad"]
    listed.write_text("\n".join(rows) + "\n")
    corpus = tmp_path / "c"
    corpus.mkdir()
    for i, im in enumerate(originals):  # only re-encoded copies are indexed, never the listed originals
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=75)
        (corpus / f"copy{i}.jpg").write_bytes(buf.getvalue())
    store = tmp_path / "store"
    _index(store, [str(corpus)], settings_for(nsfw_threshold=1.0), extractor)  # model flags nothing
    strict = settings_for(nsfw_threshold=1.0)
    out = _import(store, listed, "removed", strict)
    assert out["hashes"] == 2 and out["matched_images"] == 2
    assert [b["line"] for b in out["bad_lines"]] == [4]
    with Store(store, readonly=True) as st:
        ku = st.known_unsafe(strict)
        want = {st.resolve_image(str(corpus / f"copy{i}.jpg")) for i in range(2)}
    assert set(ku) == want and all(v == ["hash_list"] for v in ku.values())
    # a query with another re-encode of a listed original reports the list match
    s = Searcher.open(store, strict)
    ans = s.neighbours(min(want)).to_json()
    assert ans["pdq"]["matches"] and ans["pdq"]["matches"][0]["list"] == "removed"
    assert ans["pdq"]["matches"][0]["distance"] <= 31
    other = max(want)
    assert {n["id"] for n in s.neighbours(other).to_json()["nearest_unsafe"]} == want - {other}
    s.close()
    # images indexed after the import are matched as they arrive
    buf = io.BytesIO()
    originals[0].resize((200, 150)).save(buf, "PNG")
    (corpus / "late.png").write_bytes(buf.getvalue())
    _index(store, [str(corpus)], strict, extractor)
    with Store(store, readonly=True) as st:
        assert st.known_unsafe(strict)[st.resolve_image(str(corpus / "late.png"))] == ["hash_list"]
    # a human safe overrides the model only: the list match still counts (issue 13)
    _label(store, [str(corpus / "late.png")], "safe", strict)
    with Store(store, readonly=True) as st:
        assert st.known_unsafe(strict)[st.resolve_image(str(corpus / "late.png"))] == ["hash_list"]
    # overriding the list is an explicit act, with a reason
    with Store(store) as st:
        label_images(st, [str(corpus / "late.png")], "safe", strict, reason="reviewed", override_hash_lists=True)
    with Store(store, readonly=True) as st:
        assert st.resolve_image(str(corpus / "late.png")) not in st.known_unsafe(strict)


def test_query_cli_json_contract(store, corpus, settings_for) -> None:
    fam = corpus / "families"
    _label(store, [str(fam / "fam1.png")], "unsafe", settings_for())
    p = run_cli(
        "query",
        str(fam / "fam1_q70.jpg"),
        str(corpus / "nope.png"),
        "--store",
        str(store),
        "--model",
        settings_for().model,
        "--json",
        "-k",
        "3",
        "--threshold",
        "0.95",
    )
    assert p.returncode == 1  # one of the two failed
    good, bad = (json.loads(line) for line in p.stdout.splitlines())
    assert set(bad) == {"path", "error"}
    assert {"path", "nsfw", "nearest_unsafe", "near_duplicates", "pdq"} <= set(good)
    assert set(good["nsfw"]) >= {"probabilities", "scores", "level", "is_nsfw"}
    assert set(good["nsfw"]["scores"]) == {"neutral", "low", "medium", "high"}
    assert set(good["pdq"]) == {"hash", "quality", "matches"} and len(good["pdq"]["hash"]) == 64
    first = good["nearest_unsafe"][0]
    assert set(first) >= {"id", "similarity", "scores", "level", "sources", "paths"}
    assert first["paths"] == [str(fam / "fam1.png")] and "human" in first["sources"]
    assert len(good["nearest_unsafe"]) <= 3
    me = _id(store, fam / "fam1_q70.jpg")
    assert good["indexed_id"] == me
    assert {d["id"] for d in good["near_duplicates"]} >= {_id(store, fam / "fam1.png")}
    assert me not in {d["id"] for d in good["near_duplicates"]}  # an indexed image is left out of its own answer
    assert good["exact_duplicates"] == {"count": 0, "paths": [str(fam / "fam1_q70.jpg")]}
    human = run_cli(
        "query",
        str(fam / "fam1_q70.jpg"),
        "--store",
        str(store),
        "--model",
        settings_for().model,
        "--json",
        "--source",
        "human",
        check=True,
    )
    assert [n["id"] for n in json.loads(human.stdout)["nearest_unsafe"]] == [_id(store, fam / "fam1.png")]


def test_approximate_index_factory_is_stored_checked_and_measured(store, settings_for, extractor, corpus) -> None:
    p = run_cli("rebuild", "--store", str(store), "--index-factory", "HNSW8", check=True)
    assert "vectors" in p.stderr
    m = json.loads((store / "faiss" / "all.manifest.json").read_text())
    assert m["factory"] == "HNSW8" and m["metric"] == "inner_product"
    st = json.loads(run_cli("stats", "--store", str(store), "--json", check=True).stdout)
    assert 0.8 <= st["recall_at_10"] <= 1.0
    s = Searcher.open(store, settings_for(near_duplicate_threshold=0.95))
    fam0 = _id(store, corpus / "families" / "fam0.png")
    assert len(s.neighbours(fam0).to_json()["near_duplicates"]) == 3  # HNSW has no range search: top-k then threshold
    s.close()
    p = run_cli("rebuild", "--store", str(store), "--index-factory", "IVF2,Flat", check=True)
    st = json.loads(run_cli("stats", "--store", str(store), "--json", check=True).stdout)
    assert st["indexes"]["all"]["factory"] == "IVF2,Flat" and st["recall_at_10"] is not None
    every_list = json.loads(run_cli("stats", "--store", str(store), "--json", "--nprobe", "2", check=True).stdout)
    one_list = json.loads(run_cli("stats", "--store", str(store), "--json", "--nprobe", "1", check=True).stdout)
    assert every_list["recall_at_10"] == 1.0  # probing both lists of IVF2 is exhaustive
    assert one_list["recall_at_10"] < 1.0
    bad = run_cli("rebuild", "--store", str(store), "--index-factory", "NotAFactory")
    assert bad.returncode == 2 and "cannot build index factory" in bad.stderr
    assert json.loads((store / "faiss" / "all.manifest.json").read_text())["factory"] == "IVF2,Flat"


def test_search_imports_without_torch() -> None:
    code = (
        "import sys; import search.query, search.store, search.vectors, search.labels, search.stats, "
        "search.export, search.pdq, search.service; "
        "import importlib.util; "
        "importlib.util.find_spec('search.clusters') and importlib.import_module('search.clusters'); "
        "assert 'torch' not in sys.modules, 'torch was imported'; print('ok')"
    )
    import importlib  # noqa: F401

    out = subprocess.run(
        [sys.executable, "-c", "import importlib; " + code],
        capture_output=True,
        text=True,
        cwd=str(Path(__file__).parent.parent),
        timeout=120,
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_settings_flags_beat_env_beat_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NSFW_INDEX_K", "7")
    monkeypatch.setenv("NSFW_INDEX_NSFW_THRESHOLD", "0.8")
    s = Settings.from_flags(k=None, nsfw_threshold=0.3)
    assert s.k == 7 and s.nsfw_threshold == 0.3 and s.near_duplicate_threshold == 0.90
    with pytest.raises(ValueError):
        Settings(nsfw_threshold=2)


def test_opening_a_missing_store_says_how_to_create_one(tmp_path) -> None:
    with pytest.raises(Exception, match=r"no store at .*nsfw-index index"):
        Searcher.open(tmp_path / "nothing", Settings())
    assert not (tmp_path / "nothing").exists()  # a reader never creates a store


def test_a_list_imported_during_an_index_run_is_matched_by_the_run(tmp_path, settings_for, extractor) -> None:
    """The writer reads the lists inside each batch's transaction: no image slips between import and run."""
    from search.store import ImageRecord

    settings = settings_for(nsfw_threshold=1.0)
    corpus = tmp_path / "c"
    corpus.mkdir()
    photo(1).save(corpus / "a.png")
    store = tmp_path / "store"
    _index(store, [str(corpus)], settings, extractor)
    target = photo(2, (256, 192))
    h, q = compute_pdq(target)
    dim = 64
    with Store(store) as writer:  # the long-lived connection of a running indexer
        run = writer.begin_run("index", {})
        vec = np.ones(dim, np.float32) / np.sqrt(dim)

        def rec(sha: str) -> ImageRecord:
            return ImageRecord(sha, 1, 256, 192, "PNG", [1, 0, 0, 0], [1, 0, 0, 0], "neutral", vec, h, q)

        writer.write_batch(run, [rec("a" * 64)], [("/x/before.png", "a" * 64, 1, 1)])
        lst = tmp_path / "l.txt"
        lst.write_text(h + "\n")
        out = _import(store, lst, "late", settings)  # meanwhile, another process imports a list
        assert out["matched_images"] == 1  # what was committed before the import
        writer.write_batch(run, [rec("b" * 64)], [("/x/after.png", "b" * 64, 1, 1)])  # and after it
        ku = writer.known_unsafe(settings)
        assert {writer.resolve_image("/x/before.png"), writer.resolve_image("/x/after.png")} <= set(ku)
