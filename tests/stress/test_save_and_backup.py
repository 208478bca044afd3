"""A failing FAISS save (no space left) keeps the previous index and reports the error; a `VACUUM INTO` backup taken
while indexing restores to a store that `nsfw-index verify` passes."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from conftest import index_dir

from stress.conftest import record
from stress.procs import EXE, corpus, progress


def _faiss_state(store_dir: Path) -> dict[str, str]:
    d = store_dir / "faiss"
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def _runs(store_dir: Path) -> list[tuple[int, str]]:
    with sqlite3.connect(f"file:{store_dir / 'meta.sqlite'}?mode=ro", uri=True) as c:
        return [(int(r[0]), str(r[1])) for r in c.execute("SELECT id, status FROM runs ORDER BY id")]


def _assert_previous_kept(store_dir: Path, before: dict[str, str]) -> None:
    after = _faiss_state(store_dir)
    assert after == before, "the previous index files changed or a partial file was left"
    for name in ("all", "unsafe"):
        m = json.loads((store_dir / "faiss" / f"{name}.manifest.json").read_text())
        assert (store_dir / "faiss" / m["file"]).exists()


def test_save_fails_with_a_patched_write(tmp_path: Path, settings_for, monkeypatch: pytest.MonkeyPatch):
    import search.durable as durable  # atomic_write_bytes: where the FAISS files are written
    from search.errors import IndexWriteFailed
    from search.store import Store
    from search.verify import verify_store

    src = corpus(tmp_path / "c", 60)
    first = tmp_path / "first"
    first.mkdir()
    for p in sorted(src.glob("x*.jpg"))[:30]:
        os.link(p, first / p.name)
    store_dir = tmp_path / "store"
    settings = settings_for()
    index_dir(store_dir, [str(first)], settings)
    before = _faiss_state(store_dir)
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, f):  # type: ignore[no-untyped-def]
            self.f = f

        def __enter__(self):  # type: ignore[no-untyped-def]
            return self

        def __exit__(self, *exc):  # type: ignore[no-untyped-def]
            self.f.close()

        def write(self, data: bytes) -> int:
            self.f.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(durable.os, "fdopen", lambda fd, mode: Full(real_fdopen(fd, mode)))
    with pytest.raises(IndexWriteFailed, match="No space left"):
        index_dir(store_dir, [str(src)], settings)
    monkeypatch.undo()
    _assert_previous_kept(store_dir, before)
    assert _runs(store_dir)[-1][1] == "failed"
    with Store(store_dir, readonly=True) as st:
        assert verify_store(st, settings).ok  # the old files are sound; the new rows are caught up on open
        assert st.count_images() > 30
    record("save_failure_patched", {"failed_saves": 1, "previous_index_kept": 1})


def test_save_fails_on_a_full_tmpfs(tmp_path: Path, checkpoint: Path):
    src = corpus(tmp_path / "c", 400)
    first = tmp_path / "first"
    first.mkdir()
    for p in sorted(src.glob("x*.jpg"))[:100]:
        os.link(p, first / p.name)
    store_dir = tmp_path / "store"
    (store_dir / "faiss").mkdir(parents=True)
    # 100 vectors of 64 floats + ids ~ 27 KB per file: 100 KB holds the first files, not a second generation of 400
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=100k", "tmpfs", str(store_dir / "faiss")], check=False)
    if mount.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root): the patched-write test covers it")
    try:
        base = [EXE, "index", "--store", str(store_dir), "--model", str(checkpoint), "--device", "cpu", "--quiet"]
        ok = subprocess.run([*base, str(first), "--workers", "0"], capture_output=True, text=True)
        assert ok.returncode == 0, ok.stderr
        before = _faiss_state(store_dir)
        full = subprocess.run([*base, str(src), "--workers", "0"], capture_output=True, text=True)
        assert full.returncode == 2 and "No space left" in full.stderr, (full.returncode, full.stderr)
        assert "previous index is kept" in full.stderr
        _assert_previous_kept(store_dir, before)
        assert _runs(store_dir)[-1][1] == "failed"
        v = subprocess.run([EXE, "verify", "--store", str(store_dir)], capture_output=True, text=True)
        assert v.returncode == 0, v.stdout
    finally:
        subprocess.run(["umount", str(store_dir / "faiss")], check=False)
    record("save_failure_tmpfs", {"failed_saves": 1, "previous_index_kept": 1})


def test_vacuum_into_backup_while_indexing(tmp_path: Path, checkpoint: Path):
    src = corpus(tmp_path / "c", 600)
    store_dir = tmp_path / "store"
    args = [EXE, "index", str(src), "--store", str(store_dir), "--model", str(checkpoint), "--device", "cpu"]
    proc = subprocess.Popen([*args, "--quiet", "--workers", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while progress(store_dir) < 100 and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before the backup"
        backup = tmp_path / "backup.sqlite"
        with sqlite3.connect(f"file:{store_dir / 'meta.sqlite'}?mode=ro", uri=True, timeout=30) as c:
            c.execute("VACUUM INTO ?", [str(backup)])
        during = proc.poll() is None
    finally:
        rc = proc.wait(600)
    assert during, "the backup did not overlap the run"
    assert rc in (0, 1), proc.stderr.read() if proc.stderr else ""
    restored = tmp_path / "restored"
    restored.mkdir()
    backup.rename(restored / "meta.sqlite")
    v = subprocess.run([EXE, "verify", "--store", str(restored), "--json"], capture_output=True, text=True)
    assert v.returncode == 0 and json.loads(v.stdout)["ok"], v.stdout
    n_backup = progress(restored)
    assert 100 <= n_backup <= progress(store_dir)
    # the restored store resumes: indexing the corpus again completes it to the same content
    again = subprocess.run([*args, "--quiet", "--workers", "0", "--store", str(restored)], capture_output=True)
    assert again.returncode in (0, 1)
    with (
        sqlite3.connect(f"file:{store_dir / 'meta.sqlite'}?mode=ro", uri=True) as a,
        sqlite3.connect(f"file:{restored / 'meta.sqlite'}?mode=ro", uri=True) as b,
    ):
        q = "SELECT sha256 FROM images ORDER BY sha256"
        assert [r[0] for r in a.execute(q)] == [r[0] for r in b.execute(q)]
    v = subprocess.run([EXE, "verify", "--store", str(restored)], capture_output=True, text=True)
    assert v.returncode == 0, v.stdout
    record("vacuum_into", {"backups": 1, "rows_in_backup": n_backup, "verified": 2})
