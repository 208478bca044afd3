"""The one settings object: flag > environment (NSFW_INDEX_*) > default; `None` means "use the default"."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from search.errors import InvalidArgument

LEVELS: tuple[str, ...] = ("neutral", "low", "medium", "high")
DEFAULT_MODEL = "Freepik/nsfw_image_detector"
DEFAULT_ARCH = "eva02_base_patch14_448.mim_in22k_ft_in22k_in1k"

# Cosine similarity of L2-normalised EVA-02 pooled features at or above which two images count as near-duplicates.
# Re-encodes, resizes and small crops of one photo stay well above it; distinct photos of one scene mostly fall below.
DEFAULT_NEAR_DUPLICATE_THRESHOLD = 0.90


class Settings(BaseSettings):
    """Everything configurable. Build with `Settings.from_flags(**cli_flags)` so that `None` flags fall through."""

    model_config = SettingsConfigDict(env_prefix="NSFW_INDEX_", extra="ignore", validate_default=True)

    # where things are
    store: Path | None = None
    model: str = DEFAULT_MODEL
    arch: str | None = None  # only for a bare .safetensors file

    # inference
    device: Literal["cpu", "cuda"] | None = None  # None: cuda when available
    # issue 11: the forward pass's runtime and precision (indexer/backends/); exports cached under cache_dir
    backend: Literal["auto", "torch", "onnxruntime", "openvino"] = "auto"
    dtype: Literal["fp32", "bf16", "int8"] | None = None  # None: bf16 where the device has native bf16, else fp32
    cache_dir: Path | None = None  # None: $XDG_CACHE_HOME/nsfw-index (~/.cache/nsfw-index)
    batch_size: int = Field(16, ge=1, le=4096)
    threads: int | None = Field(None, ge=1)
    workers: int | None = Field(None, ge=0)  # decode processes; None: cores - 1, at least 1; 0: in-process

    # decoding limits
    max_file_bytes: int = Field(64 * 1024 * 1024, ge=1)
    max_pixels: int = Field(89_478_485, ge=1)  # Pillow's own bomb limit, but an error, not a warning

    # verdicts and known-unsafe
    nsfw_level: Literal["low", "medium", "high"] = "medium"
    nsfw_threshold: float = Field(0.5, ge=0.0, le=1.0)
    pdq_max_distance: int = Field(31, ge=0, le=256)
    pdq_min_quality: int = Field(0, ge=0, le=100)
    # thumbnails: blurred by default from this score at the verdict level (None: nsfw_threshold), and known-unsafe
    blur_score: float | None = Field(None, ge=0.0, le=1.0)

    # search
    k: int = Field(10, ge=1, le=1000)
    near_duplicate_threshold: float = Field(DEFAULT_NEAR_DUPLICATE_THRESHOLD, ge=-1.0, le=1.0)
    index_factory: str = "Flat"
    nprobe: int | None = Field(None, ge=1)
    ef_search: int | None = Field(None, ge=1)

    # HTTP
    api_keys: str = ""  # "KEY:right+right,KEY2:right"; rights: read, write, label, read_paths
    read_requires_key: bool = False
    queue_size: int = Field(64, ge=1)
    max_batch: int = Field(16, ge=1)
    max_wait_ms: float = Field(10.0, ge=0.0)
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1)
    reload_seconds: float = Field(2.0, gt=0.0)
    # HTTP hardening (api/limits.py, api/protocol.py, api/worker.py): every upload is decoded under these
    http_max_pixels: int = Field(50_000_000, ge=1)  # an upload's declared pixels (the CLI's cap is max_pixels)
    max_images_per_request: int = Field(16, ge=1)
    decode_pixel_budget: int = Field(150_000_000, ge=1)  # pixels being decoded or waiting for inference, server-wide
    decode_threads: int = Field(2, ge=1)  # threads preparing large uploads (one more lane for small ones)
    body_bytes_budget: int = Field(256 * 1024 * 1024, ge=1)  # request bodies being received or held, server-wide
    body_idle_seconds: float = Field(10.0, gt=0.0)  # a body read with no byte for this long: 408
    body_total_seconds: float = Field(120.0, gt=0.0)  # a whole body read taking longer: 408
    header_seconds: float = Field(10.0, gt=0.0)  # a connection without complete request headers: closed (408)
    max_connections: int = Field(64, ge=1)  # open HTTP connections; more are answered 503 at once
    # issue 14: `POST /v1/query` with {"url": ...}: off unless enabled; only http(s) hosts on the allowlist
    url_queries: bool = False
    url_allowlist: str = ""  # comma-separated host names; "*.example.com" matches subdomains
    url_allow_private: bool = False  # loopback, private, link-local and reserved addresses (tests, intranets)
    url_max_bytes: int = Field(16 * 1024 * 1024, ge=1)
    url_timeout_seconds: float = Field(10.0, gt=0.0)

    @field_validator("index_factory")
    @classmethod
    def _factory_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("index_factory must not be empty (use 'Flat' for exact search)")
        return v.strip()

    @classmethod
    def from_flags(cls, **flags: Any) -> Settings:
        """Flags given as None are left out so the environment and the defaults apply. A bad value raises
        InvalidArgument naming the flag or the `NSFW_INDEX_*` variable it came from and the values accepted."""
        given = {k: v for k, v in flags.items() if v is not None}
        try:
            return cls(**given)
        except ValidationError as e:
            raise InvalidArgument(_explain(e, given)) from None

    def resolved_device(self) -> str:
        if self.device is not None:
            return self.device
        try:
            import torch
        except ImportError:  # pragma: no cover - search-only installs
            return "cpu"
        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_workers(self) -> int:
        if self.workers is not None:
            return self.workers
        import os

        return max(1, (os.cpu_count() or 2) - 1)


def accepted_values(field: str) -> str:
    """What a setting accepts, in words: its choices, or its type and bounds."""
    info = Settings.model_fields.get(field)
    if info is None:
        return "see `nsfw-index --help`"
    kinds = [info.annotation, *get_args(info.annotation)]
    choices = [c for a in kinds if get_origin(a) is Literal for c in get_args(a)]
    if choices:
        return "one of " + ", ".join(map(str, choices))
    names = {int: "an integer", float: "a number", bool: "a boolean (1/0, true/false)", str: "text", Path: "a path"}
    kind = next((names[a] for a in kinds if a in names), "a value")
    bounds = []
    for m in info.metadata:
        for attr, word in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(m, attr, None) is not None:
                bounds.append(f"{word} {getattr(m, attr)}")
    return kind + (" " + " and ".join(bounds) if bounds else "")


def _explain(e: ValidationError, given: dict[str, Any]) -> str:
    """One line per bad setting: where the value came from (flag or environment variable), the value, what is
    accepted."""
    lines = []
    for err in e.errors():
        field = str(err["loc"][0]) if err.get("loc") else ""
        env = f"NSFW_INDEX_{field.upper()}"
        env_value = next((v for k, v in os.environ.items() if k.upper() == env), None)
        if field in given:
            where = f"--{field.replace('_', '-')} {given[field]!r}"
        elif env_value is not None:
            where = f"environment variable {env}={env_value!r}"
        else:
            where = field or "settings"
        lines.append(f"{where}: {err['msg']}; accepted: {accepted_values(field)}")
    return "; ".join(lines)
