"""The label policy and the label log: a human `safe` overrides the model only, overriding a hash-list match is an
explicit event; clashing flags are usage errors; the log cannot be rewritten through SQLite and its hash chain
finds what was changed behind nsfw-index's back."""

from __future__ import annotations

import json
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import index_dir, photo, run_cli

from api.app import create_app
from api.auth import key_name
from api.server import BackgroundServer
from search.images import image_detail
from search.query import Searcher
from search.settings import Settings
from search.store import Store
from search.store.chain import event_hash
from search.store.schema import MIGRATIONS, statements

KEYS = {"label": "k-label", "read": "k-read", "write": "k-write"}
API_KEYS = f"{KEYS['label']}:read+label,{KEYS['read']}:read+read_paths,{KEYS['write']}:read+write"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, settings_for) -> Path:
    """A store of 4 images, indexed once; tests copy it."""
    root = tmp_path_factory.mktemp("labels")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(4):
        photo(900 + i, (96, 80)).save(corpus / f"img{i}.png")
    index_dir(root / "store", [str(corpus)], settings_for())
    return root / "store"


@pytest.fixture
def store_dir(built: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "store"
    shutil.copytree(built, dst)
    return dst


def cli(*args: str, store: Path, check: bool = True) -> Any:
    return run_cli(*args, "--store", str(store), check=check)


def own_hash_list(store: Path, image_id: int, name: str = "removed") -> None:
    """Import a hash list holding the image's own PDQ hash (a match at distance 0)."""
    with Store(store, readonly=True) as st:
        pdq = st.image(image_id).pdq.hash
    assert pdq
    listed = store.parent / f"{name}.txt"
    listed.write_text(pdq + "\n")
    cli("import-hashes", str(listed), "--name", name, store=store)


def log_rows(store: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(store / "meta.sqlite") as conn:
        return conn.execute("SELECT * FROM labels ORDER BY id").fetchall()


def test_safe_keeps_a_hash_list_match_and_only_an_explicit_override_cancels_it(store_dir: Path, settings_for) -> None:
    everything = settings_for(nsfw_threshold=0.0)  # the model flags every image: `safe` must cancel that source
    own_hash_list(store_dir, 1)
    with Store(store_dir, readonly=True) as st:
        assert st.known_unsafe(everything, [1])[1] == ["hash_list", "model"]

    cli("label", "--safe", "1", "--reason", "looked at it", store=store_dir)
    with Store(store_dir, readonly=True) as st:
        assert st.known_unsafe(everything, [1])[1] == ["hash_list"]  # safe overrode the model only
        assert 1 in st.known_unsafe(everything)
        assert image_detail(st, 1, everything).hash_list_override is None

    # the override is explicit, with a reason; the match stays listed and the answers show both
    p = cli(
        "label", "--safe", "--override-hash-lists", "1", "--reason", "list false positive", "--json", store=store_dir
    )
    event = json.loads(p.stdout)
    assert event["override_hash_lists"] is True and event["label"] == "safe"
    with Store(store_dir, readonly=True) as st:
        assert st.known_unsafe(everything, [1])[1] == []
        assert 1 not in st.known_unsafe(everything)
        detail = image_detail(st, 1, everything).to_json()
    assert detail["known_unsafe_sources"] == []
    assert detail["hash_list_override"] == {
        "event": event["event"],
        "who": event["who"],
        "at": event["at"],
        "reason": "list false positive",
        "in_force": True,
    }
    assert [e["override_hash_lists"] for e in detail["labels"]] == [False, True]
    s = Searcher.open(store_dir, everything)
    ans = s.neighbours(1).to_json()
    s.close()
    assert ans["known_unsafe_sources"] == []
    assert [(m["source"], m["list"], m["distance"]) for m in ans["pdq"]["matches"]] == [("hash_list", "removed", 0)]
    assert ans["hash_list_override"]["event"] == event["event"]

    # importing the list again is new information: the match counts again until overridden anew
    own_hash_list(store_dir, 1)
    with Store(store_dir, readonly=True) as st:
        assert st.known_unsafe(everything, [1])[1] == ["hash_list"]
        assert image_detail(st, 1, everything).to_json()["hash_list_override"]["in_force"] is False
    cli("label", "--safe", "--override-hash-lists", "1", "--reason", "still a false positive", store=store_dir)
    with Store(store_dir, readonly=True) as st:
        assert st.known_unsafe(everything, [1])[1] == []

    # a later plain safe (or clear, or unsafe) ends the override: the latest event wins
    cli("label", "--safe", "1", store=store_dir)
    with Store(store_dir, readonly=True) as st:
        assert st.known_unsafe(everything, [1])[1] == ["hash_list"]
        assert image_detail(st, 1, everything).hash_list_override is None
    cli("label", "--unsafe", "1", store=store_dir)
    with Store(store_dir, readonly=True) as st:
        assert st.known_unsafe(everything, [1])[1] == ["human", "hash_list", "model"]
        assert st.verify_label_chain() == []


def test_an_override_needs_safe_a_reason_and_a_match_or_nothing_is_written(store_dir: Path) -> None:
    own_hash_list(store_dir, 1)
    before = log_rows(store_dir)
    # image 2 matches no list: all-or-nothing, image 1 is not labelled either
    p = cli("label", "--safe", "--override-hash-lists", "1", "2", "--reason", "x", store=store_dir, check=False)
    assert p.returncode == 2 and "matches no hash list" in p.stderr and "nothing was labelled" in p.stderr
    csv = store_dir.parent / "l.csv"
    csv.write_text("id,label,reason\n1,safe,\n")
    p = cli("label", "--safe", "--override-hash-lists", "--from-file", str(csv), store=store_dir, check=False)
    assert p.returncode == 2 and "needs a reason" in p.stderr
    assert log_rows(store_dir) == before


@pytest.mark.parametrize(
    "flags",
    [
        ["--unsafe", "--safe"],
        ["--clear", "--unsafe"],
        ["--safe", "--clear"],
        ["--override-hash-lists", "--reason", "r"],
        ["--unsafe", "--override-hash-lists", "--reason", "r"],
        ["--safe", "--override-hash-lists"],
    ],
)
def test_clashing_label_flags_are_usage_errors_and_write_nothing(built: Path, flags: list[str]) -> None:
    before = log_rows(built)
    p = cli("label", *flags, "1", store=built, check=False)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "Usage:" in p.stderr and "Error:" in p.stderr
    assert log_rows(built) == before


def test_label_help_says_safe_overrides_the_model_only() -> None:
    text = " ".join(run_cli("label", "--help", check=True).stdout.split())
    assert "overrides the model's verdict only" in text and "--override-hash-lists" in text
    assert "overrides the model and hash lists" not in text


# -- HTTP ---------------------------------------------------------------------------------------------------------
@pytest.fixture
def server(store_dir: Path, checkpoint: Path, extractor) -> Iterator[tuple[httpx.Client, Path]]:
    own_hash_list(store_dir, 1)
    settings = Settings(
        model=str(checkpoint), workers=0, device="cpu", store=store_dir, api_keys=API_KEYS, nsfw_threshold=1.0
    )
    app = create_app(settings, extractor=extractor)
    with BackgroundServer(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        yield client, store_dir


def test_an_override_over_http_needs_the_label_right_and_shows_match_and_override(server) -> None:
    client, store = server
    body = {"label": "safe", "override_hash_lists": True, "reason": "false positive, ticket 7"}
    before = log_rows(store)
    assert client.put("/v1/images/1/label", json=body).status_code == 401
    for role in ("read", "write"):
        r = client.put("/v1/images/1/label", json=body, headers={"Authorization": f"Bearer {KEYS[role]}"})
        assert r.status_code == 403, r.text
    label_key = {"Authorization": f"Bearer {KEYS['label']}"}
    for bad in ({**body, "label": "unsafe"}, {**body, "reason": None}, {**body, "reason": " "}):
        assert client.put("/v1/images/1/label", json=bad, headers=label_key).status_code == 422
    r = client.put("/v1/images/2/label", json=body, headers=label_key)  # no match to override
    assert r.status_code == 422 and "matches no hash list" in r.json()["error"]["message"]
    assert log_rows(store) == before

    # a plain safe leaves the match counting
    r = client.put("/v1/images/1/label", json={"label": "safe"}, headers=label_key)
    assert r.status_code == 200 and r.json()["known_unsafe_sources"] == ["hash_list"]
    assert r.json()["override_hash_lists"] is False

    r = client.put("/v1/images/1/label", json=body, headers=label_key)
    assert r.status_code == 200, r.text
    event = r.json()
    assert event["override_hash_lists"] is True and event["known_unsafe_sources"] == []
    assert event["who"] == key_name(KEYS["label"])
    image = client.get("/v1/images/1", headers=label_key).json()
    assert image["known_unsafe_sources"] == [] and image["label"] == "safe"
    assert image["hash_list_override"] == {
        "event": event["event"],
        "who": event["who"],
        "at": event["at"],
        "reason": "false positive, ticket 7",
        "in_force": True,
    }
    near = client.get("/v1/images/1/neighbours", headers=label_key).json()
    assert [m["source"] for m in near["pdq"]["matches"]] == ["hash_list"] and near["pdq"]["matches"][0]["distance"] == 0
    assert near["hash_list_override"]["event"] == event["event"]
    assert client.get("/v1/images/2", headers=label_key).json()["hash_list_override"] is None


# -- the log cannot be rewritten -------------------------------------------------------------------------------
def three_events(store: Path) -> None:
    cli("label", "--unsafe", "1", "--reason", "first", store=store)
    cli("label", "--safe", "2", store=store)
    cli("label", "--clear", "1", store=store)


def test_the_label_log_cannot_be_rewritten_through_sqlite(store_dir: Path) -> None:
    three_events(store_dir)
    before = log_rows(store_dir)
    fields = "id, sha256, label, who, at, prev_hash, hash"
    forged = "1, 'x', 'safe', 'mallory', 't', 'p', 'h'"
    attempts = [
        f"INSERT OR REPLACE INTO labels ({fields}) VALUES ({forged})",
        f"REPLACE INTO labels ({fields}) VALUES ({forged})",
        f"INSERT INTO labels ({fields}) VALUES ({forged}) ON CONFLICT(id) DO UPDATE SET label = 'safe'",
        "UPDATE labels SET label = 'safe' WHERE id = 1",
        "UPDATE labels SET hash = NULL, prev_hash = NULL WHERE id = 1",
        "UPDATE OR REPLACE labels SET id = 9 WHERE id = 1",
        "DELETE FROM labels WHERE id = 3",
        "INSERT INTO labels (sha256, label, who, at) VALUES ('x', 'safe', 'mallory', 't')",
    ]
    conn = sqlite3.connect(store_dir / "meta.sqlite")  # a plain connection: recursive triggers off
    for sql in attempts:
        with pytest.raises(sqlite3.DatabaseError, match=r"append-only|chain hash"):
            conn.execute(sql)
    conn.commit()
    conn.close()
    assert log_rows(store_dir) == before

    # without the insert guard, REPLACE's implicit delete still fires the delete guard on nsfw-index's connections
    with sqlite3.connect(store_dir / "meta.sqlite") as raw:
        raw.execute("DROP TRIGGER labels_no_replace")
    with Store(store_dir) as st:
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            st.db.execute(f"INSERT OR REPLACE INTO labels ({fields}) VALUES ({forged})")
        assert any("labels_no_replace is missing" in p for p in st.verify_label_chain())
    assert log_rows(store_dir) == before


def tampered(store: Path, *sql: str, params: list[Any] | None = None) -> list[str]:
    """Run `sql` on the file with the guard triggers dropped (what someone with the file could do), then verify."""
    with sqlite3.connect(store / "meta.sqlite") as conn:
        for t in ("labels_no_update", "labels_no_delete", "labels_no_replace", "labels_sealed"):
            conn.execute(f"DROP TRIGGER IF EXISTS {t}")
        for s in sql:
            conn.execute(s, params or [])
    with Store(store, readonly=True) as st:
        return [p for p in st.verify_label_chain() if "guard trigger" not in p]


def test_verify_label_chain_finds_an_edited_field(store_dir: Path) -> None:
    three_events(store_dir)
    with Store(store_dir, readonly=True) as st:
        assert st.verify_label_chain() == []
    problems = tampered(store_dir, "UPDATE labels SET label = 'unsafe' WHERE id = 2")
    assert len(problems) == 1 and problems[0].startswith("event 2: hash mismatch") and "edited" in problems[0]


def test_verify_label_chain_finds_a_deleted_event(store_dir: Path) -> None:
    three_events(store_dir)
    problems = tampered(store_dir, "DELETE FROM labels WHERE id = 2")
    assert problems[0].startswith("event 2 missing")
    assert problems[1].startswith("event 3: broken link")
    assert len(problems) == 2


def test_verify_label_chain_finds_a_cut_tail(store_dir: Path) -> None:
    three_events(store_dir)
    problems = tampered(store_dir, "DELETE FROM labels WHERE id = 3")
    assert problems == [problems[0]] and problems[0].startswith("event 3 missing") and "tail was cut" in problems[0]


def test_verify_label_chain_finds_forged_inserts(store_dir: Path) -> None:
    three_events(store_dir)
    with Store(store_dir, readonly=True) as st:
        sha, (last, prev) = st.image(1).sha256, st.label_chain_head()
    problems = tampered(
        store_dir,
        "INSERT INTO labels (id, sha256, label, who, at, reason, override_hash_lists, prev_hash, hash) "
        "VALUES (?, ?, 'safe', 'mallory', '2030-01-01', NULL, 0, ?, 'f00d')",
        params=[last + 1, sha, prev],
    )
    assert any(p.startswith(f"event {last + 1}: hash mismatch") for p in problems)
    assert any(p.startswith(f"event {last + 1} added outside nsfw-index") for p in problems)
    # a forger who recomputes the chain is still caught by the store's record of its last event
    with sqlite3.connect(store_dir / "meta.sqlite") as conn:
        conn.execute("DELETE FROM labels WHERE id = ?", [last + 1])
    digest = event_hash(last + 1, sha, "safe", "mallory", "2030-01-01", None, 0, prev)
    problems = tampered(
        store_dir,
        "INSERT INTO labels (id, sha256, label, who, at, reason, override_hash_lists, prev_hash, hash) "
        "VALUES (?, ?, 'safe', 'mallory', '2030-01-01', NULL, 0, ?, ?)",
        params=[last + 1, sha, prev, digest],
    )
    assert problems == [f"event {last + 1} added outside nsfw-index: it last wrote event {last}"]


def test_an_older_store_is_sealed_by_the_migration(tmp_path: Path) -> None:
    db = tmp_path / "meta.sqlite"
    conn = sqlite3.connect(db)
    for number in (1, 2):
        for s in statements(MIGRATIONS[number - 1]):
            conn.execute(s)
    conn.execute("PRAGMA user_version = 2")
    for i, label in enumerate(("unsafe", "safe", "clear")):
        conn.execute("INSERT INTO labels (sha256, label, who, at) VALUES (?, ?, 'old', ?)", [f"s{i}", label, f"t{i}"])
    conn.commit()
    conn.close()
    with Store(tmp_path, readonly=True) as st:  # a reader migrates through a short-lived writer
        assert st.verify_label_chain() == []
        assert st.label_chain_head()[0] == 3
    with sqlite3.connect(db) as raw:
        assert raw.execute("SELECT COUNT(*) FROM labels WHERE hash IS NULL").fetchone()[0] == 0
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            raw.execute("UPDATE labels SET who = 'new' WHERE id = 1")
    problems = tampered(tmp_path, "UPDATE labels SET who = 'new' WHERE id = 1")
    assert len(problems) == 1 and problems[0].startswith("event 1: hash mismatch")
