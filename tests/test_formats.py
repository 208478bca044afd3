"""AVIF (Pillow's own plugin) and HEIC/HEIF (pillow-heif): walked, decoded in the worker processes, under the same
caps as JPEG, indexed with their size and format, accepted as uploads."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import httpx
import pillow_heif
import pytest
from click.testing import CliRunner
from conftest import index_dir, photo
from PIL import Image, features

from api.app import create_app
from api.server import BackgroundServer
from indexer import bmff
from indexer.cli import cli
from indexer.corpus import Item, walk
from indexer.decode import decode_cost, decode_image
from search.errors import InvalidImage
from search.store import Store

MAX_BYTES = 16 * 1024 * 1024
MAX_PIXELS = 89_478_485


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    """`img` written by Pillow (AVIF, JPEG, PNG) or by pillow-heif's encoder (HEIF)."""
    buf = io.BytesIO()
    if fmt == "HEIF":
        pillow_heif.from_pillow(img).save(buf, quality=90, **params)
    else:
        img.save(buf, fmt, quality=90, **params)
    return buf.getvalue()


def declaring(data: bytes, width: int, height: int) -> bytes:
    """`data` with every `ispe` property rewritten to declare `width` x `height` (the coded pixels stay small)."""
    out = bytearray(data)
    at = out.find(b"ispe")
    assert at > 0 and out.count(b"ispe") == 1
    out[at + 8 : at + 16] = struct.pack(">II", width, height)  # after the type: version and flags, then the size
    return bytes(out)


def decode(data: bytes, name: str = "upload", **kw: int) -> object:
    return decode_image(data, name, max_bytes=MAX_BYTES, max_pixels=kw.pop("max_pixels", MAX_PIXELS), **kw)


def refusal(data: bytes, **kw: int) -> InvalidImage:
    with pytest.raises(InvalidImage) as info:
        decode(data, **kw)
    return info.value


def test_the_libraries_read_and_write_these_formats() -> None:
    assert features.check("avif"), "Pillow was built without AVIF"
    assert pillow_heif.libheif_info()["decoders"], "pillow-heif has no HEVC decoder"
    assert bmff.brand_format(encode(photo(0), "AVIF")) == "AVIF"
    assert bmff.brand_format(encode(photo(0), "HEIF")) == "HEIF"
    assert bmff.brand_format(encode(photo(0), "JPEG")) is None


@pytest.mark.parametrize("fmt", ["AVIF", "HEIF"])
def test_decoded_with_size_format_and_orientation(fmt: str) -> None:
    src = Image.new("RGB", (96, 80), (200, 30, 30))
    src.paste((30, 30, 200), (0, 0, 24, 12))  # a blue corner at the top left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    got = decode(encode(src, fmt, exif=exif.tobytes()))
    assert (got.format, got.width, got.height, got.image.mode) == (fmt, 80, 96, "RGB")
    r, g, b = got.image.getpixel((got.width - 2, 1))  # the blue corner is now at the top right
    assert b > 150 and r < 80, (r, g, b)
    # the reduced decode keeps the full size in width/height
    small = decode(encode(photo(1, (256, 200)), fmt), min_side=100)
    assert small.reduced and (small.width, small.height) == (256, 200) and small.image.size == (128, 100)


def test_a_heif_decodes_its_primary_image_not_its_first() -> None:
    first, primary = Image.new("RGB", (64, 48), (255, 0, 0)), Image.new("RGB", (40, 30), (0, 0, 255))
    buf = io.BytesIO()
    first.save(buf, "HEIF", save_all=True, append_images=[primary], primary_index=1)
    got = decode(buf.getvalue())
    assert (got.width, got.height) == (40, 30)
    assert got.image.getpixel((5, 5))[2] > 200


@pytest.mark.parametrize("fmt", ["AVIF", "HEIF", "JPEG"])
def test_pixel_cap_refuses_from_the_header_with_the_jpeg_error_kind(fmt: str) -> None:
    data = encode(photo(2, (128, 128)), fmt)
    err = refusal(data, max_pixels=128 * 128 - 1)
    assert err.kind == "too_large"
    assert "image of 128x128 = 16384 pixels exceeds the limit of 16383 (raise --max-pixels)" in err.reason
    assert decode_cost(data, max_pixels=128 * 128 - 1, min_side=None) == 0  # nothing charged, nothing decoded


@pytest.mark.parametrize("fmt", ["AVIF", "HEIF"])
def test_a_declared_size_over_the_cap_is_refused_before_any_pixel_is_decoded(fmt: str) -> None:
    """The container declares 6000x5000 over 128x128 of coded pixels: refused on the declaration (decoding would
    fail, or allocate the declared size), with the limit's own message."""
    lie = declaring(encode(photo(3, (128, 128)), fmt), 6000, 5000)
    err = refusal(lie, max_pixels=20_000_000)
    assert err.kind == "too_large"
    assert "image of 6000x5000 = 30000000 pixels exceeds the limit of 20000000" in err.reason


def test_an_avif_past_libavifs_own_limit_is_too_large_not_corrupt() -> None:
    """libavif refuses 20000x20000 while parsing (past its 16384^2 limit): still reported as the pixel cap."""
    lie = declaring(encode(photo(4, (64, 64)), "AVIF"), 20000, 20000)
    assert bmff.declared_size(lie) == (20000, 20000)
    err = refusal(lie)
    assert err.kind == "too_large"
    assert f"image of 20000x20000 = 400000000 pixels exceeds the limit of {MAX_PIXELS}" in err.reason
    jpeg = refusal(declaring_jpeg(20000, 20000))  # the same declaration in a JPEG: the same kind
    assert jpeg.kind == "too_large"


def declaring_jpeg(width: int, height: int) -> bytes:
    data = bytearray(encode(photo(4, (64, 64)), "JPEG"))
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@pytest.mark.parametrize("fmt", ["AVIF", "HEIF"])
def test_corrupt_data_is_invalid_and_names_the_format(fmt: str) -> None:
    data = encode(photo(5), fmt)
    truncated = refusal(data[: len(data) - 40])
    assert truncated.kind == "invalid" and f"truncated or corrupt {fmt} data" in truncated.reason
    header = refusal(data[:60])
    assert header.kind == "invalid" and f"truncated or corrupt {fmt} data" in header.reason


def test_walked_by_default_and_indexed_in_worker_processes_with_a_corrupt_heic(tmp_path: Path, checkpoint) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    files = {
        "a.avif": encode(photo(10, (96, 80)), "AVIF"),
        "b.heic": encode(photo(11, (72, 64)), "HEIF"),
        "c.HEIF": encode(photo(12, (64, 96)), "HEIF"),
        "d.hif": encode(photo(13, (80, 80)), "HEIF"),
        "e.png": encode(photo(14), "PNG"),
    }
    heic = encode(photo(15), "HEIF")
    files["broken.heic"] = heic[: len(heic) // 2]
    for name, data in files.items():
        (corpus / name).write_bytes(data)
    assert sorted(Path(i.key).name for i in walk([str(corpus)]) if isinstance(i, Item)) == sorted(files)

    store = tmp_path / "store"
    args = ["index", str(corpus), "--store", str(store), "--model", str(checkpoint), "--workers", "1", "--json"]
    res = CliRunner().invoke(cli, args)  # in this process; the decoding runs in one spawned worker process
    assert res.exit_code == 1, res.output  # some inputs failed, the others were indexed
    out = json.loads(res.stdout)
    assert out["new_images"] == 5, out
    with Store(store, readonly=True) as st:
        rows = st.images(list(range(1, st.max_image_id() + 1)))
        by_name = {Path(st.paths_of([i])[i][0]).name: row for i, row in rows.items()}
        [error] = st.errors()
    got = {name: (row.format, row.width, row.height) for name, row in by_name.items()}
    assert got == {
        "a.avif": ("AVIF", 96, 80),
        "b.heic": ("HEIF", 72, 64),
        "c.HEIF": ("HEIF", 64, 96),
        "d.hif": ("HEIF", 80, 80),
        "e.png": ("PNG", 96, 80),
    }
    assert Path(error["path"]).name == "broken.heic" and error["kind"] == "invalid"
    assert "truncated or corrupt HEIF data" in error["reason"]


def test_the_index_run_records_the_pixel_cap_like_for_a_jpeg(tmp_path: Path, settings_for, extractor) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, fmt in [("big.avif", "AVIF"), ("big.heic", "HEIF"), ("big.jpg", "JPEG")]:
        (corpus / name).write_bytes(encode(photo(20, (128, 128)), fmt))
    (corpus / "small.heic").write_bytes(encode(photo(21, (64, 64)), "HEIF"))
    summary = index_dir(tmp_path / "store", [str(corpus)], settings_for(max_pixels=100 * 100), extractor=extractor)
    assert summary.new_images == 1
    with Store(tmp_path / "store", readonly=True) as st:
        kinds = {Path(e["path"]).name: e["kind"] for e in st.errors()}
    assert kinds == {"big.avif": "too_large", "big.heic": "too_large", "big.jpg": "too_large"}


def test_uploads_of_avif_and_heic(tmp_path: Path, settings_for, extractor) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    avif, heic = encode(photo(30), "AVIF"), encode(photo(31), "HEIF")
    (corpus / "known.avif").write_bytes(avif)
    (corpus / "other.png").write_bytes(encode(photo(32), "PNG"))
    store = tmp_path / "store"
    index_dir(store, [str(corpus)], settings_for(), extractor=extractor)
    settings = settings_for(store=store, http_max_pixels=10_000)
    big = encode(photo(33, (128, 128)), "HEIF")
    with (
        BackgroundServer(create_app(settings, extractor=extractor)) as server,
        httpx.Client(base_url=server.url, timeout=30) as client,
    ):
        r = client.post(
            "/v1/query",
            files=[("files", ("k.avif", avif, "image/avif")), ("files", ("h.heic", heic, "image/heic"))],
        )
        assert r.status_code == 200, r.text
        known, other = r.json()["results"]
        assert (known["filename"], other["filename"]) == ("k.avif", "h.heic")
        assert known["indexed_id"] is not None and other["indexed_id"] is None
        too_big = client.post("/v1/query", files={"file": ("big.heif", big, "image/heif")})
        assert too_big.status_code == 413, too_big.text
        assert "exceeds the limit of 10000" in too_big.json()["error"]["message"]
