"""The export cache: one directory per artifact, keyed by the weights' sha256, the backend, the dtype and the runtime
version, built once (atomically, under a lock, with a message) and reused after."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import Any

from search.errors import InvalidArgument

log = logging.getLogger(__name__)

META = "meta.json"


def cache_root(configured: Path | None) -> Path:
    """`--cache-dir` / NSFW_INDEX_CACHE_DIR, else $XDG_CACHE_HOME/nsfw-index, else ~/.cache/nsfw-index."""
    if configured is not None:
        return Path(configured).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "nsfw-index"


def config_digest(config: dict[str, Any]) -> str:
    """A short digest of the checkpoint's config: the same weights under another preprocessing are another export."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]


class ExportCache:
    """`<root>/exports/<weights sha256>/<config digest>/<artifact>/` holding the artifact's files and `meta.json`
    (written last: a directory without it is never used)."""

    def __init__(self, root: Path, weights_sha256: str, config: dict[str, Any]) -> None:
        self.dir = root / "exports" / weights_sha256 / config_digest(config)

    def path(self, artifact: str) -> Path:
        return self.dir / artifact

    def meta(self, artifact: str) -> dict[str, Any] | None:
        """The artifact's meta.json, or None when it is missing or unreadable (then it is built again)."""
        try:
            meta = json.loads((self.path(artifact) / META).read_text())
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) else None

    def get_or_build(
        self, artifact: str, build: Callable[[Path], dict[str, Any]], *, say: Callable[[str], None] | None = None
    ) -> tuple[Path, dict[str, Any], bool]:
        """(directory, meta, built_now). `build(tmpdir)` writes the files into tmpdir and returns the meta; the
        directory is renamed into place, so a crash or a concurrent builder never leaves a half-written artifact."""
        meta = self.meta(artifact)
        if meta is not None:
            return self.path(artifact), meta, False
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InvalidArgument(f"cannot create the export cache {self.dir} ({e}); set --cache-dir") from e
        with _locked(self.dir / f".{artifact}.lock"):
            meta = self.meta(artifact)  # built by another process while we waited
            if meta is not None:
                return self.path(artifact), meta, False
            if say is not None:
                say(f"building the {artifact} graph once (cached in {self.dir}) ...")
            t0 = time.perf_counter()
            tmp = Path(tempfile.mkdtemp(prefix=f".{artifact}.", dir=self.dir))
            try:
                with _stdout_to_stderr():  # exporters and NNCF print progress: never into a `--json` stdout
                    meta = dict(build(tmp))
                meta["build_seconds"] = round(time.perf_counter() - t0, 2)
                meta["built_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                (tmp / META).write_text(json.dumps(meta, indent=1, default=str))
                final = self.path(artifact)
                if final.exists():  # a directory without meta.json: an earlier crash; replace it
                    shutil.rmtree(final)
                os.replace(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            log.info("built %s in %.1f s", artifact, meta["build_seconds"])
            return final, json.loads((final / META).read_text()), True  # the JSON form, as a later reuse reads it


@contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send file descriptor 1 (and sys.stdout) to stderr for the duration: what libraries print while building."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
