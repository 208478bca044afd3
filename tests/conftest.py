"""Shared fixtures: a tiny EVA-02 checkpoint in exactly the Freepik layout, and generated images."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Exported graphs (indexer/backends) go to a cache of this test session, never the user's ~/.cache; the CLI and server
# subprocesses of the tests inherit it, so each checkpoint is exported once per session.
os.environ.setdefault("NSFW_INDEX_CACHE_DIR", tempfile.mkdtemp(prefix="nsfw-index-test-cache-"))

ARCH = "eva02_base_patch14_448.mim_in22k_ft_in22k_in1k"
# The real architecture name, shrunk through config.json's `model_args` (honoured by transformers and by us).
SMALL_MODEL_ARGS = {"img_size": 56, "embed_dim": 64, "depth": 2, "num_heads": 2}
LABELS = ["neutral", "low", "medium", "high"]


def make_checkpoint(
    directory: Path, *, layout: str = "prefixed", seed: int = 0, num_classes: int = 4, full_size: bool = False
) -> Path:
    """Write config.json + model.safetensors with transformers' TimmWrapperForImageClassification.save_pretrained.

    layout "prefixed": keys `timm_model.*` as transformers 5 writes them; "bare": plain timm keys as 4.x wrote them.
    full_size: the real architecture at 448x448 (random weights: for timing the real compute, never for answers).
    """
    import timm
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    pretrained_cfg = dict(timm.models.get_pretrained_cfg(ARCH).to_dict())
    pretrained_cfg.pop("num_classes", None)
    if not full_size:
        pretrained_cfg["input_size"] = (3, SMALL_MODEL_ARGS["img_size"], SMALL_MODEL_ARGS["img_size"])
    config = TimmWrapperConfig(
        architecture=ARCH,
        num_labels=num_classes,
        label_names=(LABELS if num_classes == 4 else [f"c{i}" for i in range(num_classes)]),
        pretrained_cfg=pretrained_cfg,
        model_args=None if full_size else SMALL_MODEL_ARGS,
    )
    torch.manual_seed(seed)
    model = TimmWrapperForImageClassification(config)
    with torch.no_grad():  # a head with real spread, so that images get different levels
        model.timm_model.head.weight.normal_(0.0, 0.5)
        model.timm_model.head.bias.normal_(0.0, 0.5)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    weights = directory / "model.safetensors"
    state = load_file(weights)
    assert all(k.startswith("timm_model.") for k in state), "transformers changed its key layout"
    if layout == "bare":
        save_file(
            {k[len("timm_model.") :]: v.contiguous() for k, v in state.items()}, weights, metadata={"format": "pt"}
        )
    elif layout != "prefixed":
        raise ValueError(layout)
    json.loads((directory / "config.json").read_text())  # written and readable
    return directory


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight EVA-02 in the transformers-5 (prefixed) Freepik layout. A test fixture, never a default."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "prefixed")


@pytest.fixture(scope="session")
def bare_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "bare", layout="bare")


def photo(seed: int, size: tuple[int, int] = (96, 80)) -> Image.Image:
    """A synthetic 'photo': smooth random colour field plus shapes, distinct per seed."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        fx, fy, ph = rng.uniform(0.02, 0.25), rng.uniform(0.02, 0.25), rng.uniform(0, 6.28)
        img[..., c] = 127 + 120 * np.sin(fx * xx + ph) * np.cos(fy * yy + ph * c)
    for _ in range(4):
        x0, y0 = rng.integers(0, w - 10), rng.integers(0, h - 10)
        img[y0 : y0 + rng.integers(5, 30), x0 : x0 + rng.integers(5, 30)] = rng.integers(0, 255, 3)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


@pytest.fixture
def images_dir(tmp_path: Path) -> Path:
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(6):
        photo(i).save(d / f"img{i}.png")
    return d


@pytest.fixture(scope="session")
def settings_for(checkpoint: Path):
    """Settings for the tiny checkpoint: CPU, decode in-process (fast tests); override fields as keyword arguments."""
    from search.settings import Settings

    def make(**kw: object) -> Settings:
        base: dict[str, object] = {"model": str(checkpoint), "device": "cpu", "workers": 0, "batch_size": 8}
        base.update(kw)
        return Settings(**base)

    return make


@pytest.fixture(scope="session")
def extractor(checkpoint: Path, settings_for):
    from indexer.extractor import Extractor

    return Extractor.from_settings(settings_for())


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120, check: bool = False):
    """Run the real console script in a subprocess; returns CompletedProcess (text)."""
    import subprocess
    import sys

    exe = Path(sys.executable).parent / "nsfw-index"
    full_env = {**os.environ, **(env or {})}
    p = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout, env=full_env)
    if check and p.returncode != 0:
        raise AssertionError(f"nsfw-index {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def save_family(img: Image.Image, d: Path, stem: str) -> list[Path]:
    """The original plus near-duplicates a re-uploader makes: resized, re-encoded JPEG, slightly cropped."""
    import io

    d.mkdir(parents=True, exist_ok=True)
    out = [d / f"{stem}.png", d / f"{stem}_small.png", d / f"{stem}_q70.jpg", d / f"{stem}_crop.png"]
    img.save(out[0])
    img.resize((img.width * 3 // 4, img.height * 3 // 4), Image.BICUBIC).save(out[1])
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=70)
    out[2].write_bytes(buf.getvalue())
    img.crop((1, 1, img.width - 1, img.height - 1)).save(out[3])
    return out


def index_dir(store_dir: Path, inputs: list[str], settings, **kw: object):
    """Index into the store at `store_dir` as the CLI does: open it with its writer lock, run, close."""
    from indexer.service import index_inputs
    from search.store import Store

    with Store.writing(store_dir, "nsfw-index index", create=True) as store:
        return index_inputs(store, inputs, settings, **kw)
