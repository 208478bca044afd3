"""Shared pieces of the verbs: the option groups, flags -> Settings, exit codes, errors -> one line and a status."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from search.errors import NsfwIndexError
from search.settings import Settings

F = TypeVar("F", bound=Callable[..., Any])

EXIT_FAILED_ITEMS = 1  # some inputs failed, the rest were processed
EXIT_ERROR = 2  # nothing done: a usage, model or store problem
EXIT_INTERRUPTED = 130


def emit(obj: dict[str, Any]) -> None:
    """One JSON object on one line of stdout."""
    click.echo(json.dumps(obj, ensure_ascii=False, allow_nan=False))


def handle_errors(fn: F) -> F:
    """NsfwIndexError -> one line on stderr and exit status 2: the message says how to fix it."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except NsfwIndexError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(EXIT_ERROR)
        except KeyboardInterrupt:
            click.echo("interrupted: what was committed is kept; run the same command again to resume", err=True)
            sys.exit(EXIT_INTERRUPTED)

    return wrapper  # type: ignore[return-value]


def model_options(fn: F) -> F:
    opts = [
        click.option(
            "--model",
            envvar="NSFW_INDEX_MODEL",
            default=None,
            help="Hugging Face repo id (default Freepik/nsfw_image_detector), a directory with config.json + "
            "model.safetensors, or a .safetensors file with --arch. Env NSFW_INDEX_MODEL.",
        ),
        click.option("--arch", default=None, help="timm architecture for a bare .safetensors file."),
        click.option("--batch-size", type=click.IntRange(1, 4096), default=None, help="Images per forward pass."),
        click.option(
            "--device", type=click.Choice(["cpu", "cuda"]), default=None, help="Default: cuda when available."
        ),
        click.option(
            "--backend",
            type=click.Choice(["auto", "torch", "onnxruntime", "openvino"]),
            default=None,
            help="Forward-pass runtime. auto (default): the fastest measured for the device and dtype (CPU: openvino, "
            "then onnxruntime, then torch; CUDA: torch). Exports are built once and cached. Env NSFW_INDEX_BACKEND.",
        ),
        click.option(
            "--dtype",
            type=click.Choice(["fp32", "bf16", "int8"]),
            default=None,
            help="Default: bf16 on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX), fp32 elsewhere. int8: the "
            "opt-in fast CPU mode (static int8 calibrated on shipped photographs). Env NSFW_INDEX_DTYPE.",
        ),
        click.option(
            "--cache-dir",
            type=click.Path(file_okay=False, path_type=Path),
            default=None,
            help="Where exported graphs are cached (default ~/.cache/nsfw-index). Env NSFW_INDEX_CACHE_DIR.",
        ),
        click.option("--threads", type=click.IntRange(1), default=None, help="Intra-op threads of the backend."),
        click.option(
            "--nsfw-level",
            type=click.Choice(["low", "medium", "high"]),
            default=None,
            help="Score that decides is_nsfw (default medium).",
        ),
        click.option(
            "--nsfw-threshold",
            type=click.FloatRange(0, 1),
            default=None,
            help="is_nsfw when the score at --nsfw-level reaches this (default 0.5).",
        ),
        click.option("--max-pixels", type=click.IntRange(1), default=None, help="Refuse images with more pixels."),
        click.option("--max-file-bytes", type=click.IntRange(1), default=None, help="Refuse larger files unread."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def search_options(fn: F) -> F:
    """Search-time knobs of an approximate index (ignored by the exact default)."""
    fn = click.option(
        "--ef-search",
        type=click.IntRange(1),
        default=None,
        help="HNSW efSearch (default max(64, the index's)). Env NSFW_INDEX_EF_SEARCH.",
    )(fn)
    return click.option(
        "--nprobe",
        type=click.IntRange(1),
        default=None,
        help="IVF lists probed per query (default 16). Env NSFW_INDEX_NPROBE.",
    )(fn)


def store_option(fn: F) -> F:
    return click.option(
        "--store",
        envvar="NSFW_INDEX_STORE",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="Store directory. Env NSFW_INDEX_STORE.",
    )(fn)


def json_option(help: str = "One JSON object.") -> Callable[[F], F]:
    return click.option("--json", "as_json", is_flag=True, help=help)


def settings_from(**flags: Any) -> Settings:
    """Flags (None: not given) over NSFW_INDEX_* environment variables over the defaults. A bad value is an
    InvalidArgument naming the flag or variable and the accepted values (exit status 2)."""
    return Settings.from_flags(**flags)


def preflight_model(settings: Settings) -> None:
    """Find the model's files before the seconds of importing torch: a missing model fails at once with the hint."""
    from indexer.model import resolve_checkpoint

    resolve_checkpoint(settings.model, settings.arch)


def verbose_option(fn: F) -> F:
    return click.option("--verbose", "-v", is_flag=True, help="Show the library warnings captured during the run.")(fn)


def require_store(settings: Settings) -> Path:
    if settings.store is None:
        raise click.UsageError("no store given: pass --store DIR or set NSFW_INDEX_STORE")
    return settings.store
