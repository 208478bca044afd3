"""Building the cached graphs: the two-output ONNX export of the hooked model, and the int8 graphs calibrated on the
photographs scikit-image ships."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from search.errors import InvalidArgument

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
OV_INT8_FILE = "model.xml"
OPSET = 17

#: Real photographs inside the scikit-image wheel (no download): the int8 calibration set, each also mirrored.
CALIBRATION_PHOTOS = (
    "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png", "coffee.png",
    "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png", "motorcycle_left.png",
    "motorcycle_right.png", "page.png", "retina.jpg", "rocket.jpg", "text.png", "color.png",
)  # fmt: skip


def export_onnx(model: Any, input_size: tuple[int, int, int], out: Path) -> None:
    """Trace `model` with the pooled-feature hook inside: one graph, input `pixels` (N, 3, H, W), outputs `logits`
    and `pooled` (the head's input), dynamic batch."""
    import warnings

    import torch

    from indexer.hooks import PooledFeatureHook

    class TwoOutputs(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            with PooledFeatureHook(self.inner) as hook:
                logits = self.inner(x)
                return logits, hook.pop()

    wrapper = TwoOutputs(model.float().eval()).eval()
    example = torch.zeros((1, *input_size), dtype=torch.float32)
    dyn = {"pixels": {0: "batch"}, "logits": {0: "batch"}, "pooled": {0: "batch"}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(
            wrapper,
            (example,),
            str(out),
            input_names=["pixels"],
            output_names=["logits", "pooled"],
            dynamic_axes=dyn,
            opset_version=OPSET,
            dynamo=False,
        )


def calibration_batches(transform: Any) -> list[np.ndarray]:
    """The shipped photographs and their mirror images through the model's own eval transform, one (1, 3, H, W)
    float32 array each."""
    try:
        import skimage
    except ImportError as e:
        raise InvalidArgument(
            "--dtype int8 calibrates on scikit-image's sample photographs: pip install scikit-image"
        ) from e
    from PIL import Image, ImageOps

    src = Path(skimage.__file__).parent / "data"
    out: list[np.ndarray] = []
    for name in CALIBRATION_PHOTOS:
        path = src / name
        if not path.is_file():
            continue
        with Image.open(path) as im:
            rgb = im.convert("RGB")
        for variant in (rgb, ImageOps.mirror(rgb)):
            out.append(transform(variant).numpy()[None].astype(np.float32))
    if len(out) < 16:
        raise InvalidArgument(f"only {len(out)} calibration photographs found in {src}; reinstall scikit-image")
    return out


def quantize_openvino(onnx_path: Path, out_dir: Path, batches: list[np.ndarray]) -> dict[str, Any]:
    """Static int8 (NNCF post-training quantisation, transformer preset) of the exported graph -> OpenVINO IR."""
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(onnx_path))
    quantized = nncf.quantize(
        model,
        nncf.Dataset(batches),
        model_type=nncf.ModelType.TRANSFORMER,
        subset_size=len(batches),
    )
    ov.save_model(quantized, str(out_dir / OV_INT8_FILE), compress_to_fp16=False)
    return {"method": "nncf.quantize (static, ModelType.TRANSFORMER)", "nncf": nncf.__version__}


def quantize_onnxruntime(onnx_path: Path, out_dir: Path, batches: list[np.ndarray]) -> dict[str, Any]:
    """Static int8 (QDQ, per-channel weights) of the exported graph's MatMul/Gemm/Conv for onnxruntime."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self.it, None)
            return None if x is None else {"pixels": x}

    pre = out_dir / "preprocessed.onnx"
    quant_pre_process(str(onnx_path), str(pre), skip_symbolic_shape=True)
    quantize_static(
        str(pre),
        str(out_dir / ONNX_FILE),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul", "Gemm", "Conv"],
    )
    pre.unlink()
    return {"method": "onnxruntime.quantization.quantize_static (QDQ, per-channel)"}
