"""Library warnings captured during a long CLI run, so that progress bars stay whole: counted, shown with `-v`."""

# What is captured: Python warnings (Pillow's among them) and WARNING log records of this process, and whatever C
# libraries (libtiff, FAISS training) or the decoder processes (they inherit the descriptor) write to stderr. File
# descriptor 2 points at a temporary file for the run; the progress bar and the run's own messages go to a copy of
# the real stderr (`Captured.stream`). A run that fails replays what was captured, so nothing is lost.

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO

#: At most this many captured warnings are kept as text (all are counted).
KEEP = 1000


@dataclass
class Captured:
    """What a run wrote besides its own output: `stream` is the real stderr (for the bar and messages)."""

    stream: IO[str]
    lines: list[str] = field(default_factory=list)
    count: int = 0

    def add(self, text: str) -> None:
        self.count += 1
        if len(self.lines) < KEEP:
            self.lines.append(text)

    def say(self, message: str) -> None:
        """A message of the run itself, on the real stderr."""
        print(message, file=self.stream, flush=True)


class _Records(logging.Handler):
    def __init__(self, captured: Captured) -> None:
        super().__init__(logging.WARNING)
        self.captured = captured

    def emit(self, record: logging.LogRecord) -> None:
        self.captured.add(f"{record.name}: {record.getMessage()}")


def _entries(text: str) -> list[str]:
    """Captured stderr text as entries: an indented line (a warning's source line, a traceback) continues the last."""
    out: list[str] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        if out and line[:1].isspace():
            out[-1] += "\n" + line
        else:
            out.append(line)
    return out


@contextlib.contextmanager
def capture_warnings(enabled: bool = True) -> Iterator[Captured]:
    """Capture library warnings for the duration (see the module comment). Disabled: nothing is redirected."""
    if not enabled:
        yield Captured(sys.stderr)
        return
    sys.stderr.flush()
    saved = os.dup(2)
    real = os.fdopen(os.dup(saved), "w", buffering=1, encoding="utf-8", errors="replace")
    captured = Captured(real)
    handler = _Records(captured)
    root = logging.getLogger()
    failed = False
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        root.addHandler(handler)
        try:
            with warnings.catch_warnings(record=True) as recorded:
                warnings.simplefilter("always")
                try:
                    yield captured
                finally:
                    for w in recorded:
                        captured.add(f"{w.category.__name__}: {w.message} ({os.path.basename(w.filename)}:{w.lineno})")
        except BaseException:
            failed = True
            raise
        finally:
            root.removeHandler(handler)
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            for entry in _entries(tmp.read().decode("utf-8", "replace")):
                captured.add(entry)
            if failed:  # replay: a failing run shows everything that might explain it
                for line in captured.lines:
                    print(line, file=sys.stderr)
            real.flush()
