"""Model-only speed and drift of every backend and dtype against torch fp32 (the baseline, same run).

    .venv/bin/python benchmarks/backends.py [--model DIR] [--batch-size 8] [--pairs torch/bf16,openvino/bf16,...]

Inputs: the benchmark photographs (benchmarks/photos.py) and their mirror images, through the model's own
transform. For each pair: seconds per image of `Extractor.run_prepared` at the batch size (after one warm-up
batch), the one-time load (export/quantisation when the cache is cold, else the cached graph), and the drift from
torch fp32: max probability difference, min embedding cosine, share of images on the same level. Writes
benchmarks/out/backends.json. Without --model: the full-size random-weight checkpoint (the compute of the real one).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

PAIRS = "torch/bf16,onnxruntime/fp32,onnxruntime/int8,openvino/fp32,openvino/bf16,openvino/int8"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--pairs", default=PAIRS)
    args = ap.parse_args()
    os.environ.setdefault("NSFW_INDEX_CACHE_DIR", str(OUT / "export-cache"))
    from photos import photographs
    from PIL import Image, ImageOps

    from indexer.backends.base import native_bf16
    from indexer.extractor import Extractor
    from indexer.prepare import prepare_image
    from search.settings import Settings

    OUT.mkdir(exist_ok=True)
    model = args.model or str(OUT / "full-size-ckpt")
    if not (Path(model) / "model.safetensors").is_file():
        from conftest import make_checkpoint

        make_checkpoint(Path(model), full_size=True)

    def extractor(backend: str, dtype: str) -> Extractor:
        return Extractor.from_settings(
            Settings(model=model, device="cpu", backend=backend, dtype=dtype, batch_size=args.batch_size)
        )

    import io

    files = []
    for p in photographs():
        files.append((p.name, p.read_bytes()))
        with Image.open(p) as im:
            buf = io.BytesIO()
            ImageOps.mirror(im.convert("RGB")).save(buf, "PNG")
        files.append((f"mirrored-{p.name}", buf.getvalue()))

    def measure(backend: str, dtype: str) -> tuple[dict, list]:
        t0 = time.perf_counter()
        ex = extractor(backend, dtype)
        load = time.perf_counter() - t0
        s = ex.settings
        items = [
            prepare_image(n, d, transform=ex.transform, max_bytes=s.max_file_bytes, max_pixels=s.max_pixels)
            for n, d in files
        ]
        ex.run_prepared(items[: args.batch_size])  # warm-up
        t1 = time.perf_counter()
        res = ex.run_prepared(items)
        per = (time.perf_counter() - t1) / len(items)
        return {
            "backend": backend,
            "dtype": dtype,
            "s_per_image": round(per, 4),
            "load_s": round(load, 1),
            "built": ex.engine.built,
        }, res

    base_row, base = measure("torch", "fp32")
    rows = [base_row]
    print(json.dumps(base_row), flush=True)
    for pair in args.pairs.split(","):
        backend, dtype = pair.split("/")
        row, res = measure(backend, dtype)
        row["speedup_vs_torch_fp32"] = round(base_row["s_per_image"] / row["s_per_image"], 2)
        row["max_prob_diff"] = round(
            max(
                abs(a.probabilities[k] - b.probabilities[k])
                for a, b in zip(res, base, strict=True)
                for k in a.probabilities
            ),
            5,
        )
        row["min_cosine"] = round(min(float(a.embedding @ b.embedding) for a, b in zip(res, base, strict=True)), 6)
        row["level_agreement"] = round(float(np.mean([a.level == b.level for a, b in zip(res, base, strict=True)])), 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = {
        "date": time.strftime("%Y-%m-%d"),
        "model": args.model or "EVA-02 base/448, Freepik layout, random weights (generated)",
        "images": len(files),
        "batch_size": args.batch_size,
        "native_bf16": native_bf16(),
        "cpu_count": os.cpu_count(),
        "rows": rows,
    }
    (OUT / "backends.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
