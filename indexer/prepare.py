"""The one image-preparation path: (name, bytes) -> safe decode, sha256, PDQ hash, the model's transform."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from indexer.decode import decode_image
from indexer.thumbnails import make_thumbnail
from search.errors import InvalidImage
from search.pdq import compute_pdq_dihedral
from search.store.rows import Thumbnail

#: The model's eval transform: an RGB Pillow image to a (3, H, W) tensor (timm `create_transform`).
Transform = Callable[[Image.Image], Any]

#: The smallest side PDQ is given: large images are decoded at reduced size (both sides >= this and the model's
#: input side), as ThreatExchange's hashers downscale before hashing; PDQ itself works on a 64x64 luma block.
PDQ_MIN_SIDE = 512


def decode_side(transform: Transform) -> int:
    """The side an image needs for PDQ and `transform`: PDQ_MIN_SIDE, or the transform's resize/crop side if larger."""
    side = PDQ_MIN_SIDE
    for step in getattr(transform, "transforms", ()):
        size = getattr(step, "size", None)
        sides = [size] if isinstance(size, int) else list(size) if isinstance(size, (tuple, list)) else []
        side = max([side, *(s for s in sides if isinstance(s, int))])
    return side


@dataclass(frozen=True)
class Prepared:
    """One image ready for the model: its input tensor and the facts the store records. Picklable (plain numpy), so
    decoder processes hand it back as is."""

    name: str
    sha256: str
    size: int  # bytes of the encoded input
    width: int  # after the EXIF transpose
    height: int
    format: str  # Pillow's format name
    pdq: str | None  # None when PDQ cannot hash the image (it is still analysed)
    pdq_quality: int | None
    tensor: np.ndarray  # (3, H, W) float32: the model's input
    timings: dict[str, float] = field(default_factory=dict)  # seconds per step: decode, sha256, pdq, transform
    thumbnail: Thumbnail | None = None  # only when asked for (a store created with `index --thumbnails`)
    pdq_dihedral: tuple[str, ...] | None = None  # the 7 other dihedral PDQ hashes (search.pdq.DIHEDRAL[1:] order)

    @property
    def seconds(self) -> float:
        return sum(self.timings.values())


def prepare_image(
    name: str,
    data: bytes,
    *,
    transform: Transform,
    max_bytes: int,
    max_pixels: int,
    sha256: str | None = None,
    thumbnail: bool = False,
) -> Prepared:
    """Decode untrusted bytes safely, hash them (sha256, PDQ with its 8 dihedral hashes) and apply the model's
    transform; or raise InvalidImage.

    The image is decoded at the size PDQ and the model need (`decode_side`): a large one at reduced size (both sides
    >= that side), its full-size pixels never all held (JPEG) or dropped right after loading; the decoded pixels go
    before returning (a Prepared holds the tensor).
    `sha256` skips hashing when the caller has already hashed `data` (the index run routes content by it).
    `thumbnail` also makes the image's thumbnails (`indexer.thumbnails`) from the same decode.
    """
    t0 = time.perf_counter()
    decoded = decode_image(data, name, max_bytes=max_bytes, max_pixels=max_pixels, min_side=decode_side(transform))
    t1 = time.perf_counter()
    sha = sha256 or hashlib.sha256(data).hexdigest()
    t2 = time.perf_counter()
    dihedral: tuple[str, ...] | None
    try:  # the 8 dihedral hashes in one pass (the original is exactly compute_pdq's): mirrored, rotated copies match
        hashes, quality = compute_pdq_dihedral(decoded.image)
        pdq, dihedral = hashes[0], hashes[1:]
    except Exception:  # PDQ is an extra: an image it cannot hash is still analysed
        pdq, quality, dihedral = None, None, None
    t3 = time.perf_counter()
    tensor = np.ascontiguousarray(np.asarray(transform(decoded.image), dtype=np.float32))
    t4 = time.perf_counter()
    thumbs = make_thumbnail(decoded.image) if thumbnail else None
    t5 = time.perf_counter()
    decoded.image.close()  # its pixels go now, not when the caller lets go of the result
    return Prepared(
        name=name,
        sha256=sha,
        size=len(data),
        width=decoded.width,
        height=decoded.height,
        format=decoded.format,
        pdq=pdq,
        pdq_quality=quality,
        pdq_dihedral=dihedral,
        tensor=tensor,
        timings={"decode": t1 - t0, "sha256": t2 - t1, "pdq": t3 - t2, "transform": t4 - t3}
        | ({"thumbnail": t5 - t4} if thumbnail else {}),
        thumbnail=thumbs,
    )


def prepare_or_error(
    name: str,
    data: bytes,
    *,
    transform: Transform,
    max_bytes: int,
    max_pixels: int,
    sha256: str | None = None,
    thumbnail: bool = False,
) -> Prepared | InvalidImage:
    """`prepare_image`, with a refused image returned (not raised) so that a batch carries its failures in order."""
    try:
        return prepare_image(
            name,
            data,
            transform=transform,
            max_bytes=max_bytes,
            max_pixels=max_pixels,
            sha256=sha256,
            thumbnail=thumbnail,
        )
    except InvalidImage as e:
        return e
