"""The offline dependency audit that .ci/run runs: it fails on a package below its safe minimum."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AUDIT = ROOT / "tools" / "audit_deps.py"


def run_audit(table: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(AUDIT), "--table", str(table)], capture_output=True, text=True, timeout=60
    )


def test_the_checked_in_table_passes_on_this_install_and_names_every_sensitive_package() -> None:
    out = run_audit(ROOT / "tools" / "safe-versions.toml")
    assert out.returncode == 0, out.stderr
    text = (ROOT / "tools" / "safe-versions.toml").read_text()
    for name in ("pillow", "starlette", "fastapi", "python-multipart", "h11", "uvicorn", "torch", "safetensors"):
        assert f"[{name}]" in text


def test_a_package_below_its_minimum_fails_and_names_the_advisory(tmp_path: Path) -> None:
    installed = version("pillow")
    major = int(installed.split(".")[0])
    table = tmp_path / "t.toml"
    table.write_text(f'[pillow]\nmin = "{major + 1}.0.0"\nadvisories = ["CVE-0000-0001: planted for the test"]\n')
    out = run_audit(table)
    assert out.returncode == 1
    assert f"pillow {installed} is below the safe minimum {major + 1}.0.0" in out.stderr
    assert "CVE-0000-0001" in out.stderr


def test_a_listed_package_that_is_not_installed_fails(tmp_path: Path) -> None:
    table = tmp_path / "t.toml"
    table.write_text('[no-such-package-nsfw-index]\nmin = "1.0"\nadvisories = []\n')
    out = run_audit(table)
    assert out.returncode == 1 and "not installed" in out.stderr
