"""PDQ perceptual hashes: computing them, parsing imported hash lists, and Hamming matching over a FAISS index."""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np
import pdqhash
from PIL import Image

from search.errors import InvalidArgument

PDQ_BITS = 256
PDQ_BYTES = PDQ_BITS // 8
PDQ_HEX_DIGITS = PDQ_BITS // 4
#: ThreatExchange convention: two PDQ hashes match when their Hamming distance is <= 31.
DEFAULT_MAX_DISTANCE = 31
#: PDQ's 8 dihedral transforms, in the order `pdqhash.compute_dihedral` returns their hashes (checked against hashes
#: of transposed photos in tests/test_hash_lists.py). Each names what is done to the image before hashing, in
#: Pillow's terms (`Image.Transpose`): rot90 turns it 90 degrees counter-clockwise (ROTATE_90), rot270 90 degrees
#: clockwise; flipV mirrors top-bottom (FLIP_TOP_BOTTOM: pdq's "FlipX"), flipH left-right (FLIP_LEFT_RIGHT: pdq's
#: "FlipY"); transpose mirrors about the main diagonal, transverse about the other one.
DIHEDRAL: tuple[str, ...] = ("original", "rot90", "rot180", "rot270", "flipV", "flipH", "transpose", "transverse")
#: The bytes of the 7 non-original dihedral hashes stored per image (the original is the image's own PDQ hash).
DIHEDRAL_BLOB_BYTES = (len(DIHEDRAL) - 1) * PDQ_BYTES

_HEX_RE = re.compile(r"[0-9a-fA-F]+")


def _pixels(image: Image.Image) -> np.ndarray:
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    # pdqhash wants an HxWx3 8-bit array; it converts to luma with numpy and then reads the luma buffer as C-ordered,
    # so a Fortran-ordered input would silently produce a wrong hash: force a C-contiguous uint8 array.
    return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))


def _bits_hex(bits: Any) -> str:
    return np.packbits(np.asarray(bits, dtype=np.uint8)).tobytes().hex()


def compute_pdq(image: Image.Image) -> tuple[str, int]:
    """Return (hex, quality) of an image's PDQ hash.

    The hex is the 256-bit vector of ``pdqhash.compute`` read as one big-endian number (element 0 is the most
    significant bit), 64 lowercase hex digits, exactly as python-threatexchange writes PDQ hashes. Quality is PDQ's
    0-100 score; ThreatExchange treats hashes below 50 as too featureless to match on.
    """
    bits, quality = pdqhash.compute(_pixels(image))
    return _bits_hex(bits), int(quality)


def compute_pdq_dihedral(image: Image.Image) -> tuple[tuple[str, ...], int]:
    """Return the PDQ hashes of the image's 8 dihedral transforms (in DIHEDRAL order, the first being exactly
    `compute_pdq`'s hash) and the quality, from one pass: the downscale is shared, only the 16x16 DCT step is done
    8 times. A mirrored or rotated copy of an image has (close to) one of these as its own PDQ hash."""
    hashes, quality = pdqhash.compute_dihedral(_pixels(image))
    return tuple(_bits_hex(bits) for bits in hashes), int(quality)


def dihedral_blob(hexes: Sequence[str]) -> bytes:
    """The stored form of an image's 7 non-original dihedral hashes (DIHEDRAL[1:] order): 224 bytes."""
    if len(hexes) != len(DIHEDRAL) - 1:
        raise ValueError(f"expected {len(DIHEDRAL) - 1} dihedral hashes, got {len(hexes)}")
    return b"".join(hex_to_bytes(h) for h in hexes)


def dihedral_from_blob(data: bytes) -> tuple[str, ...]:
    """The 7 non-original dihedral hashes (hex, DIHEDRAL[1:] order) of a stored blob; ValueError if it is not one."""
    if len(data) != DIHEDRAL_BLOB_BYTES:
        raise ValueError(f"a dihedral blob holds {DIHEDRAL_BLOB_BYTES} bytes, got {len(data)}")
    return tuple(data[i : i + PDQ_BYTES].hex() for i in range(0, len(data), PDQ_BYTES))


def _check_hex(h: str) -> str:
    """Return the stripped hex text of a PDQ hash, or raise ValueError saying what is wrong with it."""
    if not isinstance(h, str):
        raise ValueError(f"a PDQ hash must be a string of {PDQ_HEX_DIGITS} hex digits, got {type(h).__name__}")
    s = h.strip()
    if not _HEX_RE.fullmatch(s):
        shown = s if len(s) <= 80 else s[:77] + "..."
        raise ValueError(f"not a PDQ hash: {shown!r} contains characters other than hex digits 0-9a-f")
    if len(s) != PDQ_HEX_DIGITS:
        raise ValueError(f"not a PDQ hash: expected {PDQ_HEX_DIGITS} hex digits, got {len(s)}")
    return s


def hex_to_bytes(h: str) -> bytes:
    """The 32 bytes of a PDQ hash given as 64 hex digits (any case, surrounding whitespace ignored); ValueError else."""
    return bytes.fromhex(_check_hex(h))


def normalize_hex(h: str) -> str:
    """A validated PDQ hash as 64 lowercase hex digits; ValueError if it is not one."""
    return _check_hex(h).lower()


def hamming(a: str, b: str) -> int:
    """Hamming distance (number of differing bits) between two PDQ hashes given as hex."""
    x = int.from_bytes(hex_to_bytes(a), "big") ^ int.from_bytes(hex_to_bytes(b), "big")
    return bin(x).count("1")


@dataclass
class HashListParse:
    """The result of reading a hash list: the good hashes and the lines that were not."""

    #: (1-based line number, normalized hex), first occurrence of each hash only, in file order
    hashes: list[tuple[int, str]] = field(default_factory=list)
    #: (1-based line number, the line's text, why it was rejected)
    bad_lines: list[tuple[int, str, str]] = field(default_factory=list)
    #: hash -> its note, from a CSV's `note` (or `comment`) column where the row gives one (first occurrence)
    notes: dict[str, str] = field(default_factory=dict)


def _is_skipped(line: str) -> bool:
    s = line.strip()
    return not s or s.startswith("#")


def _csv_fields(line: str) -> list[str]:
    return next(csv.reader([line]), [])


#: CSV columns whose text is kept as the note of each entry (the first one a header has).
NOTE_COLUMNS = ("note", "comment")
#: Notes are cut to this many characters.
MAX_NOTE = 500


def _header_columns(line: str) -> tuple[int, int | None] | None:
    """(index of the `hash` column, index of the note column or None) if `line` is a CSV header with a `hash`
    column, else None."""
    names = [name.strip().lower() for name in _csv_fields(line)]
    if "hash" not in names:
        return None
    note = next((names.index(c) for c in NOTE_COLUMNS if c in names), None)
    return names.index("hash"), note


def hash_list_lines(data: bytes, source: str) -> list[str]:
    """The lines of a hash list given as bytes (UTF-8, an optional BOM); InvalidArgument naming `source` else."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InvalidArgument(f"hash list {source}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    return text.splitlines()


def read_hash_list_file(path: str | os.PathLike[str]) -> list[str]:
    """The lines of a hash list file, for `parse_hash_list`; InvalidArgument naming the file when it cannot be read
    or is not UTF-8."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            data = f.read()
    except OSError as e:
        raise InvalidArgument(f"hash list {name}: cannot be read ({e.strerror or e})") from e
    return hash_list_lines(data, name)


def parse_hash_list(lines: Iterable[str] | str) -> HashListParse:
    """Parse a list of PDQ hashes (its text, or its lines): one hex hash per line, or a CSV whose header row has a
    `hash` column (and optionally a `note` or `comment` column, kept as each entry's note).

    Blank lines and lines starting with '#' are skipped. Lines that do not hold a valid hash are reported in
    ``bad_lines`` rather than raised; a hash repeated in the list is kept once (its first line).
    """
    rows = lines.splitlines() if isinstance(lines, str) else [line.rstrip("\r\n") for line in lines]
    if rows and rows[0].startswith("\ufeff"):
        rows[0] = rows[0][1:]
    result = HashListParse()
    seen: set[str] = set()
    column: int | None = None
    note_column: int | None = None
    header_line = 0
    for number, line in enumerate(rows, start=1):
        if not _is_skipped(line):
            header = _header_columns(line)
            if header is not None:
                column, note_column = header
                header_line = number
            break

    for number, line in enumerate(rows, start=1):
        if number == header_line or _is_skipped(line):
            continue
        note = ""
        if column is None:
            candidate = line
        else:
            try:
                fields = _csv_fields(line)
            except csv.Error as e:
                result.bad_lines.append((number, line, f"not a valid CSV row: {e}"))
                continue
            if column >= len(fields):
                result.bad_lines.append((number, line, f"row has {len(fields)} column(s), no `hash` column"))
                continue
            candidate = fields[column]
            if note_column is not None and note_column < len(fields):
                note = fields[note_column].strip()[:MAX_NOTE]
        try:
            h = normalize_hex(candidate)
        except ValueError as e:
            result.bad_lines.append((number, line, str(e)))
            continue
        if h not in seen:
            seen.add(h)
            result.hashes.append((number, h))
            if note:
                result.notes[h] = note
    return result


def _hexes_to_array(hexes: Sequence[str]) -> np.ndarray:
    """An (n, 32) uint8 array of PDQ hashes, the layout FAISS binary indexes take (first byte = highest bits)."""
    if len(hexes) == 0:
        return np.zeros((0, PDQ_BYTES), dtype=np.uint8)
    return np.frombuffer(b"".join(hex_to_bytes(h) for h in hexes), dtype=np.uint8).reshape(len(hexes), PDQ_BYTES)


class HashMatcher:
    """FAISS binary index (``IndexBinaryFlat(256)``, exact) over PDQ hashes, each stored with a caller's integer id."""

    def __init__(self) -> None:
        self._index = faiss.IndexBinaryFlat(PDQ_BITS)
        #: faiss row -> caller id
        self._ids = np.zeros(0, dtype=np.int64)

    def add(self, ids: Sequence[int], hexes: Sequence[str]) -> None:
        """Store hashes under the given ids (e.g. SQLite ids); ids and hashes may repeat. ValueError on a bad hash."""
        if len(ids) != len(hexes):
            raise ValueError(f"add: {len(ids)} ids but {len(hexes)} hashes")
        if len(hexes) == 0:
            return
        vectors = _hexes_to_array(hexes)  # validates every hash before anything is added
        new_ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        self._index.add(vectors)
        self._ids = np.concatenate([self._ids, new_ids])

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def match(self, hexes: Sequence[str], max_distance: int = DEFAULT_MAX_DISTANCE) -> list[list[tuple[int, int]]]:
        """For each query hash, (id, distance) of every stored hash within ``max_distance`` bits (inclusive).

        Each list is sorted by distance, then id.
        """
        if isinstance(max_distance, bool) or not isinstance(max_distance, (int, np.integer)):
            raise InvalidArgument(f"max_distance must be an integer, got {max_distance!r}")
        if not 0 <= max_distance <= PDQ_BITS:
            raise InvalidArgument(f"max_distance must be between 0 and {PDQ_BITS}, got {max_distance}")
        queries = _hexes_to_array(hexes)
        if len(queries) == 0 or len(self) == 0:
            return [[] for _ in range(len(queries))]
        # FAISS binary range_search keeps distances strictly below the radius.
        lims, distances, rows = self._index.range_search(queries, int(max_distance) + 1)
        out: list[list[tuple[int, int]]] = []
        for q in range(len(queries)):
            lo, hi = int(lims[q]), int(lims[q + 1])
            found = [(int(self._ids[r]), int(d)) for r, d in zip(rows[lo:hi], distances[lo:hi], strict=True)]
            found.sort(key=lambda pair: (pair[1], pair[0]))
            out.append(found)
        return out


def match_transforms(
    matcher: HashMatcher, images: Sequence[Sequence[str]], max_distance: int = DEFAULT_MAX_DISTANCE
) -> list[list[tuple[int, int, str]]]:
    """Match each image's hashes against `matcher`: an image is given as its hashes in DIHEDRAL order (all 8, or its
    original hash alone when no dihedral ones are known). For each image, (stored id, distance, transform) of every
    stored hash within `max_distance` of any of them, the closest transform per id (the earlier in DIHEDRAL on a
    tie, so `original` wins), sorted by distance then id."""
    flat = [h for hashes in images for h in hashes]
    found = matcher.match(flat, max_distance)
    out: list[list[tuple[int, int, str]]] = []
    at = 0
    for hashes in images:
        best: dict[int, tuple[int, int]] = {}  # id -> (distance, transform index)
        for t in range(len(hashes)):
            for stored_id, distance in found[at + t]:
                if stored_id not in best or (distance, t) < best[stored_id]:
                    best[stored_id] = (distance, t)
        at += len(hashes)
        out.append(sorted(((i, d, DIHEDRAL[t]) for i, (d, t) in best.items()), key=lambda m: (m[1], m[0])))
    return out
