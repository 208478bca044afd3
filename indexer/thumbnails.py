"""Thumbnails: a small JPEG of a decoded image and a server-side blurred variant that shows nothing recognisable."""

from __future__ import annotations

import io

from PIL import Image, ImageFilter

from indexer.decode import decode_image
from search.errors import InvalidArgument
from search.settings import Settings
from search.store import Store, Thumbnail

#: Longest side of a thumbnail, in pixels (never larger than the image).
THUMBNAIL_SIZE = 256
JPEG_QUALITY = 80
#: The blurred variant keeps this many pixels on its longest side before it is blurred and scaled back up: colour
#: blobs only, no shape, face or text survives it.
BLUR_KEEP = 8


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, optimize=True)  # no EXIF, no ICC: nothing but the pixels
    return buf.getvalue()


def blurred_variant(thumb: Image.Image) -> Image.Image:
    """Downscale to BLUR_KEEP pixels a side, blur, scale back to the thumbnail's size and blur strongly again."""
    tiny = thumb.copy()
    tiny.thumbnail((BLUR_KEEP, BLUR_KEEP), Image.Resampling.BOX)
    tiny = tiny.filter(ImageFilter.GaussianBlur(1))
    big = tiny.resize(thumb.size, Image.Resampling.BILINEAR)
    return big.filter(ImageFilter.GaussianBlur(max(thumb.size) / 12))


def make_thumbnail(image: Image.Image) -> Thumbnail:
    """The thumbnails of a decoded (RGB, EXIF-transposed) image: at most THUMBNAIL_SIZE px a side, and blurred."""
    thumb = image.convert("RGB")
    thumb.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.Resampling.LANCZOS)
    return Thumbnail(
        width=thumb.width,
        height=thumb.height,
        original=_jpeg(thumb, JPEG_QUALITY),
        blurred=_jpeg(blurred_variant(thumb), 60),
    )


def thumbnail_of_bytes(name: str, data: bytes, settings: Settings) -> Thumbnail:
    """The thumbnails of image bytes, through the same safe decoder (an HTTP add: its upload was prepared without)."""
    decoded = decode_image(data, name, max_bytes=settings.max_file_bytes, max_pixels=settings.max_pixels)
    return make_thumbnail(decoded.image)


def choose_thumbnails(store: Store, requested: bool, *, rebuild: bool = False) -> bool:
    """Whether this index run makes thumbnails: the store's flag, set by `--thumbnails` on a store without images
    (a new one) or with `--rebuild` (everything is prepared again). Asking for them on a store that has images and
    no thumbnails is refused with how to get them; leaving the flag out of a later run keeps the store's choice."""
    if store.thumbnails_enabled():
        return True
    if not requested:
        return False
    if store.count_images() and not rebuild:
        raise InvalidArgument(
            f"the store at {store.root} was created without thumbnails and already holds images: thumbnails are made "
            "only while images are prepared; add `--rebuild` to re-prepare everything with thumbnails, "
            "or index into a new store with `--thumbnails`"
        )
    store.enable_thumbnails()
    return True
