"""kill -9 of a real server after acknowledged label writes and additions: every acknowledged write is there after
the restart (and the label chain still verifies)."""

from __future__ import annotations

import io
import os
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from conftest import photo

from stress.conftest import record
from stress.procs import EXE, corpus, descendants, wait_gone

KILLS = int(os.environ.get("NSFW_INDEX_STRESS_SERVER_KILLS", "5"))
KEY = "stress-key"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(store_dir: Path, ckpt: Path, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "NSFW_INDEX_API_KEYS": f"{KEY}:read+write+label"}
    args = [EXE, "serve", "--store", str(store_dir), "--model", str(ckpt), "--device", "cpu", "--port", str(port)]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, "the server exited"
        time.sleep(0.1)
    raise AssertionError("server not ready")


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    photo(seed, (64, 64)).save(buf, "PNG")
    return buf.getvalue()


def test_acknowledged_writes_survive_kill_9(tmp_path: Path, checkpoint: Path):
    store_dir = tmp_path / "store"
    src = corpus(tmp_path / "c", 30)
    subprocess.run(
        [
            EXE,
            "index",
            str(src),
            "--store",
            str(store_dir),
            "--model",
            str(checkpoint),
            "--device",
            "cpu",
            "--quiet",
            "--workers",
            "0",
        ],
        check=False,
        capture_output=True,
    )
    rng = np.random.default_rng(3)
    labels: dict[int, str] = {}  # id -> last acknowledged label
    in_flight: dict[int, str] = {}  # id -> a label sent but not acknowledged when the server died
    added: list[str] = []  # sha256s of acknowledged additions
    headers = {"Authorization": f"Bearer {KEY}"}
    acknowledged = 0
    seed = 10_000
    for _ in range(KILLS):
        port = _port()
        proc = _serve(store_dir, checkpoint, port)
        url = f"http://127.0.0.1:{port}"
        stop = threading.Event()
        delay = float(rng.uniform(1.0, 4.0))
        killer = threading.Timer(delay, lambda p=proc, s=stop: (s.set(), os.kill(p.pid, signal.SIGKILL)))
        kids = descendants(proc.pid)
        killer.start()
        with httpx.Client(base_url=url, headers=headers, timeout=30) as c:
            while not stop.is_set():
                try:
                    if rng.random() < 0.7:
                        i = int(rng.integers(1, 30))
                        lab = str(rng.choice(["unsafe", "safe", "clear"]))
                        in_flight[i] = lab
                        r = c.put(f"/v1/images/{i}/label", json={"label": lab, "reason": "stress"})
                        if r.status_code == 200:
                            labels[i] = lab
                            in_flight.pop(i, None)
                            acknowledged += 1
                    else:
                        seed += 1
                        r = c.post("/v1/images", files={"file": (f"n{seed}.png", _png(seed), "image/png")})
                        if r.status_code == 200:
                            added.append(r.json()["result"]["sha256"])
                            acknowledged += 1
                except httpx.HTTPError:
                    break  # the server died under this request: not acknowledged
        killer.join()
        proc.wait(30)
        assert not wait_gone(kids)
    port = _port()
    proc = _serve(store_dir, checkpoint, port)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=30) as c:
            for i, lab in labels.items():
                got = c.get(f"/v1/images/{i}").json()["label"]
                want = None if lab == "clear" else lab
                alt = in_flight.get(i)
                assert got == want or (alt is not None and got == (None if alt == "clear" else alt)), (i, got, lab)
            stats = c.get("/v1/stats").json()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    with sqlite3.connect(f"file:{store_dir / 'meta.sqlite'}?mode=ro", uri=True) as db:
        have = {r[0] for r in db.execute("SELECT sha256 FROM images")}
    assert set(added) <= have, set(added) - have
    assert stats["images"] >= len(added)
    v = subprocess.run([EXE, "verify", "--store", str(store_dir)], capture_output=True, text=True)
    assert v.returncode == 0, v.stdout + v.stderr
    record(
        "server_kill",
        {
            "server_kills": KILLS,
            "acknowledged_writes": acknowledged,
            "labels_checked": len(labels),
            "additions_checked": len(added),
        },
    )
