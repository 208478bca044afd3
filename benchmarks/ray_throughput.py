"""Indexing on a local Ray instance against the local pipeline, on the same files, in the same run.

    .venv/bin/python benchmarks/ray_throughput.py --n 200 [--size 640x480] [--model DIR | --full-size] [--cpus N]
        [--backend auto|torch|onnxruntime|openvino]

Without --model it generates the tiny Freepik-layout test checkpoint (random weights: it times the work around the
model); --full-size generates the real EVA-02 base 448 architecture with random weights (the real compute). Both runs
index the same generated JPEGs into fresh stores (the local one with `cores - 1` decode processes, the Ray one on a
local instance with --cpus CPUs) and must produce the same sha256s. Ray's own start-up (`ray.init`) is timed apart;
the Ray run's time includes its actors' start-up (model load) and its workers' (imports, decoder processes), which
every run pays. Prints a table and writes benchmarks/out/ray_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def _shas(store: Any) -> set[str]:
    """The content hashes a store holds."""
    ids = sorted({state[2] for state in store.all_path_states().values()})
    return {row.sha256 for row in store.images(ids).values()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="images in the corpus")
    ap.add_argument("--size", default="640x480", help="WxH of the generated JPEGs")
    ap.add_argument("--model", default=None, help="checkpoint dir (default: generate the tiny test checkpoint)")
    ap.add_argument("--full-size", action="store_true", help="generate the real EVA-02 base 448 (random weights)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--backend", default="auto", help="forward-pass backend of both runs (auto, torch, ...)")
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="CPUs of the local Ray instance")
    ap.add_argument("--shard-size", type=int, default=256)
    args = ap.parse_args()

    import ray
    from conftest import make_checkpoint, photo

    from indexer.extractor import Extractor
    from indexer.ray_cluster import RayOptions
    from indexer.ray_index import index_inputs_ray
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
        settings = Settings(model=model, device="cpu", batch_size=args.batch_size, backend=args.backend)
        ex = Extractor.from_settings(settings)  # the local run's model, loaded before its clock starts

        t0 = time.perf_counter()
        with Store.writing(t / "local", "benchmark", create=True) as store:
            local = index_inputs(store, [str(corpus)], settings, extractor=ex)
        local_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="warning", log_to_driver=False)
        ray_init_s = time.perf_counter() - t0
        try:
            t0 = time.perf_counter()
            with Store.writing(t / "ray", "benchmark", create=True) as store:
                summary, report = index_inputs_ray(
                    store, [str(corpus)], settings, RayOptions(shard_size=args.shard_size), extractor=ex
                )
            ray_s = time.perf_counter() - t0
        finally:
            ray.shutdown()
        with Store(t / "local", readonly=True) as a, Store(t / "ray", readonly=True) as b:
            assert _shas(a) == _shas(b) and len(_shas(a)) == args.n == local.new_images == summary.new_images

    tm = summary.timings
    per_image = {
        "decode_s": round(tm.get("decode(worker)", 0.0) / args.n, 5),
        "model_s": round(tm.get("model(actor)", 0.0) / args.n, 5),
        "read_hash_s": round(tm.get("ray:read+hash", 0.0) / args.n, 5),
    }
    out = {
        "n": args.n,
        "size": args.size,
        "model": args.model
        or ("EVA-02 base 448, random weights" if args.full_size else "tiny test checkpoint (random weights)"),
        "batch_size": args.batch_size,
        "engine": summary.engine,
        "cpu_count": os.cpu_count(),
        "ray_cpus": args.cpus,
        "local": {"seconds": round(local_s, 2), "images_per_s": round(args.n / local_s, 2), "timings": local.timings},
        "ray": {
            "init_seconds": round(ray_init_s, 2),
            "seconds": round(ray_s, 2),
            "images_per_s": round(args.n / ray_s, 2),
            "timings": tm,
            "per_image_seconds": per_image,
            "inference_workers": report.inference_workers,
            "threads_per_worker": report.threads_per_worker,
            "shards": report.shards_written,
        },
        "ray_vs_local": round((args.n / ray_s) / (args.n / local_s), 3),
    }
    print(f"{'variant':<44} {'img/s':>8} {'seconds':>8}")
    print(f"{'local pipeline (decode processes + model)':<44} {out['local']['images_per_s']:>8} {local_s:>8.2f}")
    label = f"local Ray, {args.cpus} CPUs (+ {ray_init_s:.1f}s ray.init)"
    print(f"{label:<44} {out['ray']['images_per_s']:>8} {ray_s:>8.2f}")
    print(f"Ray / local throughput: {out['ray_vs_local']}x; per image on Ray: {per_image}")
    (ROOT / "benchmarks" / "out").mkdir(exist_ok=True)
    (ROOT / "benchmarks" / "out" / "ray_throughput.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
