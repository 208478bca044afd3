"""The one settings object: flag > environment (NSFW_INDEX_*) > default; `None` means "use the default"."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

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
    dtype: Literal["fp32", "bf16"] | None = None  # None: fp32 on cpu, bf16 on cuda
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

    @field_validator("index_factory")
    @classmethod
    def _factory_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("index_factory must not be empty (use 'Flat' for exact search)")
        return v.strip()

    @classmethod
    def from_flags(cls, **flags: Any) -> Settings:
        """Flags given as None are left out so the environment and the defaults apply."""
        return cls(**{k: v for k, v in flags.items() if v is not None})

    def resolved_device(self) -> str:
        if self.device is not None:
            return self.device
        try:
            import torch
        except ImportError:  # pragma: no cover - search-only installs
            return "cpu"
        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_dtype(self) -> str:
        if self.dtype is not None:
            return self.dtype
        return "bf16" if self.resolved_device() == "cuda" else "fp32"

    def resolved_workers(self) -> int:
        if self.workers is not None:
            return self.workers
        import os

        return max(1, (os.cpu_count() or 2) - 1)
