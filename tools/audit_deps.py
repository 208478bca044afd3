"""Offline dependency audit: installed versions of the security-sensitive packages against tools/safe-versions.toml."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

TABLE = Path(__file__).with_name("safe-versions.toml")


def audit(table: dict[str, Any]) -> list[str]:
    """One line per problem: a package below its safe minimum (with the advisories that set it), or missing."""
    problems = []
    for name, entry in table.items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            problems.append(f"{name}: not installed (the table lists it; remove it from the table if it was dropped)")
            continue
        if Version(installed) < Version(entry["min"]):
            why = "; ".join(entry.get("advisories", [])) or "see the table"
            problems.append(f"{name} {installed} is below the safe minimum {entry['min']}: {why}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--table", type=Path, default=TABLE)
    args = parser.parse_args(argv)
    table = tomllib.loads(args.table.read_text(encoding="utf-8"))
    problems = audit(table)
    for p in problems:
        print(f"audit: {p}", file=sys.stderr)
    if not problems:
        print(f"audit: {len(table)} security-sensitive packages at or above their safe minimum ({args.table.name})")
    status = 1 if problems else 0
    if os.environ.get("NSFW_INDEX_AUDIT_ONLINE") == "1":
        exe = shutil.which("pip-audit")
        if exe is None:
            print("audit: NSFW_INDEX_AUDIT_ONLINE=1 needs pip-audit (pip install pip-audit)", file=sys.stderr)
            return 1
        status = max(status, subprocess.call([exe, "--strict", "--progress-spinner", "off"]))
    return status


if __name__ == "__main__":
    sys.exit(main())
