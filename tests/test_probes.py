"""Linear probes on the stored embeddings: planted labels are learned and separate held-out images, retraining after
new labels changes the probe, a probe never scores vectors of another model, bad label sets are refused, and every
answer (query, neighbours, show, HTTP, score --probe) carries `probes`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import httpx
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import index_dir, photo
from sklearn.metrics import roc_auc_score

from api.app import create_app
from api.server import BackgroundServer
from indexer.cli import cli
from search.errors import InvalidArgument, ModelMismatch, NotFound
from search.policy import ModelIdentity
from search.probes import (
    active_probes,
    load_probes,
    probe_infos,
    probes_for_ids,
    read_class_csv,
    score_store,
    train_probe,
)
from search.scores import cumulative_scores, level_of
from search.settings import Settings
from search.store import ImageRecord, Store

DIM = 32
IDENTITY = ModelIdentity(architecture="test-arch", weights_sha256="0" * 64, preprocessing={}, embedding_dim=DIM)
OTHER = ModelIdentity(architecture="test-arch", weights_sha256="1" * 64, preprocessing={}, embedding_dim=DIM)


def planted(n: int, classes: int, seed: int = 0, strength: float = 2.5) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors whose class (0..classes-1) is planted along one random direction each, plus noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    directions = rng.standard_normal((classes, DIM))
    x = rng.standard_normal((n, DIM)) / np.sqrt(DIM) * 3 + strength * directions[y] / np.sqrt(DIM)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y


def fill(root: Path, x: np.ndarray, seed: int = 1) -> list[int]:
    """A store holding `x` as its images' embeddings (random model scores), without running a model."""
    rng = np.random.default_rng(seed)
    with Store(root, create=True) as store:
        store.check_model(IDENTITY)
        run = store.begin_run("test", {})
        records, paths = [], []
        for i, v in enumerate(x):
            p = rng.dirichlet(np.ones(4))
            sha = f"{i:064x}"
            scores = cumulative_scores(p)
            records.append(ImageRecord(sha, 100, 10, 10, "PNG", p, scores, level_of(p), v))
            paths.append((f"/corpus/{i}.png", sha, 100, None))
        ids = store.write_batch(run, records, paths)
        return [ids[f"{i:064x}"] for i in range(len(x))]


def label(store: Store, ids: Sequence[int], y: Sequence[int]) -> None:
    store.append_labels([(i, "unsafe" if c else "safe", None) for i, c in zip(ids, y, strict=True)], "test")


@pytest.fixture
def planted_store(tmp_path: Path) -> tuple[Path, list[int], np.ndarray]:
    x, y = planted(240, 2)
    return tmp_path / "store", fill(tmp_path / "store", x), y


def test_a_probe_on_planted_labels_separates_held_out_images(planted_store) -> None:
    root, ids, y = planted_store
    with Store(root) as store:
        label(store, ids[:120], y[:120])
        t = train_probe(store, "planted", Settings())
        assert (t.classes, t.examples, t.replaced) == (["safe", "unsafe"], 120, False)
        assert t.label_watermark == store.last_label_event() == 120 and t.label_events_since == 0
        assert t.model["weights_sha256"] == IDENTITY.weights_sha256 and t.applies
        m = t.metrics
        assert m.folds == 5 and m.average == "unsafe" and m.probe.roc_auc > 0.9
        assert m.base_model is not None and m.base_model_rule == "scores.medium >= 0.5"
        assert m.probe.roc_auc > m.base_model.roc_auc  # the base model's scores here are noise
        assert sum(s.support for s in m.per_class.values()) == 120
        held_out = ids[120:]
        got = probes_for_ids(store, held_out)
        p_unsafe = [got[i]["planted"]["unsafe"] for i in held_out]
        assert roc_auc_score(y[120:], p_unsafe) > 0.95
        assert all(abs(sum(got[i]["planted"].values()) - 1) < 1e-9 for i in held_out)
        # the whole store from the stored vectors (no model pass) gives the same numbers
        (chunk_ids, outs), *rest = list(score_store(store, active_probes(store)))
        assert not rest and list(chunk_ids) == ids
        np.testing.assert_allclose(outs["planted"][120:, 1], p_unsafe)
    with Store(root) as store:  # stored: a new handle reads the same probe back
        (p,) = store.probes()
        assert p.name == "planted" and p.coef.shape == (1, DIM) and p.label_source == "labels"


def test_retraining_after_new_labels_changes_the_probe(planted_store) -> None:
    root, ids, y = planted_store
    with Store(root) as store:
        label(store, ids[:60], y[:60])
        first = train_probe(store, "p", Settings())
        (before,) = store.probes()
        flipped = ids[:30]
        label(store, flipped, 1 - y[:30])  # reviewers changed their minds on half of them
        label(store, ids[60:120], y[60:120])
        (info,) = probe_infos(store)
        assert info.label_events_since == 90
        second = train_probe(store, "p", Settings())
        (after,) = store.probes()
    assert second.replaced and second.examples == 120 and second.label_watermark == first.label_watermark + 90
    assert second.label_events_since == 0 and second.trained_at > first.trained_at
    assert not np.allclose(before.coef, after.coef)
    # the flipped images moved towards their new labels
    with Store(root, readonly=True) as store:
        x = store.vectors(flipped)
    moved = after.predict(x)[:, 1] - before.predict(x)[:, 1]
    towards = np.where(1 - y[:30] == 1, moved, -moved)
    assert (towards > 0).mean() > 0.8


def test_a_probe_never_scores_vectors_of_another_model(planted_store, checkpoint) -> None:
    root, ids, y = planted_store
    with Store(root) as store:
        label(store, ids[:40], y[:40])
        train_probe(store, "guarded", Settings())
        (probe,) = load_probes(store, ["guarded"])
        with pytest.raises(ModelMismatch, match=r"probe 'guarded' was trained on vectors of another model.*weights"):
            probe.require_model(OTHER, "the model in use")
        with pytest.raises(NotFound, match=r"no probe named 'nope'.*it has: guarded"):
            load_probes(store, ["nope"])
        store.check_model(OTHER, adopt=True)  # the store re-embedded with other weights
        with pytest.raises(ModelMismatch, match="train-probe --store DIR --name guarded"):
            load_probes(store, ["guarded"])
        assert active_probes(store) == [] and probes_for_ids(store, ids[:3]) == {i: {} for i in ids[:3]}
        (info,) = probe_infos(store)
        assert not info.applies
    # `score --probe` with a model that is not the probe's: refused before any file is read
    args = ["score", "/no/such/file.png", "--probe", "guarded", "--store", str(root), "--model", str(checkpoint)]
    res = CliRunner().invoke(cli, [*args, "--device", "cpu"])
    assert res.exit_code == 2 and "trained on vectors of another model" in res.output


def test_a_csv_label_set_trains_a_multiclass_probe(tmp_path: Path) -> None:
    x, y = planted(150, 3, seed=4, strength=4.0)
    ids = fill(tmp_path / "store", x)
    names = ["art", "diagram", "photo"]
    csv_file = tmp_path / "classes.csv"
    lines = ["sha256,class"] + [f"{i:064x},{names[c]}" for i, c in enumerate(y[:100])]
    csv_file.write_text("\n".join(lines) + "\n")
    with Store(tmp_path / "store") as store:
        rows = read_class_csv(csv_file)
        t = train_probe(store, "kinds", Settings(), assignments=rows, label_source="csv:classes.csv")
        assert t.classes == names and t.label_source == "csv:classes.csv" and t.label_events_since is None
        assert t.metrics.average == "macro" and t.metrics.base_model is None and set(t.metrics.per_class) == set(names)
        assert t.metrics.probe.roc_auc > 0.9
        (p,) = store.probes()
        assert p.coef.shape == (3, DIM)
        got = probes_for_ids(store, ids[100:])
    pred = [max(got[i]["kinds"], key=got[i]["kinds"].get) for i in ids[100:]]
    assert np.mean([a == names[c] for a, c in zip(pred, y[100:], strict=True)]) > 0.85


@pytest.mark.parametrize(
    ("csv_text", "message"),
    [
        ("sha256,class\n{0},a\n{1},a\n", "at least 2 classes"),
        ("sha256,class\n{0},a\n{1},a\n{2},b\n", "at least 2 labelled images"),
        ("sha256,class\n{0},a\n{1},a\n" + "f" * 64 + ",b\n", "line 4: sha256 'fff.*not an indexed image"),
        ("id,class\n1,a\n2,a\n999,b\n", "line 4: id '999' is not an indexed image"),
        ("sha256,class\n{0},a\n{0},b\n", "line 3: image .* is already class 'a'"),
        ("image,kind\n{0},a\n", "needs a header with a column sha256"),
        ("id,class\n1,a,b\n2,\n", "line 3: needs both an image and a class"),
    ],
)
def test_bad_label_sets_are_refused_and_nothing_changes(tmp_path: Path, csv_text: str, message: str) -> None:
    x, _ = planted(12, 2)
    fill(tmp_path / "store", x)
    path = tmp_path / "bad.csv"
    path.write_text(csv_text.format(*(f"{i:064x}" for i in range(3))))
    with Store(tmp_path / "store") as store:
        label(store, store.image_ids()[:4], [0, 1, 0, 1])
        train_probe(store, "keep", Settings())
        (before,) = store.probes()
        with pytest.raises(InvalidArgument, match=message):
            train_probe(store, "keep", Settings(), assignments=read_class_csv(path))
        (after,) = store.probes()
        assert after.trained_at == before.trained_at and np.array_equal(after.coef, before.coef)


def test_human_labels_need_two_of_each_and_a_valid_name(planted_store) -> None:
    root, ids, _ = planted_store
    with Store(root) as store:
        with pytest.raises(InvalidArgument, match=r"at least 2 classes.*nsfw-index label"):
            train_probe(store, "p", Settings())
        label(store, ids[:3], [1, 1, 0])
        with pytest.raises(InvalidArgument, match=r"at least 2 labelled images.*'safe': 1"):
            train_probe(store, "p", Settings())
        with pytest.raises(InvalidArgument, match="probe name"):
            train_probe(store, "no spaces", Settings())
        assert store.probes() == []


# -- the answers carry probes --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_store(tmp_path_factory: pytest.TempPathFactory, settings_for, extractor) -> tuple[Path, Path]:
    """8 photos through the tiny model, 4 labelled unsafe and 4 safe, with a probe trained by the CLI."""
    root = tmp_path_factory.mktemp("probes")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(8):
        photo(700 + i).save(corpus / f"img{i}.png")
    index_dir(root / "store", [str(corpus)], settings_for(), extractor=extractor)
    with Store(root / "store") as store:
        label(store, store.image_ids(), [1, 0] * 4)
    return root / "store", corpus


def invoke(*args: str) -> dict:
    res = CliRunner().invoke(cli, list(args))
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout.splitlines()[-1])


def test_every_answer_carries_the_probes(model_store, checkpoint, extractor) -> None:
    store, corpus = model_store
    t = invoke("train-probe", "--store", str(store), "--name", "mine", "--json")
    assert t["classes"] == ["safe", "unsafe"] and t["examples"] == 8 and t["metrics"]["folds"] == 4
    assert set(t["metrics"]["base_model"]) == {"precision", "recall", "roc_auc"}
    model = ["--model", str(checkpoint), "--device", "cpu"]
    q = invoke("query", str(corpus / "img3.png"), "--store", str(store), *model, "--json")
    assert set(q["probes"]) == {"mine"} and set(q["probes"]["mine"]) == {"safe", "unsafe"}
    s = invoke("score", str(corpus / "img3.png"), "--probe", "mine", "--store", str(store), *model, "--json")
    assert s["probes"]["mine"] == pytest.approx(q["probes"]["mine"], abs=1e-6)
    image_id = q["indexed_id"]
    shown = invoke("show", str(image_id), "--store", str(store), "--json")
    assert shown["probes"]["mine"] == pytest.approx(q["probes"]["mine"], abs=1e-5)
    near = invoke("neighbours", str(image_id), "--store", str(store), "--json")
    assert near["probes"] == shown["probes"]
    listed = invoke("probes", "--store", str(store), "--json")
    assert listed["name"] == "mine" and listed["applies"] and listed["label_events_since"] == 0
    settings = Settings(model=str(checkpoint), workers=0, device="cpu", store=store)
    with (
        BackgroundServer(create_app(settings, extractor=extractor)) as server,
        httpx.Client(base_url=server.url, timeout=60) as client,
    ):
        assert client.get(f"/v1/images/{image_id}").json()["probes"] == shown["probes"]
        assert client.get(f"/v1/images/{image_id}/neighbours").json()["probes"] == shown["probes"]
        png = (corpus / "img3.png").read_bytes()
        (result,) = client.post("/v1/query", files={"file": ("x.png", png)}).json()["results"]
        assert result["probes"]["mine"] == pytest.approx(q["probes"]["mine"], abs=1e-6)
    # deleting it: the answers carry `probes: {}` (the key is always there)
    res = CliRunner().invoke(cli, ["probes", "--store", str(store), "--delete", "mine"])
    assert res.exit_code == 0 and "deleted" in res.output
    assert invoke("show", str(image_id), "--store", str(store), "--json")["probes"] == {}
    res = CliRunner().invoke(cli, ["probes", "--store", str(store), "--delete", "mine"])
    assert res.exit_code == 2 and "no probe named 'mine'" in res.output


def test_score_probe_needs_a_store_and_a_known_probe(model_store, checkpoint) -> None:
    store, corpus = model_store
    model = ["--model", str(checkpoint), "--device", "cpu"]
    res = CliRunner().invoke(cli, ["score", str(corpus / "img0.png"), "--probe", "x", *model])
    assert res.exit_code == 2 and "--store" in res.output
    res = CliRunner().invoke(cli, ["score", str(corpus / "img0.png"), "--probe", "x", "--store", str(store), *model])
    assert res.exit_code == 2 and "no probe named 'x'" in res.output
