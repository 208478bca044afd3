"""`nsfw-index` with a FAISS checkpoint after every batch and a slow fsync: kills can land while a checkpoint's
temp file exists. Used by test_kills.py as `python slow_checkpoint.py index ...`."""

from __future__ import annotations

import os
import sys
import time

import indexer.pipeline as pipeline

pipeline.FAISS_CHECKPOINT_SECONDS = 0.0  # type: ignore[misc]
_fsync = os.fsync


def _slow_fsync(fd: int) -> None:
    time.sleep(0.05)
    _fsync(fd)


os.fsync = _slow_fsync

if __name__ == "__main__":
    from indexer.cli import cli

    cli(sys.argv[1:], prog_name="nsfw-index")
