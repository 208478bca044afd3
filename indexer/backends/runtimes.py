"""The three runtimes: torch (the hooked module itself), onnxruntime and OpenVINO (the exported two-output graph)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from indexer.backends.base import native_bf16
from search.errors import InvalidArgument

TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


class TorchBackend:
    """The timm module in eval mode; the pooled feature comes from `PooledFeatureHook` in the same forward."""

    name = "torch"

    def __init__(self, model: Any, dtype: str, device: str, threads: int | None = None) -> None:
        import torch

        if device == "cuda" and not torch.cuda.is_available():
            raise InvalidArgument("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
        if threads:
            torch.set_num_threads(threads)
        self.dtype, self.device = dtype, device
        self._torch_dtype = getattr(torch, TORCH_DTYPES[dtype])
        self._device = torch.device(device)
        self.model = model.to(self._device, self._torch_dtype).eval()

    def forward(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch

        from indexer.hooks import PooledFeatureHook

        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch))
            if self._device.type == "cuda":
                x = x.pin_memory()
            x = x.to(self._device, self._torch_dtype, non_blocking=True)
            with PooledFeatureHook(self.model) as hook:
                logits = self.model(x)
                pooled = hook.pop()
            return logits.float().cpu().numpy(), pooled.float().cpu().numpy()


class OnnxRuntimeBackend:
    """An ONNX graph with inputs `pixels` and outputs `logits`, `pooled` on onnxruntime's CPU provider."""

    name = "onnxruntime"

    def __init__(self, path: Path, dtype: str, threads: int | None = None) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            so.intra_op_num_threads = threads
        self.dtype, self.device = dtype, "cpu"
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    def forward(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # one image per run: on the CPU a larger batch is no faster per image, and its intermediate tensors (the
        # 1025x1025 attention maps of every head) multiply the peak memory by the batch size
        outs = [self.session.run(["logits", "pooled"], {"pixels": _one(batch, i)}) for i in range(len(batch))]
        return _stacked(outs)


class OpenVinoBackend:
    """An ONNX graph (fp32, run in bf16 by the inference-precision hint) or an NNCF int8 IR, reshaped to one image
    per request and compiled for the CPU; compiled blobs are cached by OpenVINO itself under `blob_cache`."""

    name = "openvino"

    def __init__(self, path: Path, dtype: str, blob_cache: Path, threads: int | None = None) -> None:
        import openvino as ov

        core = ov.Core()
        model = core.read_model(str(path))
        shape = model.input(0).get_partial_shape()
        shape[0] = 1  # static: faster to compile and run, and the peak memory of one image (6 GB less at batch 16)
        model.reshape({0: shape})
        config: dict[str, Any] = {
            "PERFORMANCE_HINT": "LATENCY",
            # fp32: f32 throughout. int8: the ops NNCF left unquantised (softmax, norms, the attention products) run in
            # bf16 where the CPU has it natively (0.25 s against 0.27 s an image here), else f32
            "INFERENCE_PRECISION_HINT": "bf16" if dtype == "bf16" or (dtype == "int8" and native_bf16()) else "f32",
            "CACHE_DIR": str(blob_cache),
        }
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.dtype, self.device = dtype, "cpu"
        self.compiled = core.compile_model(model, "CPU", config)
        self._request = self.compiled.create_infer_request()
        self._outputs = [self.compiled.output(name) for name in ("logits", "pooled")]
        self._lock = threading.Lock()  # one infer request: callers from several threads take turns

    def forward(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        outs = []
        with self._lock:
            for i in range(len(batch)):
                res = self._request.infer({0: _one(batch, i)})
                outs.append([res[o] for o in self._outputs])  # infer() returns copies of the outputs
        return _stacked(outs)


def _one(batch: np.ndarray, i: int) -> np.ndarray:
    return np.ascontiguousarray(batch[i : i + 1], np.float32)


def _stacked(outs: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Per-image (logits, pooled) pairs -> the batch's two float32 arrays."""
    if not outs:
        raise ValueError("an empty batch")
    logits = np.concatenate([np.asarray(o[0], np.float32) for o in outs])
    pooled = np.concatenate([np.asarray(o[1], np.float32) for o in outs])
    return logits, pooled
