"""Helpers of the stress runs: processes through /proc, store progress and contents read with sqlite3 directly."""

from __future__ import annotations

import os
import signal
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

EXE = str(Path(sys.executable).parent / "nsfw-index")


def descendants(pid: int) -> set[int]:
    """Live (non-zombie) descendants of `pid`."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                parent[int(d.name)] = int(fields[1])
    out: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {c for c, p in parent.items() if p in frontier} - out
        out |= frontier
    return out


def alive(pids: set[int]) -> set[int]:
    out = set()
    for p in pids:
        try:
            if Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                out.add(p)
        except OSError:
            pass
    return out


def wait_gone(pids: set[int], seconds: float = 15.0) -> set[int]:
    """The pids still alive after up to `seconds` (bounded wait, not a timing assertion)."""
    deadline = time.monotonic() + seconds
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = alive(pids)
    for p in left:  # never leave them behind, even when the test fails
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass
    return left


def progress(store_dir: Path) -> int:
    """Paths + errors committed so far (0 before the store exists)."""
    db = store_dir / "meta.sqlite"
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=2) as c:
            return int(c.execute("SELECT (SELECT COUNT(*) FROM paths) + (SELECT COUNT(*) FROM errors)").fetchone()[0])
    except sqlite3.Error:
        return 0


def contents(store_dir: Path) -> dict[str, Any]:
    """What must equal a clean build: sha256s, paths -> sha256, errors (path, kind), scores per sha256."""
    with sqlite3.connect(f"file:{store_dir / 'meta.sqlite'}?mode=ro", uri=True) as c:
        shas = sorted(r[0] for r in c.execute("SELECT sha256 FROM images"))
        paths = dict(c.execute("SELECT p.path, i.sha256 FROM paths p JOIN images i ON i.id = p.image_id").fetchall())
        errors = dict(c.execute("SELECT path, kind FROM errors").fetchall())
        scores = {
            r[0]: np.asarray(r[1:], dtype=np.float64)
            for r in c.execute("SELECT sha256, s_neutral, s_low, s_medium, s_high FROM images")
        }
        levels = dict(c.execute("SELECT sha256, level FROM images").fetchall())
    return {"shas": shas, "paths": paths, "errors": errors, "scores": scores, "levels": levels}


def assert_same_store(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["shas"] == b["shas"]
    assert a["paths"] == b["paths"]
    assert a["errors"] == b["errors"]
    assert a["levels"] == b["levels"]
    worst = max(float(np.abs(a["scores"][k] - b["scores"][k]).max()) for k in a["shas"])
    assert worst < 1e-4, f"scores differ from a clean build by {worst}"  # batch composition: float rounding only


def check_store(store_dir: Path, settings: Any) -> None:
    """After a kill: SQLite sound, `verify` clean, FAISS ids (caught up as a reader would) equal SQLite ids."""
    from search.store import Store
    from search.vectors import IndexFiles, index_ids
    from search.verify import verify_store

    with Store(store_dir, readonly=True) as st:
        assert st.integrity_check() == []
        if st.model_identity() is None:
            return
        report = verify_store(st, settings)
        assert report.ok, report.to_json()
        files = IndexFiles(st, settings)
        snap = files.open_all(persist=False)
        assert sorted(index_ids(snap.index).tolist()) == st.image_ids()
        assert not files.problems


def corpus(d: Path, n: int, *, seed: int = 0) -> Path:
    """n distinct JPEGs (320x240: a real decode and resize each), 10 exact duplicates and 8 broken files."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:240, 0:320].astype(np.float32)
    for i in range(n):
        f = rng.uniform(0.01, 0.2, 3)
        img = np.stack([127 + 120 * np.sin(f[c] * xx + i) * np.cos(f[(c + 1) % 3] * yy) for c in range(3)], -1)
        Image.fromarray(img.astype(np.uint8)).save(d / f"x{i:05d}.jpg", quality=80)
    for i in range(10):
        (d / f"dup{i}.jpg").write_bytes((d / f"x{i:05d}.jpg").read_bytes())
    for i in range(8):
        data = (d / f"x{i:05d}.jpg").read_bytes()
        (d / f"bad{i}.jpg").write_bytes(data[: 200 + 50 * i] if i % 2 else rng.bytes(3000))
    return d
