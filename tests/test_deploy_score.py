"""The Azure ML style scoring entry `deploy/score.py`, called directly (`init()`, `run(raw_data)`) on a store built with
the small checkpoint: the same answer as `POST /v1/query`, and error objects instead of exceptions."""

from __future__ import annotations

import base64
import importlib.util
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from conftest import index_dir, photo
from test_api import live, png
from test_api import settings_for as api_settings

from indexer.extractor import Extractor
from search.store import Store

SCORE_PY = Path(__file__).resolve().parents[1] / "deploy" / "score.py"


def load_score() -> ModuleType:
    """deploy/score.py as Azure ML loads it: a file by path, not a package module."""
    spec = importlib.util.spec_from_file_location("nsfw_index_score", SCORE_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path, extractor: Extractor) -> Path:
    corpus = tmp_path_factory.mktemp("score-corpus")
    for i in range(5):
        photo(i).save(corpus / f"img{i}.png")
    store = tmp_path_factory.mktemp("score") / "store"
    index_dir(store, [str(corpus)], api_settings(checkpoint, store), extractor=extractor)
    return store


@pytest.fixture
def score(monkeypatch: pytest.MonkeyPatch, store_dir: Path, checkpoint: Path) -> Iterator[ModuleType]:
    for name in ("NSFW_INDEX_MODEL", "AZUREML_MODEL_DIR", "NSFW_INDEX_API_KEYS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NSFW_INDEX_STORE", str(store_dir))
    monkeypatch.setenv("NSFW_INDEX_MODEL", str(checkpoint))
    monkeypatch.setenv("NSFW_INDEX_DEVICE", "cpu")
    module = load_score()
    yield module
    if module._scorer is not None:
        module._scorer.close()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def comparable(body: dict[str, Any]) -> dict[str, Any]:
    """An answer without what differs between two calls (timings, when the index was loaded)."""
    return {**body, "timings": None, "index": {**body["index"], "loaded_at": None}}


def test_run_answers_as_post_v1_query(score, store_dir, checkpoint, extractor):
    assert score.run('{"image_base64": "x"}')["error"]["status"] == 503  # before init: an error object, no raise
    score.init()
    image = png(photo(2))  # indexed content: left out of its own answer, exact duplicates listed
    body = {"image_base64": [b64(image), b64(png(photo(7)))], "k": 3}
    got = score.run(json.dumps(body))
    assert set(got) == {"results", "model", "index", "timings"}
    assert got["results"][0]["indexed_id"] is not None and got["results"][1]["indexed_id"] is None
    assert all("paths" not in n for r in got["results"] for n in r["nearest_unsafe"])  # paths never shown
    assert comparable(score.run(json.dumps(body).encode())) == comparable(got)  # str, bytes or dict
    assert comparable(score.run(body)) == comparable(got)
    settings = api_settings(checkpoint, store_dir)  # a key with `read` only: no paths, as the scoring entry
    with live(settings, extractor) as (client, _):
        http = client.post("/v1/query", json=body).json()
        assert comparable(http) == comparable(got)
        with Store(store_dir, readonly=True) as s:
            vec = s.vectors([3])[0].tolist()
        by_vec = client.post("/v1/query", json={"embedding": vec}).json()
        assert comparable(score.run({"embedding": vec})) == comparable(by_vec)
        assert by_vec["results"][0]["near_duplicates"][0]["id"] == 3


def test_bad_input_returns_error_objects(score, store_dir):
    score.init()
    cases = [
        ("{not json", 422, "invalid_request"),
        (json.dumps([1, 2]), 422, "invalid_request"),
        (json.dumps({"image_base64": "x", "url": "http://a"}), 422, "invalid_request"),
        (json.dumps({"image_base64": "x", "nope": 1}), 422, "invalid_request"),
        (json.dumps({"image_base64": "!!"}), 400, "invalid_image"),
        (json.dumps({"image_base64": b64(b"hello, not an image")}), 415, "unsupported_format"),
        (json.dumps({"embedding": [1.0, 2.0]}), 422, "invalid_argument"),
        (json.dumps({"url": "http://127.0.0.1/x.png"}), 422, "url_queries_disabled"),
        (b"\xff\xfe", 422, "invalid_request"),
        (42, 422, "invalid_request"),
    ]
    for raw, status, code in cases:
        out = score.run(raw)
        assert set(out) == {"error"}, (raw, out)
        assert out["error"]["status"] == status and out["error"]["code"] == code, (raw, out)
        assert out["error"]["message"]
    details = score.run({"image_base64": "x", "nope": 1})["error"]["details"]
    assert details and details[0]["loc"][0] == "body"
    big = score.run(json.dumps({"image_base64": "A" * (33 * 1024 * 1024)}))
    assert big["error"]["status"] == 413 and "max_body_bytes" in big["error"]["message"]
    assert "results" in score.run({"image_base64": b64(png(photo(1)))})  # still answering


def test_init_finds_the_model_under_azureml_model_dir(score, monkeypatch, tmp_path, checkpoint):
    registered = tmp_path / "azureml-models" / "nsfw" / "1"
    shutil.copytree(checkpoint, registered / "nsfw_model")
    monkeypatch.delenv("NSFW_INDEX_MODEL")
    monkeypatch.setenv("AZUREML_MODEL_DIR", str(registered))
    assert score.settings_from_env().model == str(registered / "nsfw_model")
    score.init()
    assert "results" in score.run({"image_base64": b64(png(photo(4)))})
    monkeypatch.setenv("AZUREML_MODEL_DIR", str(tmp_path / "empty"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(Exception, match="AZUREML_MODEL_DIR"):
        score.init()
    monkeypatch.setenv("NSFW_INDEX_MODEL", str(checkpoint))
    monkeypatch.delenv("NSFW_INDEX_STORE")
    with pytest.raises(Exception, match="NSFW_INDEX_STORE"):
        score.init()
