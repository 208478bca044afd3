"""Backends (indexer/backends): each runtime and dtype against torch fp32 within the documented drift, the export cache
(built once, reused, rebuilt when damaged), and the backend and dtype every run records."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import photo, run_cli

from indexer.backends.base import DRIFT, choose
from indexer.extractor import Extractor
from search.errors import InvalidArgument
from search.settings import Settings

PAIRS = [
    ("onnxruntime", "fp32"),
    ("openvino", "fp32"),
    ("openvino", "bf16"),
    ("torch", "bf16"),
    ("openvino", "int8"),
    ("onnxruntime", "int8"),
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("export-cache")


@pytest.fixture(scope="module")
def images() -> list:
    return [photo(i, (120, 90)) for i in range(10)]


def _settings(checkpoint: Path, cache: Path, backend: str, dtype: str) -> Settings:
    return Settings(model=str(checkpoint), device="cpu", backend=backend, dtype=dtype, cache_dir=cache, batch_size=4)


@pytest.fixture(scope="module")
def reference(checkpoint: Path, cache: Path, images: list) -> list:
    return Extractor.from_settings(_settings(checkpoint, cache, "torch", "fp32")).extract(images)


@pytest.mark.parametrize(("backend", "dtype"), PAIRS)
def test_backend_matches_torch_fp32_within_the_documented_drift(
    checkpoint: Path, cache: Path, images: list, reference: list, backend: str, dtype: str
) -> None:
    ex = Extractor.from_settings(_settings(checkpoint, cache, backend, dtype))
    assert ex.describe()["backend"] == backend and ex.describe()["dtype"] == dtype
    assert ex.identity == Extractor.from_settings(_settings(checkpoint, cache, "torch", "fp32")).identity
    out = ex.extract(images)
    max_prob, min_cos, min_agree = DRIFT[dtype]
    prob = max(
        abs(a.probabilities[k] - r.probabilities[k])
        for a, r in zip(out, reference, strict=True)
        for k in a.probabilities
    )
    cos = min(float(a.embedding @ r.embedding) for a, r in zip(out, reference, strict=True))
    agree = np.mean([a.level == r.level for a, r in zip(out, reference, strict=True)])
    assert prob <= max_prob and cos >= min_cos and agree >= min_agree, (prob, cos, agree)
    for a in out:  # the embedding is unit length and the scores are the cumulative ones, whatever the backend
        assert abs(float(np.linalg.norm(a.embedding)) - 1.0) < 1e-5
        assert a.scores["low"] == pytest.approx(1.0 - a.probabilities["neutral"], abs=1e-6)


def test_export_is_built_once_then_reused_without_the_torch_model(checkpoint: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = Extractor.from_settings(_settings(checkpoint, cache, "onnxruntime", "fp32"))
    assert first.engine.built == [a.rsplit("/", 1)[-1] for a in first.engine.artifacts]
    (art,) = first.engine.artifacts
    meta = json.loads((Path(art) / "meta.json").read_text())
    assert meta["identity"]["weights_sha256"] == first.identity.weights_sha256
    assert Path(art).parts[-3] == first.identity.weights_sha256  # keyed by the weights' sha256
    mtime = (Path(art) / "model.onnx").stat().st_mtime_ns
    again = Extractor.from_settings(_settings(checkpoint, cache, "openvino", "fp32"))  # same ONNX graph
    assert again.engine.built == [] and again.engine.artifacts == [art]
    assert (Path(art) / "model.onnx").stat().st_mtime_ns == mtime
    assert again.identity == first.identity and again.data_config == first.data_config
    x = [photo(3)]
    assert np.allclose(again.extract(x)[0].embedding, first.extract(x)[0].embedding, atol=1e-5)


def test_a_damaged_cache_entry_is_rebuilt_not_used(checkpoint: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = Extractor.from_settings(_settings(checkpoint, cache, "onnxruntime", "fp32"))
    (art,) = first.engine.artifacts
    (Path(art) / "meta.json").write_text("{not json")  # e.g. a crash while writing, a full disk
    again = Extractor.from_settings(_settings(checkpoint, cache, "onnxruntime", "fp32"))
    assert again.engine.built and json.loads((Path(art) / "meta.json").read_text())["identity"]
    assert np.allclose(again.extract([photo(1)])[0].embedding, first.extract([photo(1)])[0].embedding, atol=1e-6)


def test_auto_and_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NSFW_INDEX_NATIVE_BF16", "1")
    from indexer.backends import base

    base.native_bf16.cache_clear()
    assert choose("auto", None, "cpu") == base.Choice("openvino", "bf16", "cpu")
    monkeypatch.setenv("NSFW_INDEX_NATIVE_BF16", "0")
    base.native_bf16.cache_clear()
    assert choose("auto", None, "cpu") == base.Choice("openvino", "fp32", "cpu")  # no native bf16: fp32
    assert choose("auto", None, "cuda") == base.Choice("torch", "bf16", "cuda")
    assert choose("auto", "int8", "cpu").backend == "openvino"
    base.native_bf16.cache_clear()


@pytest.mark.parametrize(
    ("backend", "dtype", "device", "says"),
    [
        ("onnxruntime", "bf16", "cpu", "runs on torch, openvino"),
        ("torch", "int8", "cpu", "runs on onnxruntime, openvino"),
        ("auto", "int8", "cuda", "does not run on cuda"),
        ("openvino", "fp32", "cuda", "not cuda/fp32"),
    ],
)
def test_a_pair_no_backend_runs_is_a_clear_error(backend: str, dtype: str, device: str, says: str) -> None:
    with pytest.raises(InvalidArgument, match=says):
        choose(backend, dtype, device)


def test_each_run_records_its_backend_and_dtype_and_stats_shows_them(
    checkpoint: Path, tmp_path: Path, images_dir: Path
) -> None:
    store = tmp_path / "store"
    common = ["--store", str(store), "--model", str(checkpoint), "--device", "cpu", "--workers", "0"]
    first = run_cli("index", str(images_dir), *common, "--backend", "onnxruntime", "--dtype", "fp32", "--json")
    assert first.returncode == 0, first.stderr
    out = json.loads(first.stdout)
    assert out["engine"]["backend"] == "onnxruntime" and out["engine"]["dtype"] == "fp32"
    assert out["startup"]["model_load"] > 0 and 0 < out["model_share"] <= 1
    more = tmp_path / "more"
    more.mkdir()
    for i in range(3):
        photo(100 + i).save(more / f"m{i}.png")
    second = run_cli("index", str(more), *common, "--backend", "openvino", "--dtype", "bf16", "--json")
    assert second.returncode == 0, second.stderr
    stats = json.loads(run_cli("stats", "--store", str(store), "--json").stdout)
    by = {(v["backend"], v["dtype"]): v["images"] for v in stats["vectors_by_backend"]}
    assert by == {("onnxruntime", "fp32"): 6, ("openvino", "bf16"): 3}
    assert {(r["backend"], r["dtype"]) for r in stats["runs"] if r["kind"] == "index"} == set(by)
    assert stats["model"]["weights_sha256"]  # one model identity: a store may hold both backends' vectors
    text = run_cli("stats", "--store", str(store)).stdout
    assert "6 images by onnxruntime fp32" in text and "3 images by openvino bf16" in text


def test_building_int8_keeps_json_stdout_clean(checkpoint: Path, tmp_path: Path, images_dir: Path) -> None:
    env = {"NSFW_INDEX_CACHE_DIR": str(tmp_path / "fresh-cache")}
    r = run_cli(
        "score", str(images_dir), "--model", str(checkpoint), "--device", "cpu", "--dtype", "int8", "--json", env=env
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 6 and all("probabilities" in json.loads(line) for line in lines)
    assert "building the openvino-int8" in r.stderr


def test_bad_backend_flag_is_exit_2_with_the_choices(checkpoint: Path, images_dir: Path) -> None:
    r = run_cli("score", str(images_dir), "--model", str(checkpoint), "--backend", "onnxruntime", "--dtype", "bf16")
    assert r.returncode == 2 and "runs on torch, openvino" in r.stderr
