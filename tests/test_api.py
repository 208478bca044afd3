"""The HTTP service: a real uvicorn server on 127.0.0.1 with the small checkpoint and stores built in tmp_path."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from conftest import photo
from PIL import Image

from api.app import create_app
from api.auth import ALL_RIGHTS, KeyRing, key_name, parse_api_keys
from api.server import BackgroundServer
from indexer.analyze import analyze, query_answer
from indexer.extractor import Extractor
from indexer.service import index_inputs
from search.errors import InvalidArgument
from search.query import Searcher
from search.settings import Settings
from search.store import Store

KEYS = {
    "all": "k-all-rights",
    "write": "k-write-only",
    "label": "k-label-only",
    "read": "k-read-only",
    "paths": "k-read-paths",
}
API_KEYS = (
    f"{KEYS['all']}:read+write+label+read_paths,{KEYS['write']}:write,{KEYS['label']}:label,"
    f"{KEYS['read']}:read,{KEYS['paths']}:read+read_paths"
)
CORPUS_SEEDS = range(8)


def auth(role: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[role]}"}


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def repng(img: Image.Image) -> bytes:
    """The same pixels as `png(img)` in other bytes: other content (an indexed image is left out of its own answer),
    the same embedding and PDQ hash."""
    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=1)
    assert buf.getvalue() != png(img)
    return buf.getvalue()


def jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def settings_for(checkpoint: Path, store: Path | None = None, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "model": str(checkpoint),
        "workers": 0,
        "device": "cpu",
        "store": store,
        "api_keys": API_KEYS,
        "reload_seconds": 0.2,
    }
    return Settings(**{**base, **overrides})


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and {"code", "message"} <= set(body["error"]), body
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


@contextmanager
def live(settings: Settings, extractor: Extractor) -> Iterator[tuple[httpx.Client, Any]]:
    """A uvicorn server on a free port of 127.0.0.1 in a thread; yields an httpx client and the app."""
    app = create_app(settings, extractor=extractor)
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        yield client, app


def index_into(store_dir: Path, inputs: list[str], settings: Settings, extractor: Extractor) -> None:
    with Store.writing(store_dir, "nsfw-index index", create=True) as store:
        index_inputs(store, inputs, settings, extractor=extractor)


def build_store(store: Path, corpus: Path, settings: Settings, extractor: Extractor) -> Path:
    index_into(store, [str(corpus)], settings, extractor)
    return store


@pytest.fixture(scope="module")
def extractor(checkpoint: Path) -> Extractor:
    return Extractor.from_settings(settings_for(checkpoint))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    for i in CORPUS_SEEDS:
        photo(i).save(d / f"img{i}.png")
    return d


@pytest.fixture(scope="module")
def shared(
    tmp_path_factory: pytest.TempPathFactory, checkpoint: Path, corpus: Path, extractor: Extractor
) -> Iterator[tuple[httpx.Client, Any, Settings]]:
    """One server over an indexed store, for the tests that only read."""
    settings = settings_for(checkpoint, tmp_path_factory.mktemp("shared") / "store")
    build_store(settings.store, corpus, settings, extractor)  # type: ignore[arg-type]
    with live(settings, extractor) as (client, app):
        yield client, app, settings


@pytest.fixture
def own(
    tmp_path: Path, checkpoint: Path, corpus: Path, extractor: Extractor
) -> Iterator[tuple[httpx.Client, Any, Settings]]:
    """A server over a store of its own, for the tests that write."""
    settings = settings_for(checkpoint, tmp_path / "store")
    build_store(tmp_path / "store", corpus, settings, extractor)
    with live(settings, extractor) as (client, app):
        yield client, app, settings


def image_id_of(settings: Settings, seed: int) -> int:
    """The store id of corpus image `seed` (saved as PNG: the same bytes as `png(photo(seed))`)."""
    sha = hashlib.sha256(png(photo(seed))).hexdigest()
    with Store(settings.store, readonly=True) as store:  # type: ignore[arg-type]
        return store.ids_by_sha([sha])[sha]


def without_paths(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "paths"} for r in rows]


# -- answers ---------------------------------------------------------------------------------------------------------
def test_query_single_image_equals_analyze_and_query_answer(shared, extractor):
    client, _, settings = shared
    data = png(photo(3))
    r = client.post("/v1/query", files={"file": ("three.png", data, "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == {
        "architecture": extractor.identity.architecture,
        "weights_sha256": extractor.identity.weights_sha256,
        "backend": extractor.describe()["backend"],  # the server's forward pass: the same engine as `extractor`
        "dtype": extractor.describe()["dtype"],
    }
    assert set(body["timings"]) == {"queue_ms", "inference_ms", "batch_images", "search_ms", "total_ms"}
    assert body["index"]["ready"] and body["index"]["images"] == len(CORPUS_SEEDS)
    [got] = body["results"]

    [a] = analyze(extractor, [("three.png", data)], settings)
    searcher = Searcher.open(settings.store, settings)  # type: ignore[arg-type]
    try:
        want = query_answer(a, searcher).to_json()  # type: ignore[arg-type]
    finally:
        searcher.close()
    assert got["filename"] == "three.png"
    assert got["sha256"] == want["sha256"] and got["indexed_id"] == want["indexed_id"] == image_id_of(settings, 3)
    assert got["nsfw"]["level"] == want["nsfw"]["level"] and got["nsfw"]["is_nsfw"] == want["nsfw"]["is_nsfw"]
    for part in ("probabilities", "scores"):
        assert got["nsfw"][part] == pytest.approx(want["nsfw"][part], abs=1e-5)
    assert [n["id"] for n in got["nearest_unsafe"]] == [n["id"] for n in want["nearest_unsafe"]]
    for g, w in zip(got["nearest_unsafe"], without_paths(want["nearest_unsafe"]), strict=True):
        assert g == {**w, "similarity": pytest.approx(w["similarity"], abs=1e-5)}
    assert [d["id"] for d in got["near_duplicates"]] == [d["id"] for d in want["near_duplicates"]]
    assert got["pdq"] == want["pdq"]


def test_query_several_images_equals_the_cli_json(shared, checkpoint, tmp_path):
    from indexer.cli import cli

    client, _, settings = shared
    files = {"a.png": png(photo(1)), "b.jpg": jpeg(photo(60)), "c.png": png(photo(61, (120, 70)))}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    r = client.post(
        "/v1/query",
        params={"k": 3, "source": ["model", "human"]},
        files=[("files", (name, data)) for name, data in files.items()],
    )
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["filename"] for x in results] == list(files)
    assert r.json()["timings"]["batch_images"] >= 3  # one forward pass for the request

    out = CliRunner().invoke(
        cli,
        [
            "query",
            *(str(tmp_path / n) for n in files),
            "--store",
            str(settings.store),
            "--model",
            str(checkpoint),
            "--device",
            "cpu",
            "-k",
            "3",
            "--source",
            "model",
            "--source",
            "human",
            "--json",
        ],
    )
    assert out.exit_code == 0, out.output
    cli_rows = [json.loads(line) for line in out.output.splitlines() if line.startswith("{")]
    assert len(cli_rows) == 3
    for got, want in zip(results, cli_rows, strict=True):
        assert set(want) - {"path"} <= set(got)  # every field the CLI prints, `filename` for `path`
        assert got["sha256"] == want["sha256"] and got["pdq"] == want["pdq"]
        assert got["nsfw"]["level"] == want["nsfw"]["level"]
        assert got["nsfw"]["scores"] == pytest.approx(want["nsfw"]["scores"], abs=1e-5)
        assert [n["id"] for n in got["nearest_unsafe"]] == [n["id"] for n in want["nearest_unsafe"]]
        assert len(got["nearest_unsafe"]) <= 3
        assert [n["sources"] for n in got["nearest_unsafe"]] == [n["sources"] for n in want["nearest_unsafe"]]
        assert [d["id"] for d in got["near_duplicates"]] == [d["id"] for d in want["near_duplicates"]]


def test_neighbours_answer_without_running_the_model(shared):
    client, app, settings = shared
    worker = app.state.service.worker
    before = worker.batches
    image_id = image_id_of(settings, 2)
    r = client.get(f"/v1/images/{image_id}/neighbours", params={"k": 4})
    assert r.status_code == 200, r.text
    got = r.json()
    assert worker.batches == before  # no inference
    searcher = Searcher.open(settings.store, settings)  # type: ignore[arg-type]
    try:
        want = searcher.neighbours(image_id, k=4).to_json()
    finally:
        searcher.close()
    assert got["id"] == image_id and image_id not in [n["id"] for n in got["nearest_unsafe"]]
    assert [n["id"] for n in got["nearest_unsafe"]] == [n["id"] for n in want["nearest_unsafe"]]
    assert got["nsfw"]["scores"] == pytest.approx(want["nsfw"]["scores"])
    assert got["known_unsafe_sources"] == want["known_unsafe_sources"]
    assert got["exact_duplicates"] == {"count": 0}  # paths hidden
    assert set(got["timings"]) == {"search_ms", "total_ms"}
    assert_error(client.get("/v1/images/99999/neighbours"), 404, "not_found")


def test_image_record_and_stats(shared):
    client, _, settings = shared
    image_id = image_id_of(settings, 0)
    r = client.get(f"/v1/images/{image_id}")
    assert r.status_code == 200, r.text
    row = r.json()
    assert row["id"] == image_id and row["path_count"] == 1 and "paths" not in row
    assert row["labels"] == [] and row["label"] is None and row["format"] == "PNG"
    stats = client.get("/v1/stats").json()
    assert stats["images"] == len(CORPUS_SEEDS) and stats["model"]["weights_sha256"]
    assert str(settings.store) not in json.dumps(stats)


# -- auth ------------------------------------------------------------------------------------------------------------
def test_writes_need_a_key_with_the_right(shared):
    client, _, _ = shared
    upload = {"file": ("x.png", png(photo(70)))}
    r = client.post("/v1/images", files=upload)
    assert_error(r, 401, "unauthorized")
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert_error(client.post("/v1/images", files=upload, headers={"Authorization": "Bearer nope"}), 401)
    assert_error(client.post("/v1/images", files=upload, headers={"Authorization": "Basic a2V5Cg=="}), 401)
    assert_error(client.post("/v1/images", files=upload, headers=auth("label")), 403, "forbidden")
    assert_error(client.put("/v1/images/1/label", json={"label": "unsafe"}, headers=auth("write")), 403)
    assert_error(client.put("/v1/images/1/label", json={"label": "unsafe"}), 401)
    assert_error(
        client.post("/v1/hash-lists", files={"file": ("l.txt", b"")}, data={"name": "x"}, headers=auth("read")), 403
    )
    # reads are open by default, also to keys without the read right
    assert client.get("/v1/stats").status_code == 200
    assert client.get("/v1/stats", headers=auth("write")).status_code == 200
    assert_error(client.get("/v1/stats", headers={"Authorization": "Bearer wrong"}), 401)  # a bad key is never ok


def test_reads_closed_by_setting(tmp_path, checkpoint, corpus, extractor):
    settings = settings_for(checkpoint, tmp_path / "store", read_requires_key=True)
    build_store(tmp_path / "store", corpus, settings, extractor)
    with live(settings, extractor) as (client, _):
        assert_error(client.get("/v1/stats"), 401)
        assert_error(client.post("/v1/query", files={"file": ("a.png", png(photo(1)))}), 401)
        assert_error(client.get("/v1/images/1"), 401)
        assert_error(client.get("/v1/stats", headers=auth("write")), 403)
        assert client.get("/v1/stats", headers=auth("read")).status_code == 200
        assert (
            client.post("/v1/query", files={"file": ("a.png", png(photo(1)))}, headers=auth("read")).status_code == 200
        )
        assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200


def test_api_key_spec_is_parsed_with_clear_errors(checkpoint):
    assert parse_api_keys("a:read+label,b") == {
        "a": frozenset({"read", "label"}),
        "b": frozenset(ALL_RIGHTS),
    }
    assert parse_api_keys(" , a:read ,") == {"a": frozenset({"read"})}
    with pytest.raises(InvalidArgument, match=r"unknown API key right.*'fly'.*known"):
        parse_api_keys("a:fly")
    with pytest.raises(InvalidArgument, match="empty"):
        parse_api_keys(":read")
    with pytest.raises(InvalidArgument, match="unknown API key right"):
        create_app(settings_for(checkpoint, Path("schema-only"), api_keys="k:read+fly"))


def test_key_lookup_compares_every_key_in_constant_time(monkeypatch):
    import api.auth

    keys = {f"key-{i}-" + "x" * i: frozenset({"read"}) for i in range(5)}
    ring = KeyRing(keys)
    calls: list[tuple[int, int]] = []
    real = api.auth.hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(api.auth.hmac, "compare_digest", counting)
    for token in [*keys, "unknown", "", "key-0-"]:
        calls.clear()
        found = ring.lookup(token)
        assert (found is not None) == (token in keys)
        assert len(calls) == len(keys)  # no early exit, whichever key matches
        assert set(calls) == {(32, 32)}  # digests: the key's length does not show
    assert ring.lookup("key-3-xxx").name == key_name("key-3-xxx")  # type: ignore[union-attr]


# -- writes ----------------------------------------------------------------------------------------------------------
def test_label_over_http_is_in_the_next_query(own):
    client, _, settings = own
    image_id = image_id_of(settings, 5)
    data = repng(photo(5))  # the indexed content itself would be left out of its own answer

    def human_hits() -> list[dict[str, Any]]:
        r = client.post("/v1/query", params={"source": "human"}, files={"file": ("q.png", data)})
        assert r.status_code == 200, r.text
        return r.json()["results"][0]["nearest_unsafe"]

    assert human_hits() == []
    r = client.put(
        f"/v1/images/{image_id}/label",
        headers=auth("label"),
        json={"label": "unsafe", "reason": "reviewed", "who": "alice\n\x00"},
    )
    assert r.status_code == 200, r.text
    event = r.json()
    assert event["who"] == key_name(KEYS["label"]) + "/alice"  # the key's identity first; the name sanitised
    assert "human" in event["known_unsafe_sources"]
    hits = human_hits()
    assert hits[0]["id"] == image_id and "human" in hits[0]["sources"] and hits[0]["similarity"] > 0.999
    labels = client.get(f"/v1/images/{image_id}").json()
    assert labels["label"] == "unsafe" and labels["labels"][-1]["reason"] == "reviewed"

    assert client.put(f"/v1/images/{image_id}/label", headers=auth("all"), json={"label": "safe"}).status_code == 200
    assert human_hits() == []
    assert_error(client.put("/v1/images/9999/label", headers=auth("label"), json={"label": "unsafe"}), 404)
    assert_error(client.put(f"/v1/images/{image_id}/label", headers=auth("label"), json={"label": "maybe"}), 422)


def test_added_image_is_found_exact_and_near(own):
    client, _, _ = own
    img = photo(200)
    r = client.post("/v1/images", headers=auth("write"), files={"file": ("new.png", png(img))})
    assert r.status_code == 200, r.text
    added = r.json()
    assert added["created"] is True and added["result"]["indexed_id"] == added["id"]
    again = client.post("/v1/images", headers=auth("write"), files={"file": ("again.png", png(img))}).json()
    assert again["id"] == added["id"] and again["created"] is False

    exact = client.post("/v1/query", files={"file": ("same.png", png(img))}).json()["results"][0]
    assert exact["indexed_id"] == added["id"]
    near = client.post("/v1/query", files={"file": ("reencoded.jpg", jpeg(img, 85))}).json()["results"][0]
    assert near["indexed_id"] is None
    assert added["id"] in [d["id"] for d in near["near_duplicates"]]
    row = client.get(f"/v1/images/{added['id']}", headers=auth("paths")).json()
    assert row["paths"] == [f"upload://{exact['sha256']}"]  # nothing the client sent is stored as a path


def test_add_while_an_index_run_holds_the_store_is_503_with_retry_after(own, monkeypatch):
    import api.routers.images

    client, _, settings = own
    monkeypatch.setattr(api.routers.images, "WRITE_LOCK_TIMEOUT", 0.2)
    with Store(settings.store) as store, store.writer_lock("nsfw-index index (test)"):  # type: ignore[arg-type]
        r = client.post("/v1/images", headers=auth("write"), files={"file": ("n.png", png(photo(500)))})
        assert_error(r, 503, "store_locked")
        assert int(r.headers["retry-after"]) >= 1
        # labels need no writer lock: they still go through
        assert (
            client.put(
                f"/v1/images/{image_id_of(settings, 1)}/label", headers=auth("label"), json={"label": "unsafe"}
            ).status_code
            == 200
        )
    assert client.post("/v1/images", headers=auth("write"), files={"file": ("n.png", png(photo(500)))}).json()[
        "created"
    ]


def test_hash_list_upload_reports_bad_lines_and_matches(own):
    client, _, settings = own
    image_id = image_id_of(settings, 6)
    pdq_hash = client.get(f"/v1/images/{image_id}").json()["pdq"]["hash"]
    listing = f"# test list\n{pdq_hash}\nnot-a-hash\n".encode()
    r = client.post(
        "/v1/hash-lists", headers=auth("write"), files={"file": ("list.txt", listing)}, data={"name": "test-list"}
    )
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["imported"] == 1 and out["bad_line_count"] == 1 and out["bad_lines"][0]["line"] == 3
    assert out["matched_images"] >= 1
    got = client.post("/v1/query", params={"source": "hash_list"}, files={"file": ("q.png", repng(photo(6)))}).json()[
        "results"
    ][0]
    listed = [m for m in got["pdq"]["matches"] if m["source"] == "hash_list" and m["list"] == "test-list"]
    assert any(m["hash"] == pdq_hash and m["distance"] == 0 and m["transform"] == "original" for m in listed), listed
    assert got["nearest_unsafe"][0]["id"] == image_id and "hash_list" in got["nearest_unsafe"][0]["sources"]
    assert_error(client.post("/v1/hash-lists", headers=auth("write"), files={"file": ("l.txt", listing)}), 422)
    err = assert_error(
        client.post(
            "/v1/hash-lists",
            headers=auth("write"),
            files={"file": ("bin.txt", b"\xff\xfe\x00")},
            data={"name": "binary"},
        ),
        422,
    )
    assert "'bin.txt'" in err["message"] and "nsfw-index-hashes" not in err["message"]  # no server temp path


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_acknowledged_writes_survive_kill_9(tmp_path, checkpoint, corpus, extractor):
    settings = settings_for(checkpoint, tmp_path / "store")
    build_store(tmp_path / "store", corpus, settings, extractor)
    env = {**os.environ, "NSFW_INDEX_API_KEYS": API_KEYS, "NSFW_INDEX_RELOAD_SECONDS": "0.2"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "indexer.cli",
            "serve",
            "--store",
            str(tmp_path / "store"),
            "--model",
            str(checkpoint),
            "--device",
            "cpu",
            "--port",
            "0",
        ],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        url = None
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                break
            m = re.search(r"running on (http://127\.0\.0\.1:\d+)", line)
            url = m.group(1) if m else None
        assert url, "the server did not start"
        threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
        with httpx.Client(base_url=url, timeout=30) as client:
            assert client.get("/readyz").status_code == 200
            image_id = image_id_of(settings, 4)
            assert (
                client.put(f"/v1/images/{image_id}/label", headers=auth("label"), json={"label": "unsafe"}).status_code
                == 200
            )
            r = client.post("/v1/images", headers=auth("write"), files={"file": ("n.png", png(photo(300)))})
            assert r.status_code == 200
            added = r.json()["id"]
            os.kill(proc.pid, signal.SIGKILL)  # right after the acknowledgements
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    with live(settings, extractor) as (client, _):  # the restarted server
        assert client.get(f"/v1/images/{image_id}").json()["label"] == "unsafe"
        assert client.get(f"/v1/images/{added}").status_code == 200
        hit = client.post("/v1/query", params={"source": "human"}, files={"file": ("q.png", repng(photo(4)))}).json()[
            "results"
        ][0]
        assert hit["nearest_unsafe"][0]["id"] == image_id
        assert (
            client.post("/v1/query", files={"file": ("q.png", png(photo(300)))}).json()["results"][0]["indexed_id"]
            == added
        )


# -- limits and bad input --------------------------------------------------------------------------------------------
def test_body_cap_while_reading_chunked_and_declared(tmp_path, checkpoint, corpus, extractor):
    cap = 256 * 1024
    settings = settings_for(checkpoint, tmp_path / "store", max_body_bytes=cap)
    build_store(tmp_path / "store", corpus, settings, extractor)
    sent = 0

    def endless() -> Iterator[bytes]:  # no Content-Length: chunked; far more than the cap if it were all read
        nonlocal sent
        head = b'--BB\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n\r\n'
        sent += len(head)
        yield head
        for _ in range(16 * 1024):  # up to 1 GiB
            sent += 65536
            yield b"\x89" * 65536

    with live(settings, extractor) as (client, _):
        r = client.post("/v1/query", content=endless(), headers={"Content-Type": "multipart/form-data; boundary=BB"})
        assert_error(r, 413, "too_large")
        assert "content-length" not in r.request.headers
        assert sent < 64 * 1024 * 1024  # stopped early (the bytes sent), not after reading the 1 GiB
        r = client.post("/v1/query", content=b"x" * (cap + 1), headers={"Content-Type": "multipart/form-data; b=1"})
        assert_error(r, 413, "too_large")
        small = client.post("/v1/query", files={"file": ("ok.png", png(photo(1)))})
        assert small.status_code == 200


def test_bad_images_get_400_413_415_never_500(tmp_path, checkpoint, corpus, extractor):
    settings = settings_for(checkpoint, tmp_path / "store", max_pixels=150 * 150)
    build_store(tmp_path / "store", corpus, settings, extractor)
    good = png(photo(1))
    with live(settings, extractor) as (client, _):

        def q(*files: tuple[str, bytes], **kw: Any) -> httpx.Response:
            return client.post("/v1/query", files=[("files", f) for f in files], **kw)

        assert_error(q(("big.png", png(photo(2, (200, 200))))), 413, "too_large")
        assert_error(q(("notes.txt", b"hello, not an image")), 415, "unsupported_format")
        assert_error(q(("cut.png", good[: len(good) // 2])), 400, "invalid_image")
        mixed = q(("ok.png", good), ("bad.txt", b"nope"))
        assert mixed.status_code == 200
        ok, bad = mixed.json()["results"]
        assert ok["nsfw"]["level"] and bad["status"] == 415 and bad["error"]["code"] == "unsupported_format"
        # request shape
        assert_error(client.post("/v1/query", content=b"x", headers={"Content-Type": "text/plain"}), 415)
        assert_error(client.post("/v1/query", json={"file": "x"}), 422, "invalid_request")  # JSON: the query forms
        assert_error(client.post("/v1/query", files={"other": ("a.png", good)}), 422, "invalid_request")
        assert_error(
            client.post(
                "/v1/query", content=b"--BB\r\ngarbage", headers={"Content-Type": "multipart/form-data; boundary=BB"}
            ),
            400,
        )
        assert_error(client.post("/v1/query", params={"k": 0}, files={"file": ("a.png", good)}), 422)
        assert_error(client.post("/v1/query", params={"source": "rumour"}, files={"file": ("a.png", good)}), 422)
        assert_error(client.post("/v1/query", params={"min_similarity": "nan"}, files={"file": ("a.png", good)}), 422)
        assert_error(client.get("/v1/images/abc"), 422, "invalid_request")
        assert_error(client.get(f"/v1/images/{2**70}"), 422)
        assert_error(client.get("/v1/images/424242"), 404, "not_found")
        assert str(settings.store) not in client.get("/v1/images/424242").text  # no server paths in messages
        assert_error(client.get("/v2/nothing"), 404, "not_found")
        r = client.delete("/v1/stats")
        assert_error(r, 405, "method_not_allowed")
        assert "GET" in r.headers["allow"]
        assert_error(
            client.put(
                "/v1/images/1/label",
                headers={**auth("label"), "Content-Type": "application/json"},
                content=b"{not json",
            ),
            422,
        )


def test_queue_full_is_503_at_once_and_healthz_stays_fast(tmp_path, checkpoint, corpus, extractor):
    settings = settings_for(checkpoint, tmp_path / "store", queue_size=1, max_batch=1, max_wait_ms=0)
    build_store(tmp_path / "store", corpus, settings, extractor)
    with live(settings, extractor) as (client, app):
        worker = app.state.service.worker
        busy, release = threading.Event(), threading.Event()
        real = worker.analyze_fn

        def saturating(ex: Extractor, items: Any, s: Settings) -> Any:
            busy.set()
            out = real(ex, items, s)
            while not release.is_set():  # real inference, over and over: the CPU is as busy as it gets
                out = real(ex, items, s)
            return out

        worker.analyze_fn = saturating
        url = str(client.base_url)
        statuses: list[int] = []

        def send() -> None:
            with httpx.Client(base_url=url, timeout=30) as c:
                statuses.append(c.post("/v1/query", files={"file": ("a.png", png(photo(1)))}).status_code)

        first = threading.Thread(target=send)
        first.start()
        assert busy.wait(10)  # the worker holds the first request
        second = threading.Thread(target=send)
        second.start()
        deadline = time.monotonic() + 30  # a generous bound on a wait, not a speed assertion
        while worker.queue.qsize() < 1 and time.monotonic() < deadline:  # the second one waits in the queue
            time.sleep(0.005)
        try:
            assert worker.queue.qsize() == 1 and worker.batches == 0
            # Work done, not seconds: the worker stays inside its first batch until `release`, so an answer that
            # comes while both requests are still pending and no batch has finished was given without waiting on
            # inference.
            r = client.post("/v1/query", files={"file": ("a.png", png(photo(1)))})
            assert_error(r, 503, "overloaded")
            assert int(r.headers["retry-after"]) >= 1
            assert worker.queue.qsize() == 1  # refused, not queued
            for _ in range(20):
                assert client.get("/healthz").status_code == 200
            assert statuses == [] and worker.batches == 0 and not release.is_set()  # still saturated throughout
        finally:
            release.set()
            first.join(30)
            second.join(30)
        assert statuses == [200, 200]


# -- readiness and freshness -----------------------------------------------------------------------------------------
def test_readyz_503_when_the_store_belongs_to_another_model(tmp_path, checkpoint, corpus, extractor):
    settings = settings_for(checkpoint, tmp_path / "store")
    build_store(tmp_path / "store", corpus, settings, extractor)
    with Store(tmp_path / "store") as store:
        store.set_info("model", {**store.get_info("model"), "weights_sha256": "0" * 64})
    with live(settings, extractor) as (client, _):
        err = assert_error(client.get("/readyz"), 503, "model_mismatch")
        assert "another model" in err["message"]
        err = assert_error(client.post("/v1/query", files={"file": ("a.png", png(photo(1)))}), 503, "model_mismatch")
        assert "--model" in err["message"]
        assert_error(
            client.post("/v1/images", headers=auth("write"), files={"file": ("a.png", png(photo(99)))}),
            409,
            "model_mismatch",
        )
        assert client.get("/v1/images/1/neighbours").status_code == 200  # stored vectors only: still consistent
        assert client.get("/healthz").status_code == 200


def test_empty_store_scores_without_neighbours_until_the_first_add(tmp_path, checkpoint, extractor):
    settings = settings_for(checkpoint, tmp_path / "fresh-store")
    with live(settings, extractor) as (client, _):
        assert "no images" in assert_error(client.get("/readyz"), 503, "not_ready")["message"]
        r = client.post("/v1/query", files={"file": ("a.png", png(photo(1)))})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["index"]["ready"] is False
        got = body["results"][0]
        assert got["nsfw"]["level"] and got["nearest_unsafe"] == [] and got["near_duplicates"] == []
        assert got["indexed_id"] is None
        added = client.post("/v1/images", headers=auth("write"), files={"file": ("a.png", png(photo(1)))}).json()
        assert added["created"] and client.get("/readyz").status_code == 200
        assert client.get(f"/v1/images/{added['id']}/neighbours").status_code == 200


def test_index_run_while_serving_becomes_visible(own, tmp_path, extractor):
    client, app, settings = own
    new = tmp_path / "more"
    new.mkdir()
    for seed in (400, 401, 402):
        photo(seed).save(new / f"n{seed}.png")
    generation = app.state.service.index_info["generation"]
    searcher = app.state.service.searcher
    index_into(settings.store, [str(new)], settings, extractor)  # type: ignore[arg-type]
    deadline = time.monotonic() + 30  # the background refresher's pace: a generous bound on a wait, not a speed test
    visible = False
    while not visible and time.monotonic() < deadline:
        got = client.post("/v1/query", files={"file": ("q.png", repng(photo(401)))}).json()["results"][0]
        visible = any(d["similarity"] > 0.999 for d in got["near_duplicates"])  # n401.png, in the new snapshot
        time.sleep(0.05)
    assert visible, "the new snapshot never became visible"
    assert client.get("/v1/stats").json()["images"] == len(CORPUS_SEEDS) + 3
    assert app.state.service.index_info["generation"] > generation  # the new snapshot was swapped in
    assert app.state.service.searcher is not searcher


# -- paths -----------------------------------------------------------------------------------------------------------
def test_paths_only_for_keys_with_read_paths(shared, corpus):
    client, _, settings = shared
    image_id = image_id_of(settings, 3)
    data = repng(photo(3))
    for headers in ({}, auth("read"), auth("write")):
        r = client.post("/v1/query", files={"file": ("q.png", data)}, headers=headers)
        assert r.status_code == 200
        assert all("paths" not in n for n in r.json()["results"][0]["nearest_unsafe"])
        assert str(corpus) not in r.text
        for url in (f"/v1/images/{image_id}/neighbours", f"/v1/images/{image_id}"):
            r = client.get(url, headers=headers)
            assert r.status_code == 200 and str(corpus) not in r.text, url
    r = client.post("/v1/query", files={"file": ("q.png", data)}, headers=auth("paths")).json()
    first = r["results"][0]["nearest_unsafe"][0]
    assert first["id"] == image_id and first["paths"] == [str(corpus / "img3.png")]
    r = client.get(f"/v1/images/{image_id}/neighbours", headers=auth("paths")).json()
    assert r["exact_duplicates"]["paths"] == [str(corpus / "img3.png")]
    assert client.get(f"/v1/images/{image_id}", headers=auth("all")).json()["paths"] == [str(corpus / "img3.png")]


# -- clusters --------------------------------------------------------------------------------------------------------
def test_clusters_routes(tmp_path, checkpoint, corpus, extractor):
    from search.clusters import run_clustering  # fails (does not skip) while clustering is missing

    settings = settings_for(checkpoint, tmp_path / "store")
    build_store(tmp_path / "store", corpus, settings, extractor)
    with Store.writing(tmp_path / "store", "nsfw-index cluster") as store:
        run_clustering(store, settings)
    with live(settings, extractor) as (client, _):
        page = client.get("/v1/clusters", params={"per_page": 3})
        assert page.status_code == 200, page.text
        body = page.json()
        assert body["total"] >= 1 and 1 <= len(body["items"]) <= 3 and body["fresh"] is True
        sizes = [c["size"] for c in body["items"]]
        assert sizes == sorted(sizes, reverse=True)
        groups = client.get("/v1/clusters", params={"kind": "group", "sort": "unsafe"})
        assert groups.status_code == 200, groups.text
        first = body["items"][0]
        detail = client.get(f"/v1/clusters/{first['id']}")
        assert detail.status_code == 200, detail.text
        members = detail.json()["members"]
        assert len(members) == first["size"] and all("paths" not in m for m in members)
        assert first["representative_id"] in [m["id"] for m in members]
        assert_error(client.get("/v1/clusters/987654"), 404, "not_found")
        assert_error(client.get("/v1/clusters", params={"kind": "blob"}), 422)


def test_query_uploads_are_never_written_anywhere(tmp_path, checkpoint, corpus, extractor, monkeypatch):
    """A 3 MB upload (starlette would spool anything over 1 MB to a temp file) creates no file: no temp file is
    opened while it is answered (Linux unlinks those at once, so counting the calls is the check), nothing is left in
    the temp directory or the store."""
    import tempfile

    spool = tmp_path / "tmp"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    monkeypatch.setenv("TMPDIR", str(spool))
    opened: list[str] = []
    for name in ("TemporaryFile", "NamedTemporaryFile", "mkstemp", "mkdtemp"):
        real = getattr(tempfile, name)

        def counting(*a: Any, _real: Any = real, _name: str = name, **kw: Any) -> Any:
            opened.append(_name)
            return _real(*a, **kw)

        monkeypatch.setattr(tempfile, name, counting)
    settings = settings_for(checkpoint, tmp_path / "store")
    build_store(tmp_path / "store", corpus, settings, extractor)
    noise = Image.frombytes("RGB", (1024, 1024), os.urandom(1024 * 1024 * 3))
    body = png(noise)
    assert len(body) > 3 * 1024 * 1024
    marker = hashlib.sha256(body).hexdigest()

    def files_now() -> dict[str, int]:
        out = {}
        for root in (spool, tmp_path / "store"):
            for p in root.rglob("*"):
                if p.is_file() and not p.name.startswith("meta.sqlite"):
                    out[str(p)] = p.stat().st_size
        return out

    with live(settings, extractor) as (client, _app):
        before = files_now()
        opened.clear()
        r = client.post("/v1/query", files={"file": ("big.png", body)})
        assert r.status_code == 200, r.text
        assert opened == []
        assert r.json()["results"][0]["sha256"] == marker
        assert files_now() == before
        assert not list(spool.iterdir())
    with Store(tmp_path / "store", readonly=True) as st:
        assert st.ids_by_sha([marker]) == {}  # a query is not an addition
