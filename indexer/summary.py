"""What an index run reports: `RunSummary` (counts, stage timings, error samples) and the per-stage `Timer`."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import IO, Any

#: The counters a run records in the store and `index --json` prints, in that order.
COUNTS: tuple[str, ...] = (
    "seen",
    "unchanged",
    "new_images",
    "duplicate_paths",
    "repointed",
    "errors",
    "unchanged_errors",
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
    unchanged_errors: int = 0  # failed before, same size and mtime: not tried again (`nsfw-index errors` lists them)
    pruned_paths: int = 0
    pruned_images: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    # paid once per run, outside `timings`' stages: decoders (worker spawn + imports), model_load (weights, export
    # or cached graph, compile; paid before the run when the extractor was loaded earlier)
    startup: dict[str, float] = field(default_factory=dict)
    engine: dict[str, str] = field(default_factory=dict)  # backend, dtype, device, runtime (`Extractor.describe`)
    error_samples: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # library warnings captured during the run (`-v` shows them)

    @property
    def indexed_paths(self) -> int:
        return self.new_images + self.duplicate_paths

    @property
    def failed(self) -> int:
        """Inputs in error after this run: new failures and unchanged files that failed before."""
        return self.errors + self.unchanged_errors

    @property
    def model_share(self) -> float | None:
        """The forward pass's share of the run's wall time once started: model seconds / (total - decoder start-up).
        None when no image went through the model."""
        model = self.timings.get("model", 0.0)
        wall = self.timings.get("total", 0.0) - self.startup.get("decoders", 0.0)
        return round(model / wall, 4) if model > 0 and wall > 0 else None

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


#: What the bar shows before there is anything to count: what it is doing, and for how long.
STAGE_FORMAT = "{desc} {elapsed}"


class Progress:
    """The progress bar of a run (tqdm, on a terminal only): it says what it is doing before the first image
    ("loading model ...", "starting decoders ..."), then counts images with a rate, an ETA and the error count."""

    def __init__(self, enabled: bool = False, file: IO[str] | None = None) -> None:
        self.file = file if file is not None else sys.stderr
        isatty = getattr(self.file, "isatty", None)
        self.enabled = bool(enabled and isatty is not None and isatty())
        self._bar: Any = None

    def _make(self) -> Any:
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(
                total=None,
                unit="img",
                dynamic_ncols=True,
                file=self.file,
                disable=not self.enabled,
                leave=True,
                bar_format=STAGE_FORMAT,
            )
        return self._bar

    def stage(self, what: str) -> None:
        """Say what the run is doing now (before there is anything to count)."""
        bar = self._make()
        bar.set_description_str(what, refresh=True)

    def start(self, total: int, what: str = "indexing") -> None:
        """Start counting `total` items."""
        bar = self._make()
        bar.bar_format = None  # tqdm's bar with the rate and the ETA
        bar.reset(total=total)
        bar.set_description_str(what, refresh=True)

    def update(self, n: int = 1) -> None:
        self._make().update(n)

    def errors(self, n: int, *, refresh: bool = False) -> None:
        self._make().set_postfix(errors=n, refresh=refresh)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
