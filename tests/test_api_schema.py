"""Schemathesis against the live server's OpenAPI schema: no 5xx from any generated input, responses conform."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from conftest import photo
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from api.app import create_app
from api.server import BackgroundServer
from indexer.extractor import Extractor
from indexer.service import index_inputs
from search.settings import Settings
from search.store import Store

KEY = "schema-key"


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> Iterator[str]:
    root = tmp_path_factory.mktemp("schema")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(6):
        photo(i).save(corpus / f"img{i}.png")
    photo(0).save(corpus / "copy-of-0.png")
    settings = Settings(
        model=str(checkpoint),
        workers=0,
        device="cpu",
        store=root / "store",
        api_keys=f"{KEY}:read+write+label+read_paths",
        reload_seconds=0.5,
    )
    extractor = Extractor.from_settings(settings)
    with Store.writing(root / "store", "nsfw-index index", create=True) as store:
        index_inputs(store, [str(corpus)], settings, extractor=extractor)
    try:
        from search.clusters import run_clustering

        with Store.writing(root / "store", "nsfw-index cluster") as store:
            run_clustering(store, settings)
    except ImportError:  # the cluster routes then answer 503, which the schema documents
        pass
    with BackgroundServer(create_app(settings, extractor=extractor)) as server:
        yield server.url


# The schema is the app's own (building the app opens nothing; the store is only opened in the lifespan), loaded
# eagerly: schemathesis' lazy `from_fixture` loader does not run under pytest 9 (it sets Function._nodeid).
schema = schemathesis.openapi.from_dict(create_app(Settings(store=Path("schema-only"))).openapi())


def test_the_served_schema_is_the_one_tested(server_url: str) -> None:
    import httpx

    assert httpx.get(f"{server_url}/openapi.json").json() == schema.raw_schema


@schema.parametrize()
@hypothesis_settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors_and_responses_conform(case: Any, server_url: str) -> None:
    case.call_and_validate(
        base_url=server_url,
        headers={"Authorization": f"Bearer {KEY}"},
        checks=[not_a_server_error, response_schema_conformance],
    )
