"""Thumbnails and the review page: made only in a store created with --thumbnails, blurred by the server for every
known-unsafe image, revealed on purpose; the page itself in a real headless Chromium against a real uvicorn server."""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import numpy as np
import pytest
from conftest import photo, run_cli, save_family
from PIL import Image

from api.app import create_app
from api.server import BackgroundServer
from indexer.extractor import Extractor
from indexer.thumbnails import THUMBNAIL_SIZE, make_thumbnail
from search.clusters import run_clustering
from search.labels import import_hash_list, label_images
from search.settings import Settings
from search.store import Store

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-gpu",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
KEYS = {"review": "k-reviewer", "read": "k-reader", "label": "k-labeller", "write": "k-writer"}
API_KEYS = (
    f"{KEYS['review']}:read+label+view_images+read_paths,{KEYS['read']}:read,{KEYS['label']}:read+label,"
    f"{KEYS['write']}:read+write"
)


def auth(role: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[role]}"}


def fine_detail(jpeg: bytes) -> float:
    """Mean distance (0..255) of an image from its own 8x8-pixel version: what is finer than an 8x8 grid of colour
    blobs. A photo has a lot; the blurred variant must have next to none."""
    img = Image.open(io.BytesIO(jpeg)).convert("RGB")
    coarse = img.resize((8, 8), Image.Resampling.BOX).resize(img.size, Image.Resampling.BILINEAR)
    return float(np.abs(pixels(jpeg) - np.asarray(coarse, dtype=np.float32)).mean())


def pixels(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=np.float32)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four near-duplicate families (groups for the page) and four single photos."""
    d = tmp_path_factory.mktemp("review-corpus")
    for seed in range(4):
        save_family(photo(seed, (200, 150)), d, f"family{seed}")
    for seed in range(10, 14):
        photo(seed, (150, 200)).save(d / f"single{seed}.png")
    return d


@pytest.fixture(scope="module")
def review_store(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path, corpus: Path) -> dict[str, Any]:
    """A store indexed by the real CLI with --thumbnails, clustered, with one image of each known-unsafe source."""
    store_dir = tmp_path_factory.mktemp("review") / "store"
    run_cli(
        "index",
        str(corpus),
        "--store",
        str(store_dir),
        "--model",
        str(checkpoint),
        "--device",
        "cpu",
        "--workers",
        "1",
        "--thumbnails",
        "--quiet",
        check=True,
    )
    with Store(store_dir, readonly=True) as store:
        ids = sorted(store.images(range(1, store.max_image_id() + 1)))
        highs = sorted(store.images(ids)[i].scores.high for i in ids)
    # the model flags the top quarter; the rest is not known-unsafe until a human or a hash list says so
    threshold = float(highs[3 * len(highs) // 4])
    settings = Settings(
        model=str(checkpoint),
        device="cpu",
        workers=0,
        store=store_dir,
        api_keys=API_KEYS,
        nsfw_level="high",
        nsfw_threshold=threshold,
        reload_seconds=0.2,
    )
    with Store.writing(store_dir, "test") as store:
        flagged = sorted(store.model_flagged(settings))
        rest = [i for i in ids if i not in flagged]
        human, listed = rest[0], rest[-1]
        label_images(store, [str(human)], "unsafe", settings, reason="test: a human said so")
        pdq = store.image(listed).pdq.hash
        import_hash_list(store, [str(pdq)], "removed", settings)
        run_clustering(store, settings)
        unsafe = store.known_unsafe(settings)
    assert human in unsafe and "human" in unsafe[human] and "hash_list" in unsafe[listed]
    assert flagged and all("model" in unsafe[i] for i in flagged)
    return {
        "dir": store_dir,
        "settings": settings,
        "ids": ids,
        "unsafe": set(unsafe),
        "human": human,
        "listed": listed,
        "flagged": flagged,
    }


@pytest.fixture(scope="module")
def server(review_store: dict[str, Any], checkpoint: Path) -> Iterator[tuple[str, httpx.Client]]:
    settings = review_store["settings"]
    app = create_app(settings, extractor=Extractor.from_settings(settings))
    with BackgroundServer(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        yield srv.url, client


def test_thumbnails_are_made_only_with_the_flag_and_dropped_with_their_image(tmp_path, checkpoint, corpus):
    flags = ["--model", str(checkpoint), "--device", "cpu", "--workers", "0", "--quiet"]
    plain, thumbs = tmp_path / "plain", tmp_path / "thumbs"
    src = tmp_path / "src"
    shutil.copytree(corpus, src)
    run_cli("index", str(src), "--store", str(plain), *flags, check=True)
    with Store(plain, readonly=True) as store:
        assert not store.thumbnails_enabled() and store.count_thumbnails() == 0
    refused = run_cli("index", str(src), "--store", str(plain), "--thumbnails", *flags)
    assert refused.returncode == 2 and "--rebuild" in refused.stderr and "without thumbnails" in refused.stderr
    run_cli("index", str(src), "--store", str(thumbs), "--thumbnails", *flags, check=True)
    with Store(thumbs, readonly=True) as store:
        gone = store.resolve_image(str(src / "single10.png"))
        gone_bytes = [store.thumbnail(gone, blurred=b) for b in (False, True)]
    photo(99).save(src / "later.png")  # a later run without the flag follows the store's choice
    (src / "single10.png").unlink()
    run_cli("index", str(src), "--store", str(thumbs), "--prune", *flags, check=True)
    with Store(thumbs, readonly=True) as store:
        ids = sorted(store.images(range(1, store.max_image_id() + 1)))
        assert store.thumbnails_enabled() and store.thumbnail_ids() == set(ids) and len(ids) == 4 * 4 + 4
        for i in ids:
            original, blurred = store.thumbnail(i, blurred=False), store.thumbnail(i, blurred=True)
            assert original is not None and blurred is not None
            img = Image.open(io.BytesIO(original))
            assert img.format == "JPEG" and max(img.size) <= THUMBNAIL_SIZE
            assert Image.open(io.BytesIO(blurred)).size == img.size
            assert fine_detail(blurred) < 3 and fine_detail(original) > 5 * fine_detail(blurred), i
        dropped = store.db.execute("SELECT COUNT(*) FROM thumbnails WHERE image_id NOT IN (SELECT id FROM images)")
        assert dropped.fetchone()[0] == 0  # the pruned image took its thumbnails with it
        assert store.count_thumbnails() == len(ids) and gone not in ids
    # and its pixels are not left behind in the database's free pages (secure_delete)
    on_disk = b"".join(f.read_bytes() for f in thumbs.glob("meta.sqlite*"))
    assert all(b and b not in on_disk for b in gone_bytes)


def test_blurred_variant_keeps_nothing_recognisable():
    a, b = make_thumbnail(photo(1, (400, 300))), make_thumbnail(photo(2, (400, 300)))
    # two different photos: their originals differ a lot, their blurred variants are near-uniform colour fields
    assert np.abs(pixels(a.original) - pixels(b.original)).mean() > 40
    for t in (a, b):
        px = pixels(t.blurred)
        assert px.std(axis=(0, 1)).max() < 12 and fine_detail(t.blurred) < 3 < 20 < fine_detail(t.original)


def test_thumbnail_route_blurs_known_unsafe_and_reveals_only_with_view_images(server, review_store):
    _, client = server
    unsafe, ids = review_store["unsafe"], review_store["ids"]
    with Store(review_store["dir"], readonly=True) as store:
        stored = {i: (store.thumbnail(i, blurred=False), store.thumbnail(i, blurred=True)) for i in ids}
    for i in ids:
        original, blurred = stored[i]
        r = client.get(f"/v1/images/{i}/thumbnail", headers=auth("review"))
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        assert r.headers["cache-control"] == "no-store"
        expected = "blurred" if i in unsafe else "original"
        assert r.headers["x-thumbnail"] == expected and r.content == (blurred if i in unsafe else original)
        for headers, status in ((auth("read"), 403), (auth("label"), 403), ({}, 401)):  # no view_images: no pixels
            r = client.get(f"/v1/images/{i}/thumbnail", headers=headers)
            assert r.status_code == status and r.headers["content-type"].startswith("application/json")
    some = sorted(unsafe)[0]
    revealed = client.get(f"/v1/images/{some}/thumbnail", params={"reveal": "true"}, headers=auth("review"))
    assert revealed.status_code == 200 and revealed.content == stored[some][0]
    assert revealed.headers["x-thumbnail"] == "original" and revealed.headers["cache-control"] == "no-store"
    for headers, status in ((auth("read"), 403), (auth("label"), 403), ({}, 401)):
        r = client.get(f"/v1/images/{some}/thumbnail", params={"reveal": "true"}, headers=headers)
        assert r.status_code == status and r.json()["error"]["code"] in {"forbidden", "unauthorized"}
    missing = client.get("/v1/images/987654/thumbnail", headers=auth("review"))
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_store_without_thumbnails_answers_404_json(tmp_path, checkpoint, corpus):
    store_dir = tmp_path / "plain"
    run_cli(
        "index",
        str(corpus),
        "--store",
        str(store_dir),
        "--model",
        str(checkpoint),
        "--device",
        "cpu",
        "--workers",
        "0",
        "--quiet",
        check=True,
    )
    settings = Settings(model=str(checkpoint), device="cpu", workers=0, store=store_dir, api_keys=API_KEYS)
    app = create_app(settings, extractor=Extractor.from_settings(settings))
    with BackgroundServer(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        r = client.get("/v1/images/1/thumbnail", headers=auth("review"))
        assert r.status_code == 404 and "--thumbnails" in r.json()["error"]["message"]
        page = client.get("/review")
        assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]


def _browser() -> Any:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: `apt-get install -y chromium` (.ci/run installs it where missing)")
    from playwright.sync_api import sync_playwright

    return sync_playwright()


def test_review_page_in_headless_chromium(server, review_store):
    """Load the page, open the most unsafe group, reveal one image, label another; every response the browser got
    is checked: no known-unsafe thumbnail unblurred without a reveal, nothing from any other host."""
    url, client = server
    unsafe = review_store["unsafe"]
    with Store(review_store["dir"], readonly=True) as store:
        ids = review_store["ids"]
        stored = {i: (store.thumbnail(i, blurred=False), store.thumbnail(i, blurred=True)) for i in ids}
    requests: list[str] = []
    responses: list[dict[str, Any]] = []
    reason = "test: labelled from the review page"
    with _browser() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            page.on("request", lambda r: requests.append(r.url))

            def relay(route: Any) -> None:
                """Every request goes through here: to our server it is relayed and its answer recorded, byte for
                byte as the browser gets it; anything else is recorded (by the request listener) and refused."""
                if not route.request.url.startswith(url.rstrip("/") + "/"):
                    route.abort()
                    return
                got = route.fetch()
                body = got.body()
                responses.append({"url": got.url, "status": got.status, "headers": got.headers, "body": body})
                route.fulfill(response=got, body=body)

            page.route("**/*", relay)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)

            first = page.goto(url + "/review")
            assert first is not None and first.status == 200
            csp = first.headers["content-security-policy"]
            assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
            page.fill("#key", KEYS["review"])
            page.click("#key-use")
            page.wait_for_selector("#cluster-list button[data-cluster]")
            groups = client.get("/v1/clusters", params={"kind": "group", "sort": "unsafe"}).json()["items"]
            top = groups[0]
            assert top["unsafe_count"] >= 1
            listed = page.locator("#cluster-list button[data-cluster]")
            assert listed.first.get_attribute("data-cluster") == str(top["id"])  # the most unsafe first
            listed.first.click()
            page.wait_for_function("n => document.querySelectorAll('#member-grid img').length === n", arg=top["size"])
            cards = page.locator("#member-grid .card")
            members = [int(cards.nth(i).get_attribute("data-id") or 0) for i in range(cards.count())]
            assert sorted(members) == sorted(m["id"] for m in client.get(f"/v1/clusters/{top['id']}").json()["members"])
            for m in members:
                variant = page.get_attribute(f".card[data-id='{m}'] img", "data-variant")
                assert variant == ("blurred" if m in unsafe else "original"), m

            # reveal one known-unsafe member on purpose: click its thumbnail
            shown = next(m for m in members if m in unsafe)
            page.click(f".card[data-id='{shown}'] [data-role=thumb]")
            page.wait_for_selector(f".card[data-id='{shown}'] img[data-variant=original]")
            page.click(f".card[data-id='{shown}'] [data-role=thumb]")  # and blur it again
            page.wait_for_selector(f".card[data-id='{shown}'] img[data-variant=blurred]")

            # label a member that is not known-unsafe (or, if all are, any other) through the page
            target = next((m for m in members if m not in unsafe), next(m for m in members if m != shown))
            page.click(f".card[data-id='{target}'] [data-role=details]")
            page.wait_for_selector("#detail-body [data-role=detail-label]")
            page.wait_for_selector("#neighbours h4")
            page.fill("#reason", reason)
            page.click("#label-unsafe")
            page.wait_for_function("() => document.querySelector('#label-state').textContent.startsWith('recorded')")
            page.wait_for_function(
                "r => [...document.querySelectorAll('#history td')].some(td => td.textContent === r)", arg=reason
            )
            page.wait_for_selector(f".card[data-id='{target}'] img[data-variant=blurred]")
            assert not errors, errors
            not_ok = [(r["url"], r["status"]) for r in responses if r["status"] >= 400]
            assert not not_ok, not_ok
        finally:
            browser.close()

    # the label is in the next API answer
    detail = client.get(f"/v1/images/{target}").json()
    assert detail["label"] == "unsafe" and "human" in detail["known_unsafe_sources"]
    assert detail["labels"][-1]["reason"] == reason and detail["labels"][-1]["who"].startswith("api-key:")

    # every thumbnail the browser received: a known-unsafe image only ever unblurred after a reveal
    thumbs = [r for r in responses if "/thumbnail" in r["url"]]
    assert len(thumbs) >= len(members) + 2
    revealed = []
    label_put = next(i for i, r in enumerate(responses) if r["url"].endswith(f"/v1/images/{target}/label"))
    for n, r in enumerate(responses):
        if "/thumbnail" not in r["url"]:
            continue
        parts = urlsplit(r["url"])
        image_id = int(parts.path.split("/")[3])
        reveal = parse_qs(parts.query).get("reveal") == ["true"]
        original, blurred = stored[image_id]
        assert r["status"] == 200 and r["headers"]["cache-control"] == "no-store"
        assert r["body"] in (original, blurred)
        now_unsafe = image_id in unsafe or (image_id == target and n > label_put)
        if reveal:
            revealed.append(image_id)
            assert r["body"] == original
        elif now_unsafe:
            assert r["body"] == blurred and r["body"] != original, (n, image_id)
            assert r["headers"]["x-thumbnail"] == "blurred"
    assert revealed == [shown]
    # nothing was requested from any host but our server (thumbnails are shown from blob: URLs of our origin)
    origin = url.rstrip("/")
    strangers = [u for u in requests if not (u.startswith(origin + "/") or u.startswith(f"blob:{origin}/"))]
    assert not strangers, strangers
    assert any(u.endswith("/review/review.js") for u in requests) and any(u.endswith("/review.css") for u in requests)


def test_http_add_keeps_thumbnails_in_a_store_that_keeps_them(server, review_store):
    """Runs last in this module: it adds an image to the shared store."""
    _, client = server
    buf = io.BytesIO()
    photo(77, (300, 220)).save(buf, "PNG")
    r = client.post("/v1/images", files={"file": ("new.png", buf.getvalue(), "image/png")}, headers=auth("write"))
    assert r.status_code == 200, r.text
    new = r.json()["id"]
    with Store(review_store["dir"], readonly=True) as store:
        original, blurred = store.thumbnail(new, blurred=False), store.thumbnail(new, blurred=True)
    assert original and blurred and Image.open(io.BytesIO(original)).size == (256, 188)
    assert fine_detail(blurred) < 3 < fine_detail(original)
    served = client.get(f"/v1/images/{new}/thumbnail", headers=auth("review"))
    variant = served.headers["x-thumbnail"]
    assert served.status_code == 200 and served.content == (blurred if variant == "blurred" else original)
    assert client.get(f"/v1/images/{new}/thumbnail", headers=auth("read")).status_code == 403
