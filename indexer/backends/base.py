"""What a backend is (logits and the pooled feature of one batch, from one graph) and how `auto` picks one."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

import numpy as np

from search.errors import InvalidArgument

BACKENDS = ("torch", "onnxruntime", "openvino")
DTYPES = ("fp32", "bf16", "int8")

#: The fastest backend per (device, dtype) on the machines measured (benchmarks/README.md, "Backends"), first
#: installed one wins. onnxruntime has no bf16 CPU kernels; torch's own int8 is deprecated; CUDA runs torch.
AUTO_ORDER: dict[tuple[str, str], tuple[str, ...]] = {
    ("cpu", "fp32"): ("openvino", "onnxruntime", "torch"),
    ("cpu", "bf16"): ("openvino", "torch"),
    ("cpu", "int8"): ("openvino", "onnxruntime"),
    ("cuda", "fp32"): ("torch",),
    ("cuda", "bf16"): ("torch",),
}

#: The pairs each backend runs.
SUPPORTED: dict[str, frozenset[tuple[str, str]]] = {
    "torch": frozenset({("cpu", "fp32"), ("cpu", "bf16"), ("cuda", "fp32"), ("cuda", "bf16")}),
    "onnxruntime": frozenset({("cpu", "fp32"), ("cpu", "int8")}),
    "openvino": frozenset({("cpu", "fp32"), ("cpu", "bf16"), ("cpu", "int8")}),
}

#: The drift from torch fp32 each dtype is held to: (max probability difference, min embedding cosine, min share of
#: images on the same level). tests/test_backends.py asserts it on the small checkpoint for every backend;
#: benchmarks/backends.py measures it on the full-size architecture (benchmarks/README.md, "Backends").
DRIFT: dict[str, tuple[float, float, float]] = {
    "fp32": (1e-4, 0.99999, 1.0),
    "bf16": (0.05, 0.9995, 0.9),
    # int8 on the tests' 2-block, 64-wide checkpoint: 7 of its 10 images keep their level (the full-size
    # architecture: 97.6 % of 42); the documented figures per model size are in benchmarks/README.md
    "int8": (0.3, 0.99, 0.7),
}

_MODULES = {"torch": "torch", "onnxruntime": "onnxruntime", "openvino": "openvino"}


class Backend(Protocol):
    """One loaded graph. `forward` takes a preprocessed float32 batch (N, 3, H, W) and returns float32 logits (N, C)
    and the raw pooled feature the head sees (N, D), both from the same pass."""

    name: str
    dtype: str
    device: str

    def forward(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...  # batch: (N, 3, H, W), N >= 1


@dataclass(frozen=True)
class Choice:
    backend: str
    dtype: str
    device: str


def installed(backend: str) -> bool:
    return importlib.util.find_spec(_MODULES[backend]) is not None


@lru_cache(maxsize=1)
def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX): where it does, bf16 is the CPU default."""
    forced = os.environ.get("NSFW_INDEX_NATIVE_BF16")  # for tests and odd virtual CPUs: 1 or 0
    if forced in {"0", "1"}:
        return forced == "1"
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def choose(backend: str, dtype: str | None, device: str) -> Choice:
    """Resolve `--backend` (auto or a name) and `--dtype` (None: bf16 on CUDA and on CPUs with native bf16, fp32
    elsewhere) for `device`; a pair no backend runs is an InvalidArgument that says what does run."""
    if dtype is None:
        dtype = "bf16" if device == "cuda" or native_bf16() else "fp32"
    if dtype not in DTYPES:
        raise InvalidArgument(f"--dtype {dtype!r}: accepted: {', '.join(DTYPES)}")
    if backend == "auto":
        order = AUTO_ORDER.get((device, dtype), ())
        for name in order:
            if installed(name):
                return Choice(name, dtype, device)
        if not order:
            raise InvalidArgument(f"--dtype {dtype} does not run on {device}; use --dtype fp32 or bf16 there")
        raise InvalidArgument(f"--dtype {dtype} on {device} needs one of {', '.join(order)}: pip install {order[0]}")
    if backend not in BACKENDS:
        raise InvalidArgument(f"--backend {backend!r}: accepted: auto, {', '.join(BACKENDS)}")
    if (device, dtype) not in SUPPORTED[backend]:
        runs = sorted(f"{dv}/{dt}" for dv, dt in SUPPORTED[backend])
        others = [b for b in BACKENDS if (device, dtype) in SUPPORTED[b]]
        hint = f"; {device}/{dtype} runs on {', '.join(others)}" if others else ""
        raise InvalidArgument(f"--backend {backend} runs {', '.join(runs)}, not {device}/{dtype}{hint}")
    if not installed(backend):
        raise InvalidArgument(f"--backend {backend} is not installed: pip install {_MODULES[backend]}")
    return Choice(backend, dtype, device)
