"""Forgetting an image (`nsfw-index forget`, `DELETE /v1/images/{id}`) and external ids (`POST /v1/images` field,
`GET /v1/images?external_id=`): what goes, what stays (label events), the audit record, the FAISS files."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import pytest
from conftest import index_dir, photo, run_cli
from test_api import assert_error, auth, live, png
from test_api import settings_for as api_settings

from search.clusters import run_clustering
from search.errors import NotFound
from search.forget import ExternalIdConflict, assign_external_id, forget, resolve_for_forget
from search.labels import import_hash_list, label_images
from search.query import Searcher
from search.settings import Settings
from search.store import Store
from search.vectors import IndexFiles, index_ids
from search.verify import verify_store


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("forget-corpus")
    for i in range(6):
        photo(i).save(d / f"img{i}.png")
    photo(0).save(d / "copy-of-0.png")
    return d


def sha_of(seed: int) -> str:
    return hashlib.sha256(png(photo(seed))).hexdigest()


def faiss_ids(store_dir: Path, settings: Settings) -> tuple[set[int], set[int], int]:
    """The ids in the FAISS files on disk (all, unsafe) and the deletion epoch their manifests say."""
    with Store(store_dir, readonly=True) as store:
        files = IndexFiles(store, settings)
        snaps = [files.load(name) for name in ("all", "unsafe")]
        assert all(s is not None for s in snaps), "a FAISS file is stale or missing after forget"
        epoch = int((files.read_manifest("all") or {})["deletion_epoch"])
        all_ids, unsafe_ids = (set(index_ids(s.index).tolist()) for s in snaps if s is not None)
        return all_ids, unsafe_ids, epoch


def test_forget_from_the_cli_removes_everything_but_the_labels(tmp_path, corpus, checkpoint, extractor):
    settings = api_settings(checkpoint, tmp_path / "store")
    store_dir = tmp_path / "store"
    index_dir(store_dir, [str(corpus)], settings, extractor=extractor, thumbnails=True)
    with Store.writing(store_dir, "test") as store:
        target = store.ids_by_sha([sha_of(0)])[sha_of(0)]
        label_images(store, [str(target)], "unsafe", settings, who="reviewer", reason="ticket 1")
        import_hash_list(store, [str(store.image(target).pdq.hash)], "removed", settings)
        assert store.db.execute("SELECT COUNT(*) FROM hash_matches WHERE image_id = ?", [target]).fetchone()[0] > 0
        run_clustering(store, settings, threshold=0.0, n_clusters=2)
        assert store.thumbnail(target, blurred=True) is not None and len(store.paths_of([target])[target]) == 2
        assign_external_id(store, target, "crm-17")
        epoch_before = store.deletion_epoch()

    p = run_cli("forget", str(target), "--store", str(store_dir), "--who", "alice", "--json", check=True)
    done = json.loads(p.stdout)
    assert done["id"] == target and done["sha256"] == sha_of(0) and done["external_id"] == "crm-17"
    assert done["paths"] == 2 and done["label_events_kept"] == 1 and done["who"] == "alice"

    with Store(store_dir, readonly=True) as store:
        with pytest.raises(NotFound):
            store.image(target)
        assert store.paths_of([target])[target] == [] and store.thumbnail(target, blurred=True) is None
        assert store.image_by_external_id("crm-17") is None
        db = store.db
        assert db.execute("SELECT COUNT(*) FROM cluster_members WHERE image_id = ?", [target]).fetchone()[0] == 0
        assert db.execute("SELECT COUNT(*) FROM hash_matches WHERE image_id = ?", [target]).fetchone()[0] == 0
        # the label log keeps the event (the audit trail outlives the image), and the removal is recorded
        assert db.execute("SELECT who, reason FROM labels WHERE sha256 = ?", [sha_of(0)]).fetchall() == [
            ("reviewer", "ticket 1")
        ]
        kind, args = db.execute("SELECT kind, args FROM runs WHERE id = ?", [done["run_id"]]).fetchone()
        assert kind == "forget" and json.loads(args)["external_id"] == "crm-17"
        assert store.deletion_epoch() == epoch_before + 1
    all_ids, unsafe_ids, epoch = faiss_ids(store_dir, settings)
    assert target not in all_ids and target not in unsafe_ids and len(all_ids) == 5 and epoch == epoch_before + 1
    with Store(store_dir, readonly=True) as store:
        report = verify_store(store, settings)  # FAISS ids equal SQLite ids, the label chain holds
        assert report.ok, report.to_json()

    # forgetting twice is a clear error, naming when and by whom; an unknown one says so
    again = run_cli("forget", str(target), "--store", str(store_dir))
    assert again.returncode == 2 and "already forgotten" in again.stderr and "alice" in again.stderr
    with Store(store_dir, readonly=True) as store:  # by sha256 or external id too; an unknown one says so
        for ref, ext in ((sha_of(0), None), (None, "crm-17")):
            with pytest.raises(NotFound, match=r"already forgotten at .* by alice"):
                resolve_for_forget(store, ref=ref, external_id=ext)
        with pytest.raises(NotFound, match="no image with id 999"):
            resolve_for_forget(store, ref="999")
    usage = run_cli("forget", "1", "--external-id", "x", "--store", str(store_dir))
    assert usage.returncode == 2 and "name one image" in usage.stderr
    text = run_cli("forget", sha_of(1), "--store", str(store_dir), check=True)
    assert text.stdout.startswith("forgot image ")

    # an index run over the folder that still holds the file adds it again, with a new id; its label applies again
    # (labels are keyed by content)
    index_dir(store_dir, [str(corpus)], settings, extractor=extractor)
    with Store(store_dir, readonly=True) as store:
        back = store.ids_by_sha([sha_of(0)]).get(sha_of(0))
        assert back is not None and back > target
        assert "human" in store.known_unsafe(settings, [back])[back]


def test_forget_with_an_approximate_index(tmp_path, corpus, checkpoint, extractor):
    settings = api_settings(checkpoint, tmp_path / "store")
    store_dir = tmp_path / "store"
    index_dir(store_dir, [str(corpus)], settings, extractor=extractor, index_factory="HNSW8")
    with Store.writing(store_dir, "test") as store:
        target = resolve_for_forget(store, ref=sha_of(2))
        forget(store, target, settings, who="t")
        with pytest.raises(NotFound, match="already forgotten"):
            forget(store, target, settings, who="t")
    all_ids, _, _ = faiss_ids(store_dir, settings)
    assert target not in all_ids and len(all_ids) == 5
    with Store(store_dir, readonly=True) as store:
        searcher = Searcher(store, settings)
        vec = [0.0] * store.embedding_dim()
        vec[0] = 1.0
        assert target not in {d.id for d in searcher.embedding_answer(vec, threshold=-1.0).near_duplicates}


def test_external_ids_are_one_to_one(tmp_path, corpus, checkpoint, extractor):
    settings = api_settings(checkpoint, tmp_path / "store")
    index_dir(tmp_path / "store", [str(corpus)], settings, extractor=extractor)
    with Store.writing(tmp_path / "store", "test") as store:
        assign_external_id(store, 1, "a")
        assign_external_id(store, 1, "a")  # the same again: nothing to do
        with pytest.raises(ExternalIdConflict, match="belongs to image 1"):
            assign_external_id(store, 2, "a")
        with pytest.raises(ExternalIdConflict, match="already has external id 'a'"):
            assign_external_id(store, 1, "b")
        with pytest.raises(sqlite3.IntegrityError):  # the schema says so too
            with store.transaction() as conn:
                conn.execute("UPDATE images SET external_id = 'a' WHERE id = 2")
        assert store.external_ids([1, 2]) == {1: "a", 2: None}


def test_http_delete_and_external_ids(tmp_path, corpus, checkpoint, extractor):
    settings = api_settings(checkpoint, tmp_path / "store")
    index_dir(tmp_path / "store", [str(corpus)], settings, extractor=extractor)
    new_image = png(photo(11))
    with live(settings, extractor) as (client, _):
        # add with an external id: kept, returned, searchable
        r = client.post(
            "/v1/images", files={"file": ("n.png", new_image)}, data={"external_id": "ext-1"}, headers=auth("write")
        )
        assert r.status_code == 200, r.text
        added = r.json()
        assert added["created"] and added["external_id"] == "ext-1"
        image_id = added["id"]
        assert client.get(f"/v1/images/{image_id}").json()["external_id"] == "ext-1"
        found = client.get("/v1/images", params={"external_id": "ext-1"}).json()["images"]
        assert [i["id"] for i in found] == [image_id] and "paths" not in found[0]
        assert client.get("/v1/images", params={"external_id": "nobody"}).json() == {"images": []}
        assert_error(client.get("/v1/images"), 422)
        # the same content and id again: fine; another id for it, or this id for other content: 409, nothing written
        again = client.post(
            "/v1/images", files={"file": ("n.png", new_image)}, data={"external_id": "ext-1"}, headers=auth("write")
        )
        assert again.status_code == 200 and not again.json()["created"]
        count = client.get("/v1/stats").json()["images"]
        for data, image in (({"external_id": "ext-2"}, new_image), ({"external_id": "ext-1"}, png(photo(12)))):
            r = client.post("/v1/images", files={"file": ("x.png", image)}, data=data, headers=auth("write"))
            assert_error(r, 409, "external_id_conflict")
        assert client.get("/v1/stats").json()["images"] == count
        for bad in ("", " padded", "tab\there", "x" * 257):
            files = {"file": ("x.png", png(photo(13)))}
            assert_error(client.post("/v1/images", files=files, data={"external_id": bad}, headers=auth("write")), 422)
        assert client.get("/v1/stats").json()["images"] == count

        # delete: the write right, then gone from answers at once; labels stay; twice is a clear 404
        assert_error(client.delete(f"/v1/images/{image_id}"), 401)
        assert_error(client.delete(f"/v1/images/{image_id}", headers=auth("read")), 403)
        client.put(f"/v1/images/{image_id}/label", json={"label": "unsafe"}, headers=auth("label")).raise_for_status()
        r = client.delete(f"/v1/images/{image_id}", headers=auth("write"))
        assert r.status_code == 200, r.text
        gone = r.json()
        assert gone["id"] == image_id and gone["external_id"] == "ext-1" and gone["label_events_kept"] == 1
        assert gone["who"].startswith("api-key:")
        assert_error(client.get(f"/v1/images/{image_id}"), 404)
        assert client.get("/v1/images", params={"external_id": "ext-1"}).json() == {"images": []}
        q = client.post("/v1/query", files={"file": ("n.png", new_image)}, params={"threshold": -1.0}).json()
        [res] = q["results"]
        assert res["indexed_id"] is None
        assert image_id not in {d["id"] for d in res["near_duplicates"]}
        assert image_id not in {n["id"] for n in res["nearest_unsafe"]}
        assert q["index"]["images"] == count - 1
        twice = assert_error(client.delete(f"/v1/images/{image_id}", headers=auth("write")), 404, "not_found")
        assert "already forgotten" in twice["message"]
        assert_error(client.delete("/v1/images/424242", headers=auth("write")), 404, "not_found")
    with Store(tmp_path / "store", readonly=True) as store:
        labels = store.db.execute("SELECT label FROM labels WHERE sha256 = ?", [added["result"]["sha256"]]).fetchall()
        assert labels == [("unsafe",)]
