"""Peak server RSS under large uploads, and what they do to a small query's latency (127.0.0.1 only).

Starts the real `nsfw-index serve` with a FULL-SIZE random-weight EVA-02 checkpoint (tests/conftest.py
`make_checkpoint(full_size=True)`: the real architecture at 448x448, never for answers), then:
  1. baseline: small queries alone, one at a time;
  2. load: `--clients` threads sending large PNGs and JPEGs under the HTTP caps (`--per-request` images each) in a
     loop, while the small queries continue;
and samples the server's VmRSS from /proc every 20 ms throughout. Prints one JSON object: peak RSS, the small
query's median latency alone and under load (and their ratio), and the large requests' statuses (503s are the
pixel budget refusing at once).

    python benchmarks/server_memory.py --work /tmp/srvmem --duration 60
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def checkpoint(work: Path) -> Path:
    ckpt = work / "full-size-checkpoint"
    if not (ckpt / "model.safetensors").exists():
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import make_checkpoint

        make_checkpoint(ckpt, full_size=True)
    return ckpt


def picture(side: int, seed: int, noise: int = 0) -> Image.Image:
    """A photo-like field at `side` x `side`: smooth colour, a few blocks, optional noise (JPEG: keeps it photo-like).
    Without noise a large PNG stays small in bytes and large in pixels, as in the report that set this benchmark
    (a 283 KB PNG of 9459x9459)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (side // 256 + 2, side // 256 + 2, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(small, "RGB").resize((side, side), Image.BILINEAR), dtype=np.uint8).copy()
    for _ in range(12):
        x, y, w, h = (int(v) for v in rng.integers(0, side // 2, 4))
        img[y : y + h, x : x + w] = rng.integers(0, 255, 3)
    if noise:
        img ^= rng.integers(0, noise, img.shape, dtype=np.uint8)
    return Image.fromarray(img, "RGB")


def large_files(work: Path, side: int) -> list[tuple[str, bytes]]:
    out = []
    for fmt, ext in (("PNG", "png"), ("JPEG", "jpg")):
        path = work / f"large-{side}-v2.{ext}"
        if not path.exists():
            buf = io.BytesIO()
            if fmt == "PNG":
                picture(side, 7).save(buf, fmt, compress_level=6)
            else:
                picture(side, 8, noise=8).save(buf, fmt, quality=85)
            path.write_bytes(buf.getvalue())
        out.append((path.name, path.read_bytes()))
    return out


def small_file() -> bytes:
    buf = io.BytesIO()
    picture(320, 1, noise=16).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/nsfw-index-server-memory"))
    ap.add_argument("--side", type=int, default=7000, help="side of the large images (7000^2 = 49 MP < the 50 MP cap)")
    ap.add_argument("--clients", type=int, default=4, help="threads sending large requests")
    ap.add_argument("--per-request", type=int, default=2, help="large images per request")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    ap.add_argument("--baseline", type=int, default=8, help="small queries before the load")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    ckpt = checkpoint(args.work)
    large = large_files(args.work, args.side)
    small = small_file()
    port = free_port()
    store = args.work / f"store-{os.getpid()}"
    exe = Path(sys.executable).parent / "nsfw-index"
    cmd = [str(exe), "serve", "--store", str(store), "--create", "--model", str(ckpt), "--device", "cpu"]
    server = subprocess.Popen([*cmd, "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    samples: list[int] = []
    stop_sampling = threading.Event()

    def sample() -> None:
        while not stop_sampling.wait(0.02):
            try:
                samples.append(rss_kb(server.pid))
            except (FileNotFoundError, ProcessLookupError):
                return

    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not start: {server.stderr.read().decode() if server.stderr else ''}")
            time.sleep(0.5)
        idle_rss = rss_kb(server.pid)
        threading.Thread(target=sample, daemon=True).start()
        client = httpx.Client(base_url=url, timeout=600)

        def small_query() -> float:
            t = time.perf_counter()
            r = client.post("/v1/query", files={"file": ("small.jpg", small)})
            assert r.status_code == 200, r.text
            return time.perf_counter() - t

        small_query()  # warm-up
        alone = [small_query() for _ in range(args.baseline)]
        baseline_peak = max(samples, default=idle_rss)

        statuses: Counter[int] = Counter()
        stop = threading.Event()

        def load(i: int) -> None:
            with httpx.Client(base_url=url, timeout=600) as c:
                n = 0
                while not stop.is_set():
                    files = [("files", large[(i + n + k) % len(large)]) for k in range(args.per_request)]
                    n += 1
                    try:
                        statuses[c.post("/v1/query", files=files).status_code] += 1
                    except httpx.HTTPError as e:
                        statuses[type(e).__name__] += 1  # type: ignore[index]
                    if statuses[503]:
                        time.sleep(0.2)  # Retry-After is 1 s: a polite client waits, a hostile one would not

        loaders = [threading.Thread(target=load, args=(i,)) for i in range(args.clients)]
        for t in loaders:
            t.start()
        time.sleep(1.0)
        loaded: list[float] = []
        end = time.monotonic() + args.duration
        while time.monotonic() < end:
            loaded.append(small_query())
            time.sleep(0.5)
        stop.set()
        for t in loaders:
            t.join(600)
        stop_sampling.set()
        hwm = next(
            int(line.split()[1])
            for line in Path(f"/proc/{server.pid}/status").read_text().splitlines()
            if line.startswith("VmHWM:")
        )
        alone_p50 = statistics.median(alone)
        loaded_p50 = statistics.median(loaded)
        print(
            json.dumps(
                {
                    "model": "full-size EVA-02 base 448 (random weights), cpu",
                    "large": {
                        "side": args.side,
                        "files": {name: len(data) for name, data in large},
                        "clients": args.clients,
                        "images_per_request": args.per_request,
                        "statuses": {str(k): v for k, v in statuses.items()},
                    },
                    "rss_mb": {
                        "idle": round(idle_rss / 1024),
                        "peak_small_only": round(baseline_peak / 1024),
                        "peak": round(max(samples) / 1024),
                        "vm_hwm": round(hwm / 1024),
                    },
                    "small_query_s": {
                        "alone_p50": round(alone_p50, 3),
                        "loaded_p50": round(loaded_p50, 3),
                        "loaded_max": round(max(loaded), 3),
                        "loaded_n": len(loaded),
                        "ratio_p50": round(loaded_p50 / alone_p50, 2),
                    },
                    "cpus": os.cpu_count(),
                },
                indent=2,
            )
        )
    finally:
        stop_sampling.set()
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    main()
