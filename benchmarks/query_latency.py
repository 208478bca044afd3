"""`POST /v1/query` with one image at one client against the model-only time of one image, in the same run.

    .venv/bin/python benchmarks/query_latency.py [--model DIR] [--requests 20] [--backend auto] [--dtype ...]

Model-only: the extractor's forward pass (`Extractor.run_prepared`) on one prepared photograph, in this process,
while the server idles. Query: the whole HTTP request (multipart upload, decode, sha256, PDQ, the inference queue,
FAISS, the JSON answer) on a store of the benchmark photographs, sequential requests. Prints both medians and the
ratio; writes benchmarks/out/query_latency.json. Without --model: the full-size random-weight checkpoint.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--backend", default=None)
    ap.add_argument("--dtype", default=None)
    args = ap.parse_args()

    import httpx
    from load import started_server
    from photos import photographs

    from indexer.extractor import Extractor
    from indexer.prepare import prepare_image
    from search.settings import Settings

    OUT.mkdir(exist_ok=True)
    model = args.model or str(OUT / "full-size-ckpt")
    if not (Path(model) / "model.safetensors").is_file():
        from conftest import make_checkpoint

        make_checkpoint(Path(model), full_size=True)
    work = OUT / "query_latency"
    subprocess.run(["rm", "-rf", str(work)], check=True)
    photos = photographs()
    env = {"NSFW_INDEX_CACHE_DIR": str(OUT / "export-cache")}
    flags = [f for k, v in (("--backend", args.backend), ("--dtype", args.dtype)) if v for f in (k, v)]
    exe = str(Path(sys.executable).parent / "nsfw-index")
    import os

    subprocess.run(
        [exe, "index", *map(str, photos), "--store", str(work / "store"), "--model", model, "-q", *flags],
        check=True,
        env={**os.environ, **env},
    )
    os.environ.update(env)
    settings = Settings(model=model, device="cpu", backend=args.backend or "auto", dtype=args.dtype)
    ex = Extractor.from_settings(settings)
    picks = [p for p in photos if p.suffix == ".jpg"] or photos
    datas = [(p.name, p.read_bytes()) for p in picks]
    limits = {"max_bytes": settings.max_file_bytes, "max_pixels": settings.max_pixels}
    prepared = [prepare_image(n, d, transform=ex.transform, **limits) for n, d in datas]
    ex.run_prepared(prepared[:1])  # warm-up
    model_only = []
    for i in range(args.requests):
        t0 = time.perf_counter()
        ex.run_prepared([prepared[i % len(prepared)]])
        model_only.append(time.perf_counter() - t0)
    del ex
    srv_env = dict(env)
    if args.backend:
        srv_env["NSFW_INDEX_BACKEND"] = args.backend
    if args.dtype:
        srv_env["NSFW_INDEX_DTYPE"] = args.dtype
    query = []
    with started_server(work / "store", model, "cpu", srv_env) as url, httpx.Client(base_url=url, timeout=120) as c:
        name, data = datas[0]
        c.post("/v1/query", files={"file": (name, data, "image/jpeg")}).raise_for_status()  # warm-up
        for i in range(args.requests):
            name, data = datas[i % len(datas)]
            t0 = time.perf_counter()
            r = c.post("/v1/query", files={"file": (name, data, "image/jpeg")})
            query.append(time.perf_counter() - t0)
            r.raise_for_status()
        engine = r.json().get("model", {})
    out = {
        "date": time.strftime("%Y-%m-%d"),
        "model": args.model or "EVA-02 base/448, Freepik layout, random weights (generated)",
        "images": [n for n, _ in datas],
        "image_bytes": [len(d) for _, d in datas],
        "requests": args.requests,
        "model_only_median_s": round(statistics.median(model_only), 4),
        "query_median_s": round(statistics.median(query), 4),
        "query_p90_s": round(sorted(query)[int(0.9 * (len(query) - 1))], 4),
        "ratio_query_over_model_only": round(statistics.median(query) / statistics.median(model_only), 3),
        "server_model": engine,
    }
    print(json.dumps(out, indent=1))
    (OUT / "query_latency.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
