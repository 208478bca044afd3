"""Load test of the HTTP service: p50/p99 latency and throughput at 1, 4 and 16 concurrent clients (127.0.0.1 only).

Either targets a running server (`--url http://127.0.0.1:8000`) or starts `nsfw-index serve` itself on a free port
(`--store DIR --model M`, optionally building the store first from `--images DIR` or `--synthetic N` generated
images). Bounded: at most `--requests` requests and `--duration` seconds per (route, concurrency) cell.

    python benchmarks/load.py --model ./ckpt --synthetic 200 --requests 300
    python benchmarks/load.py --url http://127.0.0.1:8000 --concurrency 1,4,16
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
from PIL import Image

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


def synthetic_image(seed: int, size: tuple[int, int] = (320, 240)) -> Image.Image:
    """A smooth random colour field with a few blocks: distinct per seed, cheap to make."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        fx, fy, ph = rng.uniform(0.005, 0.08), rng.uniform(0.005, 0.08), rng.uniform(0, 6.28)
        img[..., c] = 127 + 120 * np.sin(fx * xx + ph) * np.cos(fy * yy + ph * c)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
        img[y0 : y0 + int(rng.integers(10, 80)), x0 : x0 + int(rng.integers(10, 80))] = rng.integers(0, 255, 3)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return None
    rank = max(1, int(np.ceil(q / 100 * len(sorted_values))))
    return sorted_values[rank - 1]


@contextmanager
def serving(args: list[str], env: dict[str, str], timeout: float = 600) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """`nsfw-index serve ARGS --host 127.0.0.1 --port 0` in a subprocess (its access log discarded); yields its URL
    and the process, stops it on exit."""
    cmd = [sys.executable, "-m", "indexer.cli", "serve", *args, "--host", "127.0.0.1", "--port", "0"]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, **env}
    )
    try:
        assert proc.stderr is not None
        url = None
        deadline = time.monotonic() + timeout
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                raise SystemExit(f"the server exited with status {proc.returncode}")
            m = re.search(r"running on (http://127\.0\.0\.1:\d+)", line)
            url = m.group(1) if m else None
        if url is None:
            raise SystemExit(f"the server did not start within {timeout:.0f} s")
        threading.Thread(target=proc.stderr.read, daemon=True).start()
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def started_server(store: Path, model: str, device: str | None, env: dict[str, str]) -> Iterator[str]:
    """`nsfw-index serve` on `store` with `model`; yields its URL."""
    with serving(["--store", str(store), "--model", model] + (["--device", device] if device else []), env) as (url, _):
        yield url


async def run_cell(
    url: str,
    route: str,
    concurrency: int,
    payloads: list[bytes],
    ids: list[int],
    max_requests: int,
    max_seconds: float,
    headers: dict[str, str],
) -> dict[str, Any]:
    """`concurrency` clients issue requests back to back until `max_requests` are done or time is up."""
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    issued = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits, headers=headers) as client:
        start = time.perf_counter()
        deadline = start + max_seconds

        async def one_client() -> None:
            nonlocal issued
            while issued < max_requests and time.perf_counter() < deadline:
                n = issued
                issued += 1
                t0 = time.perf_counter()
                try:
                    if route == "query":
                        r = await client.post(
                            "/v1/query", files={"file": (f"q{n}.jpg", payloads[n % len(payloads)], "image/jpeg")}
                        )
                    else:
                        r = await client.get(f"/v1/images/{ids[n % len(ids)]}/neighbours")
                    key = str(r.status_code)
                except httpx.HTTPError as e:
                    key = type(e).__name__
                took = time.perf_counter() - t0
                statuses[key] = statuses.get(key, 0) + 1
                if key == "200":
                    latencies.append(took)

        await asyncio.gather(*(one_client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    latencies.sort()
    ms = [x * 1000 for x in latencies]
    return {
        "route": route,
        "concurrency": concurrency,
        "requests": issued,
        "ok": len(latencies),
        "statuses": statuses,
        "seconds": round(elapsed, 3),
        "throughput_rps": round(len(latencies) / elapsed, 2) if elapsed else None,
        "p50_ms": round(percentile(ms, 50) or 0, 2) if ms else None,
        "p99_ms": round(percentile(ms, 99) or 0, 2) if ms else None,
        "mean_ms": round(sum(ms) / len(ms), 2) if ms else None,
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    head = f"{'route':<11} {'clients':>7} {'ok':>6} {'p50 ms':>9} {'p99 ms':>9} {'req/s':>8}  statuses"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['route']:<11} {r['concurrency']:>7} {r['ok']:>6} {r['p50_ms'] or 0:>9.1f} {r['p99_ms'] or 0:>9.1f} "
            f"{r['throughput_rps'] or 0:>8.1f}  {r['statuses']}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="A running server (127.0.0.1 only). Without it, one is started.")
    ap.add_argument("--store", type=Path, help="Store to serve (default: a temporary one).")
    ap.add_argument("--model", help="Model directory or repo id for the started server.")
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None)
    ap.add_argument("--images", type=Path, help="Index this folder into the store before serving.")
    ap.add_argument("--synthetic", type=int, default=0, help="Index N generated images before serving.")
    ap.add_argument("--concurrency", default="1,4,16", help="Comma-separated client counts (default 1,4,16).")
    ap.add_argument("--routes", default="query,neighbours", help="query and/or neighbours (default both).")
    ap.add_argument("--requests", type=int, default=200, help="At most this many requests per cell (default 200).")
    ap.add_argument("--duration", type=float, default=30.0, help="At most this many seconds per cell (default 30).")
    ap.add_argument("--payloads", type=int, default=32, help="Distinct query images (default 32).")
    ap.add_argument("--key", default=None, help="API key to send (needed when reads are closed).")
    ap.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).parent / "out" / "load.json",
        help="Where to write the JSON results (default benchmarks/out/load.json).",
    )
    args = ap.parse_args()

    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    routes = [r.strip() for r in args.routes.split(",") if r.strip()]
    if not set(routes) <= {"query", "neighbours"} or not levels or min(levels) < 1:
        ap.error("--routes takes query,neighbours; --concurrency positive integers")
    if args.requests < 1 or args.requests > 100_000 or args.duration <= 0 or args.duration > 600:
        ap.error("--requests must be 1..100000 and --duration 0..600 s")
    if args.url and (urlsplit(args.url).hostname or "") not in LOCAL_HOSTS:
        ap.error("this load script only targets 127.0.0.1 / localhost")
    payloads = [jpeg_bytes(synthetic_image(10_000 + i)) for i in range(args.payloads)]
    headers = {"Authorization": f"Bearer {args.key}"} if args.key else {}

    with tempfile.TemporaryDirectory(prefix="nsfw-index-load-") as tmp:

        def measure(url: str) -> list[dict[str, Any]]:
            with httpx.Client(base_url=url, timeout=60, headers=headers) as c:
                stats = c.get("/v1/stats").json()
                ready = c.get("/readyz")
                ids = list(range(1, int(stats.get("images", 0)) + 1)) or [1]
                for i in range(5):  # warm-up
                    c.post("/v1/query", files={"file": ("w.jpg", payloads[i % len(payloads)])})
            print(f"server {url}: {stats.get('images')} images, ready={ready.status_code == 200}", file=sys.stderr)
            rows = []
            for route in routes:
                for level in levels:
                    row = asyncio.run(run_cell(url, route, level, payloads, ids, args.requests, args.duration, headers))
                    print(f"  {route} x{level}: p50 {row['p50_ms']} ms, {row['throughput_rps']} req/s", file=sys.stderr)
                    rows.append(row)
            return rows

        if args.url:
            rows = measure(args.url)
        else:
            if not args.model:
                ap.error("give --url, or --model (and --store/--images/--synthetic) to start a server")
            store = args.store or Path(tmp) / "store"
            inputs = [str(args.images)] if args.images else []
            if args.synthetic:
                d = Path(tmp) / "synthetic"
                d.mkdir()
                for i in range(args.synthetic):
                    synthetic_image(i).save(d / f"s{i:05d}.jpg", quality=90)
                inputs.append(str(d))
            if inputs:
                subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "indexer.cli",
                        "index",
                        *inputs,
                        "--store",
                        str(store),
                        "--model",
                        args.model,
                    ]
                    + (["--device", args.device] if args.device else []),
                    check=True,
                )
            with started_server(store, args.model, args.device, {}) as url:
                rows = measure(url)

    print_table(rows)
    result = {
        "rows": rows,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "args": {k: str(v) for k, v in vars(args).items() if k != "key"},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
