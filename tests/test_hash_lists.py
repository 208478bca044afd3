"""Hash lists as banks (issue 14): PDQ's dihedral hashes on real photos (which transform is which), mirrored and
rotated copies matched with the transform named, the CLI and HTTP verbs (list, show, export round trip, delete),
and what a delete changes (known-unsafe, the FAISS file, answers) and keeps (label events, the list's history)."""

from __future__ import annotations

import io
import json
import shutil
import sqlite3
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from conftest import index_dir
from PIL import Image

from api.app import create_app
from api.auth import key_name
from api.server import BackgroundServer
from indexer.cli import cli
from indexer.prepare import prepare_image
from search.answers import PdqTransform
from search.labels import delete_hash_list, import_hash_list, label_images, show_hash_list
from search.pdq import DIHEDRAL, compute_pdq, compute_pdq_dihedral, hamming
from search.query import Searcher
from search.settings import Settings
from search.store import Store
from search.store.schema import FOLLOW_UPS, MIGRATIONS, statements

T = Image.Transpose
#: Pillow's operation for each of PDQ's dihedral transforms (search.pdq.DIHEDRAL)
PIL_OPS: dict[str, T | None] = {
    "original": None,
    "rot90": T.ROTATE_90,
    "rot180": T.ROTATE_180,
    "rot270": T.ROTATE_270,
    "flipV": T.FLIP_TOP_BOTTOM,
    "flipH": T.FLIP_LEFT_RIGHT,
    "transpose": T.TRANSPOSE,
    "transverse": T.TRANSVERSE,
}
#: the transform that undoes each one: a copy made with `op` matches its original through INVERSE[op]
INVERSE = {"rot90": "rot270", "rot270": "rot90"}
#: copies indexed: (original photo, the transform that made the copy)
COPIES = [("chelsea", "flipH"), ("astronaut", "rot90"), ("coffee", "flipV"), ("rocket", "transpose")]
KEYS = {"write": "k-write", "read": "k-read"}


def real_photo(name: str, side: int = 512) -> Image.Image:
    """One of scikit-image's sample photographs, at most `side` px a side."""
    import skimage

    src = Path(skimage.__file__).parent / "data"
    path = next(p for p in sorted(src.glob(f"{name}.*")) if p.suffix in (".png", ".jpg"))
    img = Image.open(path).convert("RGB")
    img.thumbnail((side, side))
    return img


def transformed(img: Image.Image, transform: str) -> Image.Image:
    op = PIL_OPS[transform]
    return img.copy() if op is None else img.transpose(op)


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, settings_for, extractor) -> Path:
    """A store of mirrored/rotated copies of 4 real photos plus 2 untouched photos, indexed once; tests copy it."""
    root = tmp_path_factory.mktemp("banks")
    corpus = root / "corpus"
    corpus.mkdir()
    for name, t in COPIES:
        transformed(real_photo(name), t).save(corpus / f"{name}_{t}.png")
    for name in ("motorcycle_left", "hubble_deep_field"):
        real_photo(name).save(corpus / f"{name}.png")
    index_dir(root / "store", [str(corpus)], settings_for(nsfw_threshold=1.0), extractor=extractor)
    return root / "store"


@pytest.fixture
def store_dir(built: Path, tmp_path: Path) -> Path:
    shutil.copytree(built, tmp_path / "store")
    return tmp_path / "store"


@pytest.fixture
def strict(settings_for) -> Settings:
    return settings_for(nsfw_threshold=1.0)  # the model flags nothing: known-unsafe comes from lists and humans


def originals_list(path: Path, names: list[str]) -> Path:
    """A CSV list of the originals' PDQ hashes, with notes."""
    rows = ["hash,note"] + [f"{compute_pdq(real_photo(n))[0]},removed {n}" for n in names]
    path.write_text("\n".join(rows) + "\n")
    return path


def image_of(st: Store, name: str, t: str | None = None) -> int:
    stem = f"{name}_{t}" if t else name
    return next(i for p, (_, _, i) in st.all_path_states().items() if Path(p).stem == stem)


def invoke(*args: str, input: str | None = None) -> Any:
    return CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)


# -- the dihedral hashes -----------------------------------------------------------------------------------------------
def test_dihedral_order_is_what_each_transform_of_a_real_photo_hashes_to() -> None:
    assert typing.get_args(PdqTransform) == DIHEDRAL
    for name in ("chelsea", "astronaut"):
        img = real_photo(name)
        hashes, quality = compute_pdq_dihedral(img)
        assert (hashes[0], quality) == compute_pdq(img)  # the original is exactly the plain hash
        for k, t in enumerate(DIHEDRAL):
            own = compute_pdq(transformed(img, t))[0]
            distances = [hamming(own, h) for h in hashes]
            # the hash of the transformed photo is (close to) slot k and far from every other slot
            assert distances[k] <= 31 and distances.index(min(distances)) == k, (name, t, distances)
            assert all(d > 64 for j, d in enumerate(distances) if j != k), (name, t, distances)


def test_prepare_keeps_the_dihedral_hashes_and_the_store_drops_them_with_the_image(store_dir: Path, strict) -> None:
    p = prepare_image(
        "x.png", png(real_photo("chelsea")), transform=lambda im: [[0.0]], max_bytes=10**8, max_pixels=10**8
    )
    hashes, _ = compute_pdq_dihedral(real_photo("chelsea"))
    assert p.pdq == hashes[0] and p.pdq_dihedral == hashes[1:]
    with Store(store_dir) as st:
        ids = sorted(i for _, _, i in st.all_path_states().values())
        assert sorted(st.dihedral_hashes(ids)) == ids and st.count_without_dihedral() == 0
        gone = image_of(st, "chelsea", "flipH")
        st.prune({p for p in st.all_path_states() if Path(p).stem != "chelsea_flipH"})
        assert gone not in st.dihedral_hashes(ids)
        assert st.db.execute("SELECT COUNT(*) FROM pdq_dihedral").fetchone()[0] == len(ids) - 1


# -- matching ----------------------------------------------------------------------------------------------------------
def test_mirrored_and_rotated_copies_match_with_their_transform(store_dir: Path, strict, tmp_path: Path) -> None:
    listed = originals_list(tmp_path / "list.csv", [n for n, _ in COPIES])
    with Store(store_dir) as st:
        out = import_hash_list(st, listed.read_text(), "removed", strict, who="alice")
        assert out.matched_images == len(COPIES)
        ku = st.known_unsafe(strict)
        copies = {image_of(st, n, t): (n, t) for n, t in COPIES}
        assert set(ku) == set(copies) and all(v == ["hash_list"] for v in ku.values())
        rows = dict(st.db.execute("SELECT image_id, transform FROM hash_matches WHERE distance <= 31").fetchall())
        assert rows == {i: INVERSE.get(t, t) for i, (_, t) in copies.items()}
        for i, (n, _) in copies.items():  # plain PDQ alone would not have caught any of them
            assert hamming(st.image(i).pdq.hash or "", compute_pdq(real_photo(n))[0]) > 31
        detail = show_hash_list(st, "removed", strict)
    assert detail.entries == len(COPIES) and detail.imported_by == "alice" and detail.matched_images == len(COPIES)
    assert detail.matched_by_transform == {"rot270": 1, "flipV": 1, "flipH": 1, "transpose": 1}
    assert [(e.action, e.who, e.changed) for e in detail.events] == [("import", "alice", len(COPIES))]

    s = Searcher.open(store_dir, strict)
    try:
        # a stored copy's answer: the entry, its note, the distance and the transform that matched
        chelsea = next(i for i, (n, _) in copies.items() if n == "chelsea")
        m = s.neighbours(chelsea).to_json()["pdq"]["matches"]
        assert [(x["source"], x["list"], x["transform"], x["note"]) for x in m] == [
            ("hash_list", "removed", "flipH", "removed chelsea")
        ]
        assert m[0]["distance"] <= 31 and m[0]["hash"] == compute_pdq(real_photo("chelsea"))[0] and m[0]["entry"] >= 1
        # an upload: its own dihedral hashes are matched (a copy rotated the other way round, never indexed)
        up = prepare_image(
            "u.png",
            png(transformed(real_photo("astronaut"), "rot270")),
            transform=lambda im: [[0.0]],
            max_bytes=10**8,
            max_pixels=10**8,
        )
        got = s.pdq_matches(up.pdq, dihedral=up.pdq_dihedral)
        assert [(x.list, x.transform) for x in got] == [("removed", "rot90")]
        assert s.pdq_matches(up.pdq) == []  # its plain hash alone matches nothing
        # a human-labelled image is matched through the upload's dihedral hashes too
        with Store(store_dir) as st:
            label_images(st, [str(image_of(st, "motorcycle_left"))], "unsafe", strict, reason="r")
        s.refresh()
        moto = prepare_image(
            "m.png",
            png(transformed(real_photo("motorcycle_left"), "flipH")),
            transform=lambda im: [[0.0]],
            max_bytes=10**8,
            max_pixels=10**8,
        )
        human = [x for x in s.pdq_matches(moto.pdq, dihedral=moto.pdq_dihedral) if x.source == "human"]
        assert [(x.transform, x.distance <= 31) for x in human] == [("flipH", True)]
    finally:
        s.close()

    # overriding a dihedral match works as for a plain one
    with Store(store_dir) as st:
        label_images(st, [str(chelsea)], "safe", strict, reason="a cat, not removed content", override_hash_lists=True)
        assert st.known_unsafe(strict, [chelsea])[chelsea] == []


def test_images_indexed_before_dihedral_hashes_match_on_their_own_hash(
    store_dir: Path, strict, tmp_path: Path, extractor
) -> None:
    with sqlite3.connect(store_dir / "meta.sqlite") as conn:  # as a store indexed before schema 8
        conn.execute("DELETE FROM pdq_dihedral")
    names = [n for n, _ in COPIES] + ["motorcycle_left"]
    listed = originals_list(tmp_path / "list.csv", names)
    with Store(store_dir) as st:
        out = import_hash_list(st, listed.read_text(), "removed", strict)
        assert out.matched_images == 1  # only the untouched photo: its copies have no dihedral hashes to match
        assert show_hash_list(st, "removed", strict).images_without_dihedral == 6
    # re-indexing with --rebuild computes them: the copies match now
    with Store(store_dir, readonly=True) as st:
        corpus = Path(next(iter(st.all_path_states()))).parent
    index_dir(store_dir, [str(corpus)], strict, extractor=extractor, rebuild=True)
    with Store(store_dir, readonly=True) as st:
        assert st.count_without_dihedral() == 0
        assert len(st.known_unsafe(strict)) == len(names)


def test_migration_records_who_imported_older_lists(tmp_path: Path) -> None:
    db = tmp_path / "store" / "meta.sqlite"
    db.parent.mkdir()
    with sqlite3.connect(db) as conn:  # a store at schema 7 with a list imported over HTTP and one by the CLI
        for number in range(1, 8):
            for statement in statements(MIGRATIONS[number - 1]):
                conn.execute(statement)
            if number in FOLLOW_UPS:
                FOLLOW_UPS[number](conn)
        conn.execute("PRAGMA user_version = 7")
        conn.execute(
            "INSERT INTO hash_lists (name, source, imported_at, count, bad_lines) VALUES "
            "('web', 'http-upload by api-key:abc123', '2026-01-01T00:00:00.000+00:00', 0, 0), "
            "('file', '/lists/x.txt', '2026-01-02T00:00:00.000+00:00', 0, 0)"
        )
    with Store(db.parent) as st:
        lists = {s.name: s for s in st.hash_list_summaries(31)}
        assert lists["web"].imported_by == "api-key:abc123" and lists["file"].imported_by is None
        assert [(e.action, e.who, e.at) for e in st.hash_list_events("file")] == [
            ("import", "unknown", "2026-01-02T00:00:00.000+00:00")
        ]
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            st.db.execute("DELETE FROM hash_list_events")


# -- banks: CLI --------------------------------------------------------------------------------------------------------
def test_cli_list_show_export_round_trip_and_delete(store_dir: Path, tmp_path: Path) -> None:
    listed = originals_list(tmp_path / "list.csv", ["chelsea", "astronaut"])
    store = ["--store", str(store_dir)]
    r = invoke("import-hashes", str(listed), "--name", "removed", "--who", "alice", "--json", *store)
    assert r.exit_code == 0 and json.loads(r.output)["hashes"] == 2
    r = invoke("hash-lists", "list", "--json", *store)
    (row,) = [json.loads(line) for line in r.output.splitlines()]
    assert (row["name"], row["entries"], row["imported_by"], row["matched_images"]) == ("removed", 2, "alice", 2)
    assert row["source"] == str(listed.resolve()) and row["matched_by_transform"] == {"rot270": 1, "flipH": 1}
    assert "removed: 2 entries" in invoke("hash-lists", "list", *store).output

    # export: hex lines (and CSV with notes) that import reads back to the same list
    out = tmp_path / "out.txt"
    assert invoke("hash-lists", "export", "removed", "--out", str(out), *store).exit_code == 0
    hashes = [compute_pdq(real_photo(n))[0] for n in ("chelsea", "astronaut")]
    assert out.read_text() == "".join(f"{h}\n" for h in hashes)
    assert invoke("import-hashes", str(out), "--name", "again", *store).exit_code == 0
    assert invoke("hash-lists", "export", "again", *store).output == out.read_text()
    csv_text = invoke("hash-lists", "export", "removed", "--csv", *store).output
    assert csv_text.splitlines() == ["hash,note", f"{hashes[0]},removed chelsea", f"{hashes[1]},removed astronaut"]
    (tmp_path / "out.csv").write_text(csv_text)
    invoke("import-hashes", str(tmp_path / "out.csv"), "--name", "csv", *store)
    assert invoke("hash-lists", "export", "csv", "--csv", *store).output == csv_text

    # delete needs --yes off a terminal; a refused or unknown delete changes nothing
    r = invoke("hash-lists", "delete", "removed", *store)
    assert r.exit_code == 2 and "--yes" in r.output
    r = invoke("hash-lists", "delete", "nope", "--yes", *store)
    assert r.exit_code == 2 and "no hash list named 'nope'" in r.output
    assert invoke("hash-lists", "show", "removed", "--json", *store).exit_code == 0
    r = invoke("hash-lists", "delete", "removed", "--yes", "--who", "bob", "--reason", "superseded", "--json", *store)
    gone = json.loads(r.output)
    assert (gone["entries_removed"], gone["event"]["who"], gone["event"]["reason"]) == (2, "bob", "superseded")
    assert gone["images_unmatched"] == 0  # the same hashes are still listed in `again` and `csv`
    r = invoke("hash-lists", "show", "removed", *store)
    assert r.exit_code == 2 and "was deleted by bob at" in r.output and "(superseded)" in r.output
    names = [json.loads(line)["name"] for line in invoke("hash-lists", "list", "--json", *store).output.splitlines()]
    assert names == ["again", "csv"]
    with Store(store_dir, readonly=True) as st:
        assert [(e.action, e.who) for e in st.hash_list_events("removed")] == [("import", "alice"), ("delete", "bob")]
    # a bad name is refused before anything is written
    r = invoke("import-hashes", str(out), "--name", "a/b", *store)
    assert r.exit_code == 2 and "without `/`" in r.output


def test_delete_ends_known_unsafe_through_the_list_only(store_dir: Path, strict, tmp_path: Path) -> None:
    listed = originals_list(tmp_path / "list.csv", ["chelsea", "astronaut", "hubble_deep_field"])
    other = tmp_path / "other.txt"
    other.write_text(compute_pdq(real_photo("coffee"))[0] + "\n")
    with Store(store_dir) as st:
        import_hash_list(st, listed.read_text(), "removed", strict)
        import_hash_list(st, other.read_text(), "other", strict)
        cat, astro, hubble = (
            image_of(st, "chelsea", "flipH"),
            image_of(st, "astronaut", "rot90"),
            image_of(st, "hubble_deep_field"),
        )
        coffee = image_of(st, "coffee", "flipV")
        label_images(st, [str(astro)], "unsafe", strict, reason="seen")
        labels_before = st.db.execute("SELECT * FROM labels ORDER BY id").fetchall()
    s = Searcher.open(store_dir, strict)
    assert {n.id for n in s.neighbours(coffee).nearest_unsafe} == {cat, astro, hubble}
    with Store(store_dir) as st:
        out = delete_hash_list(st, "removed", strict, who="carol", reason="wrong list")
        assert (out.entries_removed, out.images_unmatched) == (3, 3)
        assert out.no_longer_known_unsafe == sorted([cat, hubble])  # astro stays: a human labelled it
        assert out.unsafe_index_updated
        assert st.known_unsafe(strict) == {astro: ["human"], coffee: ["hash_list"]}
        assert st.db.execute("SELECT * FROM labels ORDER BY id").fetchall() == labels_before
        assert st.verify_label_chain() == []
        assert st.db.execute("SELECT COUNT(*) FROM list_hashes").fetchone()[0] == 1
    assert s.refresh()
    assert {n.id for n in s.neighbours(coffee).nearest_unsafe} == {astro}
    assert s.pdq_matches(compute_pdq(real_photo("chelsea"))[0]) == []
    s.close()


def test_deleting_a_list_no_image_matches_changes_query_answers(store_dir: Path, strict, tmp_path: Path) -> None:
    unseen = compute_pdq(real_photo("retina"))[0]  # no stored image matches it
    with Store(store_dir) as st:
        assert import_hash_list(st, unseen, "unseen", strict).matched_images == 0
    s = Searcher.open(store_dir, strict)
    assert [m.list for m in s.pdq_matches(unseen)] == ["unseen"]
    with Store(store_dir) as st:
        delete_hash_list(st, "unseen", strict)
    assert s.refresh() and s.pdq_matches(unseen) == []
    s.close()


# -- banks: HTTP -------------------------------------------------------------------------------------------------------
@pytest.fixture
def client(store_dir: Path, settings_for, extractor) -> Iterator[httpx.Client]:
    settings = settings_for(
        store=store_dir, nsfw_threshold=1.0, api_keys=f"{KEYS['write']}:read+write,{KEYS['read']}:read"
    )
    app = create_app(settings, extractor=extractor)
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def auth(role: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[role]}"}


def test_http_banks_need_write_and_round_trip(client: httpx.Client, tmp_path: Path) -> None:
    listed = originals_list(tmp_path / "list.csv", ["chelsea", "coffee"])
    files = {"file": ("list.csv", listed.read_bytes())}
    r = client.post("/v1/hash-lists", headers=auth("write"), files=files, data={"name": "removed"})
    assert r.status_code == 200, r.text
    for method, path in [
        ("GET", "/v1/hash-lists"),
        ("GET", "/v1/hash-lists/removed"),
        ("GET", "/v1/hash-lists/removed/export"),
        ("DELETE", "/v1/hash-lists/removed"),
    ]:
        assert client.request(method, path).status_code == 401
        assert client.request(method, path, headers=auth("read")).status_code == 403

    (row,) = client.get("/v1/hash-lists", headers=auth("write")).json()["lists"]
    assert (row["name"], row["entries"], row["imported_by"], row["source"]) == (
        "removed",
        2,
        key_name(KEYS["write"]),
        "http-upload",
    )
    detail = client.get("/v1/hash-lists/removed", headers=auth("write")).json()
    assert detail["matched_by_transform"] == {"flipV": 1, "flipH": 1} and detail["max_distance"] == 31
    assert client.get("/v1/hash-lists/nope", headers=auth("write")).status_code == 404

    r = client.get("/v1/hash-lists/removed/export", headers=auth("write"))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert r.text.splitlines() == [compute_pdq(real_photo(n))[0] for n in ("chelsea", "coffee")]
    again = client.post(
        "/v1/hash-lists", headers=auth("write"), files={"file": ("e.txt", r.content)}, data={"name": "again"}
    )
    assert again.json()["hashes"] == 2
    assert client.get("/v1/hash-lists/again/export", headers=auth("write")).text == r.text
    csv_text = client.get("/v1/hash-lists/removed/export", params={"format": "csv"}, headers=auth("write")).text
    assert csv_text.splitlines()[1].endswith(",removed chelsea")

    # a query of a mirrored copy names the list, entry, note and transform
    q = client.post("/v1/query", files={"file": ("q.png", png(transformed(real_photo("chelsea"), "flipH")))})
    (m,) = [x for x in q.json()["results"][0]["pdq"]["matches"] if x["list"] == "removed"]
    assert (m["transform"], m["note"], m["distance"] <= 31) == ("flipH", "removed chelsea", True)

    r = client.delete("/v1/hash-lists/removed", params={"reason": "done"}, headers=auth("write"))
    assert r.status_code == 200, r.text
    assert r.json()["event"]["who"] == key_name(KEYS["write"]) and r.json()["event"]["reason"] == "done"
    assert client.delete("/v1/hash-lists/removed", headers=auth("write")).status_code == 404
    assert [x["name"] for x in client.get("/v1/hash-lists", headers=auth("write")).json()["lists"]] == ["again"]
