"""`export` as CSV (by extension or --format) and Parquet, `--columns` picking what goes in, probe columns, and
embeddings in CSV only when asked; an unknown column writes nothing."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from test_probes import fill, label, planted

from indexer.cli import cli
from search.export import BASE_COLUMNS
from search.probes import probes_for_ids, train_probe
from search.settings import Settings
from search.store import Store


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 images (one with a second path holding a comma), 8 labelled, one probe."""
    root = tmp_path_factory.mktemp("export") / "store"
    x, y = planted(20, 2)
    ids = fill(root, x)
    with Store(root) as store:
        run = store.begin_run("test", {})
        store.write_batch(run, [], [("/corpus/a, b.png", f"{0:064x}", 100, None)])
        label(store, ids[:8], y[:8])
        train_probe(store, "mine", Settings())
    return root


def export(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(cli, ["export", *args])
    return res.exit_code, res.output


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_csv_by_extension_holds_every_column_but_the_embedding(store_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "all.csv"
    code, output = export("--store", str(store_dir), "--out", str(out))
    assert code == 0 and "wrote 20 images" in output
    rows = read_csv(out)
    assert list(rows[0]) == [*BASE_COLUMNS, "probe.mine.safe", "probe.mine.unsafe"]
    with Store(store_dir, readonly=True) as store:
        ids = store.image_ids()
        want = probes_for_ids(store, ids)
        first = store.image(ids[0])
        labels = store.current_labels()
    assert [int(r["id"]) for r in rows] == ids
    assert json.loads(rows[0]["paths"]) == ["/corpus/0.png", "/corpus/a, b.png"]  # a list: JSON text in the cell
    assert float(rows[0]["score_medium"]) == first.scores["medium"] and rows[0]["sha256"] == first.sha256
    for r in rows:
        assert float(r["probe.mine.unsafe"]) == want[int(r["id"])]["mine"]["unsafe"]
        assert r["label"] == (labels.get(int(r["id"])) or "")  # no label: an empty cell
        assert isinstance(json.loads(r["known_unsafe_sources"]), list)


def test_columns_pick_and_order_and_embeddings_come_only_when_asked(store_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "pick.txt"
    spec = ["--columns", "sha256,id", "--columns", "probes,embedding"]
    code, _ = export("--store", str(store_dir), "--out", str(out), "--format", "csv", *spec)
    assert code == 0
    rows = read_csv(out)
    assert list(rows[0]) == ["sha256", "id", "probe.mine.safe", "probe.mine.unsafe", "embedding"]
    with Store(store_dir, readonly=True) as store:
        vecs = store.vectors([int(r["id"]) for r in rows])
    got = np.array([json.loads(r["embedding"]) for r in rows], np.float32)
    np.testing.assert_array_equal(got, vecs)  # float32 exactly, from 9 significant digits
    code, _ = export("--store", str(store_dir), "--out", str(out), "--columns", "id,scores", "--format", "csv")
    assert code == 0 and list(read_csv(out)[0]) == ["id", "score_neutral", "score_low", "score_medium", "score_high"]
    code, _ = export("--store", str(store_dir), "--out", str(out), "--format", "csv", "--embeddings")
    assert code == 0 and list(read_csv(out)[0])[-1] == "embedding"


def test_parquet_carries_probe_columns_and_the_embedding(store_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.parquet"
    assert export("--store", str(store_dir), "--out", str(out))[0] == 0
    t = pq.read_table(out)
    assert t.column_names == [*BASE_COLUMNS, "probe.mine.safe", "probe.mine.unsafe", "embedding"]
    assert json.loads(t.schema.metadata[b"nsfw_index.probes"])["mine"]["classes"] == ["safe", "unsafe"]
    assert t.column("paths").to_pylist()[0] == ["/corpus/0.png", "/corpus/a, b.png"]
    assert export("--store", str(store_dir), "--out", str(out), "--no-embeddings", "--columns", "probe.mine")[0] == 0
    assert pq.read_table(out).column_names == ["probe.mine.safe", "probe.mine.unsafe"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--columns", "id,colour,sha256"], r"unknown export column\(s\) 'colour'; valid: id, sha256, paths"),
        (["--columns", "probe.other.unsafe"], "'probe.other.unsafe'; valid: .*probe.mine.unsafe, embedding"),
        (["--columns", "id,embedding", "--no-embeddings"], "contradict"),
    ],
)
def test_a_bad_column_list_is_refused_and_nothing_is_written(
    store_dir: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    out = tmp_path / "keep.csv"
    out.write_text("old\n")
    code, output = export("--store", str(store_dir), "--out", str(out), *args)
    assert code == 2
    assert re.search(message, output), output
    assert out.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["keep.csv"]
