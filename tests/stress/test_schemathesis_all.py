"""Schemathesis with every check (not only 5xx and response schemas) over every route, with and without a key, both
positive and negative data: zero failures. Counts go to the `make stress` report."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from conftest import photo
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from schemathesis.config import SchemathesisConfig

from api.app import create_app
from api.server import BackgroundServer
from indexer.extractor import Extractor
from indexer.service import index_inputs
from search.settings import Settings
from search.store import Store

KEY = "stress-schema-key"
EXAMPLES = int(os.environ.get("NSFW_INDEX_SCHEMA_EXAMPLES", "60"))
COUNTS: dict[str, Any] = {"cases_with_key": 0, "cases_without_key": 0}
FAILURES: set[str] = set()  # distinct failures (hypothesis replays a failing case while it shrinks it)


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> Iterator[str]:
    root = tmp_path_factory.mktemp("schema-all")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(6):
        photo(i).save(corpus / f"img{i}.png")
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
    with BackgroundServer(create_app(settings, extractor=extractor)) as server:
        yield server.url
    path = Path(os.environ.get("NSFW_INDEX_STRESS_COUNTS", "/tmp/nsfw-index-stress-counts.jsonl"))
    with path.open("a") as f:
        f.write(
            json.dumps(
                {
                    "test": "schemathesis_all_checks",
                    "examples_per_operation": EXAMPLES,
                    **COUNTS,
                    "failures": len(FAILURES),
                    "failed": sorted(FAILURES),
                }
            )
            + "\n"
        )


# Every check schemathesis has, each on its defaults; `positive_data_acceptance` also accepts what the document
# lists for valid requests that still cannot succeed here: bytes that are schema-valid `binary` but no image (400
# invalid_image), no such id, no key or the wrong right, a busy server.
POSITIVE_STATUSES = ["2xx", "400", "401", "403", "404", "409", "413", "415", "422", "503"]
CONFIG = SchemathesisConfig.from_dict(
    {"checks": {"enabled": True, "positive_data_acceptance": {"expected-statuses": POSITIVE_STATUSES}}}
)
schema = schemathesis.openapi.from_dict(create_app(Settings(store=Path("schema-only"))).openapi(), config=CONFIG)


def _run(case: Any, server_url: str, headers: dict[str, str]) -> None:
    try:
        case.call_and_validate(base_url=server_url, headers=headers)
    except BaseException as e:
        FAILURES.add(f"{case.operation.label}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
        raise


@schema.parametrize()
@hypothesis_settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_all_checks_with_a_key(case: Any, server_url: str) -> None:
    COUNTS["cases_with_key"] += 1
    _run(case, server_url, {"Authorization": f"Bearer {KEY}"})


@schema.parametrize()
@hypothesis_settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_all_checks_without_a_key(case: Any, server_url: str) -> None:
    COUNTS["cases_without_key"] += 1
    _run(case, server_url, {})
