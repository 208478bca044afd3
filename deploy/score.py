"""Azure ML style scoring entry: `init()` loads the model and opens the store, `run(raw_data)` answers one JSON query
form (`image_base64`, `embedding`, `url`) with the JSON that `POST /v1/query` returns.

Configuration (environment, read by `init()`):

- `NSFW_INDEX_STORE`: the store directory (required; opened read-only).
- `NSFW_INDEX_MODEL`: the model (a Hugging Face repo id in the local cache, or a directory with `config.json` +
  `model.safetensors`). When it is not set and `AZUREML_MODEL_DIR` is (Azure ML sets it to the registered model's
  folder), the model is the directory under it that holds `config.json` + `model.safetensors` (the folder itself,
  or the only such folder up to two levels below). Neither set: the default `Freepik/nsfw_image_detector` from the
  Hugging Face cache.
- Every other `NSFW_INDEX_*` setting as for `nsfw-index serve` (e.g. `NSFW_INDEX_URL_QUERIES=1` and
  `NSFW_INDEX_URL_ALLOWLIST=...` for url queries, off by default; `NSFW_INDEX_MAX_BODY_BYTES` caps `raw_data`).

`run(raw_data)` takes the request body (str or bytes of JSON, or a dict already parsed) and returns a dict: the body
`POST /v1/query` answers, built by the same code (`api.routers.query`, `api.schemas.QueryResponse`), stored paths
always left out (no per-caller rights here, as for an API key without `read_paths`). Bad input never raises: it
returns `{"error": {"code": str, "message": str, "status": int}}` (`status`: what the HTTP API would answer, e.g.
400, 413, 415, 422, 503; `details` added for validation errors), the same codes as the HTTP error bodies (Azure ML
answers whatever `run` returns with its own 200: read `error.status`). Images go through the same preparation and
caps as HTTP uploads (max_file_bytes, http_max_pixels from the header, max_images_per_request); one forward pass
runs at a time (the server-wide pixel budget of `serve` has no counterpart here).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from api import schemas
from api.errors import error_body, error_code, http_status
from api.routers.common import SearchOptions, query_timings
from api.routers.query import answer, embedding_result, failure
from api.worker import BatchInfo
from indexer.analyze import Analysis, analyze_prepared
from indexer.extractor import Extractor
from indexer.files import require_same_model
from indexer.prepare import Prepared, prepare_or_error
from indexer.query_forms import QueryForm, embedding_answer, form_images
from search.errors import InvalidArgument, InvalidImage, ModelNotFound, NsfwIndexError, StoreNotFound
from search.query import Searcher
from search.settings import Settings

log = logging.getLogger("nsfw_index.deploy")

MODEL_FILES = ("config.json", "model.safetensors")


def find_model_dir(root: Path, depth: int = 2) -> Path | None:
    """`root` if it holds the model files, else the only folder at most `depth` levels below that does."""
    if all((root / f).is_file() for f in MODEL_FILES):
        return root
    found: list[Path] = []
    level = [root]
    for _ in range(depth):
        level = sorted(d for parent in level for d in parent.iterdir() if d.is_dir())
        found += [d for d in level if all((d / f).is_file() for f in MODEL_FILES)]
    return found[0] if len(found) == 1 else None


def settings_from_env() -> Settings:
    """Settings from `NSFW_INDEX_*`, the model from `AZUREML_MODEL_DIR` when NSFW_INDEX_MODEL is not set."""
    overrides: dict[str, Any] = {}
    azure = os.environ.get("AZUREML_MODEL_DIR")
    if not os.environ.get("NSFW_INDEX_MODEL") and azure:
        model_dir = find_model_dir(Path(azure))
        if model_dir is None:
            raise ModelNotFound(
                f"AZUREML_MODEL_DIR={azure} holds no single folder with {' + '.join(MODEL_FILES)}: register the "
                "model folder itself, or set NSFW_INDEX_MODEL"
            )
        overrides["model"] = str(model_dir)
    settings = Settings(**overrides)
    if settings.store is None:
        raise StoreNotFound("set NSFW_INDEX_STORE to the store directory (built with `nsfw-index index`)")
    return settings


class Scorer:
    """The model and a read-only Searcher over the store, kept in step with it on every `run`."""

    def __init__(self, settings: Settings, extractor: Extractor | None = None) -> None:
        assert settings.store is not None
        self.settings = settings
        self.extractor = extractor or Extractor.from_settings(settings)
        self.searcher = Searcher.open(settings.store, settings)  # StoreNotFound when there is none
        require_same_model(self.searcher.store, self.extractor.identity)  # refuse at init, not per request
        self._model_lock = threading.Lock()  # one forward pass at a time
        engine = self.extractor.describe()  # as api.state.Service names its model: with the backend and dtype
        self.model_info = schemas.ModelInfo(
            architecture=self.extractor.identity.architecture,
            weights_sha256=self.extractor.identity.weights_sha256,
            backend=engine["backend"],
            dtype=engine["dtype"],
        )

    def close(self) -> None:
        self.searcher.close()

    def run(self, raw_data: str | bytes | dict[str, Any]) -> dict[str, Any]:
        try:
            return self._run(raw_data)
        except ValidationError as e:
            details = [
                {"loc": ["body", *map(str, err.get("loc", ()))], "msg": str(err.get("msg", "")), "type": err["type"]}
                for err in e.errors(include_url=False)[:50]
            ]
            where = ".".join(details[0]["loc"]) if details else "body"
            return error(422, "invalid_request", f"{where}: {details[0]['msg'] if details else e}", details)
        except NsfwIndexError as e:
            return error(http_status(e)[0], error_code(e), str(e))
        except Exception:  # a bug: say so without detail, as the HTTP API does
            log.exception("scoring failed")
            return error(500, "internal", "internal error (logged by the scoring service)")

    def _run(self, raw_data: str | bytes | dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        s = self.settings
        form = QueryForm.model_validate(parse_raw(raw_data, s.max_body_bytes))
        options = SearchOptions.of(form.k, form.source, form.min_similarity, form.threshold)
        self.searcher.refresh()  # an index run since the last call is seen now
        searcher = self.searcher if self.searcher.ready else None
        index = schemas.IndexInfo.model_validate({**self.searcher.index_info(), "ready": searcher is not None})
        if form.embedding is not None:
            ts = time.perf_counter()
            ans = embedding_answer(form.embedding, searcher, self.extractor.identity.embedding_dim, **options.kwargs())
            return schemas.QueryResponse(
                results=[embedding_result(ans, show_paths=False)],
                model=self._store_model(),
                index=index,
                timings=query_timings(BatchInfo(0.0, 0.0, 0), time.perf_counter() - ts, t0),
            ).to_json()
        require_same_model(self.searcher.store, self.extractor.identity)
        items = form_images(form, s)
        max_pixels = min(s.max_pixels, s.http_max_pixels)  # the caps of an HTTP upload
        prepared: list[Prepared | InvalidImage] = [
            it
            if isinstance(it, InvalidImage)
            else prepare_or_error(
                it[0], it[1], transform=self.extractor.transform, max_bytes=s.max_file_bytes, max_pixels=max_pixels
            )
            for it in items
        ]
        ti = time.perf_counter()
        with self._model_lock:
            analyses: list[Analysis | InvalidImage] = analyze_prepared(self.extractor, prepared)
        good = sum(isinstance(a, Analysis) for a in analyses)
        info = BatchInfo(queue_ms=0.0, inference_ms=(time.perf_counter() - ti) * 1000, batch_images=good)
        failures = [a for a in analyses if isinstance(a, InvalidImage)]
        if len(failures) == len(analyses):
            raise failures[0]
        ts = time.perf_counter()
        results: list[schemas.QueryResult | schemas.QueryFailure | schemas.EmbeddingResult] = [
            failure(a, None) if isinstance(a, InvalidImage) else answer(a, searcher, None, False, options)
            for a in analyses
        ]
        timings = query_timings(info, time.perf_counter() - ts, t0)
        return schemas.QueryResponse(results=results, model=self.model_info, index=index, timings=timings).to_json()

    def _store_model(self) -> schemas.ModelInfo:
        """The model of the store's vectors (an embedding answer comes from them alone), as Service says it."""
        ident = self.searcher.store.model_identity()
        if ident is None or ident == self.extractor.identity:
            return self.model_info
        return schemas.ModelInfo(architecture=ident.architecture, weights_sha256=ident.weights_sha256)


def parse_raw(raw_data: object, max_bytes: int) -> object:
    """The JSON object in `raw_data` (str or bytes of JSON, or already parsed)."""
    if isinstance(raw_data, dict):
        return raw_data
    if not isinstance(raw_data, (str, bytes, bytearray)):
        raise InvalidJson(f"raw_data must be JSON text or a dict, not {type(raw_data).__name__}")
    size = len(raw_data.encode("utf-8")) if isinstance(raw_data, str) else len(raw_data)
    if size > max_bytes:
        why = f"{size} bytes, more than {max_bytes} (setting max_body_bytes)"
        raise InvalidImage("raw_data", why, kind="too_large")
    try:
        return json.loads(raw_data)
    except (ValueError, RecursionError) as e:
        raise InvalidJson(f"raw_data is not valid JSON text (UTF-8): {e}") from None


class InvalidJson(InvalidArgument):
    """raw_data that is not a JSON object (422, as the HTTP API answers a body it cannot read)."""

    code = "invalid_request"


def error(status: int, code: str, message: str, details: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    body = error_body(code, message, details)
    body["error"]["status"] = status
    return body


_scorer: Scorer | None = None
_init_lock = threading.Lock()


def init() -> None:
    """Load the model and open the store named by the environment (see the module docstring). Raises when either is
    missing or they do not match: a deployment that cannot answer should fail to start."""
    global _scorer
    with _init_lock:
        fresh = Scorer(settings_from_env())
        old, _scorer = _scorer, fresh
        if old is not None:
            old.close()


def run(raw_data: str | bytes | dict[str, Any]) -> dict[str, Any]:
    """One query form in, the `POST /v1/query` answer (or an error object) out; never raises."""
    scorer = _scorer
    if scorer is None:
        return error(503, "not_ready", "init() has not run (or failed): see the deployment's log")
    return scorer.run(raw_data)
