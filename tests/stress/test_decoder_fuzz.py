"""Hypothesis-generated truncations and byte mutations of valid JPEG, PNG, GIF, WebP and TIFF files through the
decoder (`decode_image` and `prepare_image`): only InvalidImage or a valid result, each case time- and
memory-bounded."""

from __future__ import annotations

import io
import os
import time
from typing import Any

import pytest
from conftest import photo
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stress.conftest import record

EXAMPLES = int(os.environ.get("NSFW_INDEX_STRESS_FUZZ_EXAMPLES", "2000"))
CASE_SECONDS = 20.0  # a hang shows as minutes; a loaded 2-core machine still decodes these in well under a second
RSS_GROWTH_MB = 1024
MAX_PIXELS = 4096 * 4096
COUNTS: dict[str, int] = {}


def _rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _samples(fmt: str) -> list[bytes]:
    out = []
    for seed, size in ((1, (96, 80)), (2, (200, 150))):
        img = photo(seed, size)
        buf = io.BytesIO()
        if fmt == "GIF":
            img.save(buf, "GIF", save_all=True, append_images=[photo(seed + 9, size)], duration=50, loop=0)
        elif fmt == "JPEG":
            img.save(buf, "JPEG", quality=85, progressive=seed == 2)
        elif fmt == "PNG":
            (img.convert("P") if seed == 2 else img).save(buf, "PNG")
        elif fmt == "TIFF":
            img.save(buf, "TIFF", compression="tiff_lzw" if seed == 2 else "raw")
        else:
            img.save(buf, fmt)
        out.append(buf.getvalue())
    return out


@st.composite
def damaged(draw: Any, samples: list[bytes]) -> bytes:
    data = bytearray(draw(st.sampled_from(samples)))
    kind = draw(st.sampled_from(["truncate", "mutate", "both", "header"]))
    if kind in ("mutate", "both", "header"):
        hi = min(len(data), 64) if kind == "header" else len(data)  # the header holds sizes, counts, offsets
        for _ in range(draw(st.integers(1, 16))):
            data[draw(st.integers(0, hi - 1))] = draw(st.integers(0, 255))
    if kind in ("truncate", "both"):
        data = data[: draw(st.integers(0, len(data) - 1))]
    return bytes(data)


@pytest.fixture(scope="module")
def transform():  # type: ignore[no-untyped-def]
    from timm.data import create_transform

    return create_transform(input_size=(3, 56, 56), is_training=False)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP", "TIFF"])
def test_damaged_files_decode_or_are_refused(fmt: str, transform) -> None:  # type: ignore[no-untyped-def]
    from indexer.decode import decode_image
    from indexer.prepare import prepare_image
    from search.errors import InvalidImage

    samples = _samples(fmt)
    base_rss = _rss_mb()
    seen = {"cases": 0, "refused": 0, "valid": 0}

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(damaged(samples))
    def case(data: bytes) -> None:
        t0 = time.monotonic()
        seen["cases"] += 1
        try:
            dec = decode_image(data, "f", max_bytes=1 << 26, max_pixels=MAX_PIXELS)
            assert dec.width > 0 and dec.height > 0 and dec.width * dec.height <= MAX_PIXELS
            prep = prepare_image("f", data, transform=transform, max_bytes=1 << 26, max_pixels=MAX_PIXELS)
            assert tuple(prep.tensor.shape) == (3, 56, 56) and len(prep.sha256) == 64
            seen["valid"] += 1
        except InvalidImage:
            seen["refused"] += 1
        took = time.monotonic() - t0
        assert took < CASE_SECONDS, f"{len(data)} bytes took {took:.1f} s"
        assert _rss_mb() - base_rss < RSS_GROWTH_MB, f"RSS grew to {_rss_mb():.0f} MB"

    case()
    for k, v in seen.items():
        COUNTS[f"{fmt}_{k}"] = v
    COUNTS["peak_rss_mb"] = max(COUNTS.get("peak_rss_mb", 0), int(_rss_mb()))
    if fmt == "TIFF":
        record("decoder_fuzz", {"inputs_tried": sum(v for k, v in COUNTS.items() if k.endswith("_cases")), **COUNTS})
