"""kill -9 of a real indexer: 50 times inside the indexing phase, 20 times during a FAISS checkpoint write. After
each: SQLite sound, `verify` clean, FAISS ids equal SQLite ids, no decoder process left; the final store equals a
clean build."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from stress.conftest import record
from stress.procs import EXE, assert_same_store, check_store, contents, corpus, descendants, progress, wait_gone

N_IMAGES = 1400
KILLS_INDEXING = int(os.environ.get("NSFW_INDEX_STRESS_KILLS", "50"))
KILLS_CHECKPOINT = int(os.environ.get("NSFW_INDEX_STRESS_CHECKPOINT_KILLS", "20"))
HERE = Path(__file__).parent
COUNTS: dict[str, int] = {}


def _start(store_dir: Path, src: Path, ckpt: Path, *, launcher: list[str] | None = None) -> subprocess.Popen[bytes]:
    args = ["index", str(src), "--store", str(store_dir), "--model", str(ckpt), "--device", "cpu", "--quiet"]
    args += ["--workers", "2", "--batch-size", "8"]
    return subprocess.Popen([*(launcher or [EXE]), *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    kids = descendants(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    left = wait_gone(kids)
    assert not left, f"processes outlived the killed indexer: {left}"
    COUNTS["orphans_checked"] = COUNTS.get("orphans_checked", 0) + len(kids)


def _tmp_files(store_dir: Path) -> list[str]:
    d = store_dir / "faiss"
    return [p.name for p in d.glob(".*.tmp")] if d.exists() else []


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return corpus(tmp_path_factory.mktemp("kills") / "corpus", N_IMAGES)


def test_kill_9_inside_indexing_and_during_checkpoints(src: Path, tmp_path: Path, checkpoint: Path, settings_for):
    rng = np.random.default_rng(12)
    store_dir = tmp_path / "store"
    total = N_IMAGES + 18
    settings = settings_for()
    kills = late = rounds = 0
    while kills < KILLS_INDEXING:
        if progress(store_dir) >= total:  # this store is complete: the next kills go into a fresh one
            rounds += 1
            store_dir = tmp_path / f"store-{rounds}"
        before = progress(store_dir)
        target = before + int(rng.integers(1, 14))
        proc = _start(store_dir, src, checkpoint)
        while progress(store_dir) < target and proc.poll() is None:
            time.sleep(0.02)
        time.sleep(float(rng.uniform(0, 0.15)))  # anywhere inside the phase, not only just after a commit
        inside = progress(store_dir) < total
        assert proc.poll() is None, f"the run ended before the kill (corpus too small?): {proc.stderr.read()!r}"
        _kill(proc)
        if inside:
            kills += 1
        else:  # it had committed everything: a kill in the final FAISS phase, checked but not counted as inside
            late += 1
        check_store(store_dir, settings)
    COUNTS["kills_indexing"] = kills
    COUNTS["kills_after_the_last_commit"] = late
    COUNTS["fresh_stores"] = rounds + 1

    launcher = [sys.executable, str(HERE / "slow_checkpoint.py")]
    landed = 0
    for _ in range(KILLS_CHECKPOINT):
        proc = _start(store_dir, src, checkpoint, launcher=launcher)
        nth = int(rng.integers(1, 4))
        seen = 0
        was = False
        while proc.poll() is None:
            now = bool(_tmp_files(store_dir))
            if now and not was:
                seen += 1
                if seen >= nth:
                    break
            was = now
            time.sleep(0.002)
        assert proc.poll() is None, f"the run ended before the kill: {proc.stderr.read()!r}"
        time.sleep(float(rng.uniform(0, 0.03)))
        _kill(proc)
        landed += bool(_tmp_files(store_dir))  # the temp file is still there: killed mid-write
        check_store(store_dir, settings)
    COUNTS["kills_checkpoint"] = KILLS_CHECKPOINT
    COUNTS["kills_checkpoint_with_temp_file_left"] = landed
    assert landed >= KILLS_CHECKPOINT // 2, f"only {landed} kills landed while a temp file existed"

    done = subprocess.run(
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
            "2",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode in (0, 1) and "error:" not in done.stderr, done.stderr  # 1: the broken files
    assert not _tmp_files(store_dir)
    clean_dir = tmp_path / "clean"
    clean = subprocess.run(
        [
            EXE,
            "index",
            str(src),
            "--store",
            str(clean_dir),
            "--model",
            str(checkpoint),
            "--device",
            "cpu",
            "--quiet",
            "--workers",
            "2",
        ],
        capture_output=True,
        text=True,
    )
    assert clean.returncode in (0, 1) and "error:" not in clean.stderr, clean.stderr
    assert_same_store(contents(store_dir), contents(clean_dir))
    check_store(store_dir, settings)
    v = subprocess.run([EXE, "verify", "--store", str(store_dir), "--json"], capture_output=True, text=True)
    assert v.returncode == 0 and json.loads(v.stdout)["ok"], v.stdout
    COUNTS["images"] = len(contents(store_dir)["shas"])
    record("kills", COUNTS)
