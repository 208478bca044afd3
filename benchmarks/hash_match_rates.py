"""Match rates on real photos and their mirrored, rotated, transposed, cropped and re-encoded copies: plain PDQ
against dihedral PDQ against the embedding's nearest neighbour; and what the dihedral hashes cost in prepare.

    nice -n 10 .venv/bin/python benchmarks/hash_match_rates.py [--full-size | --model DIR] [--device cpu|cuda]

The photos are scikit-image's sample photographs (shipped in the wheel). Each copy and each original goes through
the product path: `index_inputs` into a fresh store (prepare_image: decode, sha256, PDQ + its 8 dihedral hashes,
the model), then the originals' stored PDQ hashes are imported as a hash list (`import_hash_list`), so that the
store matches every copy's dihedral hashes against it. Per kind of copy:
- plain PDQ: the copy's own PDQ hash is within 31 bits of its original's (the list entry);
- dihedral PDQ: the store matched the copy to its original's entry within 31 bits (any of its 8 hashes);
- embedding NN: the copy's nearest original by cosine similarity of the stored embeddings is its own original.
`wrong` counts matches to another original's entry (false positives), per method.

The embedding needs weights. Without --model the store uses a generated random-weight EVA-02 (tests/conftest.py
`make_checkpoint`): the tiny one by default (fast; its embedding answers say nothing about the real model), the real
architecture at 448x448 with --full-size (about 1 s an image on CPU; still random weights, so still not the real
model's answers). Give --model Freepik/nsfw_image_detector (or a local copy) for the real model's figures.

The prepare cost part times `compute_pdq` against `compute_pdq_dihedral` on the same decoded image (decoded as
`prepare_image` decodes it for the real model's 448 transform), natively and 4x upscaled, and the whole
`prepare_image` (wall time) for scale; PDQ times are CPU times of this thread, paired (`--cost-only`: just this
part). Prints two tables; writes benchmarks/out/hash_match_rates.json.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from PIL import Image  # noqa: E402

T = Image.Transpose
#: scikit-image's sample photographs (textures included); motorcycle_right is left out: it is the other half of
#: a stereo pair with motorcycle_left, a near-duplicate by nature
PHOTOS = (
    "astronaut.png",
    "camera.png",
    "chelsea.png",
    "coffee.png",
    "coins.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "moon.png",
    "motorcycle_left.png",
    "page.png",
    "retina.jpg",
    "rocket.jpg",
    "brick.png",
    "grass.png",
    "gravel.png",
)
#: not photographs of scenes: high-frequency textures and a scanned page (reported apart: PDQ's mirror hashes are
#: least exact on them)
NOT_SCENES = {"brick", "grass", "gravel", "page"}
THRESHOLD = 31  # ThreatExchange's PDQ match distance (the store's default)


def _crop(img: Image.Image, fraction: float) -> Image.Image:
    """Cut `fraction` of the width and of the height, half on each side (a central crop)."""
    dx, dy = round(img.width * fraction / 2), round(img.height * fraction / 2)
    return img.crop((dx, dy, img.width - dx, img.height - dy))


def _jpeg(img: Image.Image, quality: int = 75) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


#: kind of copy -> (how it is made, the format it is saved in)
COPIES: dict[str, tuple[Callable[[Image.Image], Image.Image], str]] = {
    "flipH": (lambda im: im.transpose(T.FLIP_LEFT_RIGHT), "PNG"),
    "flipV": (lambda im: im.transpose(T.FLIP_TOP_BOTTOM), "PNG"),
    "rot90": (lambda im: im.transpose(T.ROTATE_90), "PNG"),
    "rot180": (lambda im: im.transpose(T.ROTATE_180), "PNG"),
    "rot270": (lambda im: im.transpose(T.ROTATE_270), "PNG"),
    "transpose": (lambda im: im.transpose(T.TRANSPOSE), "PNG"),
    "transverse": (lambda im: im.transpose(T.TRANSVERSE), "PNG"),
    "crop5": (lambda im: _crop(im, 0.05), "PNG"),
    "crop10": (lambda im: _crop(im, 0.10), "PNG"),
    "crop20": (lambda im: _crop(im, 0.20), "PNG"),
    "jpeg75": (lambda im: im, "JPEG"),
    "half_jpeg75": (lambda im: im.resize((im.width // 2, im.height // 2), Image.Resampling.BICUBIC), "JPEG"),
    "flipH_crop5": (lambda im: _crop(im.transpose(T.FLIP_LEFT_RIGHT), 0.05), "PNG"),
    "rot90_jpeg75": (lambda im: im.transpose(T.ROTATE_90), "JPEG"),
    "rot90_crop10": (lambda im: _crop(im.transpose(T.ROTATE_90), 0.10), "PNG"),
}


def load_photos() -> dict[str, Image.Image]:
    import skimage

    src = Path(skimage.__file__).parent / "data"
    return {Path(n).stem: Image.open(src / n).convert("RGB") for n in PHOTOS if (src / n).is_file()}


def save(img: Image.Image, path: Path, fmt: str) -> Path:
    path = path.with_suffix(".jpg" if fmt == "JPEG" else ".png")
    img.save(path, fmt, **({"quality": 75} if fmt == "JPEG" else {}))
    return path


def match_rates(photos: dict[str, Image.Image], model: str, device: str, tmp: Path) -> dict[str, Any]:
    import numpy as np

    from indexer.service import index_inputs
    from search.labels import import_hash_list
    from search.pdq import hamming
    from search.settings import Settings
    from search.store import Store

    corpus = tmp / "corpus"
    corpus.mkdir()
    for name, img in photos.items():
        save(img, corpus / f"orig__{name}", "PNG")
        for kind, (make, fmt) in COPIES.items():
            save(make(img), corpus / f"{kind}__{name}", fmt)
    settings = Settings(
        model=model, device=device, backend="torch", workers=0, batch_size=8, nsfw_threshold=1.0, store=tmp / "store"
    )
    t0 = time.perf_counter()
    with Store.writing(tmp / "store", "benchmark", create=True) as store:
        summary = index_inputs(store, [str(corpus)], settings)
    index_s = time.perf_counter() - t0
    with Store(tmp / "store") as store:
        by_stem = {Path(p).stem: i for p, (_, _, i) in store.all_path_states().items()}
        original_ids = {n: by_stem[f"orig__{n}"] for n in photos}
        rows = store.images(list(by_stem.values()))
        entries = [rows[original_ids[n]].pdq.hash or "" for n in photos]
        import_hash_list(store, "\n".join(entries), "originals", settings, source="benchmark", who="benchmark")
        entry_of = {str(h): (int(i), str(n)) for i, h, n, _ in store.hash_list_entries()}
        owner = {entry_of[entries[k]][0]: n for k, n in enumerate(photos)}  # entry id -> its photo
        stored: dict[int, list[tuple[str, int, str]]] = {}  # image id -> (photo of the entry, distance, transform)
        for image_id, entry, distance, transform in store.db.execute(
            "SELECT image_id, list_hash_id, distance, transform FROM hash_matches WHERE distance <= ?", [THRESHOLD]
        ):
            stored.setdefault(int(image_id), []).append((owner[int(entry)], int(distance), str(transform)))
        names = list(photos)
        originals = store.vectors([original_ids[n] for n in names])
        table: dict[str, Any] = {}
        for kind in COPIES:
            row: dict[str, Any] = {"n": 0, "plain": 0, "dihedral": 0, "embedding_nn": 0}
            row |= {"scenes": {"n": 0, "plain": 0, "dihedral": 0, "embedding_nn": 0}}
            row |= {"wrong": {"plain": 0, "dihedral": 0}, "missed_dihedral": []}
            sims: list[float] = []
            transforms: dict[str, int] = {}
            for n in names:
                image_id = by_stem[f"{kind}__{n}"]
                own = rows[image_id].pdq.hash or ""
                plain = [m for m, h in zip(names, entries, strict=True) if own and hamming(own, h) <= THRESHOLD]
                found = stored.get(image_id, [])
                hit = [f for f in found if f[0] == n]
                sim = originals @ store.vectors([image_id])[0]
                got = {
                    "n": 1,
                    "plain": n in plain,
                    "dihedral": bool(hit),
                    "embedding_nn": names[int(np.argmax(sim))] == n,
                }
                for key, value in got.items():
                    row[key] += int(value)
                    if n not in NOT_SCENES:
                        row["scenes"][key] += int(value)
                if not hit:
                    row["missed_dihedral"].append(n)
                row["wrong"]["plain"] += len([m for m in plain if m != n])
                row["wrong"]["dihedral"] += len([f for f in found if f[0] != n])
                for _, _, t in hit:
                    transforms[t] = transforms.get(t, 0) + 1
                sims.append(float(sim[names.index(n)]))
            row["matched_transforms"] = transforms
            row["mean_similarity_to_own"] = round(statistics.fmean(sims), 4)
            table[kind] = row
        # unrelated photos matching each other's entries: what the extra hashes cost in false positives
        cross = {"plain": 0, "dihedral": 0}
        for n in names:
            own = rows[original_ids[n]].pdq.hash or ""
            cross["plain"] += sum(1 for m, h in zip(names, entries, strict=True) if m != n and hamming(own, h) <= 31)
            cross["dihedral"] += sum(1 for f in stored.get(original_ids[n], []) if f[0] != n)
    return {
        "photos": names,
        "copies": table,
        "originals_matching_another_original": cross,
        "index_seconds": round(index_s, 1),
        "indexed_images": summary.new_images,
    }


def prepare_cost(photos: dict[str, Image.Image], reps: int) -> dict[str, Any]:
    import timm
    from timm.data import create_transform, resolve_data_config

    from indexer.decode import decode_image
    from indexer.prepare import decode_side, prepare_image
    from search.pdq import compute_pdq, compute_pdq_dihedral

    arch = "eva02_base_patch14_448.mim_in22k_ft_in22k_in1k"
    transform = create_transform(
        **resolve_data_config({}, pretrained_cfg=timm.models.get_pretrained_cfg(arch).to_dict()), is_training=False
    )
    side, cap = decode_side(transform), 10**9

    def paired_ms(a: Callable[[], object], b: Callable[[], object]) -> tuple[float, float, float]:
        """Median CPU ms of `a`, of `b`, and of b - a, timed in alternation on this thread's CPU clock (both are
        single-threaded: the other load of a shared machine does not count in)."""
        a(), b()
        ta, tb = [], []
        for _ in range(reps):
            t = time.thread_time()
            a()
            t1 = time.thread_time()
            b()
            t2 = time.thread_time()
            ta.append(t1 - t)
            tb.append(t2 - t1)
        diffs = [y - x for x, y in zip(ta, tb, strict=True)]
        return statistics.median(ta) * 1000, statistics.median(tb) * 1000, statistics.median(diffs) * 1000

    out: dict[str, Any] = {}
    for scale in (1, 4):
        per: list[dict[str, Any]] = []
        for name, img in photos.items():
            big = img if scale == 1 else img.resize((img.width * scale, img.height * scale), Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            big.save(buf, "JPEG", quality=90)
            data = buf.getvalue()
            decoded = decode_image(data, name, max_bytes=cap, max_pixels=cap, min_side=side).image
            plain, dihedral, extra = paired_ms(
                lambda d=decoded: compute_pdq(d), lambda d=decoded: compute_pdq_dihedral(d)
            )
            prep = prepare_image(name, data, transform=transform, max_bytes=cap, max_pixels=cap)
            prep_ms = statistics.median(
                [
                    prepare_image(name, data, transform=transform, max_bytes=cap, max_pixels=cap).seconds
                    for _ in range(3)
                ]
            )
            per.append(
                {
                    "photo": name,
                    "size": list(big.size),
                    "decoded": list(decoded.size),
                    "plain_ms": round(plain, 3),
                    "dihedral_ms": round(dihedral, 3),
                    "extra_ms": round(extra, 3),
                    "prepare_ms": round(prep_ms * 1000, 2),
                    "prepare_steps_ms": {k: round(v * 1000, 2) for k, v in prep.timings.items()},
                }
            )
        out[f"x{scale}"] = {
            "images": per,
            "mean_plain_ms": round(statistics.fmean(p["plain_ms"] for p in per), 3),
            "mean_dihedral_ms": round(statistics.fmean(p["dihedral_ms"] for p in per), 3),
            "mean_extra_ms": round(statistics.fmean(p["extra_ms"] for p in per), 3),
            "mean_prepare_ms": round(statistics.fmean(p["prepare_ms"] for p in per), 3),
        }
    return out


def _misses(missed: list[str], names: list[str]) -> str:
    if len(missed) <= len(names) // 2:
        return ", ".join(missed)
    caught = [n for n in names if n not in missed]
    return "all" if not caught else f"all but {', '.join(caught)}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="A checkpoint (default: a generated random-weight one).")
    ap.add_argument("--full-size", action="store_true", help="Generate the real architecture (random weights).")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--reps", type=int, default=30, help="Timing repetitions for the prepare cost.")
    ap.add_argument("--cost-only", action="store_true", help="Only the prepare cost part (no store, no model).")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "hash_match_rates.json")
    args = ap.parse_args()

    from conftest import make_checkpoint

    photos = load_photos()
    rates: dict[str, Any] = {}
    weights = None
    if not args.cost_only:
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d)
            if args.model:
                model, weights = args.model, f"checkpoint {args.model}"
            else:
                model = str(make_checkpoint(tmp / "ckpt", full_size=args.full_size))
                weights = (
                    "generated random-weight EVA-02 at 448 (real architecture, NOT the real model's embedding)"
                    if args.full_size
                    else "generated tiny random-weight EVA-02 (NOT the real model's embedding)"
                )
            rates = match_rates(photos, model, args.device, tmp)
    cost = prepare_cost(photos, args.reps)
    result = {"embedding_model": weights, "threshold": THRESHOLD, **rates, "prepare_cost": cost}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if rates:
        print_rates(rates, str(weights))
    print("prepare cost (per image, mean over the photos; PDQ: paired median CPU ms; prepare_image: wall ms):")
    for scale, c in cost.items():
        print(
            f"  {scale}: PDQ {c['mean_plain_ms']:.2f} ms, dihedral PDQ {c['mean_dihedral_ms']:.2f} ms "
            f"(extra {c['mean_extra_ms']:+.2f} ms), whole prepare_image {c['mean_prepare_ms']:.1f} ms"
        )
    print(f"wrote {args.out}")


def print_rates(rates: dict[str, Any], weights: str) -> None:
    n = len(rates["photos"])
    print(f"{n} photos x {len(COPIES)} kinds of copy; PDQ match at distance <= {THRESHOLD}; embedding: {weights}")
    print(f"matched of all {n} (of the {n - len(NOT_SCENES)} scenes, without {', '.join(sorted(NOT_SCENES))})")
    print("| copy | plain PDQ | dihedral PDQ | embedding NN | cos to own | wrong plain/dihedral | dihedral misses |")
    print("|---|---|---|---|---|---|---|")
    for kind, r in rates["copies"].items():
        c = r["scenes"]
        cells = [f"{r[k]}/{r['n']} ({c[k]}/{c['n']})" for k in ("plain", "dihedral", "embedding_nn")]
        print(
            f"| {kind} | {' | '.join(cells)} | {r['mean_similarity_to_own']:.3f} | "
            f"{r['wrong']['plain']}/{r['wrong']['dihedral']} | {_misses(r['missed_dihedral'], rates['photos'])} |"
        )
    cross = rates["originals_matching_another_original"]
    print(f"originals matching another original's entry: plain {cross['plain']}, dihedral {cross['dihedral']}")


if __name__ == "__main__":
    main()
