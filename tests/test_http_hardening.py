"""HTTP hardening: decoding at reduced size, the pixel budget and the prepare pool, body and header timeouts, the
connection cap, JSON errors at the connection level, and an OpenAPI document that says what the server does."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import photo
from PIL import Image

from api.app import create_app
from api.errors import ApiError
from api.limits import PixelBudget
from api.server import BackgroundServer
from api.worker import SMALL_PIXELS
from indexer.decode import decode_cost, decode_image
from indexer.extractor import Extractor
from indexer.prepare import PDQ_MIN_SIDE, decode_side, prepare_image
from search.pdq import compute_pdq, hamming
from search.settings import Settings

KEY = "hardening-key"
BIG = 1 << 30


def encoded(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def big_photo(seed: int, size: tuple[int, int]) -> Image.Image:
    return photo(seed, (size[0] // 8, size[1] // 8)).resize(size, Image.BICUBIC)


# -- decoding at the size PDQ and the model need -----------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "TIFF"])
def test_large_images_decode_reduced_with_their_full_size_kept(fmt: str) -> None:
    img = big_photo(1, (2200, 1700))
    data = encoded(img, fmt)
    full = decode_image(data, "x", max_bytes=BIG, max_pixels=BIG)
    small = decode_image(data, "x", max_bytes=BIG, max_pixels=BIG, min_side=512)
    assert (full.width, full.height) == (small.width, small.height) == (2200, 1700)
    assert full.image.size == (2200, 1700) and not full.reduced
    assert small.reduced and small.image.mode == "RGB"
    assert 512 <= min(small.image.size) < 1024  # both sides at least what is needed, at most twice that
    # the same picture: the reduced decode against the full one, downscaled alike
    ref = np.asarray(full.image.resize(small.image.size, Image.BOX), dtype=np.float32)
    assert np.abs(ref - np.asarray(small.image, dtype=np.float32)).mean() < 6


def test_jpeg_is_scaled_while_decoding_and_costs_its_draft_size() -> None:
    data = encoded(big_photo(2, (4096, 4096)), "JPEG", quality=90)
    cost = decode_cost(data, max_pixels=BIG, min_side=512)
    assert cost == 512 * 512  # libjpeg's 1/8 scale: the full 16.8 MP are never held
    assert decode_cost(encoded(big_photo(2, (4096, 4096)), "PNG"), max_pixels=BIG, min_side=512) == 4096 * 4096
    assert decode_cost(b"not an image", max_pixels=BIG, min_side=512) == 0
    assert decode_cost(data, max_pixels=1000, min_side=512) == 0  # refused from its header: nothing decoded
    assert decode_image(data, "x", max_bytes=BIG, max_pixels=BIG, min_side=512).image.size == (512, 512)


def test_exif_orientation_and_modes_survive_the_reduced_path() -> None:
    img = big_photo(3, (2000, 1200))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    data = encoded(img, "JPEG", exif=exif.tobytes())
    full = decode_image(data, "x", max_bytes=BIG, max_pixels=BIG)
    small = decode_image(data, "x", max_bytes=BIG, max_pixels=BIG, min_side=512)
    assert (full.width, full.height) == (small.width, small.height) == (1200, 2000)
    assert small.image.height > small.image.width
    ref = np.asarray(full.image.resize(small.image.size, Image.BOX), dtype=np.float32)
    assert np.abs(ref - np.asarray(small.image, dtype=np.float32)).mean() < 8
    for mode in ("P", "RGBA", "LA", "1", "I;16", "CMYK"):
        converted = img.convert("L").convert("I;16") if mode == "I;16" else img.convert(mode)
        fmt = "TIFF" if mode == "CMYK" else "PNG"
        d = decode_image(encoded(converted, fmt), mode, max_bytes=BIG, max_pixels=BIG, min_side=512)
        assert d.reduced and d.image.mode == "RGB" and (d.width, d.height) == (2000, 1200), mode


def test_pdq_of_the_reduced_decode_stays_close_to_the_full_size_hash() -> None:
    """Measured, and kept small: the Hamming distance between PDQ of the full image and of the reduced decode."""
    distances = []
    for seed in range(4):
        img = big_photo(seed, (2600, 1900))
        data = encoded(img, "JPEG", quality=92)
        full, _ = compute_pdq(decode_image(data, "x", max_bytes=BIG, max_pixels=BIG).image)
        small, _ = compute_pdq(decode_image(data, "x", max_bytes=BIG, max_pixels=BIG, min_side=PDQ_MIN_SIDE).image)
        distances.append(hamming(full, small))
    assert max(distances) <= 16, distances  # ThreatExchange matches at <= 31


def test_prepare_records_the_full_size_and_decodes_at_the_model_side(extractor: Extractor) -> None:
    assert decode_side(extractor.transform) == PDQ_MIN_SIDE  # the tiny model's 56 px need less than PDQ
    p = prepare_image(
        "big.png",
        encoded(big_photo(4, (1800, 1300)), "PNG"),
        transform=extractor.transform,
        max_bytes=BIG,
        max_pixels=BIG,
    )
    assert (p.width, p.height) == (1800, 1300) and p.pdq is not None and p.tensor.ndim == 3


# -- the pixel budget -------------------------------------------------------------------------------------------------


def test_pixel_budget_refuses_at_once_and_gives_back() -> None:
    budget = PixelBudget(100)
    release = budget.claim(60)
    with pytest.raises(ApiError) as busy:
        budget.claim(50)
    assert busy.value.status == 503 and busy.value.headers["Retry-After"]
    with pytest.raises(ApiError) as never:
        budget.claim(101)
    assert never.value.status == 413
    release()
    release()  # idempotent
    assert budget.in_flight == 0
    budget.claim(100)()
    assert budget.peak == 100


# -- the server, in process -------------------------------------------------------------------------------------------


@contextmanager
def served(checkpoint: Path, store: Path, extractor: Extractor, **kw: Any) -> Iterator[tuple[httpx.Client, Any]]:
    base: dict[str, Any] = {
        "model": str(checkpoint),
        "workers": 0,
        "device": "cpu",
        "store": store,
        "api_keys": f"{KEY}:read+write+label+read_paths",
        "reload_seconds": 0.5,
    }
    app = create_app(Settings(**{**base, **kw}), extractor=extractor)
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        yield client, app


def large_png() -> bytes:
    """An upload whose decode takes the large lane (more than SMALL_PIXELS), cheap to encode."""
    side = int(SMALL_PIXELS**0.5) + 200
    return encoded(Image.new("RGB", (side, side), (40, 90, 160)), "PNG")


def test_a_small_query_passes_a_large_one_held_in_its_decode(tmp_path, checkpoint, extractor) -> None:
    with served(checkpoint, tmp_path / "store", extractor) as (client, app):
        worker = app.state.service.worker
        started, release = threading.Event(), threading.Event()
        real = worker.pool.prepare_fn

        def holding(name: str, data: bytes) -> Any:
            if name == "large.png":
                started.set()
                release.wait(60)
            return real(name, data)

        worker.pool.prepare_fn = holding
        big: list[int] = []
        t = threading.Thread(
            target=lambda: big.append(client.post("/v1/query", files={"file": ("large.png", large_png())}).status_code)
        )
        t.start()
        try:
            assert started.wait(30)
            r = client.post("/v1/query", files={"file": ("small.png", encoded(photo(1), "PNG"))})
            assert r.status_code == 200, r.text
            # counted, not timed: the small one was prepared and ran its forward pass while the large one was
            # still inside its decode, holding no inference
            assert worker.pool.completed == {"small": 1, "large": 0} and worker.batches == 1 and big == []
        finally:
            release.set()
            t.join(60)
        assert big == [200] and worker.batches == 2 and worker.pool.completed["large"] == 1
        assert worker.budget.in_flight == 0


def test_budget_and_caps_answer_at_once(tmp_path, checkpoint, extractor) -> None:
    side = int(SMALL_PIXELS**0.5) + 200
    one = side * side + 512 * 512
    with served(
        checkpoint,
        tmp_path / "store",
        extractor,
        decode_pixel_budget=one + 1000,
        max_images_per_request=3,
        http_max_pixels=side * side,
    ) as (client, app):
        worker = app.state.service.worker
        started, release = threading.Event(), threading.Event()
        real = worker.pool.prepare_fn

        def holding(name: str, data: bytes) -> Any:
            started.set()
            release.wait(60)
            return real(name, data)

        worker.pool.prepare_fn = holding
        t = threading.Thread(target=lambda: client.post("/v1/query", files={"file": ("a.png", large_png())}))
        t.start()
        try:
            assert started.wait(30)
            r = client.post("/v1/query", files={"file": ("b.png", large_png())})
            assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded" and int(r.headers["retry-after"])
            assert not release.is_set() and worker.batches == 0  # refused while the first is still held
        finally:
            release.set()
            t.join(60)
        worker.pool.prepare_fn = real
        two = [("files", (f"{i}.png", large_png())) for i in range(2)]
        r = client.post("/v1/query", files=two)
        assert r.status_code == 413 and "decode_pixel_budget" in r.json()["error"]["message"]
        four = [("files", (f"{i}.png", encoded(photo(i), "PNG"))) for i in range(4)]
        r = client.post("/v1/query", files=four)
        assert r.status_code == 413 and "max_images_per_request" in r.json()["error"]["message"]
        over = encoded(Image.new("RGB", (side + 1, side), 0), "PNG")
        r = client.post("/v1/query", files={"file": ("over.png", over)})
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
        assert worker.budget.in_flight == 0 and worker.budget.peak <= worker.budget.total


# -- OpenAPI and the server agree --------------------------------------------------------------------------------------


def test_openapi_says_what_the_server_does(tmp_path, checkpoint, extractor) -> None:
    with served(checkpoint, tmp_path / "store", extractor) as (client, _):
        doc = client.get("/openapi.json").json()
        stats = doc["paths"]["/v1/stats"]["get"]
        assert {} in stats["security"] and {"HTTPBearer": []} in stats["security"]
        assert client.get("/v1/stats").status_code == 200  # no key: answered, as the document says
        label = doc["paths"]["/v1/images/{id}/label"]["put"]
        assert label["security"] == [{"HTTPBearer": []}]  # writes: a key is required
        assert "422" in label["responses"] and "408" in label["responses"]
        r = client.put(
            "/v1/images/1/label",
            content=b'{"label": "\xff"}',  # not UTF-8: FastAPI's own 400, made the documented 422
            headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        )
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
        body = doc["paths"]["/v1/query"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
        assert body["minProperties"] == 1 and body["additionalProperties"] is False
        assert set(body["properties"]) == {"file", "files"}
        r = client.post("/v1/query", files={"other": ("x.png", encoded(photo(0), "PNG"))})
        assert r.status_code == 422 and "422" in doc["paths"]["/v1/query"]["post"]["responses"]
        both = {"file": ("x.png", encoded(photo(0), "PNG")), "note": ("n.png", encoded(photo(1), "PNG"))}
        r = client.post("/v1/query", files=both)
        assert r.status_code == 422 and "unknown multipart part" in r.json()["error"]["message"]
    with served(checkpoint, tmp_path / "store", extractor, read_requires_key=True) as (client, _):
        doc = client.get("/openapi.json").json()
        assert doc["paths"]["/v1/stats"]["get"]["security"] == [{"HTTPBearer": []}]
        assert client.get("/v1/stats").status_code == 401


# -- the real CLI server: timeouts and connection limits set by the environment -------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def cli_server(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> Iterator[tuple[str, int]]:
    port = _free_port()
    env = {
        **os.environ,
        "NSFW_INDEX_BODY_IDLE_SECONDS": "1",
        "NSFW_INDEX_BODY_TOTAL_SECONDS": "4",
        "NSFW_INDEX_HEADER_SECONDS": "3",
        "NSFW_INDEX_MAX_CONNECTIONS": "6",
        "NSFW_INDEX_API_KEYS": f"{KEY}:read+write+label",
    }
    exe = Path(sys.executable).parent / "nsfw-index"
    store = tmp_path_factory.mktemp("hardening") / "store"
    args = [str(exe), "serve", "--store", str(store), "--create", "--model", str(checkpoint), "--device", "cpu"]
    proc = subprocess.Popen([*args, "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                out = proc.stdout.read().decode() if proc.stdout else ""
                raise RuntimeError(f"nsfw-index serve did not start:\n{out}")
            time.sleep(0.2)
        yield "127.0.0.1", port
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _response(sock: socket.socket) -> tuple[int, dict[str, str], dict[str, Any]]:
    """Read one whole response (the server closes the connection after these errors)."""
    sock.settimeout(30)  # a bound on a wait that must end, not a speed assertion
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, json.loads(body)


def _connect(server: tuple[str, int]) -> socket.socket:
    return socket.create_connection(server, timeout=30)


def _multipart_head(length: int) -> bytes:
    return (
        b"POST /v1/query HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        b"Content-Length: %d\r\n\r\n" % length
    )


def test_a_stalled_body_gets_408(cli_server) -> None:
    with _connect(cli_server) as s:
        s.sendall(_multipart_head(100_000) + b"--b\r\n" + b"x" * 1000)  # declares 100 KB, sends 1 KB, stops
        status, headers, body = _response(s)  # _response reads to EOF: the server closed the connection
    assert status == 408 and body["error"]["code"] == "request_timeout" and "sent nothing" in body["error"]["message"]
    assert headers["content-type"] == "application/json"


def test_a_trickled_body_hits_the_total_bound(cli_server) -> None:
    with _connect(cli_server) as s:
        s.sendall(
            _multipart_head(100_000) + b'--b\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\n'
        )
        stop = threading.Event()

        def trickle() -> None:  # a byte every 0.25 s: never idle for the idle timeout
            try:
                while not stop.wait(0.25):
                    s.sendall(b"x")
            except OSError:
                pass

        t = threading.Thread(target=trickle)
        t.start()
        try:
            status, _, body = _response(s)
        finally:
            stop.set()
            t.join()
    assert status == 408 and "took longer than 4 s" in body["error"]["message"]


def test_incomplete_headers_get_408(cli_server) -> None:
    with _connect(cli_server) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finishes the head
        status, _, body = _response(s)
    assert status == 408 and "headers" in body["error"]["message"]


def test_malformed_content_length_gets_a_json_400(cli_server) -> None:
    with _connect(cli_server) as s:
        s.sendall(b"POST /v1/query HTTP/1.1\r\nHost: x\r\nContent-Length: 12abc\r\n\r\n")
        status, headers, body = _response(s)
    assert status == 400 and body["error"]["code"] == "bad_request" and headers["content-type"] == "application/json"


def test_connections_past_the_cap_get_503_at_once(cli_server) -> None:
    held = [_connect(cli_server) for _ in range(6)]  # the cap; each sends part of a head (timed out after 3 s)
    try:
        for s in held:
            s.sendall(b"GET /healthz HTTP/1.1\r\n")
        time.sleep(0.2)  # let the server accept them all (ordering, not a speed assertion)
        with _connect(cli_server) as extra:
            status, headers, body = _response(extra)
        assert status == 503 and body["error"]["code"] == "overloaded" and int(headers["retry-after"]) >= 1
    finally:
        for s in held:
            s.close()
    deadline = time.monotonic() + 30
    while True:  # once they are gone the server answers again
        try:
            if httpx.get(f"http://{cli_server[0]}:{cli_server[1]}/healthz", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_an_early_answer_closes_a_connection_whose_body_is_still_coming(cli_server) -> None:
    with _connect(cli_server) as s:
        s.sendall(_multipart_head(100_000) + b"not a multipart body")  # refused on its first bytes (400)
        stop = threading.Event()

        def trickle() -> None:
            try:
                while not stop.wait(0.25):
                    s.sendall(b"x")
            except OSError:
                pass

        t = threading.Thread(target=trickle)
        t.start()
        try:
            status, headers, _ = _response(s)  # to EOF: the server closed it although the client kept sending
        finally:
            stop.set()
            t.join()
    assert status == 400 and headers["connection"] == "close"


def test_large_upload_decodes_run_at_a_lower_cpu_priority_than_small_ones() -> None:
    """Forward passes and the small lane get the CPU before a big decode (2 cores: contention is the latency)."""
    import os
    import threading

    from api.worker import PreparePool

    def niceness(_name: str, _data: bytes) -> int:  # type: ignore[return]
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    pool = PreparePool(niceness, threads=1)  # type: ignore[arg-type]
    try:
        small = pool.submit("s", b"", cost=1).result(timeout=30)
        large = pool.submit("l", b"", cost=10**9).result(timeout=30)
    finally:
        pool.shutdown()
    assert large > small


def test_inference_queue_puts_a_one_image_query_ahead_of_recent_multi_image_requests_without_starving_them() -> None:
    from api.worker import _STOP, PRIORITY_MAX_DELAY, _Job, _JobQueue

    def job(images: int, submitted: float) -> _Job:
        return _Job([None] * images, None, None, submitted)  # type: ignore[arg-type]

    q = _JobQueue(maxsize=10)
    big = job(2, submitted=100.0)
    bigger = job(16, submitted=100.1)
    small = job(1, submitted=100.5)  # arrives after both
    old = job(16, submitted=100.5 - PRIORITY_MAX_DELAY - 1)  # waited longer than the bounded delay
    for j in (big, bigger, _STOP, small, old):
        q.put_nowait(j)
    order = [q.get_nowait() for _ in range(5)]
    assert order == [old, small, big, bigger, _STOP]
