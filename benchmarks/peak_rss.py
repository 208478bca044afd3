"""Peak RSS of the indexer and of the server with the full-size model, per backend and dtype.

    .venv/bin/python benchmarks/peak_rss.py [--model DIR] [--pairs torch/fp32,openvino/bf16,...]

Indexer: `nsfw-index index` of the benchmark photographs (benchmarks/photos.py, originals only) into a new store;
peak RSS of the process (wait4's ru_maxrss: the largest of the indexer and the decode workers it waited for).
Server: `nsfw-index serve` on that store, 5 sequential `POST /v1/query` of one photograph, then VmHWM (the
process's own peak RSS) read from /proc before it is stopped. Export caches are warmed first (not counted).
Writes benchmarks/out/peak_rss.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out"
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

PAIRS = "torch/fp32,torch/bf16,onnxruntime/fp32,onnxruntime/int8,openvino/fp32,openvino/bf16,openvino/int8"


def vm_hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--pairs", default=PAIRS)
    args = ap.parse_args()
    import httpx
    from load import serving
    from photos import photographs

    OUT.mkdir(exist_ok=True)
    model = args.model or str(OUT / "full-size-ckpt")
    if not (Path(model) / "model.safetensors").is_file():
        from conftest import make_checkpoint

        make_checkpoint(Path(model), full_size=True)
    work = OUT / "peak_rss"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    photos = [str(p) for p in photographs()]
    exe = str(Path(sys.executable).parent / "nsfw-index")
    env = {**os.environ, "NSFW_INDEX_CACHE_DIR": str(OUT / "export-cache")}
    rows = []
    for pair in args.pairs.split(","):
        backend, dtype = pair.split("/")
        flags = ["--backend", backend, "--dtype", dtype]
        subprocess.run(
            [exe, "score", photos[0], "--model", model, *flags, "--json"],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # warm the export cache
        store = work / f"store-{backend}-{dtype}"
        t0 = time.perf_counter()
        p = subprocess.Popen([exe, "index", *photos, "--store", str(store), "--model", model, "-q", *flags], env=env)
        _, status, usage = os.wait4(p.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"index {pair} failed")
        row = {
            "backend": backend,
            "dtype": dtype,
            "index_peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
            "index_wall_s": round(time.perf_counter() - t0, 1),
        }
        serve_args = ["--store", str(store), "--model", model, *flags]
        with serving(serve_args, env) as (url, srv), httpx.Client(base_url=url, timeout=120) as c:
            data = Path(photos[0]).read_bytes()
            for _ in range(5):
                c.post("/v1/query", files={"file": ("q.png", data, "image/png")}).raise_for_status()
            row["server_peak_rss_mib"] = vm_hwm_mib(srv.pid)
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = {
        "date": time.strftime("%Y-%m-%d"),
        "model": args.model or "EVA-02 base/448, random weights (generated)",
        "index_images": len(photos),
        "rows": rows,
    }
    (OUT / "peak_rss.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
