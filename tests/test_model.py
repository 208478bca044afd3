"""The Freepik checkpoint in timm: loading both key layouts, the hooked embedding, parity with transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ARCH, make_checkpoint, photo
from safetensors.torch import load_file, save_file

from indexer.extractor import Extractor
from indexer.hooks import PooledFeatureHook
from indexer.model import load_model, resolve_checkpoint
from search.errors import CheckpointMismatch, ModelNotFound
from search.scores import cumulative_scores
from search.settings import Settings


@pytest.fixture(scope="module")
def loaded(checkpoint: Path):
    return load_model(str(checkpoint))


def _batch(loaded, n: int = 3) -> torch.Tensor:
    t = loaded.transform()
    return torch.stack([t(photo(i)) for i in range(n)])


def test_both_key_layouts_load_the_same_weights(checkpoint: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(checkpoint, bare)
    state = load_file(checkpoint / "model.safetensors")
    save_file({k.removeprefix("timm_model."): v for k, v in state.items()}, bare / "model.safetensors")
    a, b = load_model(str(checkpoint)), load_model(str(bare))
    x = _batch(a)
    with torch.no_grad():
        assert torch.equal(a.model(x), b.model(x))
    assert a.identity.architecture == ARCH
    assert a.identity.weights_sha256 != b.identity.weights_sha256  # different files, recorded as such


def test_loaded_weights_are_the_files_not_random(checkpoint: Path) -> None:
    m1, m2 = load_model(str(checkpoint)), load_model(str(checkpoint))
    state = load_file(checkpoint / "model.safetensors")
    for k, v in m1.model.state_dict().items():
        assert torch.equal(v, state["timm_model." + k]), k
    x = _batch(m1)
    with torch.no_grad():
        assert torch.equal(m1.model(x), m2.model(x))


def test_hooked_embedding_is_the_pre_logits_feature_of_the_same_pass(loaded) -> None:
    model = loaded.model
    x = _batch(loaded, 4)
    with torch.no_grad(), PooledFeatureHook(model) as hook:
        logits = model(x)
        pooled = hook.pop()
    with torch.no_grad():
        ref = model.forward_head(model.forward_features(x), pre_logits=True)
        plain = model(x)
    torch.testing.assert_close(pooled, ref)
    torch.testing.assert_close(logits, plain)
    # the hook removes itself: another forward captures nothing
    assert not model.head._forward_pre_hooks
    ex = Extractor(loaded, Settings(device="cpu", backend="torch", dtype="fp32"))
    res = ex.run(x)
    want = torch.nn.functional.normalize(ref, dim=1).numpy()
    np.testing.assert_allclose(np.stack([r.embedding for r in res]), want, atol=1e-5)
    assert all(abs(np.linalg.norm(r.embedding) - 1) < 1e-5 for r in res)
    assert res[0].embedding.shape == (loaded.identity.embedding_dim,)


def test_scores_match_transformers_and_reference_formula(checkpoint: Path, tmp_path: Path) -> None:
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    files = []
    for i in range(3):
        p = tmp_path / f"{i}.jpg"
        photo(i, (120, 70)).save(p, quality=90)
        files.append(p)
    hf_model = AutoModelForImageClassification.from_pretrained(str(checkpoint)).eval()
    proc = AutoImageProcessor.from_pretrained(str(checkpoint))
    pil = [Image.open(p).convert("RGB") for p in files]
    inputs = proc(pil, return_tensors="pt")
    with torch.no_grad():
        probs = torch.softmax(hf_model(**inputs).logits, dim=-1).numpy()
    # the reference package's formula, written out independently
    ref_scores = np.stack([probs[:, 0], probs[:, 1:].sum(1), probs[:, 2:].sum(1), probs[:, 3]], axis=1)

    loaded = load_model(str(checkpoint))
    ex = Extractor(loaded, Settings(device="cpu", backend="torch", dtype="fp32", batch_size=2))
    from indexer.files import score_files

    out = list(score_files(files, ex.settings, ex))
    got_p = np.array([[r.probabilities[k] for k in ("neutral", "low", "medium", "high")] for _, r in out])
    got_s = np.array([[r.scores[k] for k in ("neutral", "low", "medium", "high")] for _, r in out])
    np.testing.assert_allclose(got_p, probs, atol=1e-5)
    np.testing.assert_allclose(got_s, ref_scores, atol=1e-5)
    np.testing.assert_allclose(cumulative_scores(probs), ref_scores, atol=1e-12)
    for (_, r), p in zip(out, probs, strict=True):
        assert r.level == ["neutral", "low", "medium", "high"][int(p.argmax())]
        assert r.is_nsfw == (r.scores["medium"] >= 0.5)
    # the preprocessed tensor is the transformers image processor's output
    ours = torch.stack([ex.preprocess(im) for im in pil])
    torch.testing.assert_close(ours, inputs["pixel_values"])


def test_preprocessing_comes_from_the_checkpoint_config(loaded) -> None:
    dc = loaded.identity.preprocessing
    assert list(dc["input_size"]) == [3, 56, 56]
    assert dc["interpolation"] == "bicubic"
    assert dc["crop_mode"] == "squash"
    np.testing.assert_allclose(dc["mean"], (0.48145466, 0.4578275, 0.40821073))


def test_results_do_not_depend_on_batch_size(loaded) -> None:
    x = _batch(loaded, 5)
    one = Extractor(loaded, Settings(device="cpu", backend="torch", dtype="fp32", batch_size=1)).run_tensors(list(x))
    five = Extractor(loaded, Settings(device="cpu", backend="torch", dtype="fp32", batch_size=5)).run_tensors(list(x))
    for a, b in zip(one, five, strict=True):
        np.testing.assert_allclose(a.embedding, b.embedding, atol=1e-5)
        for k in a.probabilities:
            assert abs(a.probabilities[k] - b.probabilities[k]) < 1e-5


def test_threshold_and_level_settings_change_the_verdict(loaded) -> None:
    x = _batch(loaded, 4)
    lax = Extractor(
        loaded, Settings(device="cpu", backend="torch", dtype="fp32", nsfw_level="low", nsfw_threshold=0.0)
    ).run(x)
    strict = Extractor(
        loaded, Settings(device="cpu", backend="torch", dtype="fp32", nsfw_level="high", nsfw_threshold=1.0)
    ).run(x)
    assert all(r.is_nsfw for r in lax)
    assert not any(r.is_nsfw for r in strict if r.scores["high"] < 1.0)


def test_head_mismatch_is_named(tmp_path: Path) -> None:
    d = make_checkpoint(tmp_path / "five", num_classes=5)
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_classes"] = 4
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointMismatch, match=r"head\.weight.*5 classes.*num_classes=4"):
        load_model(str(d))


def test_missing_tensor_is_named(checkpoint: Path, tmp_path: Path) -> None:
    d = tmp_path / "missing"
    shutil.copytree(checkpoint, d)
    state = load_file(d / "model.safetensors")
    del state["timm_model.blocks.1.mlp.fc2.weight"]
    save_file(state, d / "model.safetensors")
    with pytest.raises(CheckpointMismatch, match=r"missing tensor.*blocks\.1\.mlp\.fc2\.weight") as e:
        load_model(str(d))
    assert str(d / "model.safetensors") in str(e.value)


def test_unexpected_tensor_is_named(checkpoint: Path, tmp_path: Path) -> None:
    d = tmp_path / "extra"
    shutil.copytree(checkpoint, d)
    state = load_file(d / "model.safetensors")
    state["timm_model.surprise"] = torch.zeros(2)
    save_file(state, d / "model.safetensors")
    with pytest.raises(CheckpointMismatch, match=r"unexpected tensor.*surprise"):
        load_model(str(d))


def test_bare_safetensors_file_needs_arch(checkpoint: Path, tmp_path: Path) -> None:
    f = tmp_path / "w.safetensors"
    shutil.copy(checkpoint / "model.safetensors", f)
    with pytest.raises(ModelNotFound, match="--arch"):
        resolve_checkpoint(str(f))


def test_missing_weights_say_how_to_get_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelNotFound, match=r"hf download Freepik/nsfw_image_detector.*--model DIR"):
        load_model("Freepik/nsfw_image_detector")
    with pytest.raises(ModelNotFound, match=r"model\.safetensors"):
        load_model(str(tmp_path))


def test_hub_cache_layout_is_resolved_offline(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint placed in the HF cache the way `hf download` leaves it is found with HF_HUB_OFFLINE=1."""
    cache = tmp_path / "hub"
    snap = cache / "models--Freepik--nsfw_image_detector" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(checkpoint / name, snap / name)
    (cache / "models--Freepik--nsfw_image_detector" / "refs").mkdir()
    (cache / "models--Freepik--nsfw_image_detector" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    loaded = load_model("Freepik/nsfw_image_detector")
    assert loaded.identity.source == "Freepik/nsfw_image_detector"
    assert loaded.identity.architecture == ARCH


def test_safetensors_file_with_arch_loads_the_same_model(checkpoint: Path) -> None:
    """`--model FILE.safetensors --arch ARCH`: the file's own config.json beside it still supplies model_args."""
    by_dir = load_model(str(checkpoint))
    by_file = load_model(str(checkpoint / "model.safetensors"), arch=ARCH)
    assert by_file.identity.weights_sha256 == by_dir.identity.weights_sha256
    x = _batch(by_dir, 2)
    with torch.no_grad():
        assert torch.equal(by_dir.model(x), by_file.model(x))
