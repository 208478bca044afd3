"""`make stress` only: these long runs are collected when NSFW_INDEX_STRESS=1 (the Makefile's `stress` target sets
it), never by `make test` / a plain `pytest`."""

from __future__ import annotations

import os

if os.environ.get("NSFW_INDEX_STRESS") != "1":
    collect_ignore_glob = ["test_*.py"]


def record(name: str, counts: dict[str, object]) -> None:
    """Append one test's counts to the report that `make stress` prints at the end (and README.md quotes)."""
    import json
    from pathlib import Path

    path = Path(os.environ.get("NSFW_INDEX_STRESS_COUNTS", "/tmp/nsfw-index-stress-counts.jsonl"))
    with path.open("a") as f:
        f.write(json.dumps({"test": name, **counts}) + "\n")


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # type: ignore[no-untyped-def]
    from pathlib import Path

    path = Path(os.environ.get("NSFW_INDEX_STRESS_COUNTS", "/tmp/nsfw-index-stress-counts.jsonl"))
    if os.environ.get("NSFW_INDEX_STRESS") == "1" and path.exists():
        terminalreporter.section("stress counts")
        for line in path.read_text().splitlines():
            terminalreporter.write_line(line)
