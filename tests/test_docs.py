"""Every CLI verb and every HTTP route is documented (README) and every verb's help has an example."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from indexer.cli import cli

README = (Path(__file__).parent.parent / "README.md").read_text()
VERBS = sorted(cli.commands)
HTTP = {"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"}
DESIGN_VERBS = {"score", "index", "query", "label", "import-hashes", "cluster", "stats", "export", "rebuild", "serve"}
REVIEW_VERBS = {"show", "neighbours", "errors", "clusters"}  # issue 13: review from the terminal


def test_the_cli_has_the_verbs_of_the_design() -> None:
    assert set(VERBS) >= DESIGN_VERBS | REVIEW_VERBS


@pytest.mark.parametrize("verb", VERBS)
def test_verb_is_documented_with_an_example(verb: str) -> None:
    assert f"`nsfw-index {verb}`" in README, f"README does not document `nsfw-index {verb}`"
    result = CliRunner().invoke(cli, [verb, "--help"])
    assert result.exit_code == 0
    assert "Example:" in result.output and f"nsfw-index {verb}" in result.output


def test_readme_opens_with_the_two_setup_commands() -> None:
    head = README[:1200]
    assert "make demo" in head and "make test" in head


def test_every_route_is_documented(tmp_path: Path) -> None:
    from api.app import create_app
    from search.settings import Settings

    app = create_app(Settings(store=tmp_path / "store"))
    # the routes in the schema, read from the OpenAPI document: FastAPI keeps included routers as nodes of `app.routes`
    routes = {(m.upper(), path) for path, ops in app.openapi()["paths"].items() for m in ops if m.upper() in HTTP}
    documented = set(re.findall(r"`(GET|POST|PUT|DELETE|PATCH) (/[^`]*)`", README))
    missing = {f"{m} {p}" for m, p in routes if (m, p) not in documented and m != "HEAD"}
    assert not missing, f"routes missing from README: {sorted(missing)}"
    for m, p in documented:
        assert (m, p) in routes, f"README documents {m} {p} but the app has no such route"
