"""The Freepik score formula and the most probable level, from the 4 softmax probabilities (no torch); the verdict
is `search.policy.is_nsfw`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from search.settings import LEVELS


def cumulative_scores(probabilities: Sequence[float] | np.ndarray) -> np.ndarray:
    """ "At least this level" scores exactly as the Freepik package computes them from the softmax p.

    neutral = p0, low = p1+p2+p3, medium = p2+p3, high = p3. Works on one vector (4,) or a batch (N, 4).
    """
    p = np.asarray(probabilities, dtype=np.float64)
    if p.shape[-1] != len(LEVELS):
        raise ValueError(f"expected {len(LEVELS)} probabilities, got {p.shape[-1]}")
    out = np.empty_like(p)
    out[..., 0] = p[..., 0]
    out[..., 3] = p[..., 3]
    out[..., 2] = p[..., 2] + p[..., 3]
    out[..., 1] = p[..., 1] + p[..., 2] + p[..., 3]
    return out


def level_of(probabilities: Sequence[float] | np.ndarray) -> str:
    """The most probable of neutral/low/medium/high."""
    return LEVELS[int(np.argmax(np.asarray(probabilities)))]


def as_level_dict(values: Sequence[float] | np.ndarray) -> dict[str, float]:
    return {name: float(v) for name, v in zip(LEVELS, values, strict=True)}
