"""Indexing throughput: pipelined decoding (worker processes, prefetch) against in-process decoding, same run.

    .venv/bin/python benchmarks/index_throughput.py --n 300 [--model DIR] [--size 1024x768] [--workers 1]

Without --model it generates the tiny Freepik-layout test checkpoint (random weights: a stand-in for timing the
pipeline around the model, not the model itself). Prints a table and writes benchmarks/out/index_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=300, help="images in the corpus")
    ap.add_argument("--size", default="1024x768", help="WxH of the generated JPEGs")
    ap.add_argument("--model", default=None, help="checkpoint dir (default: generate the tiny test checkpoint)")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument(
        "--full-size",
        action="store_true",
        help="generate the real EVA-02 base 448 architecture (random weights) to time the real compute",
    )
    args = ap.parse_args()

    from conftest import make_checkpoint, photo

    from indexer.extractor import Extractor
    from indexer.service import index_inputs
    from search.settings import Settings
    from search.store import Store

    w, h = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        model = args.model or str(make_checkpoint(t / "ckpt", full_size=args.full_size))
        corpus = t / "corpus"
        corpus.mkdir()
        for i in range(args.n):
            photo(i, (w, h)).save(corpus / f"{i:05d}.jpg", quality=90)
        results = {}
        ex = Extractor.from_settings(Settings(model=model, device="cpu"))
        for name, workers in (
            ("in-process decode (baseline)", 0),
            (f"pipelined, {args.workers} decode workers", args.workers),
        ):
            s = Settings(model=model, device="cpu", workers=workers, batch_size=args.batch_size)
            t0 = time.perf_counter()
            with Store.writing(t / f"store{workers}", "benchmark", create=True) as store:
                summary = index_inputs(store, [str(corpus)], s, extractor=ex)
            dt = time.perf_counter() - t0
            t1 = time.perf_counter()
            with Store.writing(t / f"store{workers}", "benchmark") as store:
                again = index_inputs(store, [str(corpus)], s, extractor=ex)
            rerun = time.perf_counter() - t1
            assert summary.new_images == args.n and again.unchanged == args.n
            results[name] = {
                "seconds": round(dt, 2),
                "images_per_s": round(args.n / dt, 2),
                "rerun_seconds": round(rerun, 3),
                "stages": summary.timings,
            }
        base, piped = list(results.values())
        what = "EVA-02 base 448, random weights" if args.full_size else "tiny test checkpoint (random weights)"
        out = {
            "n": args.n,
            "size": args.size,
            "model": args.model or what,
            "batch_size": args.batch_size,
            "cpu_count": os.cpu_count(),
            "results": results,
            "speedup_pipelined_vs_baseline": round(piped["images_per_s"] / base["images_per_s"], 2),
        }
    print(f"{'variant':<36} {'img/s':>8} {'seconds':>8} {'unchanged re-run s':>19}")
    for name, r in results.items():
        print(f"{name:<36} {r['images_per_s']:>8} {r['seconds']:>8} {r['rerun_seconds']:>19}")
    print(f"pipelined / baseline: {out['speedup_pipelined_vs_baseline']}x")
    (ROOT / "benchmarks" / "out").mkdir(exist_ok=True)
    (ROOT / "benchmarks" / "out" / "index_throughput.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
