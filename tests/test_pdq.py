"""PDQ hashing, hash-list parsing and Hamming matching (search/pdq.py), on generated images and random hashes."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pdqhash
import pytest
from PIL import Image

from search.errors import InvalidArgument
from search.pdq import (
    DEFAULT_MAX_DISTANCE,
    PDQ_BITS,
    HashMatcher,
    compute_pdq,
    hamming,
    hex_to_bytes,
    normalize_hex,
    parse_hash_list,
    read_hash_list_file,
)


def textured(seed: int, size: tuple[int, int] = (256, 256)) -> Image.Image:
    """A smooth random colour field: plenty of low-frequency structure for PDQ, different per seed."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)


def jpeg_roundtrip(image: Image.Image, quality: int = 70) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    out = Image.open(io.BytesIO(buf.getvalue()))
    out.load()
    return out


def random_hex(rng: np.random.Generator) -> str:
    return rng.integers(0, 256, PDQ_BITS // 8, dtype=np.uint8).tobytes().hex()


def flip_bits(h: str, positions: np.ndarray) -> str:
    value = int(h, 16)
    for p in positions:
        value ^= 1 << int(p)
    return f"{value:064x}"


# --- hashing -------------------------------------------------------------------------------------------------------


def test_hex_is_big_endian_reading_of_pdqhash_bits() -> None:
    image = textured(1)
    h, quality = compute_pdq(image)
    assert len(h) == 64
    assert h == h.lower()
    assert all(c in "0123456789abcdef" for c in h)
    bits, expected_quality = pdqhash.compute(np.asarray(image.convert("RGB"), dtype=np.uint8))
    expected = f"{int(''.join(str(int(b)) for b in bits), 2):064x}"
    assert h == expected
    assert quality == expected_quality


def test_compute_pdq_converts_mode_and_ignores_memory_layout() -> None:
    image = textured(3)
    h, _ = compute_pdq(image)
    assert compute_pdq(image.convert("RGBA"))[0] == h
    # a Fortran-ordered copy of the same pixels must hash the same (pdqhash reads its luma buffer as C-ordered)
    fortran = Image.fromarray(np.asfortranarray(np.asarray(image)))
    assert compute_pdq(fortran)[0] == h


def test_near_duplicates_are_close_and_unrelated_images_far() -> None:
    original = textured(1)
    h, quality = compute_pdq(original)
    h_jpeg, _ = compute_pdq(jpeg_roundtrip(original, quality=70))
    h_resized, _ = compute_pdq(original.resize((230, 230), Image.Resampling.BILINEAR))
    h_other, _ = compute_pdq(textured(2))
    assert quality >= 50  # a hash worth matching on at all
    assert hamming(h, h_jpeg) <= DEFAULT_MAX_DISTANCE
    assert hamming(h, h_resized) <= DEFAULT_MAX_DISTANCE
    assert hamming(h, h_other) > DEFAULT_MAX_DISTANCE


def test_quality_low_for_flat_image_high_for_textured() -> None:
    _, flat_quality = compute_pdq(Image.new("RGB", (128, 128), (120, 30, 200)))
    _, textured_quality = compute_pdq(textured(1))
    assert flat_quality < 50
    assert textured_quality >= 50
    assert textured_quality > flat_quality


# --- hex helpers ---------------------------------------------------------------------------------------------------


def test_hamming_equals_popcount_of_xor() -> None:
    rng = np.random.default_rng(7)
    for _ in range(20):
        a, b = random_hex(rng), random_hex(rng)
        xor = np.bitwise_xor(np.frombuffer(bytes.fromhex(a), np.uint8), np.frombuffer(bytes.fromhex(b), np.uint8))
        assert hamming(a, b) == int(np.unpackbits(xor).sum())
        assert hamming(a, a) == 0
    assert hamming("0" * 64, "f" * 64) == 256


def test_hex_validation() -> None:
    good = "aB" * 32
    assert hex_to_bytes(good) == bytes.fromhex(good)
    assert hex_to_bytes(f"  {good}\n") == bytes.fromhex(good)
    assert normalize_hex(f" {good} ") == good.lower()
    with pytest.raises(ValueError, match="64 hex digits, got 63"):
        hex_to_bytes("a" * 63)
    with pytest.raises(ValueError, match="64 hex digits, got 65"):
        hex_to_bytes("a" * 65)
    with pytest.raises(ValueError, match="other than hex digits"):
        hex_to_bytes("g" + "a" * 63)
    with pytest.raises(ValueError, match="other than hex digits"):
        hex_to_bytes("a" * 32 + " " + "a" * 32)
    with pytest.raises(ValueError):
        hex_to_bytes("")


# --- hash lists ----------------------------------------------------------------------------------------------------


def test_parse_plain_hash_list(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    h1, h2 = random_hex(rng), random_hex(rng)
    path = tmp_path / "hashes.txt"
    path.write_text(
        "\n".join(
            [
                "# exported hashes",  # 1
                h1.upper(),  # 2
                "",  # 3
                "not-a-hash",  # 4
                f"  {h2}  ",  # 5
                h1,  # 6: duplicate, silently dropped
                h2[:-1],  # 7: 63 digits
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    parsed = parse_hash_list(read_hash_list_file(path))
    assert parsed.hashes == [(2, h1), (5, h2)]
    assert [(n, text) for n, text, _ in parsed.bad_lines] == [(4, "not-a-hash"), (7, h2[:-1])]
    assert all(reason for _, _, reason in parsed.bad_lines)


def test_parse_csv_hash_list(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    h1, h2, h3 = random_hex(rng), random_hex(rng), random_hex(rng)
    path = tmp_path / "hashes.csv"
    path.write_text(
        "\n".join(
            [
                'id,"Hash",quality,note',  # 1
                f"1,{h1},100,first",  # 2
                f'2,"{h2}",90,"quoted, with comma"',  # 3
                "3,zzzz,80,bad hash",  # 4
                "",  # 5
                "4",  # 6: no hash column
                f"5,{h3.upper()},70,",  # 7
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    parsed = parse_hash_list(read_hash_list_file(str(path)))
    assert parsed.hashes == [(2, h1), (3, h2), (7, h3)]
    assert [n for n, _, _ in parsed.bad_lines] == [4, 6]
    assert parsed.bad_lines[0][1] == "3,zzzz,80,bad hash"


def test_parse_hash_list_unreadable(tmp_path: Path) -> None:
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"caf\xe9\n")
    with pytest.raises(InvalidArgument, match=re.escape("latin1.txt")):
        read_hash_list_file(bad)
    with pytest.raises(InvalidArgument, match=re.escape("missing.txt")):
        read_hash_list_file(tmp_path / "missing.txt")


# --- matching ------------------------------------------------------------------------------------------------------


def brute_force(ids: list[int], hexes: list[str], queries: list[str], max_distance: int) -> list[list[tuple[int, int]]]:
    out = []
    for q in queries:
        found = [(i, hamming(q, h)) for i, h in zip(ids, hexes, strict=True)]
        out.append(sorted(((i, d) for i, d in found if d <= max_distance), key=lambda p: (p[1], p[0])))
    return out


def test_match_equals_brute_force_with_boundaries() -> None:
    rng = np.random.default_rng(42)
    base = random_hex(rng)
    hexes: list[str] = []
    # neighbours of base at exact distances, including the 31/32 boundary, plus one repeated hash
    for distance in (0, 5, 20, 30, 31, 31, 32, 33, 40, 64):
        hexes.append(flip_bits(base, rng.choice(PDQ_BITS, size=distance, replace=False)))
    hexes.append(hexes[4])
    hexes += [random_hex(rng) for _ in range(200)]
    ids = [int(i) for i in rng.permutation(10_000)[: len(hexes)]]

    matcher = HashMatcher()
    assert len(matcher) == 0
    matcher.add(ids[:100], hexes[:100])
    matcher.add(ids[100:], hexes[100:])
    assert len(matcher) == len(hexes)

    queries = [base, hexes[50], random_hex(rng)]
    for max_distance in (0, 20, 31, 32, 64, 120, 128, 256):
        assert matcher.match(queries, max_distance) == brute_force(ids, hexes, queries, max_distance)

    default = matcher.match([base])[0]
    distances = [d for _, d in default]
    assert distances.count(31) == 3  # the two 31-bit flips and the repeated one: included
    assert 32 not in distances  # excluded at the default
    assert distances == sorted(distances)
    assert (ids[6], 32) in matcher.match([base], 32)[0]


def test_match_empty_cases() -> None:
    matcher = HashMatcher()
    h = "0" * 64
    assert matcher.match([h, h]) == [[], []]
    assert matcher.match([]) == []
    matcher.add([], [])
    assert len(matcher) == 0
    matcher.add([7], [h])
    assert matcher.match([]) == []
    assert matcher.match([h]) == [[(7, 0)]]


def test_add_and_match_validate() -> None:
    matcher = HashMatcher()
    with pytest.raises(ValueError):
        matcher.add([1, 2], ["0" * 64])
    with pytest.raises(ValueError):
        matcher.add([1], ["xyz"])
    assert len(matcher) == 0
    with pytest.raises(InvalidArgument):
        matcher.match(["0" * 64], max_distance=-1)
