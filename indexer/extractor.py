"""One forward pass per batch giving the 4 probabilities, the Freepik scores, the verdict and the pooled embedding."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from indexer.hooks import PooledFeatureHook
from indexer.model import LoadedModel, load_model
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


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class Extractor:
    """Holds the model on its device. `run` is the one forward path: `run_prepared` (prepared images, what every caller
    uses), `run_tensors` and `extract` (decoded RGB images) all batch into it."""

    def __init__(self, loaded: LoadedModel, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        if tuple(loaded.identity.label_names) != ("neutral", "low", "medium", "high"):
            raise InvalidArgument(
                f"the model's labels are {list(loaded.identity.label_names)}; nsfw-index needs the 4 Freepik levels "
                "neutral, low, medium, high in that order"
            )
        self.identity: ModelIdentity = loaded.identity
        self.data_config = loaded.data_config
        self.transform = loaded.transform()
        device = self.settings.resolved_device()
        if device == "cuda" and not torch.cuda.is_available():
            raise InvalidArgument("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
        self.device = torch.device(device)
        self.dtype = _DTYPES[self.settings.resolved_dtype()]
        if self.settings.threads:
            torch.set_num_threads(self.settings.threads)
        self.model = loaded.model.to(self.device, self.dtype).eval()

    @classmethod
    def from_settings(cls, settings: Settings) -> Extractor:
        return cls(load_model(settings.model, settings.arch), settings)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """The model's own eval transform (timm `resolve_data_config` + `create_transform`)."""
        return self.transform(image)

    @torch.inference_mode()
    def forward(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Logits and raw pooled features (before normalisation) of one preprocessed batch, in one pass."""
        x = batch.to(self.device, self.dtype, non_blocking=True)
        with PooledFeatureHook(self.model) as hook:
            logits = self.model(x)
            pooled = hook.pop()
        return logits.float().cpu().numpy(), pooled.float().cpu().numpy()

    def run(self, batch: torch.Tensor) -> list[ImageResult]:
        """Results for one preprocessed batch (N, 3, H, W)."""
        if batch.ndim != 4:
            raise InvalidArgument(f"expected a batch of shape (N, 3, H, W), got {tuple(batch.shape)}")
        logits, pooled = self.forward(batch)
        return results_from_outputs(logits, pooled, self.settings)

    def run_prepared(self, items: Sequence[Prepared]) -> list[ImageResult]:
        """Results for prepared images (`indexer.prepare`), in order, batched by `settings.batch_size`."""
        out: list[ImageResult] = []
        bs = self.settings.batch_size
        for i in range(0, len(items), bs):
            out.extend(self.run(torch.from_numpy(np.stack([p.tensor for p in items[i : i + bs]]))))
        return out

    def run_tensors(self, tensors: Sequence[torch.Tensor]) -> list[ImageResult]:
        """Results for preprocessed (3, H, W) tensors, batched by `settings.batch_size`."""
        out: list[ImageResult] = []
        bs = self.settings.batch_size
        for i in range(0, len(tensors), bs):
            out.extend(self.run(torch.stack(list(tensors[i : i + bs]))))
        return out

    def extract(self, images: Sequence[Image.Image]) -> list[ImageResult]:
        """Preprocess and run decoded RGB images in batches of `settings.batch_size`."""
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
