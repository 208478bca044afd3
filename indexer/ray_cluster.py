"""Ray for `index --ray`: the options, connecting (or starting a local instance), the inference actor pool's size."""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from search.errors import InvalidArgument, NsfwIndexError
from search.settings import Settings

INSTALL_HINT = "pip install 'nsfw-index[ray]'"
_ADDRESS = re.compile(r"^(local|auto|ray://[\w.\-\[\]:]+|[\w.\-\[\]:]+:\d+)$")


class RayRunFailed(NsfwIndexError):
    """The Ray part of a run failed (a task or actor error, a lost cluster): its finished shards are kept."""

    code = "ray_run_failed"


def require_ray() -> ModuleType:
    """Ray Data, or the error that says how to install it (an optional extra)."""
    try:
        import ray
        import ray.data
    except ImportError as e:
        raise InvalidArgument(f"--ray needs Ray Data, an optional extra: {INSTALL_HINT} ({e})") from None
    return ray


@dataclass(frozen=True)
class RayOptions:
    """Where and how a run uses Ray. `address`: "local" (a new local instance), "auto" (the cluster `ray start`
    runs on this machine), HOST:PORT or ray://HOST:10001."""

    address: str = "local"
    workers: int | None = None  # inference actors; None: one per GPU share, else scaled to the CPUs
    gpus_per_worker: float = 0.0  # 0: CPU inference (the run's backend and dtype); > 0: CUDA, shares of a GPU
    shard_size: int = 1024  # new images per result shard: what a killed run resumes at
    num_cpus: int | None = None  # a new local instance's CPUs (None: all)

    def check(self) -> None:
        if not _ADDRESS.match(self.address):
            raise InvalidArgument(
                f"--ray {self.address!r} is not a Ray address: use --ray alone (a local Ray instance), --ray auto "
                "(the cluster `ray start` runs on this machine), --ray HOST:PORT or --ray ray://HOST:10001; "
                "with --ray alone, put it after the inputs (`nsfw-index index DIR --store S --ray`)"
            )
        if self.shard_size < 1 or (self.workers is not None and self.workers < 1):
            raise InvalidArgument("--ray-shard-size and --ray-workers must be at least 1")
        if self.gpus_per_worker < 0:
            raise InvalidArgument("--gpus-per-worker must be >= 0")

    @property
    def device(self) -> str:
        return "cuda" if self.gpus_per_worker > 0 else "cpu"


@dataclass
class RayReport:
    """What a Ray run used and did besides the run's counts."""

    address: str
    nodes: int = 0
    cpus: float = 0.0
    gpus: float = 0.0
    inference_workers: str = ""  # "2", or "1-4" for an autoscaling pool
    gpus_per_worker: float = 0.0
    threads_per_worker: int = 0
    shards_written: int = 0
    shards_reused: int = 0  # finished shards of an earlier, killed try: not computed again
    unfinished_runs: list[str] = field(default_factory=list)  # other runs' shards, kept to resume them

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def worker_settings(settings: Settings, **update: Any) -> Settings:
    """Settings for Ray workers: local paths made absolute (workers may start elsewhere), no store, no decoders."""
    model = Path(settings.model).expanduser()
    fixed: dict[str, Any] = {"store": None, "workers": 0, **update}
    if model.exists():
        fixed["model"] = str(model.resolve())
    if settings.cache_dir is not None:
        fixed["cache_dir"] = settings.cache_dir.expanduser().resolve()
    return settings.model_copy(update=fixed)


@contextlib.contextmanager
def session(options: RayOptions, report: RayReport, startup: dict[str, float]) -> Iterator[Any]:
    """Ray, connected (or a local instance started, and stopped afterwards; seconds in `startup["ray"]`), with Ray
    Data's progress bars and INFO lines off. A Ray already initialised in this process (a notebook, the tests) is
    used as it is."""
    ray = require_ray()
    started = not ray.is_initialized()
    if started:
        t0 = time.perf_counter()
        local = options.address == "local"
        try:
            ray.init(
                address=options.address,
                num_cpus=options.num_cpus if local else None,
                include_dashboard=False,
                logging_level=logging.WARNING,
                log_to_driver=False,
            )
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise InvalidArgument(
                f"cannot connect to Ray at {options.address!r}: {e}; start a cluster with `ray start --head` "
                "(then --ray auto), or use --ray alone for a local instance"
            ) from None
        startup["ray"] = round(time.perf_counter() - t0, 4)
    for handler in logging.getLogger("ray.data").handlers:  # its console: warnings only (its log file keeps all)
        if isinstance(handler, logging.StreamHandler):
            handler.setLevel(max(handler.level, logging.WARNING))
    try:
        ctx = ray.data.DataContext.get_current()
        for name in ("enable_progress_bars", "enable_operator_progress_bars", "print_on_execution_start"):
            if hasattr(ctx, name):
                setattr(ctx, name, False)
        resources = ray.cluster_resources()
        report.cpus, report.gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
        report.nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        yield ray
    finally:
        if started:
            ray.shutdown()


def actor_pool(
    ray: Any, options: RayOptions, report: RayReport, settings: Settings
) -> tuple[Any, dict[str, Any], Settings]:
    """The inference actor pool: its strategy, each actor's resources, and the settings it loads the model with.

    GPU actors: one per GPU share (`--gpus-per-worker`), one CPU each. CPU actors: half a node's CPUs each (or
    `--threads`), autoscaling from 1 up to half the cluster's CPUs; the other half decodes. `--ray-workers N`
    fixes the pool's size."""
    gpus = options.gpus_per_worker
    if gpus > report.gpus:
        raise InvalidArgument(f"--gpus-per-worker {gpus:g}: the Ray cluster has {report.gpus:g} GPUs")
    node_cpus = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")] or [report.cpus]
    threads = 1 if gpus > 0 else settings.threads or max(1, int(min(node_cpus)) // 2)
    if options.workers is not None:
        n = options.workers
        if n * gpus > report.gpus or n * threads > report.cpus - 1:
            raise InvalidArgument(
                f"--ray-workers {n} ({threads} CPU, {gpus:g} GPU each) do not fit the cluster's "
                f"{report.cpus:g} CPUs and {report.gpus:g} GPUs (one CPU stays for decoding)"
            )
        pool, size = ray.data.ActorPoolStrategy(size=n), str(n)
    elif gpus > 0:
        n = max(1, int(report.gpus // gpus))
        pool, size = ray.data.ActorPoolStrategy(size=n), str(n)
    else:
        n = max(1, int(report.cpus) // (2 * threads))
        pool, size = ray.data.ActorPoolStrategy(min_size=1, max_size=n), f"1-{n}" if n > 1 else "1"
    report.inference_workers, report.gpus_per_worker, report.threads_per_worker = size, gpus, threads
    resources = {"num_cpus": threads, **({"num_gpus": gpus} if gpus > 0 else {})}
    return pool, resources, worker_settings(settings, device=options.device, threads=threads)
