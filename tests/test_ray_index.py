"""`index --ray`: a Ray-built store equals a local build; a killed run resumes from its finished shards; without Ray,
`--ray` says how to install it."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import index_dir, photo, run_cli

from indexer.cli import cli
from indexer.prepare import Prepared
from indexer.ray_cluster import RayOptions
from indexer.ray_shards import (
    Failure,
    finished_shards,
    objects,
    prepared_batch,
    prepared_from_batch,
    result_batch,
    shard_rows,
    shard_table,
    write_shard,
)
from search.errors import InvalidArgument
from search.settings import LEVELS
from search.store import ImageRecord, Store, Thumbnail

BATCH = 4


def _ray_processes(session_dir: str) -> list[int]:
    """Processes of the Ray instance whose session directory is `session_dir` (their command lines name it)."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if session_dir in cmd and int(pid) != os.getpid():
            out.append(int(pid))
    return out


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray instance (2 CPUs) for the module: the in-process runs use it, the CLI connects to it."""
    ray = pytest.importorskip("ray")
    saved = os.environ.get("RAY_AUTH_MODE")  # a new local instance sets it to "token": the CLI inherits it
    ctx = ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=256 * 1024 * 1024,
        logging_level="warning",
        log_to_driver=False,
    )
    session = os.path.basename(ctx.address_info["session_dir"])
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        if saved is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved
        deadline = time.monotonic() + 30
        while _ray_processes(session) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = _ray_processes(session)
        for pid in left:  # ours: never leave them to the next module, then say so
            os.kill(pid, signal.SIGKILL)
        assert not left, f"Ray processes left behind after ray.shutdown(): {left}"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """9 photos, an exact duplicate in a subdirectory, a corrupt file, and a tar shard with a new image and a copy."""
    d = tmp_path_factory.mktemp("ray-corpus")
    for i in range(9):
        photo(100 + i).save(d / f"p{i}.png")
    (d / "sub").mkdir()
    (d / "sub" / "copy_of_p3.png").write_bytes((d / "p3.png").read_bytes())
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    new = io.BytesIO()
    photo(150).save(new, "PNG")
    with tarfile.open(d / "shard.tar", "w") as tf:
        for name, data in (("m/new.png", new.getvalue()), ("m/p5.png", (d / "p5.png").read_bytes())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return d


@pytest.fixture(scope="module")
def local_store(tmp_path_factory, corpus, settings_for) -> Path:
    """The same corpus indexed by the local pipeline (with thumbnails)."""
    store = tmp_path_factory.mktemp("ray-local") / "store"
    summary = index_dir(store, [str(corpus)], settings_for(batch_size=BATCH), thumbnails=True)
    assert (summary.new_images, summary.duplicate_paths, summary.errors) == (10, 2, 1)
    return store


def _contents(store_dir: Path) -> dict:
    """What a store holds, independent of how it was built: per sha256 the image row, its embedding, dihedral PDQ
    hashes and thumbnails; every path with its sha256, size and mtime; every error."""
    with Store(store_dir, readonly=True) as s:
        cols = "id, sha256, size, width, height, format, level, pdq, pdq_quality, embedding"
        nums = ", ".join(f"p_{lv}, s_{lv}" for lv in LEVELS)
        rows = s.db.execute(f"SELECT {cols}, {nums} FROM images").fetchall()
        ids = [r[0] for r in rows]
        dihedral = s.dihedral_hashes(ids)
        images = {
            r[1]: {
                "facts": tuple(r[2:9]),
                "embedding": np.frombuffer(r[9], np.float32),
                "numbers": np.array(r[10:], np.float64),
                "dihedral": dihedral.get(r[0]),
                "thumbnails": (s.thumbnail(r[0], blurred=False), s.thumbnail(r[0], blurred=True)),
            }
            for r in rows
        }
        paths = s.db.execute(
            "SELECT p.path, i.sha256, p.size, p.mtime_ns FROM paths p JOIN images i ON i.id = p.image_id ORDER BY 1"
        ).fetchall()
        errors = [(e["path"], e["reason"], e["kind"], e["size"], e["mtime_ns"]) for e in s.errors()]
    return {"images": images, "paths": paths, "errors": errors}


def _assert_same_store(ray_store: Path, local_store: Path) -> None:
    got, want = _contents(ray_store), _contents(local_store)
    assert set(got["images"]) == set(want["images"])
    assert got["paths"] == want["paths"]
    assert got["errors"] == want["errors"] and len(want["errors"]) == 1
    for sha, w in want["images"].items():
        g = got["images"][sha]
        assert g["facts"] == w["facts"] and g["dihedral"] == w["dihedral"] and g["thumbnails"] == w["thumbnails"]
        assert w["thumbnails"][0] is not None and w["dihedral"] is not None
        np.testing.assert_allclose(g["embedding"], w["embedding"], atol=1e-5)
        np.testing.assert_allclose(g["numbers"], w["numbers"], atol=1e-5)
    assert not (ray_store / "ray-shards").exists()  # merged: the shards (embeddings of user images) are gone


def test_ray_build_equals_a_local_build_and_reruns_incrementally(
    ray_cluster, corpus, local_store, settings_for, tmp_path
):
    from indexer.ray_index import index_inputs_ray

    settings = settings_for(batch_size=BATCH)
    with Store.writing(tmp_path / "store", "test", create=True) as store:
        summary, report = index_inputs_ray(store, [str(corpus)], settings, RayOptions(shard_size=3), thumbnails=True)
    assert summary.counts() | {"seen": 0} == {
        **dict.fromkeys(summary.counts(), 0),
        "new_images": 10,
        "duplicate_paths": 2,
        "errors": 1,
    }
    assert summary.seen == 13 and summary.error_samples[0][0].endswith("broken.jpg")
    # 11 contents analysed (10 images and the corrupt one), 3 per shard; nothing to reuse
    assert (report.shards_written, report.shards_reused, report.cpus, report.inference_workers) == (4, 0, 2.0, "1")
    assert summary.engine["device"] == "cpu"
    _assert_same_store(tmp_path / "store", local_store)

    with Store.writing(tmp_path / "store", "test") as store:  # unchanged: nothing goes to Ray
        again, report = index_inputs_ray(store, [str(corpus)], settings, RayOptions(shard_size=3))
    assert (again.unchanged, again.unchanged_errors, again.new_images, again.errors) == (12, 1, 0, 0)
    assert report.nodes == 0 and report.shards_written == 0
    _assert_same_store(tmp_path / "store", local_store)


def test_killed_run_resumes_from_its_finished_shards(ray_cluster, corpus, local_store, checkpoint, tmp_path):
    store = tmp_path / "store"
    args = [
        *("index", str(corpus), "--store", str(store), "--model", str(checkpoint), "--device", "cpu"),
        *("--batch-size", "1", "--thumbnails", "--ray", ray_cluster, "--ray-shard-size", "1", "--json", "-q"),
    ]
    exe = Path(sys.executable).parent / "nsfw-index"
    proc = subprocess.Popen([str(exe), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    shards = store / "ray-shards"
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if shards.is_dir() and any(shards.glob("*/shard-*.parquet")):
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.communicate()}"
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    done = sorted(p.name for p in shards.glob("*/shard-*.parquet"))
    assert 1 <= len(done) < 11, done  # killed after some shards, before the merge

    again = run_cli(*args, timeout=180)
    assert again.returncode == 1, again.stderr  # 1: the corrupt file is in error
    out = json.loads(again.stdout)
    assert out["ray"]["shards_reused"] == len(done)  # finished shards are not computed again
    assert out["ray"]["shards_written"] == 11 - len(done)
    assert (out["new_images"], out["duplicate_paths"], out["errors"]) == (10, 2, 1)
    _assert_same_store(store, local_store)


def test_without_ray_the_flag_says_how_to_install_it(corpus, checkpoint, tmp_path):
    store = tmp_path / "store"
    argv = ["nsfw-index", "index", str(corpus), "--store", str(store), "--model", str(checkpoint), "--ray"]
    code = f"import sys; sys.modules['ray'] = None; sys.argv = {argv!r}; from indexer.cli import main; main()"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert "pip install 'nsfw-index[ray]'" in p.stderr
    assert not store.exists()  # refused before anything was created


def test_ray_flags_are_checked_before_any_work(corpus, checkpoint, tmp_path):
    runner = CliRunner()
    base = ["index", str(corpus), "--store", str(tmp_path / "s"), "--model", str(checkpoint)]
    r = runner.invoke(cli, [*base, "--ray", str(tmp_path)])  # a path taken for the address
    assert r.exit_code == 2 and "is not a Ray address" in r.output and "after the inputs" in r.output
    r = runner.invoke(cli, [*base, "--gpus-per-worker", "1"])
    assert r.exit_code == 2 and "go with --ray" in r.output
    r = runner.invoke(cli, [*base, "--ray", "--workers", "2"])
    assert r.exit_code == 2 and "Ray tasks decode" in r.output
    assert not (tmp_path / "s").exists()
    for good in ("local", "auto", "10.0.0.5:6379", "ray://head.example:10001", "[::1]:6379"):
        RayOptions(address=good).check()
    for bad in ("", "./corpus", "http://x:1", "host"):
        with pytest.raises(InvalidArgument):
            RayOptions(address=bad).check()


def _record(seed: int) -> ImageRecord:
    rng = np.random.default_rng(seed)
    return ImageRecord(
        sha256=f"{seed:064x}",
        size=1000 + seed,
        width=64,
        height=48,
        format="PNG",
        probabilities=list(rng.dirichlet(np.ones(4))),
        scores=list(rng.random(4)),
        level="low",
        embedding=rng.standard_normal(8).astype(np.float32),
        pdq="ab" * 32,
        pdq_quality=90,
        thumbnail=Thumbnail(16, 12, b"\xff\xd8jpeg", b"\xff\xd8blur"),
        pdq_dihedral=tuple(f"{i:02x}" * 32 for i in range(7)),
    )


def _prepared(r: ImageRecord) -> Prepared:
    return Prepared(
        name=f"/corpus/{r.sha256[:8]}.png",
        sha256=r.sha256,
        size=r.size,
        width=r.width,
        height=r.height,
        format=r.format,
        pdq=r.pdq,
        pdq_quality=r.pdq_quality,
        tensor=np.arange(48, dtype=np.float32).reshape(3, 4, 4),
        timings={"decode": 0.01},
        thumbnail=r.thumbnail,
        pdq_dihedral=r.pdq_dihedral,
    )


def test_shards_keep_every_record_field_and_broken_shards_are_recomputed(tmp_path):
    # a new field of ImageRecord must be carried by the shards: this list is what they hold
    assert {f.name for f in dataclasses.fields(ImageRecord)} == {
        *("sha256", "size", "width", "height", "format", "probabilities", "scores", "level", "embedding"),
        *("pdq", "pdq_quality", "thumbnail", "pdq_dihedral"),
    }
    plain = dataclasses.replace(_record(2), pdq=None, pdq_quality=None, thumbnail=None, pdq_dihedral=None)
    records = [_record(1), None, plain, None]
    outcomes = [
        _prepared(records[0]),
        Failure("corrupt", "invalid"),
        _prepared(plain),
        Failure("cannot read: gone", "unreadable", transient=True),
    ]
    rows = {"w": np.arange(4), "shard": np.zeros(4, int), "sha256": objects([f"{i:064x}" for i in (1, 7, 2, 8)])}
    decoded = prepared_batch(rows, outcomes)
    for got, want in zip(prepared_from_batch(decoded), outcomes, strict=True):  # prepared images arrive whole
        if got is None:
            assert isinstance(want, Failure)
            continue
        g, w = dataclasses.asdict(got), dataclasses.asdict(want)
        np.testing.assert_array_equal(g.pop("tensor"), w.pop("tensor"))
        assert g == w
    batch = result_batch(decoded, records, 0.5)
    table = shard_table(batch, [["/a"], ["/b", "/c"], ["/d"], ["/e"]], "key1", dim=8)
    path = write_shard(tmp_path, 0, table)
    back = list(shard_rows(path))
    assert [r.sha256 for r in back] == [f"{i:064x}" for i in (1, 7, 2)]  # the transient failure is not kept
    for got, want in ((back[0].record, records[0]), (back[2].record, plain)):
        assert got is not None and want is not None
        g, w = dataclasses.asdict(got), dataclasses.asdict(want)
        np.testing.assert_array_equal(g.pop("embedding"), w.pop("embedding"))
        assert g == w
    assert back[1].record is None and back[1].failure == Failure("corrupt", "invalid")

    (tmp_path / "shard-00001.parquet").write_bytes(path.read_bytes()[:100])  # a shard cut short
    (tmp_path / ".shard-00002.parquet.tmp").write_bytes(b"partial")
    found = finished_shards(tmp_path, "key1")
    assert [(p.name, len(shas)) for p, shas in found] == [("shard-00000.parquet", 3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-00000.parquet"]
    assert finished_shards(tmp_path, "another-run") == [] and not path.exists()  # not this run's: recomputed
