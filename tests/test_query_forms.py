"""The JSON query forms of `POST /v1/query` (image_base64, embedding, url): parsing, the URL fetcher's rules against a
real HTTP server on 127.0.0.1, and the route on a live server with the small checkpoint."""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import photo
from pydantic import ValidationError
from test_api import assert_error, auth, build_store, live, png
from test_api import settings_for as api_settings

from indexer.extractor import Extractor
from indexer.query_forms import (
    QueryForm,
    UrlFetchFailed,
    UrlQueriesDisabled,
    UrlRefused,
    decode_base64,
    fetch_url,
    host_allowed,
    load_embeddings,
)
from search.errors import InvalidArgument, InvalidImage
from search.query import as_embedding
from search.settings import Settings
from search.store import Store

# -- a real HTTP server on 127.0.0.1 -----------------------------------------------------------------------------------
#: path -> (status, headers, body); a callable body is called with the handler (to stream or stall)
Routes = dict[str, tuple[int, dict[str, str], bytes | Callable[[http.server.BaseHTTPRequestHandler], None]]]


@contextmanager
def image_server(routes: Routes) -> Iterator[tuple[str, list[str]]]:
    """A threaded HTTP server on a free port of 127.0.0.1; yields its base URL and the paths it was asked for."""
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            seen.append(self.path)
            status, headers, body = routes.get(self.path.split("?", 1)[0], (404, {}, b"missing"))
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            if callable(body):
                self.end_headers()
                body(self)
                return
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def url_settings(**kw: Any) -> Settings:
    base: dict[str, Any] = {"url_queries": True, "url_allowlist": "127.0.0.1", "url_allow_private": True}
    return Settings(**{**base, **kw})


IMAGE = png(photo(3))


# -- parsing -----------------------------------------------------------------------------------------------------------
def test_base64_forms_decode_and_bad_ones_say_why() -> None:
    std = base64.b64encode(IMAGE).decode()
    assert decode_base64(std, "x") == IMAGE
    assert decode_base64(std.rstrip("="), "x") == IMAGE  # padding optional
    assert decode_base64("data:image/png;base64," + std, "x") == IMAGE
    assert decode_base64("\n".join(std[i : i + 76] for i in range(0, len(std), 76)), "x") == IMAGE  # MIME lines
    assert decode_base64(base64.urlsafe_b64encode(IMAGE).decode(), "x") == IMAGE
    for bad in ("", "   ", "not base64!", "ab$d"):
        err = decode_base64(bad, "image_base64[1]")
        assert isinstance(err, InvalidImage) and err.kind == "invalid" and "image_base64[1]" in str(err)


def test_a_body_holds_exactly_one_form_with_strict_types() -> None:
    assert QueryForm.model_validate({"image_base64": ["a", "b"], "k": 3}).form == "image_base64"
    assert QueryForm.model_validate({"embedding": [1, 2.5]}).embedding == [1.0, 2.5]
    for bad in (
        {},
        {"image_base64": "a", "url": "http://x"},
        {"image_base64": []},
        {"embedding": ["1.0"]},
        {"embedding": [True]},
        {"url": "http://x", "k": "3"},
        {"url": "http://x", "k": 0},
        {"url": "http://x", "source": ["rumour"]},
        {"url": "http://x", "threshold": 2},
        {"url": "http://x", "extra": 1},
        ["image_base64"],
    ):
        with pytest.raises(ValidationError):
            QueryForm.model_validate(bad)


def test_embeddings_are_checked_for_dimension_and_finiteness_then_normalised(tmp_path: Path) -> None:
    v = as_embedding([3, 4], 2)
    assert v.dtype == np.float32 and np.allclose(v, [0.6, 0.8])
    assert np.allclose(as_embedding([1e300, 1e300], 2), [2**-0.5, 2**-0.5])  # no overflow in the norm
    for bad, why in (
        ([1.0] * 3, "2 numbers"),
        ([[1.0, 2.0]], "shape"),
        ([float("nan"), 1.0], "finite"),
        ([float("inf"), 1.0], "finite"),
        ([0.0, 0.0], "zeros"),
        (np.array(["a", "b"]), "numbers"),
    ):
        with pytest.raises(InvalidArgument, match=why):
            as_embedding(bad, 2)
    np.save(tmp_path / "one.npy", np.arange(4, dtype=np.float32))
    np.save(tmp_path / "rows.npy", np.ones((3, 4)))
    np.save(tmp_path / "cube.npy", np.ones((2, 2, 2)))
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    assert load_embeddings(tmp_path / "one.npy").shape == (1, 4)
    assert load_embeddings(tmp_path / "rows.npy").shape == (3, 4)
    for name in ("cube.npy", "junk.npy"):
        with pytest.raises(InvalidArgument):
            load_embeddings(tmp_path / name)


# -- the URL fetcher ---------------------------------------------------------------------------------------------------
def test_url_queries_are_off_by_default_and_refuse_before_connecting() -> None:
    with image_server({"/a.png": (200, {"Content-Type": "image/png"}, IMAGE)}) as (base, seen):
        with pytest.raises(UrlQueriesDisabled):
            fetch_url(f"{base}/a.png", Settings())
        # loopback without url_allow_private, even when the host is allowlisted
        with pytest.raises(UrlRefused, match="loopback"):
            fetch_url(f"{base}/a.png", url_settings(url_allow_private=False))
        with pytest.raises(UrlRefused, match="allowlist"):
            fetch_url(f"{base}/a.png", url_settings(url_allowlist="images.example.com"))
        with pytest.raises(UrlRefused, match="http and https"):
            fetch_url(base.replace("http", "ftp") + "/a.png", url_settings())
        with pytest.raises(UrlRefused, match="credentials"):
            fetch_url(base.replace("://", "://u:p@") + "/a.png", url_settings())
        assert seen == []  # nothing was even asked
        assert fetch_url(f"{base}/a.png?token=1", url_settings()) == IMAGE
        assert seen == ["/a.png?token=1"]


def test_private_answers_of_a_name_are_refused_and_the_checked_address_is_used() -> None:
    def dns(answers: list[str]) -> Callable[[str, int], list[str]]:
        return lambda host, port: answers

    s = url_settings(url_allow_private=False, url_allowlist="*.example.com")
    for answers, kind in (
        (["10.1.2.3"], "private"),
        (["93.184.216.34", "192.168.0.7"], "private"),  # one private answer refuses the host
        (["169.254.169.254"], "link-local"),
        (["::ffff:127.0.0.1"], "loopback"),
        (["::1"], "loopback"),
        (["0.0.0.0"], "unspecified"),
    ):
        with pytest.raises(UrlRefused, match=kind):
            fetch_url("http://img.example.com/a.png", s, resolver=dns(answers))
    assert host_allowed("a.b.example.com", ["*.example.com"]) and not host_allowed("example.com", ["*.example.com"])
    assert not host_allowed("badexample.com", ["*.example.com"]) and host_allowed("X.Example.COM.", ["x.example.com"])
    # a name on the allowlist is connected to at the address that was checked (Host header kept), not looked up again
    with image_server({"/a.png": (200, {}, IMAGE)}) as (base, seen):
        port = base.rsplit(":", 1)[1]
        pinned = url_settings(url_allowlist="img.example.com")
        assert fetch_url(f"http://img.example.com:{port}/a.png", pinned, resolver=dns(["127.0.0.1"])) == IMAGE
        assert seen == ["/a.png"]


def test_redirects_only_to_allowed_hosts_and_bodies_capped() -> None:
    big = b"\x89PNG" + b"\0" * 5000

    def stream_big(handler: http.server.BaseHTTPRequestHandler) -> None:  # no Content-Length: read until closed
        handler.close_connection = True
        try:
            for _ in range(50):
                handler.wfile.write(b"\0" * 1000)
        except OSError:  # the client hung up at its cap
            pass

    routes: Routes = {
        "/a.png": (200, {}, IMAGE),
        "/same": (302, {"Location": "/a.png"}, b""),
        "/other": (302, {"Location": "http://localhost:1/a.png"}, b""),  # another host, not allowlisted
        "/loop": (301, {"Location": "/loop"}, b""),
        "/gone": (404, {}, b"nope"),
        "/big": (200, {}, big),
        "/stream": (200, {"Connection": "close"}, stream_big),
        "/gzip": (200, {"Content-Encoding": "gzip"}, b"\x1f\x8b"),
    }
    with image_server(routes) as (base, seen):
        s = url_settings()
        assert fetch_url(f"{base}/same", s) == IMAGE  # a redirect on the same host is followed
        with pytest.raises(UrlRefused, match="allowlist"):
            fetch_url(f"{base}/other", s)
        assert "/a.png" not in seen[seen.index("/other") :]
        with pytest.raises(UrlRefused, match="redirects more than"):
            fetch_url(f"{base}/loop", s)
        with pytest.raises(UrlFetchFailed, match="404"):
            fetch_url(f"{base}/gone", s)
        for path in ("/big", "/stream"):  # declared too large (refused unread), then cut off while streaming
            with pytest.raises(InvalidImage, match="url_max_bytes") as e:
                fetch_url(f"{base}{path}", url_settings(url_max_bytes=4000))
            assert e.value.kind == "too_large"
        with pytest.raises(UrlFetchFailed, match="Content-Encoding"):
            fetch_url(f"{base}/gzip", s)


def test_a_stalled_answer_fails_at_the_deadline() -> None:
    release = threading.Event()

    def stall(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.wfile.write(b"\x89PNG")
        handler.wfile.flush()
        release.wait(10)

    with image_server({"/slow": (200, {"Content-Length": "100000"}, stall)}) as (base, _):
        try:
            with pytest.raises(UrlFetchFailed, match="url_timeout_seconds"):
                fetch_url(f"{base}/slow", url_settings(url_timeout_seconds=0.5))
        finally:
            release.set()


# -- the route ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path, extractor: Extractor) -> Path:
    corpus = tmp_path_factory.mktemp("forms-corpus")
    for i in range(5):
        photo(i).save(corpus / f"img{i}.png")
    store = tmp_path_factory.mktemp("forms") / "store"
    build_store(store, corpus, api_settings(checkpoint, store), extractor)
    with Store(store) as s:  # one known-unsafe image, so that nearest_unsafe has something to find
        from search.labels import label_images

        label_images(s, ["1"], "unsafe", api_settings(checkpoint, store), who="test")
    return store


def without_timings(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in ("timings", "index")}


def test_json_forms_answer_as_multipart_does(store_dir: Path, checkpoint: Path, extractor: Extractor) -> None:
    images: Routes = {"/a.png": (200, {"Content-Type": "image/png"}, IMAGE), "/big.png": (200, {}, IMAGE * 2)}
    with image_server(images) as (base, _):
        settings = api_settings(
            checkpoint,
            store_dir,
            url_queries=True,
            url_allowlist="127.0.0.1",
            url_allow_private=True,
            url_max_bytes=len(IMAGE) + 100,
        )
        with live(settings, extractor) as (client, _):
            multi = client.post("/v1/query", files={"file": ("a.png", IMAGE)}, params={"k": 3}).json()
            b64 = base64.b64encode(IMAGE).decode()
            one = client.post("/v1/query", json={"image_base64": b64, "k": 3}).json()
            expected = [{**multi["results"][0], "filename": None}]
            assert without_timings(one) == without_timings({**multi, "results": expected})
            by_url = client.post("/v1/query", json={"url": f"{base}/a.png"}, params={"k": 3})
            assert by_url.status_code == 200, by_url.text
            assert by_url.json()["results"] == expected
            assert_error(client.post("/v1/query", json={"url": f"{base}/big.png"}), 413, "too_large")
            off_list = {"url": base.replace("127.0.0.1", "localhost") + "/a.png"}
            assert_error(client.post("/v1/query", json=off_list), 422, "url_not_allowed")
            # a list: answered in order, a bad entry in place with its own status
            several = client.post("/v1/query", json={"image_base64": [b64, "!!", b64]}).json()["results"]
            assert several[0]["sha256"] == hashlib.sha256(IMAGE).hexdigest() == several[2]["sha256"]
            assert several[1]["status"] == 400 and "image_base64[1]" in several[1]["error"]["message"]
            assert_error(client.post("/v1/query", json={"image_base64": "!!"}), 400, "invalid_image")
            # an embedding: the stored vector of image 1 finds image 1 (no model run; nothing left out)
            with Store(store_dir, readonly=True) as s:
                vec = s.vectors([1])[0] * 7.0  # not unit length: normalised first
            r = client.post("/v1/query", json={"embedding": vec.tolist(), "k": 2})
            assert r.status_code == 200, r.text
            body = r.json()
            [res] = body["results"]
            assert set(res) == {"nearest_unsafe", "near_duplicates"}
            assert res["near_duplicates"][0]["id"] == 1 and res["near_duplicates"][0]["similarity"] == pytest.approx(1)
            assert res["nearest_unsafe"][0]["id"] == 1 and "paths" not in res["nearest_unsafe"][0]
            assert body["timings"]["batch_images"] == 0
            with_paths = client.post("/v1/query", json={"embedding": vec.tolist()}, headers=auth("all")).json()
            assert with_paths["results"][0]["nearest_unsafe"][0]["paths"]
            # bad bodies: 422 with what is wrong, never a 500
            dim = len(vec)
            for bad, why in (
                ({"embedding": [0.5] * (dim + 1)}, f"{dim} numbers"),
                ({"embedding": [0.0] * dim}, "zeros"),
                ({"image_base64": b64, "url": f"{base}/a.png"}, "exactly one"),
                ({"image_base64": b64, "file": "x"}, "xtra"),
            ):
                assert why in assert_error(client.post("/v1/query", json=bad), 422)["message"]
            nan = '{"embedding": [NaN' + ", 0.5" * (dim - 1) + "]}"
            err = assert_error(client.post("/v1/query", content=nan, headers={"Content-Type": "application/json"}), 422)
            assert "finite" in err["message"]
            both = client.post("/v1/query", json={"image_base64": b64, "k": 2}, params={"k": 3})
            assert "once" in assert_error(both, 422)["message"]
            assert_error(client.post("/v1/query", content=b"{", headers={"Content-Type": "application/json"}), 422)
            deep = b"[" * 100_000 + b"]" * 100_000
            assert_error(client.post("/v1/query", content=deep, headers={"Content-Type": "application/json"}), 422)
            assert_error(client.post("/v1/query", content=b"x", headers={"Content-Type": "text/plain"}), 415)
            assert client.get("/readyz").status_code == 200  # still serving


def test_json_images_meet_the_limits_of_uploads_and_url_is_off_by_default(
    store_dir: Path, checkpoint: Path, extractor: Extractor
) -> None:
    big = png(photo(9, (120, 100)))  # 12,000 pixels
    settings = api_settings(checkpoint, store_dir, http_max_pixels=10_000, max_body_bytes=64 * 1024)
    assert settings.url_queries is False
    with image_server({"/a.png": (200, {}, IMAGE)}) as (base, seen), live(settings, extractor) as (client, _):
        err = assert_error(client.post("/v1/query", json={"url": f"{base}/a.png"}), 422, "url_queries_disabled")
        assert "url_queries" in err["message"] and seen == []
        multi = assert_error(client.post("/v1/query", files={"file": ("big.png", big)}), 413, "too_large")
        b64 = assert_error(client.post("/v1/query", json={"image_base64": base64.b64encode(big).decode()}), 413)
        assert b64["message"].split(": ", 1)[1] == multi["message"].split(": ", 1)[1]  # the same pixel cap, same words
        huge = {"image_base64": base64.b64encode(b"\0" * 65 * 1024).decode()}
        assert "max_body_bytes" in assert_error(client.post("/v1/query", json=huge), 413, "too_large")["message"]
        ok = client.post("/v1/query", json={"image_base64": base64.b64encode(IMAGE).decode()})
        assert ok.status_code == 200 and json.loads(ok.text)["results"][0]["nsfw"]["level"]


def test_query_embedding_from_the_cli(store_dir: Path, tmp_path: Path, checkpoint: Path) -> None:
    from conftest import run_cli

    with Store(store_dir, readonly=True) as s:
        vecs = s.vectors([2, 3])
    np.save(tmp_path / "two.npy", vecs)
    np.save(tmp_path / "wrong.npy", np.ones(5))
    env = {"NSFW_INDEX_MODEL": "/nonexistent"}  # no model is needed (nor loaded)
    p = run_cli("query", "--embedding", str(tmp_path / "two.npy"), "--store", str(store_dir), "--json", env=env)
    assert p.returncode == 0, p.stderr
    rows = [json.loads(line) for line in p.stdout.splitlines()]
    assert [r["row"] for r in rows] == [0, 1]
    assert [r["near_duplicates"][0]["id"] for r in rows] == [2, 3]
    assert "nsfw" not in rows[0] and "pdq" not in rows[0]
    p = run_cli("query", "--embedding", str(tmp_path / "wrong.npy"), "--store", str(store_dir), env=env)
    assert p.returncode == 2 and "numbers" in p.stderr
    p = run_cli("query", "x.png", "--embedding", str(tmp_path / "two.npy"), "--store", str(store_dir), env=env)
    assert p.returncode == 2 and "not both" in p.stderr
