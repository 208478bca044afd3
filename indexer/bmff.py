"""ISO BMFF (HEIF, AVIF) container headers read without decoding: which format the brand names, the declared size."""

from __future__ import annotations

import struct
from collections.abc import Iterator

#: Major brands Pillow's AVIF plugin and pillow-heif take (mif1/msf1 are generic HEIF: AVIF when `avif` is listed).
AVIF_BRANDS = frozenset({b"avif", b"avis"})
HEIF_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1"})

#: Boxes from the file to the image spatial extents property: meta (a full box) / iprp / ipco / ispe.
_ISPE_PATH = (b"meta", b"iprp", b"ipco", b"ispe")
_FULL_BOXES = frozenset({b"meta", b"ispe"})  # 4 bytes of version and flags before their content


def brand_format(data: bytes) -> str | None:
    """`"AVIF"` or `"HEIF"` when `data` starts with an `ftyp` box of those brands, else None."""
    if data[4:8] != b"ftyp":
        return None
    major = data[8:12]
    if major in AVIF_BRANDS:
        return "AVIF"
    if major not in HEIF_BRANDS:
        return None
    box = next(_boxes(data, 0, len(data)), None)
    compatible = data[16 : box[2]] if box is not None and box[0] == b"ftyp" else b""
    brands = {compatible[i : i + 4] for i in range(0, len(compatible) - 3, 4)}
    return "AVIF" if major in (b"mif1", b"msf1") and brands & AVIF_BRANDS else "HEIF"


def declared_size(data: bytes) -> tuple[int, int] | None:
    """The largest width x height an `ispe` property of the file's `meta` box declares (never decoded), or None.

    Read when a decoder refuses the header (libavif refuses sizes past its own limits at parse time), so that a
    file declaring too many pixels is reported as too large rather than as corrupt."""
    found: list[tuple[int, int]] = []
    _collect(data, 0, len(data), 0, found)
    return max(found, key=lambda wh: wh[0] * wh[1], default=None)


def _collect(data: bytes, start: int, end: int, depth: int, found: list[tuple[int, int]]) -> None:
    for kind, content, stop in _boxes(data, start, end):
        if kind != _ISPE_PATH[depth]:
            continue
        if kind in _FULL_BOXES:
            content += 4
        if depth == len(_ISPE_PATH) - 1:
            if stop - content >= 8:
                found.append(struct.unpack_from(">II", data, content))
        else:
            _collect(data, content, stop, depth + 1, found)


def _boxes(data: bytes, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    """(type, content start, end) of each box between `start` and `end`; stops at the first malformed one."""
    offset = start
    while offset + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, offset)
        header = 8
        if size == 1:  # a 64-bit size follows the type
            if offset + 16 > end:
                return
            (size,) = struct.unpack_from(">Q", data, offset + 8)
            header = 16
        elif size == 0:  # to the end of the enclosing box
            size = end - offset
        if size < header or offset + size > end:
            return
        yield kind, offset + header, offset + size
        offset += size
