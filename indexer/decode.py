"""Safe decoding of untrusted image bytes into an RGB Pillow image: caps, format allowlist, EXIF, frames, modes."""

from __future__ import annotations

import io
import os
import re
import stat
import struct
import warnings
from dataclasses import dataclass

import numpy as np
import pillow_heif
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from indexer import bmff
from search.errors import InvalidImage

# HEIC/HEIF through pillow-heif (AVIF is Pillow's own). Registered on import, so in every decoder process too; no
# thumbnails, depth or auxiliary images: only the primary image is ever decoded.
pillow_heif.register_heif_opener(thumbnails=False, depth_images=False, aux_images=False)

#: Pillow format names we decode. MPO is how Pillow names a JPEG that carries extra (multi-picture) frames.
ALLOWED_FORMATS: frozenset[str] = frozenset({"JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF", "HEIF"})

#: The fixed colour that transparent areas are composited on, so that one image always gives one RGB result.
BACKGROUND: tuple[int, int, int] = (255, 255, 255)

_ACCEPTED = ", ".join(sorted(ALLOWED_FORMATS))

#: The plugins allowed to parse the bytes at all. MPO has no opener of its own: the JPEG plugin returns it.
_OPENERS: tuple[str, ...] = tuple(sorted(ALLOWED_FORMATS - {"MPO"}))

#: What Pillow's plugins raise on hostile or broken input (RuntimeError covers RecursionError). MemoryError and
#: KeyboardInterrupt are not in it: they are not facts about the image.
_DECODE_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
    OverflowError,
    NotImplementedError,
    RuntimeError,
)

_IDENTIFY_ERRORS: tuple[type[Exception], ...] = (Image.DecompressionBombError, *_DECODE_ERRORS)

#: Integer and float modes whose samples do not fit 0..255 and need scaling, not Pillow's clipping `convert`.
_WIDE_INT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})

#: Signatures of the accepted formats, so that a broken header of a known format reads "corrupt", not "unknown".
_SIGNATURES: tuple[tuple[str, re.Pattern[bytes]], ...] = (
    ("JPEG", re.compile(rb"\A\xff\xd8\xff")),
    ("PNG", re.compile(rb"\A\x89PNG\r\n\x1a\n")),
    ("GIF", re.compile(rb"\AGIF8[79]a")),
    ("WEBP", re.compile(rb"\ARIFF.{4}WEBP", re.DOTALL)),
    ("TIFF", re.compile(rb"\A(?:II[*+]\x00|MM\x00[*+])")),
    ("BMP", re.compile(rb"\ABM.{4}\x00\x00\x00\x00", re.DOTALL)),  # file size, then two reserved zero words
)

_BOMB_PIXELS = re.compile(r"\((\d+) pixels\) exceeds limit of (\d+) pixels")


@dataclass(frozen=True)
class DecodedImage:
    """An accepted image, decoded: RGB, EXIF orientation applied, first frame only (a HEIF's primary image)."""

    image: Image.Image  # mode "RGB"; downscaled when decode_image was given `min_side` (see `reduced`)
    width: int  # of the full-size image, after the EXIF transpose
    height: int
    format: str  # Pillow's format name, e.g. "JPEG" ("MPO" for multi-picture JPEGs)
    size_bytes: int  # length of the encoded input

    @property
    def reduced(self) -> bool:
        """Whether `image` is smaller than the full-size image (decoded at reduced size)."""
        return self.image.size != (self.width, self.height)


#: Modes `Image.reduce` averages correctly as they are; others are converted (at full size) first.
_REDUCIBLE = frozenset({"L", "LA", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV"})

#: EXIF orientation -> the transpose that undoes it (as ImageOps.exif_transpose does).
_ORIENTATION: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def reduce_factor(size: tuple[int, int], min_side: int | None) -> int:
    """The integer factor an image of `size` can be shrunk by while both sides stay at least `min_side` (>= 1)."""
    if not min_side or min_side <= 0:
        return 1
    return max(1, min(size) // min_side)


def decode_cost(data: bytes, *, max_pixels: int, min_side: int | None) -> int:
    """The pixels decoding `data` will hold at once (its header read, nothing decoded): the full size, or the
    JPEG draft size when the decoder can scale down while decoding. 0 for data that will be refused before any
    pixel is decoded (unparseable header, over `max_pixels`): admission control charges it nothing."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data), formats=_OPENERS) as img:
                width, height = img.size
                if width * height > max_pixels or width <= 0 or height <= 0:
                    return 0
                if img.format in ("JPEG", "MPO") and reduce_factor(img.size, min_side) >= 2:
                    scale = min(8, 1 << (reduce_factor(img.size, min_side).bit_length() - 1))
                    return -(-width // scale) * -(-height // scale)
                return width * height
    except _IDENTIFY_ERRORS:
        return 0


def decode_image(
    data: bytes, name: str, *, max_bytes: int, max_pixels: int, min_side: int | None = None
) -> DecodedImage:
    """Decode untrusted bytes, or raise `InvalidImage` (kind invalid, too_large or unsupported_format) naming `name`.

    With `min_side`, an image at least twice that size on both sides is decoded smaller, by an integer factor that
    keeps both sides >= `min_side`: a JPEG through libjpeg's DCT scaling (`draft`, 1/2 to 1/8, never holding the
    full size), any other format with `Image.reduce` right after loading, the full-size pixels dropped before the
    colour conversion. `width`/`height` still give the full size.

    The pixel cap is checked on the declared size right after the header is parsed, before any pixel is decoded, so it
    holds whatever Pillow's global `Image.MAX_IMAGE_PIXELS` is. Pillow's own bomb warning is made an error for the
    duration of the call whenever that cannot refuse an image `max_pixels` allows (i.e. `max_pixels` <= Pillow's
    limit); Pillow's hard error at twice its limit stays in force either way (we never change Pillow's globals), so a
    `max_pixels` above 2 * `Image.MAX_IMAGE_PIXELS` is capped there, with a message that says so.
    `ImageFile.LOAD_TRUNCATED_IMAGES` is never touched: with its default (False) truncated data is an error.
    """
    size_bytes = len(data)
    if size_bytes == 0:
        raise InvalidImage(name, "zero-byte file")
    if size_bytes > max_bytes:
        raise InvalidImage(name, _too_many_bytes(size_bytes, max_bytes), kind="too_large")

    pillow_limit = Image.MAX_IMAGE_PIXELS
    escalate = pillow_limit is not None and max_pixels <= pillow_limit
    fmt = _sniff(data) or "image"  # for messages about data that breaks before Pillow names its format
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error" if escalate else "ignore", Image.DecompressionBombWarning)
            img = _open(data, name, max_pixels)
            with img:
                fmt = img.format or fmt
                if fmt not in ALLOWED_FORMATS:  # cannot happen with formats= restricted; kept as the contract
                    raise InvalidImage(name, _not_accepted(fmt), kind="unsupported_format")
                _check_pixels(img.size, name, max_pixels)
                if fmt != "HEIF":  # a HEIF opens on its primary image (what viewers show), which may not be the first
                    img.seek(0)  # first frame of an animation / first page of a multi-page TIFF
                _check_pixels(img.size, name, max_pixels)
                full = img.size
                factor = reduce_factor(full, min_side)
                if factor >= 2 and fmt in ("JPEG", "MPO"):
                    img.draft(None, (-(-full[0] // factor), -(-full[1] // factor)))  # DCT scaling while decoding
                img.load()
                _check_pixels(img.size, name, max_pixels)
                if factor >= 2:
                    rgb, width, height = _reduced_rgb(img, full, factor)
                else:
                    ImageOps.exif_transpose(img, in_place=True)  # in place: keeps TIFF tags that `to_rgb` reads
                    rgb = to_rgb(img)
                    if rgb is img:  # detach from the file object that `with img` is about to close
                        rgb = img.copy()
                    width, height = rgb.width, rgb.height
    except InvalidImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidImage(name, _bomb_reason(exc, max_pixels), kind="too_large") from exc
    except _DECODE_ERRORS as exc:
        raise InvalidImage(name, f"truncated or corrupt {fmt} data ({exc})") from exc
    return DecodedImage(image=rgb, width=width, height=height, format=fmt, size_bytes=size_bytes)


def _reduced_rgb(img: Image.Image, full: tuple[int, int], factor: int) -> tuple[Image.Image, int, int]:
    """`img` (loaded, maybe JPEG-drafted) shrunk by what is left of `factor`, then oriented and made RGB; with the
    full size after the EXIF transpose. The full-size pixels are released as soon as the small copy exists."""
    orientation = img.getexif().get(0x0112)
    rest = max(1, min(img.size[0] * factor // full[0], img.size[1] * factor // full[1]))  # after a JPEG draft
    if rest >= 2:
        if img.mode in ("P", "PA"):
            work = img.convert("RGBA" if img.has_transparency_data else "RGB")
        elif img.mode == "1":
            work = img.convert("L")
        elif img.mode not in _REDUCIBLE or "transparency" in img.info:
            work = to_rgb(img)  # wide samples, tRNS colours: converted at full size (their meaning needs every pixel)
        else:
            work = img
        small = work.reduce(rest)
        del work
    else:
        small = img.copy() if img.mode in _REDUCIBLE and "transparency" not in img.info else to_rgb(img)
    img.close()  # the full-size (or drafted) pixels go now
    rgb = to_rgb(small)
    if orientation in _ORIENTATION:
        rgb = rgb.transpose(_ORIENTATION[orientation])
    width, height = (full[1], full[0]) if orientation in (5, 6, 7, 8) else full
    return rgb, width, height


def read_image_file(path: str | os.PathLike[str], *, max_bytes: int, max_pixels: int) -> tuple[bytes, DecodedImage]:
    """Read (`read_file_bytes`) and decode (`decode_image`) one file."""
    data = read_file_bytes(path, max_bytes=max_bytes)
    return data, decode_image(data, os.fspath(path), max_bytes=max_bytes, max_pixels=max_pixels)


def read_file_bytes(path: str | os.PathLike[str], *, max_bytes: int) -> bytes:
    """The bytes of one file; a non-regular or oversized file is refused from its `stat`, without being read.

    The file is then opened non-blocking and checked again on the open descriptor, so a path swapped for a FIFO or a
    bigger file between the two looks cannot hang or overrun the caps. Unreadable paths (missing, permission denied)
    raise `InvalidImage` of kind invalid, so a corpus walk records them like any other per-file error.
    """
    name = os.fspath(path)
    try:
        st = os.stat(path)
        _check_file(st, name, max_bytes)
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
        fd = os.open(path, flags)
        with os.fdopen(fd, "rb") as fh:
            _check_file(os.fstat(fh.fileno()), name, max_bytes)
            data = fh.read(max_bytes + 1)
    except OSError as exc:
        raise InvalidImage(name, f"cannot read the file ({exc.strerror or exc})") from exc
    if len(data) > max_bytes:  # it grew after the stat
        raise InvalidImage(name, _too_many_bytes(len(data), max_bytes, at_least=True), kind="too_large")
    return data


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB; transparency is composited over `BACKGROUND`. Returns `img` itself if opaque RGB.

    16-bit and 32-bit integer samples are scaled by their bit depth (65535 -> 255; a TIFF's BitsPerSample and
    SampleFormat decide for mode "I", else 16-bit unsigned is assumed, as from PNG), negatives clip to 0. Float ("F")
    samples are read as 0..1 when none exceeds 1.0, else as 0..255; NaN and -inf become 0, +inf 255. CMYK (including
    Adobe's inverted JPEG CMYK, which Pillow un-inverts on load), YCbCr, LAB and HSV go through Pillow's `convert`.
    """
    if img.mode == "RGB" and not img.has_transparency_data:  # an RGB PNG's tRNS colour is transparency too
        return img
    if img.mode in _WIDE_INT_MODES or img.mode == "F":
        img = _wide_to_l(img)
    if img.has_transparency_data:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _open(data: bytes, name: str, max_pixels: int) -> ImageFile.ImageFile:
    """Parse the header with the allowlisted plugins only; say what the data is when none of them takes it."""
    try:
        return Image.open(io.BytesIO(data), formats=_OPENERS)
    except UnidentifiedImageError as exc:
        known = _sniff(data)
        declared = bmff.declared_size(data) if known in ("AVIF", "HEIF") else None
        if declared is not None:  # libavif refuses sizes past its own limits while parsing: too large, not corrupt
            _check_pixels(declared, name, max_pixels)
        if known is not None:
            raise InvalidImage(name, f"truncated or corrupt {known} data (Pillow cannot parse its header)") from exc
        other = _identify_any(data)
        if other is not None:
            raise InvalidImage(name, _not_accepted(other), kind="unsupported_format") from exc
        raise InvalidImage(
            name, f"not an image in a recognised format (accepted: {_ACCEPTED})", kind="unsupported_format"
        ) from exc


def _sniff(data: bytes) -> str | None:
    """The accepted format whose signature `data` starts with, if any."""
    return next((fmt for fmt, signature in _SIGNATURES if signature.match(data)), None) or bmff.brand_format(data)


def _identify_any(data: bytes) -> str | None:
    """The format name any Pillow plugin gives `data` from its header (never decoded), or None."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as other:
                return other.format
    except _IDENTIFY_ERRORS:
        return None


def _check_pixels(size: tuple[int, int], name: str, max_pixels: int) -> None:
    width, height = size
    pixels = width * height
    if pixels <= 0:
        raise InvalidImage(name, f"image of {width}x{height} has no pixels")
    if pixels > max_pixels:
        raise InvalidImage(
            name,
            f"image of {width}x{height} = {pixels} pixels exceeds the limit of {max_pixels} (raise --max-pixels)",
            kind="too_large",
        )


def _bomb_reason(exc: Exception, max_pixels: int) -> str:
    """Pillow refused the size while parsing the header; say so in the same words as `_check_pixels`."""
    match = _BOMB_PIXELS.search(str(exc))
    if match is None:
        return f"image exceeds the pixel limit of {max_pixels} (raise --max-pixels): {exc}"
    pixels, pillow_limit = int(match.group(1)), int(match.group(2))
    if pixels > max_pixels:
        return f"image of {pixels} pixels exceeds the limit of {max_pixels} (raise --max-pixels)"
    return (
        f"image of {pixels} pixels exceeds Pillow's decompression-bomb ceiling of {pillow_limit} pixels "
        "(twice PIL.Image.MAX_IMAGE_PIXELS), which --max-pixels cannot lift"
    )


def _check_file(st: os.stat_result, name: str, max_bytes: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise InvalidImage(name, f"not a regular file ({_file_kind(st.st_mode)})")
    if st.st_size > max_bytes:
        raise InvalidImage(name, _too_many_bytes(st.st_size, max_bytes), kind="too_large")


def _file_kind(mode: int) -> str:
    kinds = (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    )
    return next((label for test, label in kinds if test(mode)), "not a plain file")


def _too_many_bytes(size: int, max_bytes: int, *, at_least: bool = False) -> str:
    more = "at least " if at_least else ""
    return f"file of {more}{size} bytes exceeds the limit of {max_bytes} bytes (raise --max-file-bytes)"


def _not_accepted(fmt: str) -> str:
    return f"format {fmt!r} is not accepted (accepted: {_ACCEPTED})"


def _wide_to_l(img: Image.Image) -> Image.Image:
    """Scale 16/32-bit integer or float samples to an 8-bit "L" image ("LA" when a tRNS grey value marks holes)."""
    raw = np.asarray(img)
    if img.mode == "F":
        values = raw.astype(np.float64)
        finite = values[np.isfinite(values)]
        if finite.size and finite.max() > 1.0:
            scaled = values
        else:
            scaled = values * 255.0
        scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
        gray = np.rint(np.clip(scaled, 0.0, 255.0)).astype(np.uint8)
    else:
        top = _int_max(img)
        values = np.clip(raw.astype(np.int64), 0, top)
        gray = ((values * 255 + top // 2) // top).astype(np.uint8)  # rounded: 65535 -> 255, 32768 -> 128
    out = Image.fromarray(gray, mode="L")
    transparency = img.info.get("transparency")
    if img.mode != "F" and isinstance(transparency, int):  # a 16-bit grey PNG's tRNS: one sample value is clear
        alpha = np.where(raw == transparency, 0, 255).astype(np.uint8)
        out = Image.merge("LA", (out, Image.fromarray(alpha, mode="L")))
    return out


def _int_max(img: Image.Image) -> int:
    """The largest sample value of the integer mode's real bit depth."""
    if img.mode != "I":  # I;16 variants
        return 65535
    bits, signed = 16, False  # mode "I" without TIFF tags: a 16-bit PNG as older Pillows opened it
    tags = getattr(img, "tag_v2", None)
    if tags is not None:
        bits = _first_int(tags.get(258), 16)  # BitsPerSample
        signed = _first_int(tags.get(339), 1) == 2  # SampleFormat: 1 unsigned, 2 signed
    bits = min(max(bits, 2), 32)
    return (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1


def _first_int(value: object, default: int) -> int:
    if isinstance(value, tuple) and value:
        value = value[0]
    return value if isinstance(value, int) and value > 0 else default
