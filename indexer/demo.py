"""`make demo`: index scikit-image's sample photographs (plus re-uploads of a few) with the real model, then query."""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

from search.errors import NsfwIndexError

# Real photographs that ship inside the scikit-image wheel (no download).
SAMPLES = (
    "astronaut.png",
    "coffee.png",
    "chelsea.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "camera.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "brick.png",
    "grass.png",
    "gravel.png",
    "color.png",
)


def build_corpus(dest: Path) -> list[Path]:
    import skimage
    from PIL import Image

    src = Path(skimage.__file__).parent / "data"
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for name in SAMPLES:
        p = src / name
        if p.is_file():
            target = dest / name
            if not target.exists():
                target.write_bytes(p.read_bytes())
            out.append(target)
    # re-uploads of two photos: what a near-duplicate search must catch
    for name in ("astronaut.png", "chelsea.png"):
        if (dest / name).exists():
            img = Image.open(dest / name).convert("RGB")
            small = img.resize((img.width // 2, img.height // 2))
            buf = io.BytesIO()
            small.save(buf, "JPEG", quality=70)
            (dest / f"reupload_{Path(name).stem}.jpg").write_bytes(buf.getvalue())
    return out


def main() -> int:
    from indexer.analyze import analyze, query_answer
    from indexer.extractor import Extractor
    from indexer.service import index_inputs
    from search.query import Searcher
    from search.settings import Settings
    from search.store import Store

    root = Path(os.environ.get("NSFW_INDEX_DEMO_DIR", "demo-store")).resolve()
    corpus = root / "corpus"
    store_dir = root / "store"
    settings = Settings.from_flags(store=store_dir)
    print(f"model: {settings.model} (set NSFW_INDEX_MODEL or --model to use a local copy)")
    try:
        ex = Extractor.from_settings(settings)
    except NsfwIndexError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    build_corpus(corpus)
    with Store.writing(store_dir, "nsfw-index demo", create=True) as store:
        summary = index_inputs(store, [str(corpus)], settings, extractor=ex, progress=True)
    print(
        f"indexed {summary.new_images} new images into {store_dir} ({summary.unchanged} unchanged, "
        f"{summary.errors} errors); stage seconds {summary.timings}"
    )
    probe = corpus / "reupload_astronaut.jpg"
    (a,) = analyze(ex, [(str(probe), probe.read_bytes())], settings)
    if isinstance(a, NsfwIndexError):
        raise a
    searcher = Searcher.open(store_dir, settings)
    try:
        ans = query_answer(a, searcher, k=3)
    finally:
        searcher.close()
    print(f"query {probe.name}:")
    print(json.dumps(ans.to_json(), indent=1)[:3000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
