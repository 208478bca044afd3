"""Safe decoding: every Pillow mode to exact RGB, EXIF orientations, first frames, caps, bombs and refusals."""

from __future__ import annotations

import io
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from indexer.decode import ALLOWED_FORMATS, BACKGROUND, DecodedImage, decode_image, read_image_file, to_rgb
from search.errors import InvalidImage

MAX_BYTES = 64 * 1024 * 1024
MAX_PIXELS = 89_478_485  # the project default (Pillow's own limit)
WHITE = (255, 255, 255)
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def decode(path: Path, *, max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS) -> DecodedImage:
    data, decoded = read_image_file(path, max_bytes=max_bytes, max_pixels=max_pixels)
    assert len(data) == decoded.size_bytes == path.stat().st_size
    assert decoded.image.mode == "RGB"
    assert decoded.image.size == (decoded.width, decoded.height)
    return decoded


def save(tmp_path: Path, name: str, img: Image.Image, fmt: str, **params: object) -> Path:
    path = tmp_path / name
    img.save(path, fmt, **params)
    return path


def pixels(decoded: DecodedImage | Image.Image) -> list[tuple[int, ...]]:
    """Row-major RGB tuples."""
    img = decoded.image if isinstance(decoded, DecodedImage) else decoded
    assert img.mode == "RGB"
    return [tuple(p) for p in np.asarray(img).reshape(-1, 3).tolist()]


def refused(path: Path, kind: str, *words: str, **limits: int) -> InvalidImage:
    """Assert the file is refused with `kind`, a message that names it and says `words`."""
    with pytest.raises(InvalidImage) as info:
        decode(path, **limits)
    err = info.value
    assert err.kind == kind, str(err)
    assert err.name == str(path)
    assert str(path) in str(err)
    for word in words:
        assert word in err.reason, err.reason
    return err


def pixel_at(decoded: DecodedImage, xy: tuple[int, int]) -> tuple[int, ...]:
    x, y = xy
    return tuple(np.asarray(decoded.image)[y, x].tolist())


def close(a: tuple[int, ...], b: tuple[int, ...], tol: int) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


# ---------------------------------------------------------------- modes, through real encoded files


def test_rgb_png_exact(tmp_path: Path) -> None:
    img = Image.new("RGB", (3, 2), (10, 20, 30))
    img.putpixel((2, 1), (200, 100, 50))
    path = save(tmp_path, "a.png", img, "PNG")
    decoded = decode(path)
    assert (decoded.format, decoded.width, decoded.height) == ("PNG", 3, 2)
    assert pixels(decoded) == [(10, 20, 30)] * 5 + [(200, 100, 50)]


def test_mode_1_png(tmp_path: Path) -> None:
    img = Image.new("1", (2, 1), 0)
    img.putpixel((1, 0), 1)
    path = save(tmp_path, "bits.png", img, "PNG")
    assert Image.open(path).mode == "1"
    assert pixels(decode(path)) == [(0, 0, 0), WHITE]


def test_mode_l_png(tmp_path: Path) -> None:
    img = Image.new("L", (2, 1), 77)
    img.putpixel((1, 0), 200)
    assert pixels(decode(save(tmp_path, "grey.png", img, "PNG"))) == [(77, 77, 77), (200, 200, 200)]


def test_mode_la_png_composited_on_white(tmp_path: Path) -> None:
    img = Image.new("LA", (3, 1))
    for x, value in enumerate([(77, 255), (0, 0), (0, 128)]):
        img.putpixel((x, 0), value)
    path = save(tmp_path, "grey-alpha.png", img, "PNG")
    assert Image.open(path).mode == "LA"
    opaque, clear, half = pixels(decode(path))
    assert opaque == (77, 77, 77)
    assert clear == WHITE
    assert close(half, (127, 127, 127), 1)  # black at alpha 128/255 over white: 255 * 127/255


def palette_image() -> Image.Image:
    img = Image.new("P", (3, 1), 0)
    img.putpalette([*RED, *GREEN, *BLUE])
    img.putpixel((1, 0), 1)
    img.putpixel((2, 0), 2)
    return img


def test_mode_p_png(tmp_path: Path) -> None:
    path = save(tmp_path, "pal.png", palette_image(), "PNG")
    assert Image.open(path).mode == "P"
    assert pixels(decode(path)) == [RED, GREEN, BLUE]


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_mode_p_with_transparent_index(tmp_path: Path, fmt: str) -> None:
    path = save(tmp_path, f"pal-trns.{fmt.lower()}", palette_image(), fmt, transparency=0)
    with Image.open(path) as check:
        assert check.mode == "P" and check.info["transparency"] == 0
    # the transparent red index shows the background, never red
    assert pixels(decode(path)) == [WHITE, GREEN, BLUE]


def test_mode_p_png_with_per_index_alpha(tmp_path: Path) -> None:
    path = save(tmp_path, "pal-alpha.png", palette_image(), "PNG", transparency=bytes([0, 128, 255]))
    clear, half_green, blue = pixels(decode(path))
    assert clear == WHITE
    assert close(half_green, (127, 255, 127), 1)
    assert blue == BLUE


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "TIFF"])
def test_mode_rgba_composited_on_white(tmp_path: Path, fmt: str) -> None:
    img = Image.new("RGBA", (3, 1))
    for x, value in enumerate([(255, 0, 0, 0), (0, 0, 0, 128), (10, 20, 30, 255)]):
        img.putpixel((x, 0), value)
    params = {"lossless": True, "exact": True} if fmt == "WEBP" else {}
    path = save(tmp_path, f"rgba.{fmt.lower()}", img, fmt, **params)
    assert Image.open(path).mode == "RGBA"
    clear_red, half_black, opaque = pixels(decode(path))
    assert clear_red == WHITE == BACKGROUND
    assert close(half_black, (127, 127, 127), 1)
    assert opaque == (10, 20, 30)


def test_rgb_png_with_trns_colour(tmp_path: Path) -> None:
    img = Image.new("RGB", (2, 1), (1, 2, 3))
    img.putpixel((1, 0), (200, 0, 0))
    path = save(tmp_path, "rgb-trns.png", img, "PNG", transparency=(1, 2, 3))
    assert pixels(decode(path)) == [WHITE, (200, 0, 0)]


def test_cmyk_jpeg_pure_cyan(tmp_path: Path) -> None:
    # Pillow writes CMYK JPEGs with the Adobe marker (inverted samples) and un-inverts them on load
    path = save(tmp_path, "cyan.jpg", Image.new("CMYK", (16, 16), (255, 0, 0, 0)), "JPEG", quality=95)
    assert Image.open(path).mode == "CMYK"
    decoded = decode(path)
    assert decoded.format == "JPEG"
    assert all(close(p, (0, 255, 255), 3) for p in pixels(decoded))


def test_cmyk_tiff_exact(tmp_path: Path) -> None:
    img = Image.new("CMYK", (3, 1))
    for x, value in enumerate([(255, 0, 0, 0), (0, 0, 0, 255), (0, 0, 0, 0)]):
        img.putpixel((x, 0), value)
    path = save(tmp_path, "cmyk.tif", img, "TIFF")
    assert Image.open(path).mode == "CMYK"
    assert pixels(decode(path)) == [(0, 255, 255), (0, 0, 0), WHITE]


def test_ycbcr_tiff(tmp_path: Path) -> None:
    img = Image.new("YCbCr", (2, 1), (100, 128, 128))
    img.putpixel((1, 0), (255, 128, 128))
    path = save(tmp_path, "ycc.tif", img, "TIFF")
    assert Image.open(path).mode == "YCbCr"
    assert pixels(decode(path)) == [(100, 100, 100), WHITE]


def test_lab_tiff(tmp_path: Path) -> None:
    # Pillow's LAB: L* scaled to 0..255, a* and b* offset by 128. Neutral mid grey and a saturated red.
    img = Image.new("LAB", (2, 1), (127, 128, 128))
    img.putpixel((1, 0), (138, 209, 198))
    path = save(tmp_path, "lab.tif", img, "TIFF")
    assert Image.open(path).mode == "LAB"
    grey, red = pixels(decode(path))
    assert grey[0] == grey[1] == grey[2] and 110 <= grey[0] <= 125
    assert red[0] > 240 and red[1] < 15 and red[2] < 15


SIXTEEN_BIT = [0, 257, 32768, 65535]
SIXTEEN_BIT_AS_8 = [0, 1, 128, 255]


def wide_image(mode: str, values: list[int] | list[float]) -> Image.Image:
    img = Image.new(mode, (len(values), 1))
    for x, value in enumerate(values):
        img.putpixel((x, 0), value)
    return img


@pytest.mark.parametrize(("mode", "fmt"), [("I;16", "PNG"), ("I;16", "TIFF"), ("I;16B", "TIFF")])
def test_16_bit_grey_scaled_by_bit_depth(tmp_path: Path, mode: str, fmt: str) -> None:
    path = save(tmp_path, f"deep.{fmt.lower()}", wide_image(mode, SIXTEEN_BIT), fmt)
    with Image.open(path) as check:
        assert check.mode == mode
    assert pixels(decode(path)) == [(v, v, v) for v in SIXTEEN_BIT_AS_8]


def test_16_bit_grey_png_with_trns(tmp_path: Path) -> None:
    path = save(tmp_path, "deep-trns.png", wide_image("I;16", [1000, 65535]), "PNG", transparency=1000)
    assert pixels(decode(path)) == [WHITE, (255, 255, 255)]
    path = save(tmp_path, "deep-trns2.png", wide_image("I;16", [1000, 32768]), "PNG", transparency=1000)
    assert pixels(decode(path)) == [WHITE, (128, 128, 128)]


def test_32_bit_signed_int_tiff(tmp_path: Path) -> None:
    path = save(tmp_path, "int32.tif", wide_image("I", [-5, 0, 1 << 30, (1 << 31) - 1]), "TIFF")
    with Image.open(path) as check:
        assert check.mode == "I"
    assert pixels(decode(path)) == [(0, 0, 0), (0, 0, 0), (128, 128, 128), WHITE]


def test_mode_i_without_tags_is_16_bit() -> None:
    assert pixels(to_rgb(wide_image("I", [-1, 32768, 65535, 70000]))) == [
        (0, 0, 0),
        (128, 128, 128),
        WHITE,
        WHITE,
    ]


def test_float_tiff_unit_range(tmp_path: Path) -> None:
    path = save(tmp_path, "unit.tif", wide_image("F", [0.0, 0.25, 1.0, -0.5, float("nan")]), "TIFF")
    with Image.open(path) as check:
        assert check.mode == "F"
    assert pixels(decode(path)) == [(0, 0, 0), (64, 64, 64), WHITE, (0, 0, 0), (0, 0, 0)]


def test_float_tiff_byte_range(tmp_path: Path) -> None:
    path = save(tmp_path, "bytes.tif", wide_image("F", [0.0, 12.4, 200.0, 300.0]), "TIFF")
    assert pixels(decode(path)) == [(0, 0, 0), (12, 12, 12), (200, 200, 200), WHITE]


def test_bmp(tmp_path: Path) -> None:
    decoded = decode(save(tmp_path, "a.bmp", Image.new("RGB", (2, 2), (9, 8, 7)), "BMP"))
    assert decoded.format == "BMP"
    assert pixels(decoded) == [(9, 8, 7)] * 4


# modes no accepted format stores: converted in memory


def test_hsv_in_memory() -> None:
    assert to_rgb(Image.new("HSV", (1, 1), (0, 255, 255))).getpixel((0, 0)) == RED


def test_pa_in_memory() -> None:
    img = Image.new("PA", (2, 1))
    img.putpalette([*RED, *GREEN])
    img.putpixel((0, 0), (0, 0))  # red, fully transparent
    img.putpixel((1, 0), (1, 255))  # green, opaque
    assert pixels(to_rgb(img)) == [WHITE, GREEN]


def test_rgb_is_returned_as_is() -> None:
    img = Image.new("RGB", (1, 1))
    assert to_rgb(img) is img


# ---------------------------------------------------------------- EXIF orientation

# Where the stored top-left corner is displayed, per the EXIF/TIFF Orientation definitions (row 0 / column 0 sides)
CORNER_SHOWN = {1: "TL", 2: "TR", 3: "BR", 4: "BL", 5: "TL", 6: "TR", 7: "BR", 8: "BL"}
TRANSPOSE = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,  # 90 degrees clockwise
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,  # 90 degrees counter-clockwise
}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation(tmp_path: Path, orientation: int) -> None:
    width, height, block = 64, 32, 16
    src = Image.new("RGB", (width, height), BLUE)
    src.paste(RED, (0, 0, block, block))  # marks the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = save(tmp_path, f"o{orientation}.jpg", src, "JPEG", quality=95, subsampling=0, exif=exif.tobytes())

    decoded = decode(path)
    swapped = orientation >= 5
    assert (decoded.width, decoded.height) == ((height, width) if swapped else (width, height))

    w, h, c = decoded.width, decoded.height, block // 2
    probes = {"TL": (c, c), "TR": (w - 1 - c, c), "BR": (w - 1 - c, h - 1 - c), "BL": (c, h - 1 - c)}
    for corner, xy in probes.items():
        want = RED if corner == CORNER_SHOWN[orientation] else BLUE
        assert close(pixel_at(decoded, xy), want, 12), (orientation, corner)

    method = TRANSPOSE[orientation]
    expected = np.asarray(src if method is None else src.transpose(method), dtype=np.int16)
    assert np.abs(np.asarray(decoded.image, dtype=np.int16) - expected).max() <= 40  # JPEG ringing at the edges


# ---------------------------------------------------------------- animations: the first frame


@pytest.mark.parametrize(
    ("fmt", "suffix", "params"),
    [
        ("GIF", "gif", {"duration": 50, "loop": 0}),
        ("PNG", "png", {"duration": 50}),
        ("WEBP", "webp", {"lossless": True, "duration": 50}),
        ("TIFF", "tif", {}),
        ("MPO", "jpg", {"quality": 95}),
    ],
)
def test_animation_first_frame(tmp_path: Path, fmt: str, suffix: str, params: dict[str, object]) -> None:
    frames = [Image.new("RGB", (16, 16), colour) for colour in (RED, GREEN, BLUE)]
    path = save(tmp_path, f"anim.{suffix}", frames[0], fmt, save_all=True, append_images=frames[1:], **params)
    with Image.open(path) as check:
        assert getattr(check, "n_frames", 1) == 3
    decoded = decode(path)
    assert decoded.format == fmt
    assert all(close(p, RED, 2) for p in pixels(decoded))


# ---------------------------------------------------------------- refusals


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    refused(path, "invalid", "zero-byte file")
    with pytest.raises(InvalidImage, match="upload: zero-byte file"):
        decode_image(b"", "upload", max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS)


@pytest.mark.parametrize("keep", ["half", "header-only"])
def test_truncated_jpeg(tmp_path: Path, keep: str) -> None:
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    buf = io.BytesIO()
    noise.save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2] if keep == "half" else data[:300])  # 300: cut inside the tables
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    refused(path, "invalid", "truncated or corrupt JPEG data")


def test_truncated_png(tmp_path: Path) -> None:
    noise = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    buf = io.BytesIO()
    noise.save(buf, "PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    refused(path, "invalid", "truncated or corrupt PNG data")


def test_broken_header_of_known_format_is_invalid_not_unknown(tmp_path: Path) -> None:
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    refused(path, "invalid", "corrupt PNG data")


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height 1-bit pixels, with a tiny IDAT: a few dozen bytes in all."""

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")
    )


def test_decompression_bomb_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb_png(30000, 30000))
    filters = list(warnings.filters)
    loads = []  # refused from the header: not one pixel is decoded
    real_load = ImageFile.ImageFile.load

    def counting_load(self: ImageFile.ImageFile) -> object:
        loads.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    refused(path, "too_large", "900000000 pixels", f"limit of {MAX_PIXELS}", "--max-pixels")
    assert loads == []
    assert warnings.filters == filters  # the escalation does not leak
    assert Image.MAX_IMAGE_PIXELS == MAX_PIXELS  # nor is Pillow's global touched


def test_bomb_refused_whatever_pillows_global_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb_png(30000, 30000))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # someone switched Pillow's check off
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        refused(path, "too_large", "30000x30000 = 900000000 pixels exceeds the limit of 89478485")


def test_pixel_cap_is_ours(tmp_path: Path) -> None:
    path = save(tmp_path, "square.png", Image.new("RGB", (100, 100)), "PNG")
    refused(path, "too_large", "100x100 = 10000 pixels exceeds the limit of 5000 (raise --max-pixels)", max_pixels=5000)
    assert decode(path, max_pixels=10000).width == 100


def test_pillow_limit_below_ours(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    medium = save(tmp_path, "medium.png", Image.new("RGB", (40, 40)), "PNG")  # 1600: between Pillow's 1000 and 2000
    big = save(tmp_path, "big.png", Image.new("RGB", (50, 50)), "PNG")  # 2500: above Pillow's hard 2 * 1000
    # max_pixels <= Pillow's limit: Pillow's warning is escalated and reported in our words
    refused(medium, "too_large", "1600 pixels exceeds the limit of 1000", max_pixels=1000)
    # a larger max_pixels is honoured up to Pillow's hard ceiling, and the message says which limit bit
    assert decode(medium, max_pixels=10000).width == 40
    refused(big, "too_large", "ceiling of 2000", max_pixels=10000)


def test_file_over_byte_cap_is_not_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "huge.jpg"
    with path.open("wb") as fh:
        fh.truncate(4 * 1024**3)  # sparse: 4 GiB that must never be read

    def no_open(*args: object, **kwargs: object) -> int:
        raise AssertionError("the file was opened")

    monkeypatch.setattr(os, "open", no_open)
    refused(path, "too_large", f"file of {4 * 1024**3} bytes exceeds the limit of 1048576 bytes", max_bytes=1024**2)


def test_bytes_over_byte_cap() -> None:
    with pytest.raises(InvalidImage) as info:
        decode_image(b"x" * 11, "upload", max_bytes=10, max_pixels=MAX_PIXELS)
    assert info.value.kind == "too_large"
    assert str(info.value) == "upload: file of 11 bytes exceeds the limit of 10 bytes (raise --max-file-bytes)"


def test_text_file_named_jpg(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("these are not the pixels you are looking for\n" * 20)
    refused(path, "unsupported_format", "not an image in a recognised format", "JPEG")


@pytest.mark.parametrize(("fmt", "suffix"), [("ICO", "ico"), ("PCX", "pcx"), ("TGA", "tga")])
def test_format_not_allowlisted(tmp_path: Path, fmt: str, suffix: str) -> None:
    assert fmt not in ALLOWED_FORMATS
    path = save(tmp_path, f"icon.{suffix}", Image.new("RGB", (16, 16), RED), fmt)
    refused(path, "unsupported_format", f"format '{fmt}' is not accepted", "accepted: AVIF, BMP, GIF, HEIF, JPEG")


def test_directory_refused(tmp_path: Path) -> None:
    path = tmp_path / "folder.jpg"
    path.mkdir()
    refused(path, "invalid", "not a regular file (a directory)")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifo_refused_without_blocking(tmp_path: Path) -> None:
    path = tmp_path / "pipe.jpg"
    os.mkfifo(path)
    refused(path, "invalid", "not a regular file (a FIFO)")


def test_missing_file(tmp_path: Path) -> None:
    refused(tmp_path / "gone.jpg", "invalid", "cannot read the file")


def test_decode_image_from_bytes() -> None:
    buf = io.BytesIO()
    Image.new("L", (5, 3), 9).save(buf, "PNG")
    decoded = decode_image(buf.getvalue(), "upload", max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS)
    assert (decoded.format, decoded.width, decoded.height, decoded.size_bytes) == ("PNG", 5, 3, len(buf.getvalue()))
    assert decoded.image.mode == "RGB" and decoded.image.getpixel((4, 2)) == (9, 9, 9)
