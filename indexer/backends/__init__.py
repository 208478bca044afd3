"""Forward-pass backends behind the one extractor: torch, and the exported ONNX graph on onnxruntime or OpenVINO."""

from indexer.backends.base import BACKENDS, DTYPES, Backend, Choice, choose
from indexer.backends.build import Engine, build_engine

__all__ = ["BACKENDS", "DTYPES", "Backend", "Choice", "Engine", "build_engine", "choose"]
