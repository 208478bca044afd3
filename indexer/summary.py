"""What an index run reports: `RunSummary` (counts, stage timings, error samples) and the per-stage `Timer`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

#: The counters a run records in the store and `index --json` prints, in that order.
COUNTS: tuple[str, ...] = (
    "seen",
    "unchanged",
    "new_images",
    "duplicate_paths",
    "repointed",
    "errors",
    "pruned_paths",
    "pruned_images",
)

#: How many (path, reason) pairs a summary keeps to show the user.
ERROR_SAMPLES = 20


@dataclass
class RunSummary:
    run_id: int = 0
    seen: int = 0
    unchanged: int = 0
    new_images: int = 0
    duplicate_paths: int = 0
    repointed: int = 0
    errors: int = 0
    pruned_paths: int = 0
    pruned_images: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    error_samples: list[tuple[str, str]] = field(default_factory=list)

    @property
    def indexed_paths(self) -> int:
        return self.new_images + self.duplicate_paths

    def counts(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in COUNTS}

    def add_error(self, key: str, reason: str) -> None:
        self.errors += 1
        if len(self.error_samples) < ERROR_SAMPLES:
            self.error_samples.append((key, reason))


class Timer:
    """Seconds per pipeline stage, summed over a run."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}

    def add(self, stage: str, seconds: float) -> None:
        self.totals[stage] = self.totals.get(stage, 0.0) + seconds

    def stage(self, name: str) -> _Stage:
        return _Stage(self, name)


class _Stage:
    def __init__(self, timer: Timer, name: str) -> None:
        self.timer, self.name = timer, name

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.timer.add(self.name, time.perf_counter() - self.t0)
