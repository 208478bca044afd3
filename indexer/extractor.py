"""One forward pass per batch giving the 4 probabilities, the Freepik scores, the verdict and the pooled embedding."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from indexer.backends import Engine, build_engine
from indexer.model import LoadedModel, eval_transform
from indexer.prepare import Prepared
from search.answers import Levels, Nsfw
from search.errors import InvalidArgument
from search.policy import ModelIdentity, is_nsfw
from search.scores import as_level_dict, cumulative_scores, level_of
from search.settings import LEVELS, Settings
from search.store import ImageRecord

log = logging.getLogger(__name__)


@dataclass
class ImageResult:
    """What the model says about one image."""

    probabilities: dict[str, float]
    scores: dict[str, float]
    level: str
    is_nsfw: bool
    embedding: np.ndarray  # float32, L2-normalised

    def to_record(
        self, *, sha256: str, size: int, width: int, height: int, format: str, pdq: str | None, pdq_quality: int | None
    ) -> ImageRecord:
        """The store row for this result and the image facts the decoder found."""
        return ImageRecord(
            sha256=sha256,
            size=size,
            width=width,
            height=height,
            format=format,
            probabilities=[self.probabilities[k] for k in LEVELS],
            scores=[self.scores[k] for k in LEVELS],
            level=self.level,
            embedding=self.embedding,
            pdq=pdq,
            pdq_quality=pdq_quality,
        )

    def nsfw(self) -> Nsfw:
        """The classifier's answer (`score --json` prints it; `query` nests it under `nsfw`)."""
        return Nsfw(
            probabilities=Levels.of(self.probabilities),
            scores=Levels.of(self.scores),
            level=self.level,  # one of LEVELS (level_of); pydantic checks it
            is_nsfw=self.is_nsfw,
        )

    def embedding_json(self) -> list[float]:
        return [float(x) for x in self.embedding]


CUDA_BATCH_SIZE = 64


class Extractor:
    """Holds the chosen backend (`indexer.backends`: torch, onnxruntime or OpenVINO, fp32/bf16/int8). `run` is the one
    forward path: `run_prepared` (prepared images, what every caller uses), `run_tensors` and `extract` (decoded RGB
    images) all batch into it."""

    def __init__(
        self,
        loaded: LoadedModel | Engine | None,
        settings: Settings | None = None,
        *,
        say: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings or Settings()
        engine = loaded if isinstance(loaded, Engine) else build_engine(self.settings, loaded, say=say)
        if tuple(engine.identity.label_names) != ("neutral", "low", "medium", "high"):
            raise InvalidArgument(
                f"the model's labels are {list(engine.identity.label_names)}; nsfw-index needs the 4 Freepik levels "
                "neutral, low, medium, high in that order"
            )
        self.engine = engine
        self.backend = engine.backend
        self.identity: ModelIdentity = engine.identity
        self.data_config = engine.data_config
        self.transform = eval_transform(self.data_config)
        self.device = engine.choice.device
        self.dtype = engine.choice.dtype
        # images per forward pass: --batch-size when given; else 64 on CUDA (bf16 keeps a GPU busy only at large
        # batches) and the settings' default on the CPU (no gain from larger batches there: benchmarks/README.md)
        given = "batch_size" in self.settings.model_fields_set
        self.batch_size = self.settings.batch_size if given or self.device != "cuda" else CUDA_BATCH_SIZE

    @classmethod
    def from_settings(cls, settings: Settings, *, say: Callable[[str], None] | None = None) -> Extractor:
        """Load the model on the backend and dtype `settings` choose (an export is built once, then cached)."""
        return cls(None, settings, say=say)

    def describe(self) -> dict[str, str]:
        """backend, dtype, device and runtime: recorded with every run."""
        return self.engine.describe()

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """The model's own eval transform (timm `resolve_data_config` + `create_transform`)."""
        return self.transform(image)

    def forward(self, batch: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits and raw pooled features (before normalisation) of one preprocessed batch, in one pass."""
        x = batch.numpy() if isinstance(batch, torch.Tensor) else batch
        return self.backend.forward(np.asarray(x, np.float32))

    def run(self, batch: torch.Tensor | np.ndarray) -> list[ImageResult]:
        """Results for one preprocessed batch (N, 3, H, W)."""
        if batch.ndim != 4:
            raise InvalidArgument(f"expected a batch of shape (N, 3, H, W), got {tuple(batch.shape)}")
        logits, pooled = self.forward(batch)
        return results_from_outputs(logits, pooled, self.settings)

    def run_prepared(self, items: Sequence[Prepared]) -> list[ImageResult]:
        """Results for prepared images (`indexer.prepare`), in order, batched by `batch_size`."""
        out: list[ImageResult] = []
        bs = self.batch_size
        for i in range(0, len(items), bs):
            out.extend(self.run(np.stack([p.tensor for p in items[i : i + bs]])))
        return out

    def run_tensors(self, tensors: Sequence[torch.Tensor]) -> list[ImageResult]:
        """Results for preprocessed (3, H, W) tensors, batched by `batch_size`."""
        out: list[ImageResult] = []
        bs = self.batch_size
        for i in range(0, len(tensors), bs):
            out.extend(self.run(torch.stack(list(tensors[i : i + bs]))))
        return out

    def extract(self, images: Sequence[Image.Image]) -> list[ImageResult]:
        """Preprocess and run decoded RGB images in batches of `batch_size`."""
        return self.run_tensors([self.preprocess(im) for im in images])


def results_from_outputs(logits: np.ndarray, pooled: np.ndarray, settings: Settings) -> list[ImageResult]:
    """Softmax, the Freepik scores, the verdict and the L2-normalised embedding of one batch's raw outputs."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    probs = np.exp(z)
    probs /= probs.sum(axis=1, keepdims=True)
    scores = cumulative_scores(probs)
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    emb = (pooled / np.maximum(norms, 1e-12)).astype(np.float32)
    out = []
    for p, s, e in zip(probs, scores, emb, strict=True):
        sd = as_level_dict(s)
        out.append(
            ImageResult(
                probabilities=as_level_dict(p),
                scores=sd,
                level=level_of(p),
                is_nsfw=is_nsfw(sd, settings),
                embedding=e,
            )
        )
    return out
