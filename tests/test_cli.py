"""The CLI as users run it: `score` output contract, exit codes, the progress bar on a terminal, bf16."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import numpy as np
from conftest import photo, run_cli


def test_score_json_lines_table_and_exit_status(tmp_path: Path, checkpoint: Path) -> None:
    a, b = tmp_path / "a.png", tmp_path / "b.jpg"
    photo(1).save(a)
    photo(2).save(b)
    bad = tmp_path / "bad.jpg"
    bad.write_text("nope")
    p = run_cli("score", str(a), str(bad), str(b), "--model", str(checkpoint), "--json", "--with-embedding")
    assert p.returncode == 1  # one file failed, the others still ran
    rows = [json.loads(line) for line in p.stdout.splitlines()]
    assert [r["path"] for r in rows] == [str(a), str(bad), str(b)]
    assert set(rows[1]) == {"path", "error"} and "bad.jpg" in rows[1]["error"]
    for r in (rows[0], rows[2]):
        assert set(r) == {"path", "probabilities", "scores", "level", "is_nsfw", "embedding"}
        assert set(r["scores"]) == set(r["probabilities"]) == {"neutral", "low", "medium", "high"}
        p_ = r["probabilities"]
        assert abs(sum(p_.values()) - 1) < 1e-6
        assert abs(r["scores"]["medium"] - (p_["medium"] + p_["high"])) < 1e-9
        assert r["is_nsfw"] == (r["scores"]["medium"] >= 0.5)
        assert len(r["embedding"]) == 64 and abs(np.linalg.norm(r["embedding"]) - 1) < 1e-5
    ok = run_cli("score", str(a), "--model", str(checkpoint), "--json")
    assert ok.returncode == 0 and "embedding" not in json.loads(ok.stdout)
    table = run_cli("score", str(a), str(b), "--model", str(checkpoint))
    assert table.returncode == 0 and "a.png" in table.stdout and "medium" in table.stdout
    strict = run_cli(
        "score", str(a), "--model", str(checkpoint), "--json", "--nsfw-level", "high", "--nsfw-threshold", "1.0"
    )
    assert json.loads(strict.stdout)["is_nsfw"] is (json.loads(strict.stdout)["scores"]["high"] >= 1.0)


def test_usage_and_model_errors_exit_2_with_a_message(tmp_path: Path) -> None:
    p = run_cli("score", str(tmp_path / "x.png"), "--model", str(tmp_path / "nowhere"))
    assert p.returncode == 2
    assert "hf download Freepik/nsfw_image_detector" in p.stderr and "Traceback" not in p.stderr
    p = run_cli("index", str(tmp_path))
    assert p.returncode == 2 and "--store" in p.stderr
    p = run_cli("stats", "--store", str(tmp_path / "none"))
    assert p.returncode == 2 and "no store at" in p.stderr
    p = run_cli("score", str(tmp_path / "x.png"), "--batch-size", "0")
    assert p.returncode == 2


def test_store_from_the_environment(tmp_path: Path, checkpoint: Path) -> None:
    (tmp_path / "c").mkdir()
    photo(3).save(tmp_path / "c" / "x.png")
    env = {"NSFW_INDEX_STORE": str(tmp_path / "store"), "NSFW_INDEX_MODEL": str(checkpoint), "NSFW_INDEX_WORKERS": "0"}
    run_cli("index", str(tmp_path / "c"), "--quiet", env=env, check=True)
    p = run_cli("stats", "--json", env=env, check=True)
    assert json.loads(p.stdout)["images"] == 1


def _run_on_a_terminal(args: list[str], timeout: float = 120, expect: int = 0) -> str:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a 120-column terminal
    exe = Path(sys.executable).parent / "nsfw-index"
    proc = subprocess.Popen([str(exe), *args], stdout=slave, stderr=slave, stdin=subprocess.DEVNULL)
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r, _, _ = select.select([master], [], [], 0.2)
        if r:
            try:
                data = os.read(master, 4096)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    proc.wait(timeout=30)
    os.close(master)
    assert proc.returncode == expect
    return b"".join(chunks).decode(errors="replace")


def test_progress_bar_on_a_terminal_and_quiet_otherwise(tmp_path: Path, checkpoint: Path) -> None:
    c = tmp_path / "c"
    c.mkdir()
    for i in range(6):
        photo(i).save(c / f"{i}.png")
    (c / "bad.jpg").write_text("x")
    common = ["--model", str(checkpoint), "--workers", "0", "--batch-size", "2"]
    # bad.jpg is in error: exit status 1 (the README's "some inputs failed")
    out = _run_on_a_terminal(["index", str(c), "--store", str(tmp_path / "s1"), *common], expect=1)
    assert "indexing" in out and "img/s" in out and "errors=1" in out and "7/7" in out
    assert "stage seconds" in out
    quiet = _run_on_a_terminal(["index", str(c), "--store", str(tmp_path / "s2"), "--quiet", *common], expect=1)
    assert "indexing" not in quiet and "stage seconds" not in quiet
    piped = run_cli("index", str(c), "--store", str(tmp_path / "s3"), *common)
    assert "img/s" not in piped.stdout + piped.stderr and "stage seconds" in piped.stderr


def test_bf16_on_cpu_stays_close_to_fp32(checkpoint: Path, settings_for) -> None:
    from indexer.extractor import Extractor

    imgs = [photo(i) for i in range(3)]
    fp32 = Extractor.from_settings(settings_for(dtype="fp32")).extract(imgs)
    bf16 = Extractor.from_settings(settings_for(dtype="bf16", threads=1)).extract(imgs)
    for a, b in zip(fp32, bf16, strict=True):
        assert float(a.embedding @ b.embedding) > 0.99
        assert b.embedding.dtype == np.float32
        assert abs(a.scores["medium"] - b.scores["medium"]) < 0.1


def test_ctrl_c_keeps_what_was_committed_and_says_how_to_resume(tmp_path: Path, checkpoint: Path) -> None:
    import signal
    import sqlite3

    c = tmp_path / "c"
    c.mkdir()
    for i in range(40):
        photo(i, (200, 150)).save(c / f"{i:03d}.png")
    store = tmp_path / "store"
    exe = Path(sys.executable).parent / "nsfw-index"
    proc = subprocess.Popen(
        [
            str(exe),
            "index",
            str(c),
            "--store",
            str(store),
            "--model",
            str(checkpoint),
            "--workers",
            "0",
            "--batch-size",
            "2",
            "--quiet",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    n = 0
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            con = sqlite3.connect(f"file:{store / 'meta.sqlite'}?mode=ro", uri=True)
            n = con.execute("SELECT COUNT(*) FROM images").fetchone()[0]
            con.close()
        except sqlite3.Error:
            n = 0
        if n >= 2:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "run the same command again to resume" in err and "Traceback" not in err
    p = run_cli(
        "index", str(c), "--store", str(store), "--model", str(checkpoint), "--workers", "0", "--json", check=True
    )
    out = json.loads(p.stdout)
    assert out["new_images"] + out["unchanged"] == 40 and out["unchanged"] >= 2
    runs = run_cli("stats", "--store", str(store), "--json", check=True)
    assert [r["status"] for r in json.loads(runs.stdout)["runs"]][:2] == ["done", "interrupted"]
