"""The real-photograph corpus of the throughput benchmarks: every photograph scikit-image ships, and matplotlib's
Grace Hopper, each with transformed copies (distinct bytes, so every file costs a forward pass)."""

from __future__ import annotations

import io
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from indexer.backends.export import CALIBRATION_PHOTOS  # noqa: E402

#: The transformed copies made of each photograph (the originals are written as they ship).
VARIANTS = ("mirrored", "crop80", "rot90", "small_q70")


def photographs() -> list[Path]:
    import skimage

    src = Path(skimage.__file__).parent / "data"
    out = [src / n for n in CALIBRATION_PHOTOS if (src / n).is_file()]
    try:
        import matplotlib

        hopper = Path(matplotlib.__file__).parent / "mpl-data" / "sample_data" / "grace_hopper.jpg"
        if hopper.is_file():
            out.append(hopper)
    except ImportError:
        pass
    return out


def write_corpus(directory: Path, variants: tuple[str, ...] = VARIANTS) -> list[Path]:
    """The photographs and their copies as files in `directory` (JPEG for the copies)."""
    from PIL import Image, ImageOps

    directory.mkdir(parents=True, exist_ok=True)
    files = []
    for src in photographs():
        data = src.read_bytes()
        orig = directory / src.name
        orig.write_bytes(data)
        files.append(orig)
        with Image.open(io.BytesIO(data)) as im:
            rgb = im.convert("RGB")
        w, h = rgb.size
        made = {
            "mirrored": ImageOps.mirror(rgb),
            "crop80": rgb.crop((w // 10, h // 10, w - w // 10, h - h // 10)),
            "rot90": rgb.rotate(90, expand=True),
            "small_q70": rgb.resize((max(1, w * 2 // 3), max(1, h * 2 // 3))),
        }
        for v in variants:
            out = directory / f"{src.stem}_{v}.jpg"
            made[v].save(out, quality=70 if v == "small_q70" else 90)
            files.append(out)
    return files
