"""`build_engine`: settings -> the chosen backend with the model's identity and preprocessing, from the export cache
when it holds the graph (then no torch model is built at all), else exporting once."""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

from indexer.backends.base import Backend, Choice, choose
from indexer.backends.cache import ExportCache, cache_root
from indexer.backends.export import (
    ONNX_FILE,
    OPSET,
    OV_INT8_FILE,
    calibration_batches,
    export_onnx,
    quantize_onnxruntime,
    quantize_openvino,
)
from indexer.backends.runtimes import OnnxRuntimeBackend, OpenVinoBackend, TorchBackend
from indexer.model import LoadedModel, eval_transform, load_model, resolve_checkpoint, sha256_file
from search.policy import ModelIdentity
from search.settings import Settings


@dataclass
class Engine:
    """A loaded backend and what the extractor needs beside it."""

    backend: Backend
    identity: ModelIdentity
    data_config: dict[str, Any]
    choice: Choice
    artifacts: list[str] = field(default_factory=list)  # cache directories used
    built: list[str] = field(default_factory=list)  # artifacts built by this load (first use)
    load_seconds: float = 0.0

    def describe(self) -> dict[str, Any]:
        """backend, dtype, device, runtime version: what a run records and `stats` shows."""
        return {
            "backend": self.choice.backend,
            "dtype": self.choice.dtype,
            "device": self.choice.device,
            "runtime": runtime_version(self.choice.backend),
        }


def _to_stderr(message: str) -> None:
    print(f"nsfw-index: {message}", file=sys.stderr, flush=True)


def runtime_version(backend: str) -> str:
    return f"{backend} {version(backend)}"


def onnx_artifact() -> str:
    return f"onnx-fp32-torch{version('torch')}-opset{OPSET}"


def int8_artifact(backend: str) -> str:
    if backend == "openvino":
        return f"openvino-int8-ov{version('openvino')}-nncf{version('nncf')}"
    return f"onnxruntime-int8-ort{version('onnxruntime')}"


def build_engine(
    settings: Settings, loaded: LoadedModel | None = None, *, say: Callable[[str], None] | None = None
) -> Engine:
    """The backend `settings` ask for (`backend`, `dtype`, `device`, `threads`, `cache_dir`). `loaded` reuses a
    torch model already in memory; `say` gets one line before a graph is built for the first time."""
    t0 = time.perf_counter()
    if say is None:
        say = _to_stderr
    device = settings.resolved_device()
    choice = choose(settings.backend, settings.dtype, device)
    if choice.backend == "torch":
        lm = loaded or load_model(settings.model, settings.arch)
        backend: Backend = TorchBackend(lm.model, choice.dtype, device, settings.threads)
        return Engine(backend, lm.identity, lm.data_config, choice, load_seconds=time.perf_counter() - t0)

    if loaded is not None:
        config, sha, source = loaded.config, loaded.identity.weights_sha256, loaded.identity.source
    else:
        files = resolve_checkpoint(settings.model, settings.arch)
        config, sha, source = files.config, sha256_file(files.weights), files.source
    cache = ExportCache(cache_root(settings.cache_dir), sha, config)
    holder: dict[str, LoadedModel] = {"model": loaded} if loaded is not None else {}

    def torch_model() -> LoadedModel:
        if "model" not in holder:
            holder["model"] = load_model(settings.model, settings.arch)
            if holder["model"].identity.weights_sha256 != sha:
                raise RuntimeError("the weights file changed while it was being loaded; run again")
        return holder["model"]

    def build_onnx(tmp: Path) -> dict[str, Any]:
        lm = torch_model()
        export_onnx(lm.model, tuple(lm.data_config["input_size"]), tmp / ONNX_FILE)
        ident = lm.identity.as_dict()
        ident.pop("source")
        return {"identity": ident, "data_config": lm.data_config, "opset": OPSET, "torch": version("torch")}

    used, built = [], []
    onnx_dir, meta, fresh = cache.get_or_build(onnx_artifact(), build_onnx, say=say)
    used.append(str(onnx_dir))
    if fresh:
        built.append(onnx_artifact())
    identity = ModelIdentity(
        **{**meta["identity"], "label_names": tuple(meta["identity"]["label_names"])}, source=source
    )
    data_config = dict(meta["data_config"])
    holder.clear()  # the torch model is not needed once the graph exists
    gc.collect()

    path = onnx_dir / ONNX_FILE
    if choice.dtype == "int8":

        def build_int8(tmp: Path) -> dict[str, Any]:
            batches = calibration_batches(eval_transform(data_config))
            quantize = quantize_openvino if choice.backend == "openvino" else quantize_onnxruntime
            info = quantize(onnx_dir / ONNX_FILE, tmp, batches)
            return {**info, "calibration_images": len(batches), "source_export": onnx_artifact()}

        int8_dir, _, fresh = cache.get_or_build(int8_artifact(choice.backend), build_int8, say=say)
        used.append(str(int8_dir))
        if fresh:
            built.append(int8_artifact(choice.backend))
        path = int8_dir / (OV_INT8_FILE if choice.backend == "openvino" else ONNX_FILE)

    if choice.backend == "openvino":
        backend = OpenVinoBackend(path, choice.dtype, cache.dir / "openvino-blobs", settings.threads)
    else:
        backend = OnnxRuntimeBackend(path, choice.dtype, settings.threads)
    return Engine(backend, identity, data_config, choice, used, built, time.perf_counter() - t0)
